"""The KV compressor: token-level gated pooling of every `ratio` tokens into one entry (spec §3.4, §3.5).

HCA (ratio 128): entry w = sum over tokens s of window w of softmax_s(z_s) * a_s, per channel.
CSA (ratio 4, overlapping): entry w pools 8 slots, the A-halves of window w-1 and the B-halves of window w.
New entries are bf16-rounded, RMS-normed, RoPE'd at position w*ratio and quantization-simulated: FP8 on the
non-rope dims for the main compressor, Hadamard + MXFP4 for the indexer's.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.kernels import quant
from dsv4.model.batch import ForwardBatch
from dsv4.model.config import ModelConfig
from dsv4.model.kv_state import CompressorGeometry, CompressorState
from dsv4.model.layers import Linear, RMSNorm, WeightFormat, apply_rope
from dsv4.model.numerics import Numerics, softmax


def pool_chunk(state: CompressorState, a: torch.Tensor, z: torch.Tensor, start: int, g: CompressorGeometry
               ) -> tuple[torch.Tensor, int]:
    """Feed one sequence's tokens at positions start.. into its compressor state.

    a, z: [n, coff*d] fp32 projections and gate scores (ape added). Returns the pooled (pre-norm) fp32 entries
    of every window completed by these tokens, [W, d], and the index of the first one. Updates `state` in place:
    the unfinished window's tokens go to the current slots; for CSA the last finished window becomes the
    previous-window slots. Works for any chunk length, so chunked prefill equals token-by-token decode.
    """
    m, d = g.ratio, g.head_dim
    held = start % m                                   # tokens of the current window already in the state
    current = m if g.overlap else 0                    # first slot of the current window
    cur_a = torch.cat([state.kv[current:current + held], a])
    cur_z = torch.cat([state.score[current:current + held], z])
    num_windows = cur_a.shape[0] // m
    pooled = a.new_zeros(0, d)
    if num_windows:
        win_a = cur_a[:num_windows * m].view(num_windows, m, -1)   # [W, m, coff*d]
        win_z = cur_z[:num_windows * m].view(num_windows, m, -1)
        if g.overlap:
            prev_a = torch.cat([state.kv[None, :m], win_a[:-1]])   # window w-1 for each w (state for the first)
            prev_z = torch.cat([state.score[None, :m], win_z[:-1]])
            slots_a = torch.cat([prev_a[..., :d], win_a[..., d:]], dim=1)   # [W, 2m, d]
            slots_z = torch.cat([prev_z[..., :d], win_z[..., d:]], dim=1)
            state.kv[:m], state.score[:m] = win_a[-1], win_z[-1]
        else:
            slots_a, slots_z = win_a, win_z
        pooled = (slots_a.double() * softmax(slots_z, dim=1).double()).sum(dim=1).float()
    tail = cur_a.shape[0] - num_windows * m
    state.kv[current:current + tail] = cur_a[num_windows * m:]
    state.score[current:current + tail] = cur_z[num_windows * m:]
    return pooled, (start - held) // m


class Compressor(nn.Module):
    """One compressor of one layer; `name` is its cache key ("attn" or "index")."""

    def __init__(self, config: ModelConfig, layer_id: int, geometry: CompressorGeometry, name: str,
                 rope_inv_freq: torch.Tensor):
        super().__init__()
        self.layer_id, self.geometry, self.name = layer_id, geometry, name
        self.rotate = name == "index"        # indexer keys: Hadamard + MXFP4; main entries: FP8 non-rope dims
        self.rope_dim = config.qk_rope_head_dim
        width = geometry.coff * geometry.head_dim
        # wkv / wgate are bf16 in the checkpoint and run in fp32 (the official model upcasts them).
        self.wkv = Linear(config.hidden_size, width, WeightFormat.BF16, compute="fp32")
        self.wgate = Linear(config.hidden_size, width, WeightFormat.BF16, compute="fp32")
        self.register_buffer("ape", torch.empty(geometry.ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(geometry.head_dim, config.rms_norm_eps)
        self.register_buffer("rope_inv_freq", rope_inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> None:
        """x: [T, D] attention input. Appends every newly completed entry to each sequence's cache."""
        a = self.wkv(x.float(), batch.numerics)                                     # [T, coff*d] fp32
        z = self.wgate(x.float(), batch.numerics) + self.ape[batch.positions % self.geometry.ratio]
        for chunk, rows in batch.spans():
            kv = chunk.cache.layer(self.layer_id)
            pooled, first = pool_chunk(kv.compressor_state(self.name), a[rows], z[rows], chunk.start, self.geometry)
            if pooled.shape[0]:
                kv.append_entries(self.name, first, self.finish(pooled, first, batch.numerics))

    def finish(self, pooled: torch.Tensor, first: int, numerics: Numerics) -> torch.Tensor:
        """Pooled fp32 [W, d] -> stored entries: round, RMSNorm, RoPE at w*ratio, quantization simulation."""
        entries = self.norm(numerics.act(pooled), numerics)
        positions = (torch.arange(pooled.shape[0], device=pooled.device) + first) * self.geometry.ratio
        entries = apply_rope(entries, positions, self.rope_inv_freq)
        if not numerics.simulate_quant:
            return entries   # without quantization the indexer's Hadamard cancels in q.k, so it is skipped
        if self.rotate:
            return quant.fake_quant_fp4(quant.hadamard_rotate(entries))
        return quant.fake_quant_kv(entries, self.rope_dim)

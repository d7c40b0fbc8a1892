"""Attention of one layer: shared path + sliding window + (CSA | HCA) compressed entries (spec §3).

q = RoPE(headnorm(W_qb · RMSNorm(W_qa x))); one shared KV head kv = RoPE(RMSNorm(W_kv x)) used as key and value
(K = V); each query attends to its window (positions t-127..t) plus compressed entries (all visible ones for HCA,
the indexer's top-k for CSA) with a per-head sink; the output's rope dims are rotated back by -t, then the grouped
output projection wo_a (per head group) and wo_b.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.kernels import quant
from dsv4.model.batch import ForwardBatch
from dsv4.model.compressor import Compressor
from dsv4.model.config import CSA_RATIO, ModelConfig
from dsv4.model.indexer import Indexer
from dsv4.model.kv_state import ATTN, CompressorGeometry
from dsv4.model.layers import Linear, RMSNorm, WeightFormat, apply_rope, head_rms_normalize, rope_for_layer
from dsv4.model.numerics import Numerics, exp, matmul


def sparse_attention(q: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor, sink: torch.Tensor,
                     numerics: Numerics) -> torch.Tensor:
    """Attention with a per-head sink over a shared K = V set (the official `sparse_attn` kernel's function).

    q [n, H, d], keys [K, d], allowed [n, K] bool -> o [n, H, d] (activation dtype). Scores fp32 with scale
    d^-0.5; probabilities rounded to the activation dtype before P·V (the kernel's bf16 P); the sink adds
    exp(sink - max) to the denominator only.
    """
    n, h, d = q.shape
    scores = matmul(q.reshape(n * h, d), keys).view(n, h, -1) * d ** -0.5
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    peak = scores.amax(dim=-1, keepdim=True)                                     # [n, H, 1]; window has >= 1
    probs = exp(scores - peak)
    denom = probs.double().sum(dim=-1, keepdim=True) + torch.exp(sink.double()[None, :, None] - peak.double())
    out = torch.matmul(numerics.act(probs).double(), keys.double()) / denom
    return numerics.act(out.float())


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim, self.rope_dim = config.num_attention_heads, config.head_dim, config.qk_rope_head_dim
        self.window, self.eps = config.sliding_window, config.rms_norm_eps
        self.n_groups, self.o_lora_rank = config.o_groups, config.o_lora_rank
        self.ratio = config.compress_ratio(layer_id)
        fp8 = WeightFormat.FP8 if config.weights_quantized else WeightFormat.BF16
        d, h = config.hidden_size, self.n_heads
        self.register_buffer("attn_sink", torch.empty(h, dtype=torch.float32))
        self.wq_a = Linear(d, config.q_lora_rank, fp8)
        self.q_norm = RMSNorm(config.q_lora_rank, self.eps)
        self.wq_b = Linear(config.q_lora_rank, h * self.head_dim, fp8)
        self.wkv = Linear(d, self.head_dim, fp8)
        self.kv_norm = RMSNorm(self.head_dim, self.eps)
        # wo_a is FP8 in the checkpoint; the official converter dequantizes it and runs a bf16 einsum.
        self.wo_a = Linear(h * self.head_dim // self.n_groups, self.n_groups * self.o_lora_rank, fp8, compute="bf16")
        self.wo_b = Linear(self.n_groups * self.o_lora_rank, d, fp8)
        self.register_buffer("rope_inv_freq", rope_for_layer(config, self.ratio), persistent=False)
        self.compressor = (Compressor(config, layer_id, CompressorGeometry(self.ratio, self.head_dim), ATTN,
                                      self.rope_inv_freq) if self.ratio else None)
        self.indexer = Indexer(config, layer_id, self.rope_inv_freq) if self.ratio == CSA_RATIO else None

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [T, D] (attn_norm output) -> [T, D]."""
        num, pos = batch.numerics, batch.positions
        qr = self.q_norm(num.act(self.wq_a(x, num)), num)                                  # [T, q_lora]
        q = num.act(self.wq_b(qr, num)).view(-1, self.n_heads, self.head_dim)
        q = apply_rope(head_rms_normalize(q, self.eps, num), pos, self.rope_inv_freq)
        kv = apply_rope(self.kv_norm(num.act(self.wkv(x, num)), num), pos, self.rope_inv_freq)  # [T, d]
        if num.simulate_quant:
            kv = quant.fake_quant_kv(kv, self.rope_dim)
        selected = self.indexer(x, qr, batch) if self.indexer is not None else None
        if self.compressor is not None:
            self.compressor(x, batch)
        o = torch.empty_like(q)
        for i, (chunk, rows) in enumerate(batch.spans()):
            keys, allowed = self._keys_of(chunk.cache.layer(self.layer_id), chunk.start, kv[rows], pos[rows],
                                          None if selected is None else selected[i])
            o[rows] = sparse_attention(q[rows], keys, allowed, self.attn_sink, num)
            chunk.cache.layer(self.layer_id).write_window(chunk.start, kv[rows])
        o = apply_rope(o, pos, self.rope_inv_freq, inverse=True)
        return self._project_out(o, num)

    def _keys_of(self, cache, start: int, kv: torch.Tensor, positions: torch.Tensor,
                 selected: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk's key set: its window (cached entries before `start`, then the chunk's own) and compressed
        entries, with the mask of which each query may attend to."""
        previous = cache.window(start)
        keys = torch.cat([previous.to(kv.dtype), kv])
        key_pos = torch.arange(start - previous.shape[0], start + kv.shape[0], device=kv.device)
        allowed = (key_pos[None, :] <= positions[:, None]) & (key_pos[None, :] > positions[:, None] - self.window)
        if not self.ratio:
            return keys, allowed
        num_entries = (start + kv.shape[0]) // self.ratio
        entries = cache.entries(ATTN, num_entries).to(kv.dtype)
        if selected is None:    # HCA: every visible entry
            picked = torch.arange(num_entries, device=kv.device)[None, :] < ((positions + 1) // self.ratio)[:, None]
        else:                   # CSA: the indexer's choice (-1 = nothing)
            picked = torch.zeros(kv.shape[0], num_entries + 1, dtype=torch.bool, device=kv.device)
            picked.scatter_(1, torch.where(selected < 0, num_entries, selected), True)
            picked = picked[:, :num_entries]
        return torch.cat([keys, entries]), torch.cat([allowed, picked], dim=1)

    def _project_out(self, o: torch.Tensor, num: Numerics) -> torch.Tensor:
        """Grouped output projection: group g's heads (H/g * d wide) through rows g*r..(g+1)*r of wo_a, then wo_b."""
        t = o.shape[0]
        grouped = num.act(o).reshape(t, self.n_groups, -1).double()                           # [T, g, H/g*d]
        w = self.wo_a.dense_weight().view(self.n_groups, self.o_lora_rank, -1).double()      # [g, r, H/g*d]
        z = num.act(torch.einsum("tgk,grk->tgr", grouped, w).float())
        return num.act(self.wo_b(z.flatten(1), num))

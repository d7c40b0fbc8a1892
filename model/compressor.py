"""The KV compressor: token-level gated pooling of every `ratio` tokens into one entry (spec §3.4, §3.5).

HCA (ratio 128): entry w = sum over tokens s of window w of softmax_s(z_s) * a_s, per channel.
CSA (ratio 4, overlapping): entry w pools 8 slots, the A-halves of window w-1 and the B-halves of window w.
New entries are bf16-rounded, RMS-normed, RoPE'd at position w*ratio and stored quantized: FP8 on the non-rope
dims for the main compressor, Hadamard + MXFP4 for the indexer's (`dsv4.kernels.ops.compress_flush`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsv4.model.batch import ForwardBatch
from dsv4.model.config import ModelConfig
from dsv4.model.kv_cache import INDEX, CompressorGeometry, KVStorage
from dsv4.model.layers import Linear, RMSNorm, WeightFormat

if TYPE_CHECKING:
    from dsv4.kernels.cache_ops import BatchLayout
    from dsv4.model.numerics import Numerics


class Compressor(nn.Module):
    """One compressor of one layer; `name` is its cache key ("attn" or "index")."""

    def __init__(self, config: ModelConfig, layer_id: int, geometry: CompressorGeometry, name: str,
                 rope_inv_freq: torch.Tensor):
        super().__init__()
        self.layer_id, self.geometry, self.name = layer_id, geometry, name
        width = geometry.coff * geometry.head_dim
        # wkv / wgate are bf16 in the checkpoint and run in fp32 (the official model upcasts them).
        self.wkv = Linear(config.hidden_size, width, WeightFormat.BF16, compute="fp32")
        self.wgate = Linear(config.hidden_size, width, WeightFormat.BF16, compute="fp32")
        self.register_buffer("ape", torch.empty(geometry.ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(geometry.head_dim, config.rms_norm_eps)
        self.register_buffer("rope_inv_freq", rope_inv_freq, persistent=False)

    def projections(self, x: torch.Tensor, positions: torch.Tensor, numerics: Numerics
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, z) [T, coff*d] fp32: wkv(x) and wgate(x) + ape[positions % ratio], the two linears one after the
        other (the official order; the numerics' `project` may fuse them)."""
        a = numerics.linear(self.wkv, x).float()
        return a, numerics.linear(self.wgate, x).float() + self.ape[positions % self.geometry.ratio]

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> None:
        """x: [T, D] attention input. Stores every entry completed by these tokens in the cache."""
        num = batch.numerics
        a, z = num.compressor.project(self, x, batch.positions, num)        # [T, coff*d] fp32, z with the bias
        if batch.recorder is not None:
            batch.recorder[(self.layer_id, self.name)] = (a, z)
        self.store(a, z, batch.storage, batch.layout, num)

    def store(self, a: torch.Tensor, z: torch.Tensor, storage: KVStorage, layout: BatchLayout, numerics: Numerics
              ) -> None:
        """Feed projections (a, z) [T, coff*d] fp32 of the layout's tokens into the sequences' pooling states and
        store every entry they complete."""
        store = storage.layer(self.layer_id).compressors[self.name]
        # Indexer keys are Hadamard-rotated before MXFP4 quantization; without quantization the rotation of q
        # and k cancels in q.k, so exact-fp32 skips it.
        rotate = self.name == INDEX and numerics.simulate_quant
        numerics.compressor.flush(a, z, store.state_kv, store.state_score, layout, self.geometry.ratio,
                                  self.norm.weight, self.norm.eps, self.rope_inv_freq, rotate, store.pool,
                                  store.codec)

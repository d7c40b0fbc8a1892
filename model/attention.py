"""Attention of one layer: shared path + sliding window + (CSA | HCA) compressed entries (spec §3).

q = RoPE(headnorm(W_qb · RMSNorm(W_qa x))); one shared KV head kv = RoPE(RMSNorm(W_kv x)) used as key and value
(K = V); each query attends to its window (positions t-127..t) plus compressed entries (all visible ones for HCA,
the indexer's top-k for CSA) with a per-head sink; the output's rope dims are rotated back by -t, then the grouped
output projection wo_a (per head group) and wo_b. The window entries are appended to the ring after attention
(a chunk's own entries are read from this step's kv).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.batch import ForwardBatch
from dsv4.model.compressor import Compressor
from dsv4.model.config import CSA_RATIO, ModelConfig
from dsv4.model.indexer import Indexer
from dsv4.model.kv_cache import ATTN, CompressorGeometry
from dsv4.model.layers import Linear, RMSNorm, WeightFormat, rope_for_layer
from dsv4.model.numerics import Numerics


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.eps = config.rms_norm_eps
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
        store = batch.storage.layer(self.layer_id)
        qr = self.q_norm(num.act(self.wq_a(x, num)), num)                                  # [T, q_lora]
        q = num.act(self.wq_b(qr, num)).view(-1, self.n_heads, self.head_dim)
        q = num.math.head_norm_rope(q, pos, self.rope_inv_freq, self.eps)
        # the window entries as their FP8 storage will give them back
        kv = num.math.kv_entry(num.act(self.wkv(x, num)), self.kv_norm.weight, self.eps, pos, self.rope_inv_freq,
                               self.rope_dim)                                               # [T, d]
        chosen = self.indexer(x, qr, batch) if self.indexer is not None else None
        if self.compressor is not None:
            self.compressor(x, batch)
        o = num.attention.attend(q, kv, store, batch.layout, self.ratio, chosen, self.attn_sink, self.rope_inv_freq)
        num.attention.window_append(store.window, store.window_codec, kv, batch.layout)
        return self._project_out(o, num)

    def _project_out(self, o: torch.Tensor, num: Numerics) -> torch.Tensor:
        """Grouped output projection: group g's heads (H/g * d wide) through rows g*r..(g+1)*r of wo_a, then wo_b."""
        z = num.linear.grouped(self.wo_a, o.reshape(o.shape[0], self.n_groups, -1), self.n_groups)   # [T, g, r]
        return num.act(self.wo_b(z.flatten(1), num))

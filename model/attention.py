"""Attention of one layer: shared path + sliding window + (CSA | HCA) compressed entries (spec §3).

q = RoPE(headnorm(W_qb · RMSNorm(W_qa x))); one shared KV head kv = RoPE(RMSNorm(W_kv x)) used as key and value
(K = V); each query attends to its window (positions t-127..t) plus compressed entries (all visible ones for HCA,
the indexer's top-k for CSA) with a per-head sink; the output's rope dims are rotated back by -t, then the grouped
output projection wo_a (per head group) and wo_b.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.kernels import ops, quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.model.batch import ForwardBatch
from dsv4.model.compressor import Compressor
from dsv4.model.config import CSA_RATIO, ModelConfig
from dsv4.model.indexer import Indexer
from dsv4.model.kv_cache import ATTN, CompressorGeometry
from dsv4.model.layers import Linear, RMSNorm, WeightFormat, apply_rope, head_rms_normalize, rope_for_layer
from dsv4.model.numerics import Numerics


def visible_entries(layout: BatchLayout, ratio: int) -> torch.Tensor:
    """Every compressed entry each token may see (entry w is visible to t iff w*m + m - 1 <= t): [T, E], -1 pad.
    E comes from the block table's shape (what the blocks can hold), so no device value sets a shape: no host
    synchronisation, and CUDA graphs can capture it."""
    width = layout.block_table.shape[1] * (layout.block_size // ratio)
    visible = (layout.positions + 1) // ratio
    entries = torch.arange(width, device=visible.device)[None, :].expand(visible.shape[0], -1)
    return torch.where(entries < visible[:, None], entries, -1)


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
        q = apply_rope(head_rms_normalize(q, self.eps, num), pos, self.rope_inv_freq)
        kv = apply_rope(self.kv_norm(num.act(self.wkv(x, num)), num), pos, self.rope_inv_freq)  # [T, d]
        if num.simulate_quant:   # the window entries as their FP8 storage will give them back
            kv = quant.fake_quant_kv(kv, self.rope_dim)
        chosen = self.indexer(x, qr, batch) if self.indexer is not None else None
        if self.compressor is not None:
            self.compressor(x, batch)
        keys, valid = ops.window_gather(store.window, store.window_codec, kv, batch.layout)
        if self.ratio:
            entries = chosen if chosen is not None else visible_entries(batch.layout, self.ratio)
            main = store.compressors[ATTN]
            extra, extra_valid = ops.gather_entries(main.pool, main.codec, batch.layout, entries, self.ratio)
            keys, valid = torch.cat([keys, extra.to(keys.dtype)], dim=1), torch.cat([valid, extra_valid], dim=1)
        o = ops.sparse_attention(q, keys, valid, self.attn_sink, num.act_dtype)
        ops.window_append(store.window, store.window_codec, kv, batch.layout)
        o = apply_rope(o, pos, self.rope_inv_freq, inverse=True)
        return self._project_out(o, num)

    def _project_out(self, o: torch.Tensor, num: Numerics) -> torch.Tensor:
        """Grouped output projection: group g's heads (H/g * d wide) through rows g*r..(g+1)*r of wo_a, then wo_b."""
        t = o.shape[0]
        grouped = num.act(o).reshape(t, self.n_groups, -1).double()                           # [T, g, H/g*d]
        w = self.wo_a.dense_weight().view(self.n_groups, self.o_lora_rank, -1).double()      # [g, r, H/g*d]
        z = num.act(torch.einsum("tgk,grk->tgr", grouped, w).float())
        return num.act(self.wo_b(z.flatten(1), num))

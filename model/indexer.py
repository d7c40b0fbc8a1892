"""The lightning indexer of CSA layers: picks the top-k compressed entries for each query (spec §4).

I(t, s) = sum_h w_h(t) * ReLU(q_h(t) . K_s) over visible entries s < floor((t+1)/4). In reference mode q and K
are Hadamard-rotated and MXFP4-quantized, and the score is computed on bf16 tensors as the official code does.
Selection: the top min(index_topk, #visible); ties go to the lower entry index (the project's fixed rule; the
official GPU top-k leaves tie order to the implementation).
"""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.batch import ForwardBatch
from dsv4.model.compressor import Compressor
from dsv4.model.config import CSA_RATIO, ModelConfig
from dsv4.model.kv_cache import INDEX, CompressorGeometry
from dsv4.model.layers import Linear, WeightFormat


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, rope_inv_freq: torch.Tensor):
        super().__init__()
        self.n_heads, self.head_dim, self.topk = config.index_n_heads, config.index_head_dim, config.index_topk
        self.layer_id = layer_id
        fmt = WeightFormat.FP8 if config.weights_quantized else WeightFormat.BF16
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, fmt)
        self.weights_proj = Linear(config.hidden_size, self.n_heads, WeightFormat.BF16)
        self.compressor = Compressor(config, layer_id, CompressorGeometry(CSA_RATIO, self.head_dim), INDEX,
                                     rope_inv_freq)
        self.register_buffer("rope_inv_freq", rope_inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, qr: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x [T, D] attention input, qr [T, q_lora] q-LoRA activation -> chosen entries [T, index_topk], -1 pad."""
        num = batch.numerics
        q = num.act(self.wq_b(qr, num)).view(-1, self.n_heads, self.head_dim)
        q = num.indexer.query(q, batch.positions, self.rope_inv_freq)     # RoPE (+ Hadamard, MXFP4)
        self.compressor(x, batch)
        scale = self.head_dim ** -0.5 * self.n_heads ** -0.5
        weights = num.act(num.act(self.weights_proj(x, num)).float() * scale)
        store = batch.storage.layer(self.layer_id).compressors[INDEX]
        return num.indexer.topk(q, weights, store.pool, store.codec, batch.layout, CSA_RATIO, self.topk)

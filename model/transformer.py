"""The DeepSeek-V4 network: embed -> hc_mult streams -> blocks -> hc head -> norm -> fp32 logits (spec §2.1).

`Transformer.forward(batch)` runs any mix of prefill chunks and decode tokens of many sequences, reading and
writing each sequence's cache. Module and buffer names equal the official checkpoint's tensor names, so
`load_state_dict` takes an official shard (after FP4/FP8 tensors are put in these dtypes by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsv4.model.batch import ForwardBatch
from dsv4.model.block import Block, MTPBlock, _hc_buffers, hc_params
from dsv4.model.config import ModelConfig
from dsv4.model.layers import RMSNorm
from dsv4.model.numerics import Numerics


@dataclass(frozen=True, slots=True)
class ForwardOutput:
    logits: torch.Tensor    # [L, vocab] fp32 for the requested rows
    streams: torch.Tensor   # [T, hc, D] final residual streams (the MTP block's input)


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab_size, dim, dtype=torch.bfloat16))

    def forward(self, token_ids: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        return numerics.math.embed(self.weight, token_ids)


class Head(nn.Module):
    """Output projection; bf16 in the checkpoint, run in fp32 (the official `ParallelHead`)."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.register_buffer("weight", torch.empty(vocab_size, dim, dtype=torch.bfloat16))

    def forward(self, h: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        return numerics.linear.logits(h, self.weight)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: list[int] | None = None):
        """expert_ids: the routed experts this instance holds (all when None); the rest run elsewhere."""
        super().__init__()
        self.config = config
        self.hc = hc_params(config)
        d = config.hidden_size
        self.embed = Embedding(config.vocab_size, d)
        self.layers = nn.ModuleList(Block(config, i, expert_ids) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps)
        self.head = Head(config.vocab_size, d)
        _hc_buffers(self, "hc_head", config.hc_mult, config.hc_mult * d, 1)
        self.mtp = nn.ModuleList(MTPBlock(config, config.num_hidden_layers + i, expert_ids)
                                 for i in range(config.num_nextn_predict_layers))

    def logits(self, streams: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """[L, hc, D] final streams -> [L, vocab] fp32 logits (fp32 head, as the official `ParallelHead`)."""
        h = numerics.mhc.head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.hc)
        return self.head(self.norm(h, numerics), numerics)

    def forward(self, batch: ForwardBatch, logits_rows: torch.Tensor | None = None) -> ForwardOutput:
        """logits_rows: rows of the flat batch to compute logits for (default: each chunk's last token)."""
        num = batch.numerics
        x = self.embed(batch.token_ids, num)
        streams = x.unsqueeze(1).expand(-1, self.config.hc_mult, -1).contiguous()        # [T, hc, D]
        pending = None        # each block's last post mix runs fused with the next block's first pre mix
        for layer in self.layers:
            streams, pending = layer.forward_pending(streams, batch, pending)
        f, post, comb = pending
        streams = num.mhc.post(f, streams, post, comb)
        rows = batch.last_rows() if logits_rows is None else logits_rows
        return ForwardOutput(self.logits(streams[rows], num), streams)

    def forward_mtp(self, streams: torch.Tensor, next_batch: ForwardBatch, depth: int = 0,
                    logits_rows: torch.Tensor | None = None) -> ForwardOutput:
        """MTP block `depth`: `streams` are the main model's final streams at positions p, `next_batch` carries
        the tokens at p+1 with positions p and the sequences' caches. Returns logits for the token at p+2."""
        num = next_batch.numerics
        block = self.mtp[depth]
        out = block(streams, self.embed(next_batch.token_ids, num), next_batch)
        rows = next_batch.last_rows() if logits_rows is None else logits_rows
        return ForwardOutput(self.head(block.collapse(out[rows], num), num), out)

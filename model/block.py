"""A decoder block (mHC around attention and MoE) and the MTP block (spec §2.1, §2.5)."""

from __future__ import annotations

import torch
from torch import nn

from dsv4.model.attention import Attention
from dsv4.model.batch import ForwardBatch
from dsv4.model.config import ModelConfig
from dsv4.model.layers import Linear, RMSNorm, WeightFormat
from dsv4.model.mhc import HcParams
from dsv4.model.moe import MoE
from dsv4.model.numerics import Numerics


def hc_params(config: ModelConfig) -> HcParams:
    return HcParams(config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps)


def _hc_buffers(module: nn.Module, prefix: str, rows: int, width: int, num_scales: int) -> None:
    module.register_buffer(f"{prefix}_fn", torch.empty(rows, width, dtype=torch.float32))
    module.register_buffer(f"{prefix}_base", torch.empty(rows, dtype=torch.float32))
    module.register_buffer(f"{prefix}_scale", torch.empty(num_scales, dtype=torch.float32))


Pending = tuple[torch.Tensor, torch.Tensor, torch.Tensor]   # a sub-layer output and its post / comb mix


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, expert_ids: list[int] | None = None):
        super().__init__()
        self.layer_id = layer_id
        self.hc = hc_params(config)
        self.attn = Attention(config, layer_id)
        self.ffn = MoE(config, layer_id, expert_ids)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        mix, width = (2 + config.hc_mult) * config.hc_mult, config.hc_mult * config.hidden_size
        _hc_buffers(self, "hc_attn", mix, width, 3)
        _hc_buffers(self, "hc_ffn", mix, width, 3)

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """x: [T, hc, D] residual streams -> [T, hc, D]."""
        x, (f, post, comb) = self.forward_pending(x, batch)
        return batch.numerics.mhc.post(f, x, post, comb)

    def forward_pending(self, x: torch.Tensor, batch: ForwardBatch, pending: Pending | None = None
                        ) -> tuple[torch.Tensor, Pending]:
        """The block with its last post mix left pending, so that it fuses with the next block's first pre mix:
        x [T, hc, D] streams (before the previous block's pending mix, if given) -> (streams before this block's
        FFN output is mixed in, (ffn output [T, D], post, comb))."""
        num = batch.numerics
        if pending is None:
            h, post, comb = num.mhc.pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, self.hc)
        else:
            f, post, comb = pending
            x, h, post, comb = num.mhc.post_pre(f, x, post, comb, self.hc_attn_fn, self.hc_attn_scale,
                                                self.hc_attn_base, self.hc)
        x, h, post, comb = num.mhc.post_pre(self.attn(self.attn_norm(h, num), batch), x, post, comb,
                                            self.hc_ffn_fn, self.hc_ffn_scale, self.hc_ffn_base, self.hc)
        return x, (self.ffn(self.ffn_norm(h, num), batch.token_ids, num), post, comb)


class MTPBlock(Block):
    """Multi-token prediction: predicts token t+2 from the main model's final streams at t and the embedding of
    token t+1. An ordinary (sliding-window, score-routed) block with input projections and its own head collapse
    and norm; the embedding and the output head are shared with the main model."""

    def __init__(self, config: ModelConfig, layer_id: int, expert_ids: list[int] | None = None):
        super().__init__(config, layer_id, expert_ids)
        fmt = WeightFormat.FP8 if config.weights_quantized else WeightFormat.BF16
        self.e_proj = Linear(config.hidden_size, config.hidden_size, fmt)
        self.h_proj = Linear(config.hidden_size, config.hidden_size, fmt)
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        _hc_buffers(self, "hc_head", config.hc_mult, config.hc_mult * config.hidden_size, 1)

    def forward(self, streams: torch.Tensor, next_embed: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """streams [T, hc, D] main-model output streams, next_embed [T, D] embedding of each next token
        -> the block's output streams [T, hc, D]."""
        num = batch.numerics
        e = num.act(self.e_proj(self.enorm(next_embed, num), num))                     # [T, D]
        h = num.act(self.h_proj(self.hnorm(streams, num), num))                        # [T, hc, D]
        return super().forward(num.act(e.unsqueeze(1).float() + h.float()), batch)

    def collapse(self, streams: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """[T, hc, D] -> normed [T, D], ready for the shared head."""
        collapsed = numerics.mhc.head(streams, self.hc_head_fn, self.hc_head_scale, self.hc_head_base, self.hc)
        return self.norm(collapsed, numerics)

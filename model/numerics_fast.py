"""The op families of the `fast` numerics: the official kernels' precision on tensor cores, no float64.

Each family forwards to `dsv4.kernels.fast` (Triton on CUDA tensors, a PyTorch twin of the same structure on CPU
tensors). Weights stay in their checkpoint formats; `prepare` derives, once after loading, what the kernels need:
the routed experts of each MoE layer stacked into one tensor per projection (the per-expert buffers become views
of it, so the checkpoint names still address them and nothing is stored twice), and per-weight FP8 scale data.

Token ids are validated where a step's inputs are built (and at the API), not in here: the embedding clamps an
out-of-range id instead of checking it, so a step never synchronises with the host.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import attention, compressor, indexer, linear, mhc, norm, router
from dsv4.kernels.fast import moe as moe_kernels
from dsv4.kernels.kv_format import EntryCodec
from dsv4.model.kv_cache import ATTN, LayerStorage
from dsv4.model.layers import Linear, WeightFormat
from dsv4.model.mhc import HcParams

if TYPE_CHECKING:
    from dsv4.model.compressor import Compressor
    from dsv4.model.moe import MoE
    from dsv4.model.numerics import Numerics

ACT = torch.bfloat16


class FastMath:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        return norm.rms_norm(x.to(ACT), weight, eps)

    def head_norm_rope(self, q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, eps: float
                       ) -> torch.Tensor:
        return norm.head_norm_rope(q, positions, inv_freq, eps)

    def kv_entry(self, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                 inv_freq: torch.Tensor, rope_dim: int) -> torch.Tensor:
        return norm.kv_entry(kv, norm_weight, eps, positions, inv_freq, kv.shape[-1] - rope_dim)

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
             ) -> torch.Tensor:
        return norm.rope(x, positions, inv_freq, inverse)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, limit: float, route_weight: torch.Tensor | None
               ) -> torch.Tensor:
        """The shared expert's clamped SwiGLU (the routed experts fuse theirs into the grouped GEMM)."""
        h = F.silu(gate.float().clamp(max=limit)) * up.float().clamp(-limit, limit)
        if route_weight is not None:
            h = route_weight * h
        return h.to(ACT)

    def embed(self, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        return weight[token_ids.clamp(0, weight.shape[0] - 1)]


class FastLinear:
    def __call__(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """bf16 [.., out] for quantized and bf16 linears, fp32 for fp32 ones (compressor projections)."""
        shape, x = x.shape[:-1], x.reshape(-1, x.shape[-1]).to(ACT)
        if layer.compute == "fp32" and layer.fmt is WeightFormat.BF16:
            y = linear.fp32_linear(x, layer.weight)
        elif layer.fmt is WeightFormat.FP8:
            y = linear.fp8_linear(x, _fp8(layer), quant_act=layer.compute == "quantized")
        elif layer.fmt is WeightFormat.BF16:
            y = linear.bf16_linear(x, layer.weight)
        else:
            raise NotImplementedError(f"fast numerics: a dense {layer.fmt.value} linear ({layer.extra_repr()}); FP4 "
                                      "weights are routed experts, which run through the grouped expert kernels")
        return y.view(*shape, -1)

    def grouped(self, layer: Linear, o: torch.Tensor, num_groups: int) -> torch.Tensor:
        """o [T, g, K] -> [T, g, R] bf16 (wo_a: no activation quantization, as the official bf16 einsum)."""
        o = o.to(ACT)
        if layer.fmt is WeightFormat.FP8:
            return linear.grouped_fp8_linear(o, _fp8(layer), quant_act=False)
        w = layer.weight.view(num_groups, -1, o.shape[-1])                                  # [g, R, K]
        return torch.bmm(o.transpose(0, 1), w.transpose(1, 2)).transpose(0, 1)

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 head: bf16 h and weight, exact products, fp32 accumulation -> [L, vocab] fp32."""
        return linear.fp32_linear(h.to(ACT), weight)

    def prepare(self, model: torch.nn.Module) -> None:
        """Each FP8 linear's derived scale data and split-K counters, once (again only for a weight that
        changed)."""
        for module in model.modules():
            if isinstance(module, Linear) and module.fmt is WeightFormat.FP8 and module.weight.device.type != "meta":
                _fp8(module)


def _stacked_projection(module: Compressor) -> torch.Tensor | None:
    """The compressor's stacked wkv | wgate weight if its two weights are still views of it (not re-assigned by
    a later load)."""
    stacked = getattr(module, "fast_wkv_wgate", None)
    if stacked is None:
        return None
    wkv, wgate = module.wkv.weight, module.wgate.weight
    if wkv.data_ptr() != stacked.data_ptr() or wgate.data_ptr() != wkv.data_ptr() + wkv.numel() * wkv.element_size():
        return None
    return stacked


def _fp8(layer: Linear):
    prepared = getattr(layer, "fast_weight", None)
    if prepared is None or prepared.weight is not layer.weight:
        prepared = layer.fast_weight = linear.prepare_fp8(layer.weight, layer.scale)
    return prepared


class FastAttention:
    def attend(self, q: torch.Tensor, kv: torch.Tensor, store: LayerStorage, layout: BatchLayout, ratio: int,
               entries: torch.Tensor | None, sink: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        pool = store.compressors[ATTN].pool if ratio else None
        return attention.sparse_attention(q, kv, store.window, pool, store.window_codec, layout, ratio, entries,
                                          sink, inv_freq)

    def window_append(self, ring: torch.Tensor, codec: EntryCodec, kv: torch.Tensor, layout: BatchLayout) -> None:
        norm.window_append(ring, codec, kv, layout)


class FastIndexer:
    def query(self, q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        return indexer.indexer_query(q, positions, inv_freq)

    def topk(self, q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: EntryCodec,
             layout: BatchLayout, ratio: int, topk: int) -> torch.Tensor:
        return indexer.indexer_topk(q, weights, pool, codec, layout, ratio, topk)


class FastCompressor:
    def project(self, module: Compressor, x: torch.Tensor, positions: torch.Tensor, numerics: Numerics
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, z) [T, coff*d] fp32 from one GEMM on the stacked wkv | wgate weight (`prepare`), the position bias
        added in place; the reference's two linears where the stack is missing (weights not prepared)."""
        stacked = _stacked_projection(module)
        if stacked is None:
            return module.projections(x, positions, numerics)
        return compressor.project(x.reshape(-1, x.shape[-1]).to(ACT), stacked, module.ape, positions)

    def prepare(self, model: torch.nn.Module) -> None:
        """Stack each compressor's wkv and wgate weights (both bf16 [W, D]) into one [2W, D] tensor and make the two
        weights views of it (no second copy): the projections run as one GEMM."""
        from dsv4.model.compressor import Compressor

        for module in model.modules():
            if isinstance(module, Compressor) and module.wkv.weight.device.type != "meta" \
                    and _stacked_projection(module) is None:
                stacked = torch.cat([module.wkv.weight.data, module.wgate.weight.data])
                width = module.wkv.weight.shape[0]
                module.wkv.weight.data, module.wgate.weight.data = stacked[:width], stacked[width:]
                module.fast_wkv_wgate = stacked

    def flush(self, a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
              layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
              rotate: bool, pool: torch.Tensor, codec: EntryCodec) -> None:
        compressor.compress_flush(a, z, state_kv, state_score, layout, ratio, norm_weight, eps, inv_freq, rotate,
                                  pool, codec)


class FastRouter:
    def dense(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float,
              workspace: object = None) -> tuple[torch.Tensor, torch.Tensor]:
        return router.dense_route(x.to(ACT), weight, bias, topk, route_scale)

    def hash(self, x: torch.Tensor, weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
             route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return router.hash_route(x.to(ACT), weight, tid2eid, token_ids, route_scale)


class FastExperts:
    def prepare(self, model: torch.nn.Module) -> None:
        """Stack each MoE layer's held experts (w1|w3 and w2, with their scales) and make the per-expert buffers
        views of the stack."""
        from dsv4.model.moe import MoE

        for module in model.modules():
            if isinstance(module, MoE) and getattr(module, "fast_shared", None) is None:
                if module.shared_experts.w1.weight.device.type == "meta":
                    continue
                module.fast_shared = shared = stack([module.shared_experts])
                if shared.fmt == "fp8":     # views of the stack, with the cuBLAS scale layout derived once
                    module.fast_shared_linears = (linear.prepare_fp8(shared.w13[0], shared.s13[0]),
                                                  linear.prepare_fp8(shared.w2[0], shared.s2[0]))
                if module.held:
                    module.fast_experts = stack([module.local_expert(i) for i in range(len(module.held))])

    def run_pairs(self, moe: MoE, rows: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
                  pair_weight: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        if getattr(moe, "fast_shared", None) is None:
            self.prepare(moe)
        stacked = getattr(moe, "fast_experts", None)
        if stacked is None:
            return torch.zeros(pair_expert.shape[0], rows.shape[-1], dtype=ACT, device=rows.device)
        return moe_kernels.expert_forward(rows.to(ACT), pair_row, pair_expert.to(torch.int32), pair_weight.float(),
                                          stacked, moe.local_expert(0).limit)

    def combine(self, pair_out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return moe_kernels.combine_pairs(pair_out, ids.shape[1])


    def shared(self, moe: MoE, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """The shared expert [T, D]: FP8 as two FP8 linears around a fused SwiGLU, else through the grouped kernel
        as one expert of weight 1."""
        if getattr(moe, "fast_shared", None) is None:
            self.prepare(moe)
        linears = getattr(moe, "fast_shared_linears", None)
        if linears is not None:
            return moe_kernels.shared_expert_forward(x, *linears, moe.shared_experts.limit)
        rows = torch.arange(x.shape[0], device=x.device)
        return moe_kernels.expert_forward(x.to(ACT), rows, torch.zeros_like(rows, dtype=torch.int32),
                                          torch.ones(x.shape[0], device=x.device), moe.fast_shared,
                                          moe.shared_experts.limit)


def stack(experts: list) -> moe_kernels.ExpertWeights:
    """Experts (same shapes and format) into one stacked `ExpertWeights`; their buffers become views of it (FP4
    bytes then in split nibble order, which their `Linear` records)."""
    fmt = experts[0].w1.fmt.value
    stacked = moe_kernels.stack_experts([(e.w1.weight, _scale(e.w1), e.w3.weight, _scale(e.w3), e.w2.weight,
                                          _scale(e.w2)) for e in experts], fmt)
    inter = experts[0].w1.out_features
    scale_rows = stacked.s13.shape[1] // 2 if stacked.s13 is not None else 0     # w1's scale rows, then w3's
    for i, e in enumerate(experts):   # the checkpoint's names now address views of the stack
        e.w1._buffers["weight"], e.w3._buffers["weight"] = stacked.w13[i, :inter], stacked.w13[i, inter:]
        e.w2._buffers["weight"] = stacked.w2[i]
        if stacked.s13 is not None:
            e.w1._buffers["scale"], e.w3._buffers["scale"] = stacked.s13[i, :scale_rows], stacked.s13[i, scale_rows:]
            e.w2._buffers["scale"] = stacked.s2[i]
        for layer in (e.w1, e.w2, e.w3):
            layer.split_nibbles = stacked.fmt == "fp4"       # views of the stack's byte order
            layer._dense = None
            layer.__dict__.pop("fast_weight", None)       # it holds the unstacked tensors
    return stacked


def _scale(layer: Linear) -> torch.Tensor | None:
    return layer._buffers.get("scale")


class FastMhc:
    def pre(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mhc.hc_pre(x, fn, scale, base, p.hc_mult, p.sinkhorn_iters, p.hc_eps, p.norm_eps)

    def post(self, f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        return mhc.hc_post(f, residual, post, comb)

    def post_pre(self, f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fused: the post kernel also computes the next site's mixes from the streams it writes."""
        return mhc.hc_post_pre(f, residual, post, comb, fn, scale, base, p.hc_mult, p.sinkhorn_iters, p.hc_eps,
                               p.norm_eps)

    def head(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
             ) -> torch.Tensor:
        return mhc.hc_head(x, fn, scale, base, p.hc_eps, p.norm_eps)


def fast_families() -> dict[str, object]:
    return {"math": FastMath(), "linear": FastLinear(), "attention": FastAttention(), "indexer": FastIndexer(),
            "compressor": FastCompressor(), "router": FastRouter(), "experts": FastExperts(), "mhc": FastMhc()}

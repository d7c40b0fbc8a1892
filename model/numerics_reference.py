"""The op families of the `reference` and `exact-fp32` numerics: DeepSeek's official function, batch-invariant.

Every reduction and transcendental runs in float64 (`dsv4.kernels.ref_math`); quantization is simulated exactly
(`dsv4.kernels.quant`) when `simulate` is on (reference) and skipped when off (exact-fp32). Cache ops run the
exact CUDA kernels on a GPU and their PyTorch references elsewhere (`dsv4.kernels.ops`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsv4.kernels import ops, quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import EntryCodec
from dsv4.kernels.ref_math import apply_rope, matmul, rms_norm, rsqrt, silu
from dsv4.model.kv_cache import ATTN, LayerStorage
from dsv4.model.mhc import HcParams, hc_head, hc_post, hc_pre

if TYPE_CHECKING:
    from dsv4.model.compressor import Compressor
    from dsv4.model.layers import Linear
    from dsv4.model.moe import MoE
    from dsv4.model.numerics import Numerics


class _Family:
    def __init__(self, act_dtype: torch.dtype, simulate: bool):
        self.act_dtype, self.simulate = act_dtype, simulate

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.act_dtype)


class ReferenceMath(_Family):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        return self.act(rms_norm(x, weight, eps))

    def head_rms_normalize(self, q: torch.Tensor, eps: float) -> torch.Tensor:
        """Per-head q normalisation without weight. The official code does it in bf16 arithmetic, op by op."""
        if not self.simulate:
            return rms_norm(q, None, eps)
        q = q.bfloat16()
        mean = q.square().double().mean(-1, keepdim=True).to(torch.bfloat16)        # bf16 .mean: wide accumulation
        inv = rsqrt((mean.float() + eps).bfloat16().float()).bfloat16()              # bf16 add, then bf16 rsqrt
        return (q.float() * inv.float()).bfloat16()

    def head_norm_rope(self, q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, eps: float
                       ) -> torch.Tensor:
        """q [T, H, d] -> per-head RMS-normalised, RoPE'd queries."""
        return apply_rope(self.head_rms_normalize(q, eps), positions, inv_freq)

    def kv_entry(self, kv: torch.Tensor, norm_weight: torch.Tensor, eps: float, positions: torch.Tensor,
                 inv_freq: torch.Tensor, rope_dim: int) -> torch.Tensor:
        """kv [T, d] (wkv output) -> the entry as its storage gives it back: RMSNorm, RoPE, FP8 nope dims."""
        kv = apply_rope(self.rms_norm(kv, norm_weight, eps), positions, inv_freq)
        return quant.fake_quant_kv(kv, rope_dim) if self.simulate else kv

    def rope(self, x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False
             ) -> torch.Tensor:
        return apply_rope(x, positions, inv_freq, inverse)

    def swiglu(self, gate: torch.Tensor, up: torch.Tensor, limit: float, route_weight: torch.Tensor | None
               ) -> torch.Tensor:
        """Clamped SwiGLU of the (rounded) w1 and w3 outputs; the routing weight scales it before w2."""
        gate = self.act(gate).float().clamp(max=limit)
        up = self.act(up).float().clamp(-limit, limit)
        h = silu(gate) * up
        if route_weight is not None:
            h = route_weight * h
        return self.act(h)

    def embed(self, weight: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        vocab = weight.shape[0]
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
            bad = token_ids[(token_ids < 0) | (token_ids >= vocab)][0].item()
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
        return self.act(weight[token_ids].float())


class ReferenceLinear(_Family):
    def __call__(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """y = x W^T, fp32 (the caller rounds): FP8/FP4 linears quantize x per 128 to FP8 first (the official
        `linear()`), bf16 linears round x to bf16, fp32 linears upcast."""
        if layer.compute == "quantized" and self.simulate:
            x = quant.fake_quant_fp8(x.float(), quant.ACT_BLOCK)
        elif layer.compute == "bf16":
            x = self.act(x)
        return matmul(x, layer.dense_weight())

    def grouped(self, layer: Linear, o: torch.Tensor, num_groups: int) -> torch.Tensor:
        """o [T, g, K] -> [T, g, R]: group g through rows g*R..(g+1)*R of the layer (wo_a: a bf16 einsum on the
        dequantized weight, no activation quantization)."""
        w = layer.dense_weight().view(num_groups, -1, o.shape[-1]).double()               # [g, R, K]
        return self.act(torch.einsum("tgk,grk->tgr", self.act(o).double(), w).float())

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 head (official `ParallelHead`): h [L, D] -> [L, vocab] fp32."""
        return matmul(h.float(), weight)

    def prepare(self, model: torch.nn.Module) -> None:
        """Nothing to derive: the dense fp32 weights are made lazily (`Linear.dense_weight`)."""


def visible_entries(layout: BatchLayout, ratio: int) -> torch.Tensor:
    """Every compressed entry each token may see (entry w is visible to t iff w*m + m - 1 <= t): [T, E], -1 pad.
    E comes from the block table's shape (what the blocks can hold), so no device value sets a shape: no host
    synchronisation, and CUDA graphs can capture it."""
    width = layout.block_table.shape[1] * (layout.block_size // ratio)
    visible = (layout.positions + 1) // ratio
    entries = torch.arange(width, device=visible.device)[None, :].expand(visible.shape[0], -1)
    return torch.where(entries < visible[:, None], entries, -1)


class ReferenceAttention(_Family):
    def attend(self, q: torch.Tensor, kv: torch.Tensor, store: LayerStorage, layout: BatchLayout, ratio: int,
               entries: torch.Tensor | None, sink: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """q [T, H, d] attends to its window (ring + this step's kv [T, d]) and, with a compressor, to `entries`
        (CSA: the indexer's choice) or every visible entry (HCA); the output's rope dims are rotated back."""
        keys, valid = ops.window_gather(store.window, store.window_codec, kv, layout)
        if ratio:
            chosen = entries if entries is not None else visible_entries(layout, ratio)
            main = store.compressors[ATTN]
            extra, extra_valid = ops.gather_entries(main.pool, main.codec, layout, chosen, ratio)
            keys, valid = torch.cat([keys, extra.to(keys.dtype)], dim=1), torch.cat([valid, extra_valid], dim=1)
        o = ops.sparse_attention(q, keys, valid, sink, self.act_dtype)
        return apply_rope(o, layout.positions, inv_freq, inverse=True)

    def window_append(self, ring: torch.Tensor, codec: EntryCodec, kv: torch.Tensor, layout: BatchLayout) -> None:
        ops.window_append(ring, codec, kv, layout)


class ReferenceIndexer(_Family):
    def query(self, q: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
        """q [T, H, dI] -> RoPE'd; in reference numerics Hadamard-rotated and MXFP4 fake-quantized (without
        quantization the rotations of q and k cancel in q.k, so exact-fp32 skips it)."""
        q = apply_rope(q, positions, inv_freq)
        return quant.fake_quant_fp4(quant.hadamard_rotate(q)) if self.simulate else q

    def topk(self, q: torch.Tensor, weights: torch.Tensor, pool: torch.Tensor, codec: EntryCodec,
             layout: BatchLayout, ratio: int, topk: int) -> torch.Tensor:
        return ops.indexer_topk(q, weights, pool, codec, layout, ratio, topk, self.act_dtype)


class ReferenceCompressor(_Family):
    def project(self, module: Compressor, x: torch.Tensor, positions: torch.Tensor, numerics: Numerics
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, z) [T, coff*d] fp32: wkv(x) and wgate(x) + ape[positions % ratio] (the official order)."""
        return module.projections(x, positions, numerics)

    def prepare(self, model: torch.nn.Module) -> None:
        """Nothing to derive."""

    def flush(self, a: torch.Tensor, z: torch.Tensor, state_kv: torch.Tensor, state_score: torch.Tensor,
              layout: BatchLayout, ratio: int, norm_weight: torch.Tensor, eps: float, inv_freq: torch.Tensor,
              rotate: bool, pool: torch.Tensor, codec: EntryCodec) -> None:
        ops.compress_flush(a, z, state_kv, state_score, layout, ratio, norm_weight, eps, inv_freq, rotate, pool,
                           codec, self.act_dtype)


class ReferenceRouter(_Family):
    def dense(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float,
              workspace: ops.Workspace | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.dense_route(x, weight, bias, topk, route_scale, workspace)

    def hash(self, x: torch.Tensor, weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
             route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.hash_route(x, weight, tid2eid, token_ids, route_scale)


class ReferenceExperts(_Family):
    def prepare(self, model: torch.nn.Module) -> None:
        """Nothing to derive: each expert runs from its own weights."""

    def run_pairs(self, moe: MoE, rows: torch.Tensor, pair_row: torch.Tensor, pair_expert: torch.Tensor,
                  pair_weight: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """Pair p = row rows[pair_row[p]] through local expert pair_expert[p] (-1: not here, output 0) with routing
        weight pair_weight[p] -> [P, D] in the activation dtype. One expert at a time, as the official loop; the
        expert math is batch-invariant, so the grouping does not change a pair's result."""
        out = torch.zeros(pair_expert.shape[0], rows.shape[-1], dtype=self.act_dtype, device=rows.device)
        for local in pair_expert.unique().tolist():
            if local < 0:
                continue
            mine = (pair_expert == local).nonzero().flatten()
            out[mine] = moe.local_expert(local)(rows[pair_row[mine]], numerics, pair_weight[mine, None]).to(out.dtype)
        return out

    def shared(self, moe: MoE, x: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        """The shared expert, [T, D] in the activation dtype."""
        return moe.shared_experts(x, numerics)

    def combine(self, pair_out: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[T*k, D] per-pair outputs -> [T, D] fp32, summed one by one in ascending expert id (the official loop
        order; slots of other workers' experts hold zeros until their outputs come back)."""
        num_tokens, k = ids.shape
        slot_out = pair_out.view(num_tokens, k, pair_out.shape[-1]).float()
        order = ids.argsort(dim=1, stable=True)
        ordered = slot_out.gather(1, order[..., None].expand_as(slot_out))
        total = torch.zeros_like(ordered[:, 0])
        for j in range(k):
            total = total + ordered[:, j]
        return total


class ReferenceMhc(_Family):
    def pre(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return hc_pre(x, fn, scale, base, p, self.act)

    def post(self, f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        return hc_post(f, residual, post, comb, self.act)

    def post_pre(self, f: torch.Tensor, residual: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
                 fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sub-layer's post mix, then the next one's pre mix: (streams, h, post, comb)."""
        streams = self.post(f, residual, post, comb)
        return (streams, *self.pre(streams, fn, scale, base, p))

    def head(self, x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, p: HcParams
             ) -> torch.Tensor:
        return hc_head(x, fn, scale, base, p, self.act)


def reference_families(act_dtype: torch.dtype, simulate: bool) -> dict[str, _Family]:
    kinds = {"math": ReferenceMath, "linear": ReferenceLinear, "attention": ReferenceAttention,
             "indexer": ReferenceIndexer, "compressor": ReferenceCompressor, "router": ReferenceRouter,
             "experts": ReferenceExperts, "mhc": ReferenceMhc}
    return {name: kind(act_dtype, simulate) for name, kind in kinds.items()}

"""Triton kernels of the fast routers (public API and numerics: `dsv4.kernels.fast.router`).

    _gate_partials_kernel  the gate GEMM x . W^T for small T, split over (experts, K): grid (token tiles, expert
                           blocks, K splits); bf16 tensor-core dots (products exact in fp32), fp32 accumulation;
                           fp32 partial logits [S, T, E]. For large T the logits come from cuBLAS as one "split".
    _route_kernel          one program per token: sums the partial logits, sqrt(softplus) in fp32, then either
                           the top-k of score + bias (k rounds of a max over the experts, ties to the lower id;
                           dense routing) or the tid2eid experts (hash routing), and the renormalised weights.
    _hash_route_kernel     one program per token: tid2eid lookup and only the k chosen experts' dot products.

Masking instead of validation (no host sync): a token id outside [0, V) or a tid2eid entry outside [0, E) gives
id -1 and weight 0 for that row/slot and is never dereferenced. Launch geometry comes from shapes only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

_INTERPRET = bool(triton.knobs.runtime.interpret)
_BLOCK_K = 128          # K columns per GEMM step
_BLOCK_E = 32           # experts per GEMM program
_TARGET_PROGRAMS = 128  # GEMM programs to aim for
_MIN_CHUNKS = 2         # K steps per GEMM program at least
_MAX_FUSED_T = 64       # above this, cuBLAS computes the logits
_MAX_GATHER_T = 256     # hash routing: above this, a full GEMM beats gathering k weight rows per token
_HASH_BLOCK_D = 1024


# ---------------------------------------------------------------------------------------------- math
# libdevice's expf/logf (1-2 ulp) on the GPU; the interpreter has no libdevice, numpy's are as accurate.
if _INTERPRET:
    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _log(x):
        return tl.log(x)
else:
    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _log(x):
        return libdevice.log(x)


@triton.jit
def _sqrt_softplus(logit):
    """sqrt(softplus(l)) as torch's softplus (beta 1, threshold 20), log1p done accurately in fp32 (Goldberg)."""
    u = _exp(tl.minimum(logit, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, _log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.sqrt_rn(tl.where(logit > 20.0, logit, log1p))


# ---------------------------------------------------------------------------------------------- kernels
@triton.jit
def _gate_partials_kernel(x_ptr, w_ptr, part_ptr, T, E, K, CHUNKS: tl.constexpr,
                          BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t, pid_e, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    k_first = pid_s * CHUNKS * BLOCK_K
    for c in tl.static_range(CHUNKS):   # unrolled: every K step's loads in flight at once (a decode kernel)
        k = k_first + c * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + t[:, None].to(tl.int64) * K + k[None, :], mask=(t[:, None] < T) & (k[None, :] < K),
                    other=0.0)                                                          # x: [BLOCK_T, BLOCK_K]
        w = tl.load(w_ptr + e[None, :].to(tl.int64) * K + k[:, None], mask=(e[None, :] < E) & (k[:, None] < K),
                    other=0.0)                                                          # W^T: [BLOCK_K, BLOCK_E]
        acc = tl.dot(x, w, acc)
    rows = (pid_s * T + t).to(tl.int64) * E
    tl.store(part_ptr + rows[:, None] + e[None, :], acc, mask=(t[:, None] < T) & (e[None, :] < E))


@triton.jit
def _store_routes(w_out, id_out, t, slot, ids, scores, ok, route_scale, TOPK: tl.constexpr):
    """weights = route_scale * s / sum(chosen s) over the valid slots; invalid slots: id -1, weight 0."""
    scores = tl.where(ok, scores, 0.0)
    total = tl.sum(scores, axis=0)
    weights = tl.where(ok, scores / tl.where(total > 0.0, total, 1.0) * route_scale, 0.0)   # no 0/0
    out = t.to(tl.int64) * TOPK + slot
    tl.store(w_out + out, weights, mask=slot < TOPK)
    tl.store(id_out + out, tl.where(ok, ids, -1), mask=slot < TOPK)


@triton.jit
def _route_kernel(part_ptr, bias_ptr, tid2eid_ptr, tok_ptr, w_out, id_out, T, E, V, num_splits, route_scale,
                  HASH: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
                  BLOCK_E: tl.constexpr):
    t = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    e = tl.arange(0, BLOCK_E)
    slot = tl.arange(0, TOPK_PAD)
    emask = e < E
    part = tl.load(part_ptr + (s[:, None] * T + t).to(tl.int64) * E + e[None, :],
                   mask=(s[:, None] < num_splits) & emask[None, :], other=0.0)
    scores = _sqrt_softplus(tl.sum(part, axis=0))                                          # [BLOCK_E]
    if HASH:
        tok = tl.load(tok_ptr + t + 0 * slot)          # the token id in every slot lane (block-shaped masks)
        tok_ok = (tok >= 0) & (tok < V)
        ids = tl.load(tid2eid_ptr + tok * TOPK + slot, mask=(slot < TOPK) & tok_ok, other=-1)
        ok = (slot < TOPK) & tok_ok & (ids >= 0) & (ids < E)
        chosen = tl.sum(tl.where(ids[:, None] == e[None, :], scores[None, :], 0.0), axis=1)
    else:
        keys = tl.where(emask, scores + tl.load(bias_ptr + e, mask=emask, other=0.0), float("-inf"))
        ids = tl.full((TOPK_PAD,), -1, dtype=tl.int64)
        chosen = tl.zeros((TOPK_PAD,), dtype=tl.float32)
        for r in tl.static_range(TOPK):
            best = tl.min(tl.where(keys == tl.max(keys, axis=0), e, BLOCK_E), axis=0)      # ties: lower id
            ids = tl.where(slot == r, best.to(tl.int64), ids)
            chosen = tl.where(slot == r, tl.sum(tl.where(e == best, scores, 0.0), axis=0), chosen)
            keys = tl.where(e == best, float("-inf"), keys)
        ok = (slot < TOPK) & (ids >= 0) & (ids < E)                  # NaN keys leave a slot unchosen (-1)
    _store_routes(w_out, id_out, t, slot, ids, chosen, ok, route_scale, TOPK)


@triton.jit
def _hash_route_kernel(x_ptr, w_ptr, tid2eid_ptr, tok_ptr, w_out, id_out, E, V, route_scale, D: tl.constexpr,
                       TOPK: tl.constexpr, TOPK_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.arange(0, TOPK_PAD)
    tok = tl.load(tok_ptr + t + 0 * slot)              # the token id in every slot lane (block-shaped masks)
    tok_ok = (tok >= 0) & (tok < V)
    ids = tl.load(tid2eid_ptr + tok * TOPK + slot, mask=(slot < TOPK) & tok_ok, other=-1)
    ok = (slot < TOPK) & tok_ok & (ids >= 0) & (ids < E)
    rows = tl.where(ok, ids, 0) * D                                                       # never out of bounds
    acc = tl.zeros((TOPK_PAD,), dtype=tl.float32)
    for d0 in tl.static_range(0, D, BLOCK_D):   # unrolled: all of the row loads in flight at once
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(x_ptr + t.to(tl.int64) * D + d, mask=d < D, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] + d[None, :], mask=ok[:, None] & (d[None, :] < D), other=0.0)
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)                              # exact bf16 products
    _store_routes(w_out, id_out, t, slot, ids, _sqrt_softplus(acc), ok, route_scale, TOPK)


# ---------------------------------------------------------------------------------------------- launchers
def _gemm_geometry(num_tokens: int, num_experts: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_T, number of K splits, K steps per split) from the shapes only."""
    block_t = max(16, triton.next_power_of_2(max(num_tokens, 1)))
    chunks = triton.cdiv(k, _BLOCK_K)
    tiles = triton.cdiv(max(num_tokens, 1), block_t) * triton.cdiv(num_experts, _BLOCK_E)
    splits = max(1, min(_TARGET_PROGRAMS // tiles, chunks // _MIN_CHUNKS))
    chunks_per_split = triton.cdiv(chunks, splits)
    return block_t, triton.cdiv(chunks, chunks_per_split), chunks_per_split


def gate_logits(x: torch.Tensor, weight: torch.Tensor, max_fused_tokens: int = _MAX_FUSED_T) -> torch.Tensor:
    """x [T, D] bf16, weight [E, D] bf16 -> fp32 logits as partial sums [S, T, E] (sum over S = x . W^T)."""
    num_tokens, dim = x.shape
    num_experts = weight.shape[0]
    if num_tokens > max_fused_tokens:
        if x.is_cuda:
            return torch.mm(x, weight.t(), out_dtype=torch.float32).unsqueeze(0)
        return (x.float() @ weight.float().t()).unsqueeze(0)      # CPU tensors under the interpreter
    block_t, splits, chunks_per_split = _gemm_geometry(num_tokens, num_experts, dim)
    part = torch.empty(splits, num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if num_tokens:
        grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(num_experts, _BLOCK_E), splits)
        _gate_partials_kernel[grid](x, weight, part, num_tokens, num_experts, dim, CHUNKS=chunks_per_split,
                                    BLOCK_T=block_t, BLOCK_E=_BLOCK_E, BLOCK_K=_BLOCK_K,
                                    num_warps=8 if block_t >= 64 else 4)   # no register spills
    return part


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.dtype == torch.bfloat16 and x.is_contiguous(), f"x {tuple(x.shape)} {x.dtype}"
    assert weight.dtype == torch.bfloat16 and weight.is_contiguous() and weight.shape[1] == x.shape[1], \
        f"gate weight {tuple(weight.shape)} {weight.dtype}"


def _outputs(num_tokens: int, topk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(num_tokens, topk, dtype=torch.float32, device=device),
            torch.empty(num_tokens, topk, dtype=torch.int64, device=device))


def _launch_route(part: torch.Tensor, bias: torch.Tensor | None, tid2eid: torch.Tensor | None,
                  token_ids: torch.Tensor | None, topk: int, route_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    splits, num_tokens, num_experts = part.shape
    weights, ids = _outputs(num_tokens, topk, part.device)
    if num_tokens:
        is_hash = tid2eid is not None
        dummy = part    # pointer arguments the chosen mode never reads
        _route_kernel[(num_tokens,)](
            part, bias if bias is not None else dummy, tid2eid if is_hash else dummy,
            token_ids if is_hash else dummy, weights, ids, num_tokens, num_experts,
            tid2eid.shape[0] if is_hash else 0, splits, float(route_scale), HASH=is_hash, TOPK=topk,
            TOPK_PAD=triton.next_power_of_2(topk), BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_E=triton.next_power_of_2(num_experts), num_warps=4)
    return weights, ids


def dense_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, topk: int, route_scale: float, *,
                max_fused_tokens: int = _MAX_FUSED_T) -> tuple[torch.Tensor, torch.Tensor]:
    """`dsv4.kernels.fast.router.dense_route` on the GPU: T <= 64 two Triton launches, else cuBLAS + one.
    max_fused_tokens moves the switch (the tests reach the cuBLAS path at small T)."""
    _check(x, weight)
    assert topk <= weight.shape[0], f"top-{topk} of {weight.shape[0]} experts"
    return _launch_route(gate_logits(x, weight, max_fused_tokens), bias.float().contiguous(), None, None, topk,
                         route_scale)


def hash_route(x: torch.Tensor, weight: torch.Tensor, tid2eid: torch.Tensor, token_ids: torch.Tensor,
               route_scale: float, *, max_gather_tokens: int = _MAX_GATHER_T) -> tuple[torch.Tensor, torch.Tensor]:
    """`dsv4.kernels.fast.router.hash_route` on the GPU: T <= 256 one launch (only the k chosen dot products),
    else cuBLAS logits + the hash epilogue (max_gather_tokens moves the switch)."""
    _check(x, weight)
    tid2eid = tid2eid.long().contiguous()
    token_ids = token_ids.long().contiguous()
    num_tokens, dim = x.shape
    topk = tid2eid.shape[1]
    if num_tokens > max_gather_tokens:
        return _launch_route(gate_logits(x, weight, 0), None, tid2eid, token_ids, topk, route_scale)
    weights, ids = _outputs(num_tokens, topk, x.device)
    if num_tokens:
        _hash_route_kernel[(num_tokens,)](
            x, weight, tid2eid, token_ids, weights, ids, weight.shape[0], tid2eid.shape[0], float(route_scale),
            D=dim, TOPK=topk, TOPK_PAD=triton.next_power_of_2(topk),
            BLOCK_D=min(_HASH_BLOCK_D, triton.next_power_of_2(dim)), num_warps=8)
    return weights, ids

"""Benchmark cases of the fast routers (`dsv4.kernels.fast.router`) at V4-Flash shapes (E = 256, D = 4096, k = 6)
and V4-Pro's (E = 384, D = 7168), each checked against the float64 reference on the same GPU tensors.

Targets (fast numerics issue, graph nodes): dense router <= 4 us at 1-64 tokens, <= 20 us at 4096 tokens; hash
router <= 3 us.

    python benchmarks/fast_cases_router.py [--only hash]
"""

from __future__ import annotations

import sys

import torch
from harness import DEV, Case, gen, run_cases

from dsv4.kernels import routing
from dsv4.kernels.fast import router

TOPK, VOCAB = 6, 129280
FLASH, PRO = (256, 4096, 1.5), (384, 7168, 2.5)   # (E, D, route scale)


def dense_check(x, w, bias, scale) -> str:
    weights, ids = router.dense_route(x, w, bias, TOPK, scale)
    want_w, want_ids = routing.dense_route(x, w, bias, TOPK, scale)
    same = (ids.sort(-1).values == want_ids.sort(-1).values).all(-1)      # token sets agree (near-ties may swap)
    mine = weights[same].gather(1, ids[same].argsort(-1))
    want = want_w[same].gather(1, want_ids[same].argsort(-1))
    err = float(((mine - want).abs() / want).max()) if bool(same.any()) else 0.0
    return f"ids {float(same.float().mean()) * 100:.1f}% w {err:.1e}"


def hash_check(x, w, tid2eid, tokens, scale) -> str:
    weights, ids = router.hash_route(x, w, tid2eid, tokens, scale)
    want_w, want_ids = routing.hash_route(x, w, tid2eid, tokens, scale)
    err = float(((weights - want_w).abs() / want_w).max())
    return f"ids {'exact' if torch.equal(ids, want_ids) else 'MISMATCH'} w {err:.1e}"


def cases() -> list[Case]:
    out = []
    for (experts, dim, scale), sizes in ((FLASH, (1, 8, 64, 4096)), (PRO, (1, 64))):
        g = gen(experts)
        w = (torch.randn(experts, dim, generator=g, device=DEV) * dim ** -0.5 * 4).bfloat16()
        bias = torch.randn(experts, generator=g, device=DEV) * 0.1
        tid2eid = torch.randint(0, experts, (VOCAB, TOPK), generator=g, device=DEV)
        model = "V4-Flash" if experts == 256 else "V4-Pro"
        for t in sizes:
            x = torch.randn(t, dim, generator=g, device=DEV).bfloat16()
            tokens = torch.randint(0, VOCAB, (t,), generator=g, device=DEV)
            decode = t <= 64
            out.append(Case(
                "fast dense_route (gate GEMM + sqrt-softplus + bias + top-6 + renorm)",
                f"{model} T={t}, {dim}x{experts}, {'split-K Triton GEMM' if decode else 'cuBLAS'} + epilogue",
                lambda x=x, w=w, bias=bias, scale=scale: router.dense_route(x, w, bias, TOPK, scale),
                lambda x=x, w=w, bias=bias, scale=scale: routing.dense_route(x, w, bias, TOPK, scale),
                lambda x=x, w=w, bias=bias, scale=scale: dense_check(x, w, bias, scale),
                x.numel() * 2 + w.numel() * 2 + t * TOPK * 12,
                "<= 4 us graph" if decode else "<= 20 us graph", None, 4.0 if decode else 20.0, ref_reps=3))
            out.append(Case(
                "fast hash_route (tid2eid + the 6 chosen logits)",
                f"{model} T={t}, {'gathered rows' if t <= 256 else 'cuBLAS + epilogue'}",
                lambda x=x, w=w, tid2eid=tid2eid, tokens=tokens, scale=scale:
                    router.hash_route(x, w, tid2eid, tokens, scale),
                lambda x=x, w=w, tid2eid=tid2eid, tokens=tokens, scale=scale:
                    routing.hash_route(x, w, tid2eid, tokens, scale),
                lambda x=x, w=w, tid2eid=tid2eid, tokens=tokens, scale=scale:
                    hash_check(x, w, tid2eid, tokens, scale),
                x.numel() * 2 + min(t * TOPK, experts) * dim * 2 + t * TOPK * (8 + 12),
                "<= 3 us graph" if decode else "-", None, 3.0 if decode else None, ref_reps=3))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cases("fast-router", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

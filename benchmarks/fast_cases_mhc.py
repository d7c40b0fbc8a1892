"""Benchmark cases of the fast mHC kernels (`dsv4.kernels.fast.mhc`) at V4-Flash shapes (D = 4096, hc = 4), each
checked against the float64 reference on the same GPU tensors.

Target (fast numerics issue): the mHC of one block, i.e. hc_pre + hc_post of the attention site and of the FFN
site, <= 6 us as graph nodes at batch 64.

    python benchmarks/fast_cases_mhc.py [--only hc_pre]
"""

from __future__ import annotations

import math
import sys

import torch
from harness import DEV, Case, gen, run_cases

from dsv4.kernels.fast import mhc
from dsv4.model import mhc as ref_mhc

HIDDEN, HC, ITERS, EPS = 4096, 4, 20, 1e-6
PARAMS = ref_mhc.HcParams(HC, ITERS, EPS, EPS)


def _bf16(y: torch.Tensor) -> torch.Tensor:
    return y.to(torch.bfloat16)


def site(seed: int, rows: int = (2 + HC) * HC, num_scales: int = 3) -> tuple[torch.Tensor, ...]:
    g = gen(seed)
    fn = torch.randn(rows, HC * HIDDEN, generator=g, device=DEV) * 0.5 / math.sqrt(HC * HIDDEN)
    scale = torch.randn(num_scales, generator=g, device=DEV) * 0.1 + 1.0
    base = torch.randn(rows, generator=g, device=DEV) * 0.5
    return fn, scale, base


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


def ulp_share(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got != want).float().mean())


def pre_check(x, fn, scale, base) -> str:
    h, post, comb = mhc.hc_pre(x, fn, scale, base, HC, ITERS, EPS, EPS)
    want_h, want_post, want_comb = ref_mhc.hc_pre(x, fn, scale, base, PARAMS, _bf16)
    return (f"post {rel(post, want_post):.1e} comb {rel(comb, want_comb):.1e} "
            f"h {ulp_share(h, want_h):.0e} 1-ulp")


def post_check(f, x, post, comb) -> str:
    return f"{ulp_share(mhc.hc_post(f, x, post, comb), ref_mhc.hc_post(f, x, post, comb, _bf16)):.0e} 1-ulp"


def pre_bytes(t: int) -> int:
    """x read twice (GEMM and collapse), fn once per 64-token tile, h written, partials written and read."""
    from dsv4.kernels.fast._mhc_triton import _gemm_geometry

    splits = _gemm_geometry(t, HC * HIDDEN)[1]
    return 2 * t * HC * HIDDEN * 2 + math.ceil(t / 64) * 24 * HC * HIDDEN * 4 + t * HIDDEN * 2 + 2 * splits * t * 25 * 4


def post_bytes(t: int) -> int:
    return 2 * t * HC * HIDDEN * 2 + t * HIDDEN * 2 + t * 20 * 4


def site_cases(t: int, attn: tuple[torch.Tensor, ...], ffn: tuple[torch.Tensor, ...]) -> list[Case]:
    """hc_pre and hc_post at T tokens; at decode sizes also a whole block's mHC, plain and fused."""
    g = gen(10 + t)
    x = torch.randn(t, HC, HIDDEN, generator=g, device=DEV).bfloat16()
    f = torch.randn(t, HIDDEN, generator=g, device=DEV).bfloat16()
    _, post, comb = ref_mhc.hc_pre(x, *attn, PARAMS, _bf16)
    shape = f"T={t}, D=4096, hc=4"
    out = [Case("fast hc_pre (mixes GEMM split-K + Sinkhorn + collapse)", shape,
                lambda: mhc.hc_pre(x, *attn, HC, ITERS, EPS, EPS), lambda: ref_mhc.hc_pre(x, *attn, PARAMS, _bf16),
                lambda: pre_check(x, *attn), pre_bytes(t), "2 launches", ref_reps=3),
           Case("fast hc_post (post * f + comb^T X)", shape, lambda: mhc.hc_post(f, x, post, comb),
                lambda: ref_mhc.hc_post(f, x, post, comb, _bf16), lambda: post_check(f, x, post, comb),
                post_bytes(t), "1 launch", ref_reps=3)]
    if t > 64:
        return out

    def block():   # one block: attention site then FFN site (the sub-layers themselves omitted)
        _, p, c = mhc.hc_pre(x, *attn, HC, ITERS, EPS, EPS)
        x1 = mhc.hc_post(f, x, p, c)
        _, p, c = mhc.hc_pre(x1, *ffn, HC, ITERS, EPS, EPS)
        return mhc.hc_post(f, x1, p, c)

    def block_ref():
        _, p, c = ref_mhc.hc_pre(x, *attn, PARAMS, _bf16)
        x1 = ref_mhc.hc_post(f, x, p, c, _bf16)
        _, p, c = ref_mhc.hc_pre(x1, *ffn, PARAMS, _bf16)
        return ref_mhc.hc_post(f, x1, p, c, _bf16)

    def block_fused():   # the attention post fused into the FFN pre
        _, p, c = mhc.hc_pre(x, *attn, HC, ITERS, EPS, EPS)
        x1, _, p, c = mhc.hc_post_pre(f, x, p, c, *ffn, HC, ITERS, EPS, EPS)
        return mhc.hc_post(f, x1, p, c)

    def steady():   # steady state: the previous FFN post fused into this attention pre, and so on
        x1, _, p, c = mhc.hc_post_pre(f, x, post, comb, *attn, HC, ITERS, EPS, EPS)
        return mhc.hc_post_pre(f, x1, p, c, *ffn, HC, ITERS, EPS, EPS)[0]

    def steady_ref():
        x1 = ref_mhc.hc_post(f, x, post, comb, _bf16)
        _, p, c = ref_mhc.hc_pre(x1, *attn, PARAMS, _bf16)
        x2 = ref_mhc.hc_post(f, x1, p, c, _bf16)
        ref_mhc.hc_pre(x2, *ffn, PARAMS, _bf16)
        return x2

    target, goal = ("<= 6 us graph (T=64)", 6.0) if t == 64 else ("-", None)
    for name, run, ref, notes in (("2 x (hc_pre + hc_post)", block, block_ref, "6 launches"),
                                  ("hc_pre + hc_post_pre + hc_post", block_fused, block_ref, "5 launches"),
                                  ("2 x hc_post_pre, steady state", steady, steady_ref, "4 launches")):
        out.append(Case(f"fast mHC of one block ({name})", shape, run, ref,
                        lambda run=run, ref=ref: f"{ulp_share(run(), ref()):.0e} 1-ulp",
                        2 * (pre_bytes(t) + post_bytes(t)), target, None, goal, ref_reps=3, notes=notes))
    return out


def cases() -> list[Case]:
    attn, ffn, head = site(0), site(1), site(2, rows=HC, num_scales=1)
    out = [case for t in (1, 64, 4096) for case in site_cases(t, attn, ffn)]
    x = torch.randn(64, HC, HIDDEN, generator=gen(3), device=DEV).bfloat16()
    out.append(Case(
        "fast hc_head (sigmoid collapse)", "T=64, D=4096, hc=4", lambda: mhc.hc_head(x, *head, EPS, EPS),
        lambda: ref_mhc.hc_head(x, *head, PARAMS, _bf16),
        lambda: f"{ulp_share(mhc.hc_head(x, *head, EPS, EPS), ref_mhc.hc_head(x, *head, PARAMS, _bf16)):.0e} 1-ulp",
        2 * 64 * HC * HIDDEN * 2 + HC * HC * HIDDEN * 4 + 64 * HIDDEN * 2, "-", ref_reps=3))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cases("fast-mhc", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

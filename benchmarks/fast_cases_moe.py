"""Benchmark cases of the fast routed experts (`dsv4.kernels.fast.moe`): one EP-4 rank of V4-Flash (E = 64 local
experts of D = 4096, I = 2048, FP4, top-6), tokens routed uniformly at random to 6 distinct local experts.

Targets (H200, graph nodes, fast-path issue): the decode-shaped grouped MoE (dispatch + GEMM 1 with the SwiGLU +
GEMM 2; combine listed apart) >= 70 % of the HBM floor at >= 64 tokens and <= 2x the floor at 1 token, the floor
being (bytes of the distinct experts touched + x and y) / ~4.2 TB/s. 4096 tokens is tensor-core bound (no floor
target; the notes give its FLOPs). Variants beside the default: the bf16 MMA (mma_fp8=False), dispatch alone, the
shared expert as one FP8 expert. The reference column times the PyTorch twin on the same GPU.

    python benchmarks/fast_cases_moe.py [--only "T=64"]
"""

from __future__ import annotations

import sys

import torch
from harness import DEV, Case, gen, run_cases

from dsv4.kernels import quant
from dsv4.kernels.fast import _moe_cuda, _moe_triton, moe

HBM_BPS, FP8_PEAK = 4.2e12, 1.27e15
E, D, INTER, TOPK, LIMIT = 64, 4096, 2048, 6, 10.0
TOKENS = (1, 8, 64, 256, 4096)


# ---------------------------------------------------------------------------------------------- inputs
def fp4_experts(seed: int) -> moe.ExpertWeights:
    g = gen(seed)

    def one(n: int, k: int):
        w = torch.randint(-128, 128, (n, k // 2), generator=g, device=DEV, dtype=torch.int8)
        s = torch.randint(115, 121, (n, k // 32), generator=g, device=DEV, dtype=torch.uint8)
        return w, s.view(torch.float8_e8m0fnu)

    return moe.stack_experts([(*one(INTER, D), *one(INTER, D), *one(D, INTER)) for _ in range(E)], "fp4")


def routed(num_tokens: int, num_experts: int, seed: int):
    g = gen(seed)
    experts = torch.rand(num_tokens, num_experts, generator=g, device=DEV).argsort(dim=1)[:, :TOPK]
    pair_row = torch.arange(num_tokens * TOPK, device=DEV) // TOPK
    pair_weight = torch.rand(num_tokens * TOPK, generator=g, device=DEV) * 0.5
    return pair_row, experts.flatten().to(torch.int32), pair_weight


def expert_bytes(ex: moe.ExpertWeights) -> int:
    return sum(t[0].numel() * t.element_size() for t in (ex.w13, ex.s13, ex.w2, ex.s2) if t is not None)


def accuracy(y, x, pair_row, pair_expert, pair_weight, ex, limit=LIMIT, max_pairs: int = 192) -> str:
    """Relative L2 error against float64 on the first pairs (y's own bf16 rounding: ~1.6e-3)."""
    pairs = torch.arange(min(max_pairs, pair_expert.shape[0]), device=DEV)
    err_num, err_den = 0.0, 0.0
    for e in pair_expert[pairs].unique().tolist():
        mine = pairs[pair_expert[pairs] == e]
        w13, w2 = ex.dense("w13", e).double(), ex.dense("w2", e).double()
        u = quant.fake_quant_fp8(x[pair_row[mine]].float(), 128)
        gu = (u.double() @ w13.t()).float().bfloat16().double()
        inter = ex.inter_size
        gate, up = gu[:, :inter].clamp(max=limit), gu[:, inter:].clamp(-limit, limit)
        h = (pair_weight[mine, None].double() * torch.nn.functional.silu(gate) * up).float().bfloat16()
        ref = quant.fake_quant_fp8(h.float(), 128).double() @ w2.t()
        err_num += float((y[mine].double() - ref).square().sum())
        err_den += float(ref.square().sum())
    err = (err_num / err_den) ** 0.5
    return f"rel {err:.1e}" + ("" if err <= 6e-3 else " FAIL")


# ---------------------------------------------------------------------------------------------- cases
def moe_case(ex: moe.ExpertWeights, num_tokens: int, label: str = "", mma_fp8: bool = True,
             tiles: tuple = (None, None), checked: bool = True, triton: bool = False,
             cuda: tuple[str, int] | None = None) -> Case:
    """The production path (`moe.expert_forward`), or with `triton` (or a forced MMA / tiling) the Triton grouped
    GEMMs, or with `cuda` = (kernel, block_m) one CUDA decode kernel (`_moe_cuda.KERNELS`) at that block size."""
    x = torch.randn(num_tokens, D, generator=gen(num_tokens), device=DEV).bfloat16()
    pair_row, pair_expert, pair_weight = routed(num_tokens, ex.num_experts, num_tokens + 1)
    num_pairs = pair_expert.shape[0]
    touched = int(pair_expert.unique().numel())
    moved = touched * expert_bytes(ex) + num_tokens * D * 2 + num_pairs * D * 2
    floor_us = moved / HBM_BPS * 1e6
    bm = moe.block_m_for(num_pairs, ex.num_experts)

    def run():
        if cuda is not None:
            return _moe_cuda.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT, cuda[1], cuda[0])
        if triton or not mma_fp8 or tiles != (None, None):
            return _moe_triton.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT, bm, mma_fp8=mma_fp8,
                                              tiles=tiles)
        return moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)

    if num_tokens == 1:
        target, graph_us = f"<= 2x floor graph ({2 * floor_us:.1f} us)", 2 * floor_us
    elif num_tokens in (64, 256):
        target, graph_us = f">= 70% floor graph ({floor_us / 0.7:.1f} us)", floor_us / 0.7
    else:
        target, graph_us = "-", None
    flops = 2 * num_pairs * 3 * D * INTER
    if not checked:      # a tiling variant: timed only
        return Case(f"fast expert_forward {ex.fmt}{label}", f"T={num_tokens}", run, lambda: None, lambda: "-",
                    moved, target, None, graph_us, ref_reps=1)
    return Case(f"fast expert_forward {ex.fmt}{label}", f"T={num_tokens}, E={ex.num_experts}, {touched} touched",
                run, lambda: moe._twin_expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT, bm),
                lambda: accuracy(run(), x, pair_row, pair_expert, pair_weight, ex), moved, target, None, graph_us,
                ref_reps=1, notes=f"{flops / 1e9:.0f} GFLOP ({flops / FP8_PEAK * 1e6:.0f} us at the FP8 peak)")


def combine_case(num_tokens: int) -> Case:
    y = torch.randn(num_tokens * TOPK, D, generator=gen(5), device=DEV).bfloat16()
    def reference():
        return y.float().view(num_tokens, TOPK, D).sum(1)

    def check():
        return f"max|diff| {float((moe.combine_pairs(y, TOPK) - reference()).abs().max()):.1e}"

    return Case("fast combine_pairs", f"T={num_tokens} x 6 slots", lambda: moe.combine_pairs(y, TOPK), reference,
                check, y.numel() * 2 + num_tokens * D * 4, "-")


def dispatch_case(num_tokens: int) -> Case:
    _, pair_expert, _ = routed(num_tokens, E, 6)
    bm = moe.block_m_for(pair_expert.shape[0], E)

    def check():
        got = _moe_triton.dispatch(pair_expert, E, bm)[1]
        return "exact" if torch.equal(got, moe.dispatch_pairs(pair_expert, E, bm).block_bucket) else "MISMATCH"

    return Case("fast moe dispatch (alone)", f"T={num_tokens}, E={E}", lambda: _moe_triton.dispatch(pair_expert, E, bm),
                lambda: moe.dispatch_pairs(pair_expert, E, bm), check, pair_expert.numel() * 8, "-")


def fp8_shared_expert(g: torch.Generator) -> moe.ExpertWeights:
    """The shared expert (FP8, 4096 -> 2048 -> 4096) as one stacked expert."""
    def one(n: int, k: int):
        w = torch.randn(n, k, generator=g, device=DEV).mul(32).clamp(-448, 448).to(torch.float8_e4m3fn)
        return w, torch.randint(112, 118, (n // 128, k // 128), generator=g, device=DEV,
                                dtype=torch.uint8).view(torch.float8_e8m0fnu)

    return moe.stack_experts([(*one(INTER, D), *one(INTER, D), *one(D, INTER))], "fp8")


def shared_inputs(num_tokens: int):
    """(experts, x, pair_row, pair_expert, pair_weight, bytes moved) of the shared-expert cases: every token is a
    pair of the one expert, weight 1."""
    g = gen(7)
    ex = fp8_shared_expert(g)
    x = torch.randn(num_tokens, D, generator=g, device=DEV).bfloat16()
    pair_row = torch.arange(num_tokens, device=DEV)
    pair_expert = torch.zeros(num_tokens, dtype=torch.int32, device=DEV)
    pair_weight = torch.ones(num_tokens, device=DEV)
    return ex, x, pair_row, pair_expert, pair_weight, expert_bytes(ex) + num_tokens * D * 4


def shared_case(num_tokens: int) -> Case:
    """The shared expert as one expert of the fused grouped pipeline."""
    ex, x, pair_row, pair_expert, pair_weight, moved = shared_inputs(num_tokens)
    floor_us = moved / HBM_BPS * 1e6

    def run():
        return moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)

    return Case("fast expert_forward fp8 (shared expert, E=1)", f"T={num_tokens}", run,
                lambda: moe._twin_expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT,
                                                 moe.block_m_for(num_tokens, 1)),
                lambda: accuracy(run(), x, pair_row, pair_expert, pair_weight, ex), moved,
                f">= 60% floor graph ({(1 + floor_us) / 0.6:.1f} us)", None, (1 + floor_us) / 0.6, ref_reps=3)


def shared_linear_case(num_tokens: int) -> Case:
    """The shared expert as the engine runs it (`moe.shared_expert_forward`: two FP8 linears around the fused
    SwiGLU), beside the grouped-pipeline case."""
    from dsv4.kernels.fast import linear

    ex, x, pair_row, pair_expert, pair_weight, moved = shared_inputs(num_tokens)
    w13, w2 = linear.prepare_fp8(ex.w13[0], ex.s13[0]), linear.prepare_fp8(ex.w2[0], ex.s2[0])

    def run():
        return moe.shared_expert_forward(x, w13, w2, LIMIT)

    return Case("fast shared_expert_forward (2 FP8 linears + SwiGLU)", f"T={num_tokens}", run, lambda: None,
                lambda: accuracy(run(), x, pair_row, pair_expert, pair_weight, ex), moved, "-")


def cases() -> list[Case]:
    ex = fp4_experts(0)
    out = [moe_case(ex, t) for t in TOKENS]
    out += [moe_case(ex, t, " (Triton)", triton=True) for t in (1, 8, 32, 64, 128, 256)]
    for kernel, block_m, tokens in (("mma", 8, (1, 8, 21)), ("wgmma", 8, (1, 8, 21, 32, 64)),
                                    ("wgmma-ring", 8, (1, 8, 21, 32, 64)), ("wgmma", 16, (21, 32, 64, 128, 256)),
                                    ("wgmma-ring", 16, (32, 64, 128))):
        out += [moe_case(ex, t, f" ({kernel}, {block_m}-row blocks)", cuda=(kernel, block_m)) for t in tokens]
    out.append(moe_case(ex, 64, " (bf16 MMA)", mma_fp8=False))
    out += [dispatch_case(t) for t in (64, 4096)]
    out += [combine_case(t) for t in (64, 4096)]
    out += [shared_case(t) for t in (1, 64)]
    out += [shared_linear_case(t) for t in (1, 64)]
    return out


def tiling_cases() -> list[Case]:
    """`--tilings`: the grouped GEMMs' launch geometries around the default, per decode size (tuning data)."""
    ex = fp4_experts(0)
    T = _moe_triton.GemmTiles
    grid = {1: ([T(128, 4, s) for s in (2, 4, 8, 16)], [T(64, 4, 1), T(64, 4, 2), T(128, 4, 2), T(128, 4, 4)]),
            8: ([T(128, 4, s) for s in (1, 2, 4)], [T(64, 4, 1), T(128, 4, 1), T(128, 4, 2)]),
            64: ([T(128, 4, 1), T(128, 8, 1), T(128, 4, 2), T(128, 4, 1, 3)],
                 [T(128, 4, 1), T(128, 8, 1), T(64, 4, 1)]),
            256: ([T(128, 8, 1), T(128, 4, 1), T(128, 8, 1, 3)], [T(128, 4, 1), T(128, 8, 1), T(64, 4, 1)])}
    out = []
    for num_tokens, (firsts, seconds) in grid.items():
        for t1 in firsts:
            for t2 in seconds:
                label = f" [g1 {t1.block_n}/{t1.warps}w/s{t1.split_k}/st{t1.stages}" \
                        f" g2 {t2.block_n}/{t2.warps}w/s{t2.split_k}/st{t2.stages}]"
                out.append(moe_case(ex, num_tokens, label, tiles=(t1, t2), checked=False))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--tilings" in argv:
        argv.remove("--tilings")
        return run_cases("fast-moe-tilings", [tiling_cases], argv, __doc__)
    return run_cases("fast-moe", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

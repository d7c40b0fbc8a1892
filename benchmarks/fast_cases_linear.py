"""Benchmark cases of the fast FP8 linears (`dsv4.kernels.fast.linear`), V4-Flash shapes.

Targets (H200, graph nodes, fast-path issue): FP8 projections >= 60 % of the HBM floor (weight + activation bytes
over ~4.2 TB/s; "% floor graph" in the table counts the 1 us node) at decode M = 1..64 for wq_a 1024x4096, wq_b
32768x1024, wkv 512x4096, wo_b 4096x8192, indexer wq_b 8192x1024, shared w1/w3 2048x4096 and w2 4096x2048, and the
grouped wo_a 8 x (1024 x 4096); prefill M = 4096..8192 >= 50 % of the FP8 tensor-core peak (~1,270 TFLOP/s
measured: cuBLAS blockwise `_scaled_mm` 4096 x 4096 x 8192 in 217 us). Prefill rows come in pairs, Triton and
cuBLAS, so `linear.PREFILL_THRESHOLD` can be chosen from one run; anchors: cuBLAS at M = 64 and a bf16 mm.
The reference column times the PyTorch twin (fp32 per-block GEMMs) on the same GPU.

    python benchmarks/fast_cases_linear.py [--only wq_b]
"""

from __future__ import annotations

import sys

import torch
from harness import DEV, LAUNCH_GRAPH_US, Case, gen, run_cases

from dsv4.kernels import quant
from dsv4.kernels.fast import linear

HBM_BPS, FP8_PEAK = 4.2e12, 1.27e15                                  # H200, measured
FLASH = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
         "indexer wq_b": (8192, 1024), "shared w1/w3": (2048, 4096), "shared w2": (4096, 2048)}
DECODE_M = (1, 8, 16, 64)
PREFILL = (("wq_b", 4096), ("wo_b", 4096), ("shared w1/w3", 8192), ("wq_a", 8192))


# ---------------------------------------------------------------------------------------------- inputs
def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    w = torch.randn(n, k, generator=g, device=DEV).mul(64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.randint(114, 121, (-(-n // 128), k // 128), generator=g, device=DEV, dtype=torch.uint8)
    return w, scale.view(torch.float8_e8m0fnu)


def activations(m: int, k: int, seed: int) -> torch.Tensor:
    return torch.randn(m, k, generator=gen(seed), device=DEV).bfloat16()


def accuracy(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, quant_act: bool = True,
             rows: int = 256) -> str:
    """Relative L2 error of the first `rows` rows against float64 (bf16 output rounding alone: ~1.5e-3)."""
    x, y = x[:rows], y[:rows]
    xv = quant.fake_quant_fp8(x.float(), 128) if quant_act else x.float()
    ref = xv.double() @ quant.dequantize_weight_fp8(w, s).double().t()
    err = float((y.double() - ref).norm() / ref.norm())
    return f"rel {err:.1e}" + ("" if err <= 5e-3 else " FAIL")


def weight_bytes(n: int, k: int) -> int:
    return n * k + -(-n // 128) * (k // 128)


# ---------------------------------------------------------------------------------------------- cases
def decode_case(name: str, n: int, k: int, m: int, mma_fp8: bool = True, acc_depth: int | None = None) -> Case:
    w, s = fp8_weight(n, k, m)
    x = activations(m, k, m + 1)
    prepared = linear.prepare_fp8(w, s)
    moved = weight_bytes(n, k) + m * k * 2 + m * n * 2
    floor_us = moved / HBM_BPS * 1e6
    def run():
        return linear.fp8_linear(x, prepared, mma_fp8=mma_fp8, acc_depth=acc_depth)

    variant = ("" if mma_fp8 else " (bf16 MMA)") + ("" if acc_depth is None else f" (acc depth {acc_depth})")
    return Case(f"fast fp8_linear {name}{variant}", f"M={m}, {n}x{k}", run,
                lambda: linear._twin_fp8_linear(x, w, s, True, torch.bfloat16),
                lambda: accuracy(run(), x, w, s), moved,
                f">= 60% floor graph ({(LAUNCH_GRAPH_US + floor_us) / 0.6:.1f} us)", None,
                (LAUNCH_GRAPH_US + floor_us) / 0.6, ref_reps=3)


def prefill_case(name: str, n: int, k: int, m: int, use_cublas: bool, acc_depth: int = 0) -> Case:
    w, s = fp8_weight(n, k, m + 7)
    x = activations(m, k, m + 8)
    prepared = linear.prepare_fp8(w, s)
    flops = 2 * m * n * k
    target_us = flops / (0.5 * FP8_PEAK) * 1e6

    def run():
        return linear.fp8_linear(x, prepared, prefill_threshold=1, use_cublas=use_cublas, acc_depth=acc_depth)

    path = "cuBLAS" if use_cublas else "Triton" + (f" acc depth {acc_depth}" if acc_depth else "")
    return Case(f"fast fp8_linear {name} prefill {path}",
                f"M={m}, {n}x{k}, {flops / 1e9:.0f} GFLOP", run,
                lambda: linear._twin_fp8_linear(x, w, s, True, torch.bfloat16), lambda: accuracy(run(), x, w, s),
                weight_bytes(n, k) + m * k * 2 + m * n * 2, f">= 50% FP8 peak ({target_us:.0f} us cold)",
                target_us, None, ref_reps=2, graph=False, notes="TFLOP/s = GFLOP / us cold / 1e3")


def anchor_cases() -> list[Case]:
    """cuBLAS blockwise FP8 at M = 64 (quantization kernel included) and a bf16 mm on a dequantized copy."""
    n, k, m = FLASH["wq_b"][0], FLASH["wq_b"][1], 64
    w, s = fp8_weight(n, k, 3)
    x = activations(m, k, 4)
    prepared = linear.prepare_fp8(w, s)
    w16 = quant.dequantize_weight_fp8(w, s).bfloat16()
    moved = weight_bytes(n, k) + m * k * 2 + m * n * 2

    def cublas():
        return linear.fp8_linear(x, prepared, prefill_threshold=1)

    return [
        Case("anchor cuBLAS blockwise FP8 (+ act quant)", f"M={m}, {n}x{k}", cublas,
             lambda: linear._twin_fp8_linear(x, w, s, True, torch.bfloat16), lambda: accuracy(cublas(), x, w, s),
             moved, "-", notes="colleague: 14.3 us graph without the quantization kernel"),
        Case("anchor bf16 mm (dequantized weight)", f"M=1, {n}x{k}", lambda: torch.nn.functional.linear(x[:1], w16),
             lambda: torch.nn.functional.linear(x[:1], w16), lambda: "-", n * k * 2 + k * 2 + n * 2, "-",
             notes="colleague: 19.4 us graph"),
    ]


def grouped_cases() -> list[Case]:
    g, r, k = 8, 1024, 4096
    w, s = fp8_weight(g * r, k, 5)
    deq = quant.dequantize_weight_fp8(w, s).view(g, r, k)
    out = []
    for m in (1, 8, 64, 4096):
        x = activations(m * g, k, 6 + m).view(m, g, k)
        moved = weight_bytes(g * r, k) + m * g * (k + r) * 2
        floor_us = moved / HBM_BPS * 1e6

        def twin(x=x):
            return torch.einsum("mgk,grk->mgr", x.float(), deq).bfloat16()

        def check(x=x):
            rows = x[:64]
            ref = torch.einsum("mgk,grk->mgr", rows.double(), deq.double())
            got = linear.grouped_fp8_linear(x, w, s)[:64].double()
            return f"rel {float((got - ref).norm() / ref.norm()):.1e}"

        if m <= 64:
            out.append(Case("fast grouped_fp8_linear wo_a", f"M={m}, 8 x (1024x4096)",
                            lambda x=x: linear.grouped_fp8_linear(x, w, s), twin, check, moved,
                            f">= 60% floor graph ({(LAUNCH_GRAPH_US + floor_us) / 0.6:.1f} us)", None,
                            (LAUNCH_GRAPH_US + floor_us) / 0.6, ref_reps=3))
            continue
        flops = 2 * m * g * r * k
        for use_cublas in (True, False):
            out.append(Case(f"fast grouped_fp8_linear wo_a prefill {'bf16 bmm' if use_cublas else 'Triton'}",
                            f"M={m}, 8 x (1024x4096), {flops / 1e9:.0f} GFLOP",
                            lambda x=x, c=use_cublas: linear.grouped_fp8_linear(x, w, s, use_cublas=c), twin, check,
                            moved, "-", ref_reps=2, graph=False,
                            notes="bf16 compute (no activation quantization); bf16 peak ~790 TFLOP/s"))
    return out


def cases() -> list[Case]:
    out = [decode_case(name, n, k, m) for name, (n, k) in FLASH.items() for m in DECODE_M]
    out += [decode_case(name, *FLASH[name], m, mma_fp8=False) for name in ("wq_b", "wo_b", "wq_a") for m in (1, 64)]
    out += [decode_case(name, *FLASH[name], m, acc_depth=0) for name in ("wq_b", "wo_b", "wq_a") for m in (1, 64)]
    out += grouped_cases()
    for name, m in PREFILL:
        n, k = FLASH[name]
        out += [prefill_case(name, n, k, m, use_cublas) for use_cublas in (False, True)]
        out.append(prefill_case(name, n, k, m, False, acc_depth=32))
    return out + anchor_cases()


def main(argv: list[str] | None = None) -> int:
    return run_cases("fast-linear", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

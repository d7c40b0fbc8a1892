"""Fast FP8 linears on the GPU (Triton kernels and the cuBLAS blockwise path) against float64 references built from
`quant.fake_quant_fp8` and `quant.dequantize_weight_fp8`, at V4-Flash and V4-Pro shapes; corner cases; CUDA-graph
capture + replay.

Tolerances (every product is exact; only the accumulation differs):
- fp32 outputs, relative L2 error: <= 1e-5 for the bf16 MMA (expected ~1e-6, fp32 accumulation), <= 2e-4 for the
  FP8 MMA (Hopper's FP8 tensor cores accumulate with ~14 mantissa bits inside one 128-deep block; expected
  ~1e-5..1e-4), <= 2e-4 for cuBLAS.
- bf16 outputs: relative L2 error <= 5e-3 (the bf16 rounding alone is ~1.5e-3) and every element within
  2^-8 |ref| + 2e-4 max|ref| (one bf16 ulp plus the accumulation error).
- act_quant_fp8: bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import quant
from dsv4.kernels.fast import _linear_triton, linear

pytestmark = pytest.mark.gpu
DEV = "cuda"

FLASH = {"wq_a": (1024, 4096), "wq_b": (32768, 1024), "wkv": (512, 4096), "wo_b": (4096, 8192),
         "idx_wq_b": (8192, 1024), "shared_w1": (2048, 4096), "shared_w2": (4096, 2048)}
PRO = {"wq_a": (1536, 7168), "wq_b": (65536, 1536), "wo_b": (7168, 16384), "shared_w2": (7168, 3072)}


# ---------------------------------------------------------------------------------------------- inputs
def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint-format FP8 weight made on the GPU: e4m3 values of a normal, UE8M0 tile scales 2^-13..2^-7."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=DEV).mul(64).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.randint(114, 121, (-(-n // 128), k // 128), generator=g, device=DEV, dtype=torch.uint8)
    return w, scale.view(torch.float8_e8m0fnu)


def activations(m: int, k: int, seed: int, *lead: int) -> torch.Tensor:
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g, device=DEV)
    return (x * torch.exp2(torch.randint(-4, 5, (*lead, m, 1), generator=g, device=DEV).float())).bfloat16()


def reference(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, quant_act: bool) -> torch.Tensor:
    xv = quant.fake_quant_fp8(x.float(), 128) if quant_act else x.float()
    return xv.double() @ quant.dequantize_weight_fp8(w, s).double().t()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def check(y: torch.Tensor, ref: torch.Tensor, fp32_tol: float = 2e-4) -> None:
    if y.dtype == torch.float32:
        assert rel_err(y, ref) <= fp32_tol, rel_err(y, ref)
        return
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 2e-4 * float(ref.abs().max())
    assert bool((err <= bound).all()), f"worst {float((err / bound).max()):.3g} x bound"
    assert rel_err(y, ref) <= 5e-3, rel_err(y, ref)


# ---------------------------------------------------------------------------------------------- act quant
@pytest.mark.parametrize("m,k", [(1, 4096), (64, 7168), (4096, 8192)])
def test_act_quant_bit_exact(m, k):
    x = activations(m, k, 0)
    x[0, :128] = 0
    q, s = linear.act_quant_fp8(x)
    q_ref, s_ref = quant.quantize_fp8_blocks(x.cpu(), 128)
    assert torch.equal(q.float().cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


# ---------------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("m", [1, 7, 16, 64])
@pytest.mark.parametrize("name", list(FLASH))
def test_flash_decode(name, m):
    n, k = FLASH[name]
    w, s = fp8_weight(n, k, 1)
    x = activations(m, k, 2)
    ref = reference(x, w, s, True)
    check(linear.fp8_linear(x, linear.prepare_fp8(w, s)), ref)
    check(linear.fp8_linear(x, w, s, out_dtype=torch.float32), ref)


@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("name", list(PRO))
def test_pro_decode(name, m):
    n, k = PRO[name]
    w, s = fp8_weight(n, k, 3)
    x = activations(m, k, 4)
    check(linear.fp8_linear(x, w, s), reference(x, w, s, True))


@pytest.mark.parametrize("splits", [1, 2, 5, 32])
@pytest.mark.parametrize("mma_fp8", [True, False])
def test_splits_and_mma(splits, mma_fp8):
    """Forced split-K counts (uneven ones included) and the two exact MMA choices, fp32 out."""
    w, s = fp8_weight(1024, 4096, 5)
    x = activations(16, 4096, 6)
    ref = reference(x, w, s, True)
    y = _linear_triton.fp8_gemm(x, w, s, 1, True, torch.float32, num_splits=splits, mma_fp8=mma_fp8)
    check(y, ref, 2e-4 if mma_fp8 else 1e-5)


@pytest.mark.parametrize("m", [1, 16, 300])
def test_acc_depth_promotes_inside_the_block(m):
    """acc_depth 32: the FP8 MMA's sums promoted into fp32 every 32 of K; closer to the exact sums than one
    128-deep MMA accumulation (rel L2 against the float64 reference, fp32 out), never worse than 2e-4."""
    w, s = fp8_weight(1024, 4096, 9)
    x = activations(m, 4096, 10)
    ref = reference(x, w, s, True)
    errs = {depth: rel_err(_linear_triton.fp8_gemm(x, w, s, 1, True, torch.float32, acc_depth=depth), ref)
            for depth in (0, 32)}
    print(f"\nM={m}: rel L2 vs float64, 128-deep {errs[0]:.2e}, 32-deep {errs[32]:.2e}")
    assert errs[32] <= errs[0] and errs[32] <= 2e-4, errs


def test_split_k_counters_reset():
    """The fused split-K reduce leaves every arrival counter at zero; repeated calls are bit-identical."""
    prepared = linear.prepare_fp8(*fp8_weight(1024, 4096, 11))
    x = activations(4, 4096, 12)
    first = linear.fp8_linear(x, prepared)
    for _ in range(3):
        assert torch.equal(linear.fp8_linear(x, prepared), first)
    assert int(prepared.semaphores.abs().sum()) == 0


@pytest.mark.parametrize("m", [1, 64, 300])
def test_w8a16(m):
    w, s = fp8_weight(2048, 4096, 7)
    x = activations(m, 4096, 8)
    ref = reference(x, w, s, False)
    check(linear.fp8_linear(x, w, s, quant_act=False), ref)
    check(linear.fp8_linear(x, w, s, quant_act=False, out_dtype=torch.float32), ref, 1e-5)


# ---------------------------------------------------------------------------------------------- prefill
@pytest.mark.parametrize("m,name", [(2048, "wq_a"), (2048, "wq_b"), (2048, "wo_b"), (8192, "wkv")])
@pytest.mark.parametrize("use_cublas", [False, True])
def test_prefill_paths(m, name, use_cublas):
    """Triton (pre-quantized FP8 activations, 128x128 tiles) and cuBLAS blockwise FP8, both against float64."""
    n, k = FLASH[name]
    w, s = fp8_weight(n, k, 9)
    x = activations(m, k, 10)
    y = linear.fp8_linear(x, linear.prepare_fp8(w, s), prefill_threshold=1, use_cublas=use_cublas)
    check(y, reference(x, w, s, True))


def test_cublas_at_decode_and_odd_m():
    """cuBLAS's blockwise recipe where it is allowed to run (M = 64, an M that is not a multiple of 16, and odd
    ones, which the path pads to a multiple of 4)."""
    w, s = fp8_weight(32768, 1024, 11)
    for m in (64, 1000, 381, 1001, 1003):
        x = activations(m, 1024, 12)
        check(linear.fp8_linear(x, linear.prepare_fp8(w, s), prefill_threshold=1), reference(x, w, s, True))


# ---------------------------------------------------------------------------------------------- corners
def test_corner_shapes():
    w, s = fp8_weight(320, 256, 13)            # N not a multiple of 128 or of the tile: Triton only
    for m in (1, 65, 600):
        x = activations(m, 256, 14)
        check(linear.fp8_linear(x, w, s, prefill_threshold=1), reference(x, w, s, True))
    y = linear.fp8_linear(torch.empty(0, 256, dtype=torch.bfloat16, device=DEV), w, s)
    assert y.shape == (0, 320) and y.is_cuda
    x = activations(5, 256, 15, 3)              # leading dims
    assert torch.equal(linear.fp8_linear(x, w, s)[1], linear.fp8_linear(x[1], w, s))


# ---------------------------------------------------------------------------------------------- grouped wo_a
@pytest.mark.parametrize("m", [1, 64, 1024])
@pytest.mark.parametrize("groups", [8, 16])                 # Flash, Pro
@pytest.mark.parametrize("use_cublas", [False, True])
def test_grouped_wo_a(m, groups, use_cublas):
    r, k = 1024, 4096
    w, s = fp8_weight(groups * r, k, 16)
    x = activations(m, k, 17, groups).transpose(0, 1).contiguous()          # [M, G, K]
    deq = quant.dequantize_weight_fp8(w, s).double().view(groups, r, k)
    ref = torch.einsum("mgk,grk->mgr", x.double(), deq)
    y = linear.grouped_fp8_linear(x, w, s, prefill_threshold=1024, use_cublas=use_cublas)
    assert y.shape == (m, groups, r)
    check(y, ref)


def test_grouped_small_groups_and_quant():
    """R = 64 (the tiny preset's o_lora_rank: two groups share a scale block) and quant_act=True."""
    g, r, k = 4, 64, 512
    w, s = fp8_weight(g * r, k, 18)
    x = activations(9, k, 19, g).transpose(0, 1).contiguous()
    deq = quant.dequantize_weight_fp8(w, s).double().view(g, r, k)
    for quant_act in (False, True):
        xv = quant.fake_quant_fp8(x.float(), 128) if quant_act else x.float()
        check(linear.grouped_fp8_linear(x, w, s, quant_act), torch.einsum("mgk,grk->mgr", xv.double(), deq))


def test_bf16_and_fp32_linears():
    g = torch.Generator(device=DEV).manual_seed(20)
    x = torch.randn(64, 4096, generator=g, device=DEV).bfloat16()
    for n in (129280 // 8, 1024, 512):      # cuBLAS, then the Triton decode kernel (compressor shapes)
        w = torch.randn(n, 4096, generator=g, device=DEV).bfloat16()
        for m in (1, 64):
            ref = x[:m].double() @ w.double().t()
            y32 = linear.fp32_linear(x[:m], w)
            assert y32.dtype == torch.float32 and rel_err(y32, ref) <= 1e-5
            check(linear.bf16_linear(x[:m], w), ref)


# ---------------------------------------------------------------------------------------------- CUDA graphs
def test_cuda_graph_capture_and_replay():
    """Decode with split-K, a prefill-sized call (act quant + GEMM) and the grouped wo_a in one graph; replays on
    new inputs equal eager calls."""
    w1, s1 = fp8_weight(1024, 4096, 21)
    w2, s2 = fp8_weight(8192, 4096, 22)
    prepared = linear.prepare_fp8(w1, s1)
    x_dec, x_pre = activations(8, 4096, 23), activations(200, 4096, 24)
    o = activations(8, 4096, 25, 8).transpose(0, 1).contiguous()

    def step():
        return (linear.fp8_linear(x_dec, prepared), linear.fp8_linear(x_pre, prepared, use_cublas=False),
                linear.grouped_fp8_linear(o, w2, s2))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                                       # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (26, 27):
        x_dec.copy_(activations(8, 4096, seed))
        x_pre.copy_(activations(200, 4096, seed + 10))
        o.copy_(activations(8, 4096, seed + 20, 8).transpose(0, 1))
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, step(), strict=True):
            assert torch.equal(got, want)

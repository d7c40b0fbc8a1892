"""Fast FP8 linears (`dsv4.kernels.fast.linear`): the PyTorch twins and, under Triton's interpreter, the kernels
against float64 references built from `quant.fake_quant_fp8` and `quant.dequantize_weight_fp8`.

Tolerances. Every product is exact (e4m3 * 2^k factors), so only summation order differs from the float64 sums:
fp32 outputs agree to a relative L2 error <= 1e-5 (observed ~2e-8 on the CPU: fp32 sums of at most 1024 terms);
bf16 outputs are within one bf16 ulp of the float64 value (|y - ref| <= 2^-8 |ref| + 1e-30) and to a relative L2
error <= 4e-3 (observed ~1.5e-3: the bf16 rounding itself). `act_quant_fp8` is bit-exact.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import quant
from dsv4.kernels.fast import linear


# ---------------------------------------------------------------------------------------------- helpers
def fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint-format FP8 weight whose 128x128 tiles span a few powers of two."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    tiles = torch.exp2(torch.randint(-3, 3, (-(-n // 128), k // 128), generator=g).float())
    w = w * tiles.repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)
    return quant.quantize_weight_fp8(w)


def activations(m: int, k: int, seed: int, *lead: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, m, k, generator=g)
    return (x * torch.exp2(torch.randint(-4, 5, (*lead, m, 1), generator=g).float())).bfloat16()


def reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, quant_act: bool) -> torch.Tensor:
    xv = quant.fake_quant_fp8(x.float(), 128) if quant_act else x.float()
    return xv.double() @ quant.dequantize_weight_fp8(weight, scale).double().t()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def assert_fp32_close(y: torch.Tensor, ref: torch.Tensor, tol: float = 1e-5) -> None:
    assert y.dtype == torch.float32
    assert rel_err(y, ref) <= tol, rel_err(y, ref)


def assert_bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.dtype == torch.bfloat16
    err = (y.double() - ref).abs()
    bound = ref.abs() * 2.0 ** -8 + 1e-30
    assert bool((err <= bound).all()), float((err / bound).max())
    assert rel_err(y, ref) <= 4e-3, rel_err(y, ref)


# ---------------------------------------------------------------------------------------------- twins
def test_act_quant_bit_exact():
    x = activations(9, 512, 0)
    x[0] = 0                                          # floor scale
    x[1, :128] = torch.tensor(448.0 * 2 ** 10)         # saturating block
    x[2, :4] = torch.tensor([1.0625, 1.1875, -1.0625, 3e-7])   # e4m3 ties and a tiny value
    q, s = linear.act_quant_fp8(x)
    q_ref, s_ref = quant.quantize_fp8_blocks(x, 128)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (9, 4)
    assert torch.equal(q.float(), q_ref) and torch.equal(s, s_ref)


@pytest.mark.parametrize("m,n,k", [(1, 64, 128), (3, 128, 256), (37, 320, 1024)])
@pytest.mark.parametrize("quant_act", [True, False])
def test_twin_matches_reference(m, n, k, quant_act):
    w, s = fp8_weight(n, k, 1)
    x = activations(m, k, 2)
    ref = reference(x, w, s, quant_act)
    assert_fp32_close(linear.fp8_linear(x, w, s, quant_act, out_dtype=torch.float32), ref)
    assert_bf16_close(linear.fp8_linear(x, w, s, quant_act), ref)


def test_prepared_weight_and_leading_dims():
    w, s = fp8_weight(256, 384, 3)
    x = activations(5, 384, 4, 2)                     # [2, 5, K]
    prepared = linear.prepare_fp8(w, s)
    assert prepared.weight is w and prepared.mm_scale is None and prepared.out_features == 256
    y = linear.fp8_linear(x, prepared)
    assert y.shape == (2, 5, 256)
    assert torch.equal(y, linear.fp8_linear(x, w, s))
    assert torch.equal(y[1], linear.fp8_linear(x[1], w, s))


def test_fp32_scales():
    """-Base checkpoints store the power-of-two scales as fp32: re-encoded exactly as UE8M0."""
    w, s = fp8_weight(192, 256, 21)
    x = activations(4, 256, 22)
    s32 = quant.ue8m0_values(s)
    assert linear.prepare_fp8(w, s32).scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(linear.fp8_linear(x, w, s32), linear.fp8_linear(x, w, s))
    assert torch.equal(linear.grouped_fp8_linear(x.view(4, 1, 256).expand(4, 2, 256).contiguous(), w, s32),
                       linear.grouped_fp8_linear(x.view(4, 1, 256).expand(4, 2, 256).contiguous(), w, s))


def test_empty_batch():
    w, s = fp8_weight(128, 256, 5)
    y = linear.fp8_linear(torch.empty(0, 256, dtype=torch.bfloat16), w, s)
    assert y.shape == (0, 128) and y.dtype == torch.bfloat16
    g = linear.grouped_fp8_linear(torch.empty(0, 2, 256, dtype=torch.bfloat16), w, s)
    assert g.shape == (0, 2, 64)


def test_prepare_rejects_bad_shapes():
    w, s = fp8_weight(256, 256, 6)
    with pytest.raises(ValueError, match="scale"):
        linear.prepare_fp8(w, s[:1])
    with pytest.raises(ValueError, match="K % 128"):
        linear.prepare_fp8(w[:, :200].contiguous(), s)
    with pytest.raises(ValueError, match="scale"):
        linear.fp8_linear(activations(2, 256, 0), w)


@pytest.mark.parametrize("g,r,k", [(4, 64, 256), (2, 192, 384), (8, 128, 128)])
@pytest.mark.parametrize("quant_act", [False, True])
def test_grouped_twin(g, r, k, quant_act):
    """wo_a: group i through rows i*R..(i+1)*R; R = 64 puts two groups in one 128-row scale block (tiny preset)."""
    w, s = fp8_weight(g * r, k, 7)
    x = activations(6, k, 8, g).transpose(0, 1).contiguous()        # [M, G, K], rows spread per group
    deq = quant.dequantize_weight_fp8(w, s).double().view(g, r, k)
    xv = quant.fake_quant_fp8(x.float(), 128) if quant_act else x.float()
    ref = torch.einsum("mgk,grk->mgr", xv.double(), deq)
    y = linear.grouped_fp8_linear(x, w, s, quant_act)
    assert y.shape == (6, g, r)
    assert_bf16_close(y, ref)
    assert_fp32_close(linear.grouped_fp8_linear(x, w, s, quant_act, out_dtype=torch.float32), ref)


def test_bf16_and_fp32_linears():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(7, 256, generator=g).bfloat16()
    w = torch.randn(96, 256, generator=g).bfloat16()
    ref = x.double() @ w.double().t()
    y32 = linear.fp32_linear(x, w)
    assert y32.dtype == torch.float32 and rel_err(y32, ref) <= 1e-6
    assert_bf16_close(linear.bf16_linear(x, w), ref)


# ---------------------------------------------------------------------------------------------- Triton (interpreter)
@pytest.fixture
def tri():
    from dsv4.kernels.fast import _linear_triton

    return _linear_triton


@pytest.mark.triton
def test_triton_act_quant_bit_exact(tri):
    x = activations(19, 256, 10)
    x[3] = 0
    x[4, 128:] = torch.tensor(1e30)
    q, s = tri.act_quant_fp8(x)
    q_ref, s_ref = quant.quantize_fp8_blocks(x, 128)
    assert torch.equal(q.float(), q_ref) and torch.equal(s, s_ref)
    q2 = torch.empty_like(q)
    s2 = torch.empty(2, 19).t()                         # K-block-major, as cuBLAS reads scale_a
    tri.act_quant_fp8(x, q2, s2)
    assert torch.equal(q2.float(), q_ref) and torch.equal(s2, s_ref)


@pytest.mark.triton
@pytest.mark.parametrize("m,splits", [(1, None), (5, 1), (5, 3), (33, 2), (70, None)])
@pytest.mark.parametrize("quant_act", [True, False])
def test_triton_gemm(tri, m, splits, quant_act):
    """Decode tiles (fused quantization, forced split-K counts), and M = 70 (pre-quantized, 128x128 tiles)."""
    w, s = fp8_weight(192, 512, 11)
    x = activations(m, 512, 12)
    ref = reference(x, w, s, quant_act)
    assert_fp32_close(tri.fp8_gemm(x, w, s, 1, quant_act, torch.float32, num_splits=splits), ref)
    assert_bf16_close(tri.fp8_gemm(x, w, s, 1, quant_act, torch.bfloat16, num_splits=splits), ref)


@pytest.mark.triton
def test_triton_split_k_counters_reset(tri):
    """The fused split-K reduce (token tiles of 16): each tile's arrival counter is back at zero after the launch,
    so the same counters serve the next call (and every graph replay) with the same result; uneven split counts
    (the reduce loads 4 partials per step) included."""
    w, s = fp8_weight(192, 1024, 21)
    x = activations(3, 1024, 22)
    sems = tri.semaphores_for(x.device)
    for splits in (4, 3):
        first = tri.fp8_gemm(x, w, s, 1, True, torch.float32, num_splits=splits, semaphores=sems)
        assert int(sems.abs().sum()) == 0
        assert torch.equal(tri.fp8_gemm(x, w, s, 1, True, torch.float32, num_splits=splits, semaphores=sems), first)
        assert_fp32_close(first, reference(x, w, s, True))


@pytest.mark.triton
def test_triton_gemm_bf16_mma(tri):
    """mma_fp8=False widens both e4m3 operands to bf16 (exact): same values as the FP8 MMA path."""
    w, s = fp8_weight(64, 256, 13)
    x = activations(3, 256, 14)
    ref = reference(x, w, s, True)
    assert_fp32_close(tri.fp8_gemm(x, w, s, 1, True, torch.float32, mma_fp8=False), ref)


@pytest.mark.triton
@pytest.mark.parametrize("quant_act", [False, True])
def test_triton_grouped(tri, quant_act):
    g, r, k = 2, 64, 256
    w, s = fp8_weight(g * r, k, 15)
    x = activations(4, k, 16, g).transpose(0, 1).contiguous()
    deq = quant.dequantize_weight_fp8(w, s).double().view(g, r, k)
    xv = quant.fake_quant_fp8(x.float(), 128) if quant_act else x.float()
    ref = torch.einsum("mgk,grk->mgr", xv.double(), deq).reshape(4, g * r)
    y = tri.fp8_gemm(x.view(4, g * k), w, s, g, quant_act, torch.float32, num_splits=2)
    assert_fp32_close(y, ref)


@pytest.mark.triton
def test_triton_dequant(tri):
    w, s = fp8_weight(160, 256, 17)
    assert torch.equal(tri.dequant_fp8(w, s), quant.dequantize_weight_fp8(w, s).bfloat16())


@pytest.mark.triton
def test_plan_heuristics(tri, monkeypatch):
    """Decode shapes split K when N alone gives < 2 programs per SM (132 SMs); prefill tiles are 128 x 128."""
    monkeypatch.setattr(tri, "num_sms", lambda device: 132)
    dev = torch.device("cpu")
    wq_a = tri.plan_gemm(1, 1, 1024, 4096, dev)          # 16 tiles -> split
    wq_b = tri.plan_gemm(64, 1, 32768, 1024, dev)        # 512 tiles -> none
    wkv64 = tri.plan_gemm(64, 1, 512, 4096, dev)         # partial bytes capped by the weight's
    prefill = tri.plan_gemm(4096, 1, 4096, 8192, dev)
    assert (wq_a.block_n, wq_a.block_t) == (64, 16) and wq_a.num_splits > 1
    assert wq_a.num_splits * wq_a.kb_per_split >= 32 > (wq_a.num_splits - 1) * wq_a.kb_per_split
    assert wq_b.num_splits == 1 and wq_b.block_t == 64
    assert wkv64.num_splits * 64 * 512 * 4 <= max(512 * 4096, 1 << 22)
    assert (prefill.block_n, prefill.block_t, prefill.num_splits) == (128, 128, 1)

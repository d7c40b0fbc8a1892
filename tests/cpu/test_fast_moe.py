"""Fast routed experts (`dsv4.kernels.fast.moe`): dispatch, the grouped-GEMM pipeline and combine; the PyTorch
twin and, under Triton's interpreter, the kernels, against a per-pair float64 reference built from the same
quantizers and dequantizers (and once against `dsv4.model.moe.Expert` in reference numerics).

Tolerances. Products are exact and sums fp32, so the only differences are summation order and what that does to
the bf16 / e4m3 rounding of g, v and h (a rare one-step flip). Per pair: relative L2 error of y against the
float64 reference (which rounds g, v, h like the official code but not y) <= 8e-3 (observed ~1.6e-3: y's own bf16
rounding); over all pairs <= 4e-3. Against the reference's own bf16 y: >= 90 % of elements equal (observed
~98-100 %). Selections (dispatch) and zero rows are exact.
"""

from __future__ import annotations

import pytest
import torch

from dsv4.kernels import quant
from dsv4.kernels.fast import moe

LIMIT = 10.0


# ---------------------------------------------------------------------------------------------- helpers
def make_experts(fmt: str, num_experts: int, d: int, inter: int, seed: int) -> moe.ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    per = []
    for _ in range(num_experts):
        mats = []
        for n, k in ((inter, d), (inter, d), (d, inter)):
            w = torch.randn(n, k, generator=g) * k ** -0.5 * 4
            if fmt == "fp4":
                mats += list(quant.quantize_weight_fp4(w))
            elif fmt == "fp8":
                mats += list(quant.quantize_weight_fp8(w))
            else:
                mats += [w.bfloat16(), None]
        per.append(tuple(mats))
    return moe.stack_experts(per, fmt)


def make_pairs(num_rows: int, num_pairs: int, num_experts: int, seed: int, off_rank: float = 0.25):
    """(pair_row, pair_expert, pair_weight): uniform routing, a fraction of the pairs off this rank (-1)."""
    g = torch.Generator().manual_seed(seed)
    pair_row = torch.randint(0, num_rows, (num_pairs,), generator=g)
    pair_expert = torch.randint(0, num_experts, (num_pairs,), generator=g, dtype=torch.int32)
    pair_expert[torch.rand(num_pairs, generator=g) < off_rank] = -1
    pair_weight = torch.rand(num_pairs, generator=g) * 1.5
    return pair_row, pair_expert, pair_weight


def rows(num_rows: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, d, generator=g)
    return (x * torch.exp2(torch.randint(-3, 4, (num_rows, 1), generator=g).float())).bfloat16()


def reference(x, pair_row, pair_expert, pair_weight, ex: moe.ExpertWeights, limit: float = LIMIT):
    """Per pair in float64: the official rounding points (bf16 g, v, h; FP8 activations), y unrounded."""
    inter = ex.inter_size
    out = torch.zeros(pair_expert.shape[0], ex.hidden_size, dtype=torch.float64)
    weights = {}
    for p in range(pair_expert.shape[0]):
        e = int(pair_expert[p])
        if not 0 <= e < ex.num_experts:
            continue
        if e not in weights:
            weights[e] = (ex.dense("w13", e).double(),
                          ex.dense("w2", e).double())
        w13, w2 = weights[e]
        u = x[pair_row[p]][None].float()
        u = u if ex.fmt == "bf16" else quant.fake_quant_fp8(u, 128)
        gu = (u.double() @ w13.t()).float().bfloat16().double()[0]
        gate, up = gu[:inter].clamp(max=limit), gu[inter:].clamp(-limit, limit)
        h = (float(pair_weight[p]) * (torch.nn.functional.silu(gate) * up)).float().bfloat16().float()[None]
        h = h if ex.fmt == "bf16" else quant.fake_quant_fp8(h, 128)
        out[p] = (h.double() @ w2.t())[0]
    return out


def assert_pairs_close(y: torch.Tensor, ref: torch.Tensor, pair_expert: torch.Tensor, num_experts: int) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    off = (pair_expert < 0) | (pair_expert >= num_experts)
    assert bool((y[off] == 0).all())
    on = ~off
    if not bool(on.any()):
        return
    yv, rv = y[on].double(), ref[on]
    per_pair = (yv - rv).norm(dim=1) / rv.norm(dim=1).clamp(min=1e-300)
    assert float(per_pair.max()) <= 8e-3, float(per_pair.max())
    assert float((yv - rv).norm() / rv.norm()) <= 4e-3
    same = (y[on] == rv.bfloat16()).float().mean()
    assert float(same) >= 0.9, float(same)


# ---------------------------------------------------------------------------------------------- dispatch
def check_dispatch(plan: moe.Dispatch, pair_expert: torch.Tensor, num_experts: int) -> None:
    """Every pair exactly once, in its bucket's rows, stable order; blocks tile the buckets; padding unused."""
    bm, num_pairs = plan.block_m, pair_expert.shape[0]
    e = pair_expert.long()
    bucket = torch.where((e >= 0) & (e < num_experts), e, num_experts)
    num_blocks = num_pairs // bm + min(num_experts + 1, num_pairs)
    assert plan.block_bucket.shape == (num_blocks,) and plan.sorted_pair.shape == (num_blocks * bm,)
    for b in range(num_experts + 1):
        start, count = int(plan.bucket_start[b]), int(plan.bucket_count[b])
        mine = torch.nonzero(bucket == b).flatten()
        assert count == mine.numel() and start % bm == 0
        assert torch.equal(plan.sorted_pair[start:start + count].long(), mine)
        first, last = start // bm, (start + count + bm - 1) // bm
        assert bool((plan.block_bucket[first:last] == b).all())
    used = int((plan.block_bucket >= 0).sum())
    assert bool((plan.block_bucket[used:] == -1).all())
    assert used == sum(-(-int(c) // bm) for c in plan.bucket_count[:num_experts + 1])


ROUTINGS = {
    "uniform": lambda p, e, g: torch.randint(-1, e, (p,), generator=g, dtype=torch.int32),
    "one_hot_expert": lambda p, e, g: torch.full((p,), e - 1, dtype=torch.int32),
    "all_off_rank": lambda p, e, g: torch.full((p,), -1, dtype=torch.int32),
    "sparse_experts": lambda p, e, g: torch.randint(0, 3, (p,), generator=g, dtype=torch.int32) * (e // 3),
    "out_of_range": lambda p, e, g: torch.randint(-3, e + 3, (p,), generator=g, dtype=torch.int32),
}


@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("num_pairs,num_experts", [(1, 16), (6, 64), (384, 64), (1000, 32), (2000, 256)])
def test_dispatch_pairs(routing, num_pairs, num_experts):
    g = torch.Generator().manual_seed(num_pairs)
    pair_expert = ROUTINGS[routing](num_pairs, num_experts, g)
    bm = moe.block_m_for(num_pairs, num_experts)
    check_dispatch(moe.dispatch_pairs(pair_expert, num_experts, bm), pair_expert, num_experts)


def test_block_m():
    assert moe.block_m_for(6, 64) == 16 and moe.block_m_for(1536, 64) == 32 and moe.block_m_for(24576, 64) == 64
    assert moe.block_m_for(100, 1) == 64 and moe.block_m_for(0, 64) == 16
    # the CUDA decode GEMMs (wgmma): 8-row blocks up to 3 expected pairs per expert (32 tokens x top-6 on 64)
    assert moe.decode_block_m(6, 64) == 8 and moe.decode_block_m(192, 64) == 8
    assert moe.decode_block_m(193, 64) == 0 and moe.decode_block_m(384, 64) == 0


def test_decode_kernel_support():
    from dsv4.kernels.fast import _moe_cuda

    assert _moe_cuda.supports(make_experts("fp4", 2, 1024, 1024, 0), 8)
    assert _moe_cuda.supports(make_experts("fp4", 2, 1024, 1024, 0), 16)          # the wgmma kernels: 8 or 16
    assert not _moe_cuda.supports(make_experts("fp4", 2, 1024, 1024, 0), 16, "mma")   # mma.sync: 8-row blocks
    assert not _moe_cuda.supports(make_experts("fp4", 2, 1024, 1024, 0), 32)
    assert not _moe_cuda.supports(make_experts("fp4", 2, 1024, 512, 0), 8)        # K steps of 1024
    assert not _moe_cuda.supports(make_experts("fp8", 2, 1024, 1024, 0), 8)


def test_shared_expert_as_two_linears():
    """The shared expert's path (FP8 linears around the SwiGLU) against the per-pair float64 reference with one
    expert of weight 1."""
    from dsv4.kernels.fast import linear

    ex = make_experts("fp8", 1, 256, 384, 8)
    x = rows(9, 256, 9)
    y = moe.shared_expert_forward(x, linear.prepare_fp8(ex.w13[0], ex.s13[0]), linear.prepare_fp8(ex.w2[0], ex.s2[0]),
                                  LIMIT)
    pair_row, pair_expert = torch.arange(9), torch.zeros(9, dtype=torch.int32)
    assert_pairs_close(y, reference(x, pair_row, pair_expert, torch.ones(9), ex), pair_expert, 1)


# ---------------------------------------------------------------------------------------------- twin
@pytest.mark.parametrize("fmt", ["fp4", "fp8", "bf16"])
@pytest.mark.parametrize("num_experts,d,inter,num_pairs", [(4, 128, 128, 10), (16, 256, 384, 60)])
def test_twin_matches_reference(fmt, num_experts, d, inter, num_pairs):
    ex = make_experts(fmt, num_experts, d, inter, 0)
    pair_row, pair_expert, pair_weight = make_pairs(7, num_pairs, num_experts, 1)
    x = rows(7, d, 2)
    y = moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)
    assert_pairs_close(y, reference(x, pair_row, pair_expert, pair_weight, ex), pair_expert, num_experts)


@pytest.mark.parametrize("routing", ["one_hot_expert", "all_off_rank", "sparse_experts", "out_of_range"])
def test_twin_corner_routings(routing):
    ex = make_experts("fp4", 8, 128, 128, 3)
    g = torch.Generator().manual_seed(4)
    pair_expert = ROUTINGS[routing](40, 8, g)
    x = rows(9, 128, 5)
    pair_row = torch.randint(0, 9, (40,), generator=g)
    pair_weight = torch.rand(40, generator=g)
    y = moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)
    assert_pairs_close(y, reference(x, pair_row, pair_expert, pair_weight, ex), pair_expert, 8)


def test_twin_empty_and_clamp():
    ex = make_experts("fp4", 4, 128, 128, 6)
    x = rows(3, 128, 7) * 64                                  # large rows: the SwiGLU clamps engage
    y = moe.expert_forward(x, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.int32),
                           torch.empty(0), ex, LIMIT)
    assert y.shape == (0, 128) and y.dtype == torch.bfloat16
    pair_row, pair_expert, pair_weight = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3], dtype=torch.int32), \
        torch.tensor([1.0, 0.5, 1.5])
    y = moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)
    assert_pairs_close(y, reference(x, pair_row, pair_expert, pair_weight, ex), pair_expert, 4)


def test_twin_matches_model_expert():
    """Once against the model's own `Expert` (FP4, reference numerics) of the tiny preset's widths."""
    from dsv4.model.layers import WeightFormat
    from dsv4.model.moe import Expert
    from dsv4.model.numerics import Numerics

    d, inter, num_experts = 128, 128, 3
    ex = make_experts("fp4", num_experts, d, inter, 8)
    modules = []
    for e in range(num_experts):
        module = Expert(d, inter, WeightFormat.FP4, LIMIT)
        for name, w, s in (("w1", ex.w13[e, :inter], ex.s13[e, :inter]), ("w3", ex.w13[e, inter:],
                                                                          ex.s13[e, inter:]),
                           ("w2", ex.w2[e], ex.s2[e])):
            getattr(module, name).weight.copy_(quant.merge_fp4_nibbles(w))      # checkpoint order
            getattr(module, name).scale.copy_(s)
        modules.append(module)
    x = rows(5, d, 9)
    pair_row = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    pair_expert = torch.tensor([0, 1, 2, 0, 1, 2, -1], dtype=torch.int32)
    pair_weight = torch.tensor([0.3, 1.2, 0.7, 1.0, 0.1, 2.0, 0.5])
    numerics = Numerics.parse("reference")
    ref = torch.zeros(7, d, dtype=torch.float64)
    for p in range(6):
        out = modules[int(pair_expert[p])](x[pair_row[p]][None], numerics, pair_weight[p].view(1, 1))
        ref[p] = out[0].double()
    y = moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)
    assert bool((y[6] == 0).all())
    assert float((y[:6].double() - ref[:6]).norm() / ref[:6].norm()) <= 4e-3
    assert float((y[:6] == ref[:6].bfloat16()).float().mean()) >= 0.9


def test_stack_experts_layout_and_errors():
    ex = make_experts("fp8", 2, 128, 256, 10)
    assert (ex.num_experts, ex.hidden_size, ex.inter_size) == (2, 128, 256)
    assert ex.w13.shape == (2, 512, 128) and ex.s13.shape == (2, 4, 1) and ex.s2.dtype == torch.float8_e8m0fnu
    parts = (ex.w13[0, :256], ex.s13[0, :2], ex.w13[0, 256:], ex.s13[0, 2:], ex.w2[0], ex.s2[0])
    as_fp32 = tuple(quant.ue8m0_values(t) if t.dtype == torch.float8_e8m0fnu else t for t in parts)
    again = moe.stack_experts([as_fp32], "fp8")                 # fp32 power-of-two scales (-Base): re-encoded
    assert torch.equal(again.s13.view(torch.uint8), ex.s13[:1].view(torch.uint8))
    assert torch.equal(again.s2.view(torch.uint8), ex.s2[:1].view(torch.uint8))
    w1, s1 = quant.quantize_weight_fp4(torch.randn(128, 128))
    w2, s2 = quant.quantize_weight_fp4(torch.randn(128, 128))
    with pytest.raises(ValueError, match="format"):
        moe.stack_experts([(w1, s1, w1, s1, w2, s2)], "fp6")
    with pytest.raises(ValueError, match="shapes"):
        moe.stack_experts([(w1, s1, w1, s1, w2, s2), (w1[:64], s1[:64], w1, s1, w2, s2)], "fp4")
    with pytest.raises(ValueError, match="multiples of 128"):
        w1b, s1b = quant.quantize_weight_fp4(torch.randn(96, 128))
        w2b, s2b = quant.quantize_weight_fp4(torch.randn(128, 96))
        moe.stack_experts([(w1b, s1b, w1b, s1b, w2b, s2b)], "fp4")


def test_combine_pairs():
    g = torch.Generator().manual_seed(11)
    y = torch.randn(5 * 6, 64, generator=g).bfloat16()
    out = moe.combine_pairs(y, 6)
    ref = y.double().view(5, 6, 64).sum(1)
    assert out.dtype == torch.float32 and out.shape == (5, 64)
    assert float((out.double() - ref).abs().max()) <= 1e-5
    assert moe.combine_pairs(torch.empty(0, 64, dtype=torch.bfloat16), 6).shape == (0, 64)
    with pytest.raises(ValueError):
        moe.combine_pairs(y[:7], 6)


# ---------------------------------------------------------------------------------------------- Triton (interpreter)
@pytest.fixture
def tri():
    from dsv4.kernels.fast import _moe_triton

    return _moe_triton


@pytest.mark.triton
@pytest.mark.parametrize("routing", list(ROUTINGS))
@pytest.mark.parametrize("num_pairs,num_experts", [(1, 16), (10, 4), (384, 64), (300, 256), (5000, 4)])
def test_triton_dispatch(tri, routing, num_pairs, num_experts):
    """One program (small P) and count -> offsets -> scatter (300 pairs over 256 experts; 5000 pairs)."""
    g = torch.Generator().manual_seed(num_pairs + num_experts)
    pair_expert = ROUTINGS[routing](num_pairs, num_experts, g)
    bm = moe.block_m_for(num_pairs, num_experts)
    sorted_pair, block_bucket, bucket_start, bucket_count = tri.dispatch(pair_expert, num_experts, bm)
    nb = num_experts + 1
    plan = moe.Dispatch(bm, sorted_pair, block_bucket, bucket_start[:nb], bucket_count[:nb])
    check_dispatch(plan, pair_expert, num_experts)
    oracle = moe.dispatch_pairs(pair_expert, num_experts, bm)
    assert torch.equal(block_bucket, oracle.block_bucket) and torch.equal(bucket_start[:nb], oracle.bucket_start)


@pytest.mark.triton
@pytest.mark.parametrize("fmt,tiles", [("fp4", None), ("fp4", (128, 1, 2)), ("fp4", (128, 2, 2)), ("fp8", None),
                                       ("fp8", (128, 2, 1)), ("bf16", None), ("bf16", (64, 2, 2))])
def test_triton_expert_forward(tri, fmt, tiles):
    """E = 4, D = I = 256, P = 10 (a quarter off-rank), against the float64 reference and the twin; the default
    geometry and forced ones: 64 weight rows per program (the decode choice) and split K in either GEMM (tiles =
    (block_n, GEMM 1's K splits, GEMM 2's))."""
    ex = make_experts(fmt, 4, 256, 256, 12)
    pair_row, pair_expert, pair_weight = make_pairs(5, 10, 4, 13)
    x = rows(5, 256, 14)
    forced = (None, None) if tiles is None else (tri.GemmTiles(tiles[0], 4, tiles[1]),
                                                 tri.GemmTiles(tiles[0], 4, tiles[2]))
    y = tri.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT, block_m=16, tiles=forced)
    assert_pairs_close(y, reference(x, pair_row, pair_expert, pair_weight, ex), pair_expert, 4)
    twin = moe.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT)
    assert float((y.float() != twin.float()).float().mean()) <= 0.02


@pytest.mark.triton
@pytest.mark.parametrize("routing", ["one_hot_expert", "all_off_rank"])
def test_triton_corner_routings(tri, routing):
    """Every pair on one expert (several blocks of it; bf16 operands for the MMA), and no pair on this rank."""
    ex = make_experts("fp4", 4, 128, 128, 15)
    g = torch.Generator().manual_seed(16)
    pair_expert = ROUTINGS[routing](40, 4, g)
    x = rows(6, 128, 17)
    pair_row = torch.randint(0, 6, (40,), generator=g)
    pair_weight = torch.rand(40, generator=g)
    y = tri.expert_forward(x, pair_row, pair_expert, pair_weight, ex, LIMIT, block_m=16, mma_fp8=False)
    assert_pairs_close(y, reference(x, pair_row, pair_expert, pair_weight, ex), pair_expert, 4)


@pytest.mark.triton
def test_triton_empty_and_combine(tri):
    ex = make_experts("fp4", 4, 128, 128, 18)
    y = tri.expert_forward(rows(2, 128, 19), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.int32),
                           torch.empty(0), ex, LIMIT, block_m=16)
    assert y.shape == (0, 128)
    pairs = torch.randn(4 * 6, 200).bfloat16()
    assert torch.allclose(tri.combine_pairs(pairs, 6), moe.combine_pairs(pairs, 6), rtol=0, atol=1e-5)


def test_fp4_to_e4m3_bit_trick():
    """The in-register FP4 -> e4m3 conversion (`_moe_triton._fp4_to_e4m3`, same formula as its asm): every byte's
    two nibbles become e4m3 values equal to e2m1 * 2^-6."""
    byt = torch.arange(256, dtype=torch.int32)
    lo = ((byt & 0x08) << 4) | ((byt & 0x07) << 2)
    hi = (byt & 0x80) | ((byt >> 2) & 0x1C)
    codes = quant.unpack_fp4(byt.to(torch.uint8))
    want = quant.e2m1_values(codes).view(256, 2) * 2.0 ** -6
    got = torch.stack([quant.e4m3_values(lo.to(torch.uint8)), quant.e4m3_values(hi.to(torch.uint8))], 1)
    assert torch.equal(got, want)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    # the GPU's asm does it on four bytes per 32-bit word: the masks keep bits from crossing byte lanes
    words = torch.randint(0, 2 ** 32, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    lo_w = ((words << 4) & 0x80808080) | ((words << 2) & 0x1C1C1C1C)
    hi_w = ((words >> 2) & 0x1C1C1C1C) | (words & 0x80808080)
    lanes = torch.stack([(words >> (8 * j)) & 0xFF for j in range(4)], 1)
    assert torch.equal(torch.stack([(lo_w >> (8 * j)) & 0xFF for j in range(4)], 1), lo[lanes])
    assert torch.equal(torch.stack([(hi_w >> (8 * j)) & 0xFF for j in range(4)], 1), hi[lanes])

"""Fast mHC (`dsv4.kernels.fast.mhc`) against the float64 reference (`dsv4.model.mhc`).

Tolerances (observed on this machine in brackets): post and comb max relative error <= 2e-6 (~1e-7, twin and
Triton alike: fp32 accumulation of the 24 x 4D mixes GEMM); h and the hc_post / hc_head outputs: bf16 results
differing from the reference by at most one bf16 ulp, in at most 1% of the elements (0 seen: fp32 vs float64 sums
only flip a bf16 rounding at a near-tie).

The Triton kernels run under Triton's interpreter on CPU tensors (marker `triton`), at the tiny preset's
D = 128, hc = 4 and one wider D (several K splits, several D blocks, two token tiles).
"""

from __future__ import annotations

import pytest
import torch
from fast_inputs import mhc_site as site
from numerics_compare import assert_bf16_close

from dsv4.kernels.fast import mhc
from dsv4.model import mhc as ref_mhc

HC, ITERS, EPS = 4, 20, 1e-6


@pytest.fixture(scope="module")
def mhc_triton():
    pytest.importorskip("triton")
    from dsv4.kernels.fast import _mhc_triton

    return _mhc_triton


def _bf16(y: torch.Tensor) -> torch.Tensor:
    return y.to(torch.bfloat16)


def params(iters: int = ITERS) -> ref_mhc.HcParams:
    return ref_mhc.HcParams(HC, iters, EPS, EPS)


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def check_pre(got, x, fn, scale, base, iters: int = ITERS) -> None:
    h, post, comb = got
    want_h, want_post, want_comb = ref_mhc.hc_pre(x, fn, scale, base, params(iters), _bf16)
    assert post.dtype == comb.dtype == torch.float32
    assert max_rel(post, want_post) <= 2e-6
    assert max_rel(comb, want_comb) <= 2e-6
    assert_bf16_close(h, want_h)


# ---------------------------------------------------------------------------------------------- twins
@pytest.mark.parametrize("num_tokens, dim", [(5, 128), (33, 1024)])
def test_twin_pre_post_head(num_tokens, dim):
    x, fn, scale, base = site(num_tokens, dim, seed=dim)
    check_pre(mhc.hc_pre(x, fn, scale, base, HC, ITERS, EPS, EPS), x, fn, scale, base)
    _, post, comb = ref_mhc.hc_pre(x, fn, scale, base, params(), _bf16)
    f = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert_bf16_close(mhc.hc_post(f, x, post, comb), ref_mhc.hc_post(f, x, post, comb, _bf16))
    x, fn, scale, base = site(num_tokens, dim, seed=dim + 1, rows=HC, num_scales=1)
    assert_bf16_close(mhc.hc_head(x, fn, scale, base, EPS, EPS),
                      ref_mhc.hc_head(x, fn, scale, base, params(), _bf16))


def check_post_pre(got, f, x, post, comb, fn, scale, base, iters: int = ITERS) -> None:
    streams, h, new_post, new_comb = got
    want_streams = ref_mhc.hc_post(f, x, post, comb, _bf16)
    assert_bf16_close(streams, want_streams)
    check_pre((h, new_post, new_comb), streams, fn, scale, base, iters)   # the next site, on its own input


def post_pre_case(num_tokens: int, dim: int, seed: int):
    x, fn, scale, base = site(num_tokens, dim, seed=seed)
    _, post, comb = ref_mhc.hc_pre(x, fn, scale, base, params(), _bf16)
    _, fn2, scale2, base2 = site(num_tokens, dim, seed=seed + 1)
    f = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(seed + 2)).bfloat16()
    return f, x, post, comb, fn2, scale2, base2


def test_twin_post_pre():
    case = post_pre_case(9, 256, seed=8)
    check_post_pre(mhc.hc_post_pre(*case, HC, ITERS, EPS, EPS), *case)


def test_twin_comb_is_doubly_stochastic_and_post_mixes_transposed():
    x, fn, scale, base = site(3, 128, seed=7)
    _, post, comb = mhc.hc_pre(x, fn, scale, base, HC, ITERS, EPS, EPS)
    assert torch.allclose(comb.sum(-2), torch.ones(3, HC), atol=1e-5)
    assert torch.allclose(comb.sum(-1), torch.ones(3, HC), atol=1e-3)
    # a one-hot comb[j, k] moves input stream j to output stream k
    one_hot = torch.zeros(3, HC, HC)
    one_hot[:, 0, 2] = 1.0
    out = mhc.hc_post(torch.zeros(3, 128).bfloat16(), x, torch.zeros(3, HC), one_hot)
    assert torch.equal(out[:, 2], x[:, 0]) and not out[:, 0].any()


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.triton
@pytest.mark.parametrize("num_tokens, dim", [(5, 128), (20, 128), (3, 2048)])
def test_triton_pre_post(mhc_triton, num_tokens, dim):
    x, fn, scale, base = site(num_tokens, dim, seed=num_tokens + dim)
    check_pre(mhc_triton.hc_pre(x, fn, scale, base, HC, ITERS, EPS, EPS), x, fn, scale, base)
    _, post, comb = ref_mhc.hc_pre(x, fn, scale, base, params(), _bf16)
    f = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(2)).bfloat16()
    assert_bf16_close(mhc_triton.hc_post(f, x, post, comb), ref_mhc.hc_post(f, x, post, comb, _bf16))


@pytest.mark.triton
def test_triton_two_token_tiles_and_head(mhc_triton):
    x, fn, scale, base = site(70, 128, seed=3)          # 70 tokens: two 64-token GEMM tiles
    check_pre(mhc_triton.hc_pre(x, fn, scale, base, HC, 3, EPS, EPS), x, fn, scale, base, iters=3)
    x, fn, scale, base = site(6, 128, seed=4, rows=HC, num_scales=1)
    assert_bf16_close(mhc_triton.hc_head(x, fn, scale, base, EPS, EPS),
                      ref_mhc.hc_head(x, fn, scale, base, params(), _bf16))


@pytest.mark.triton
@pytest.mark.parametrize("num_tokens, dim, iters", [(5, 128, ITERS), (40, 128, 3), (70, 512, 3)])
def test_triton_post_pre(mhc_triton, num_tokens, dim, iters):
    """The fused post + next mixes: decode tiles (32 x 64), two token tiles, the prefill tiles (16 x 256). Fewer
    Sinkhorn iterations at the larger token counts keep the interpreter quick."""
    case = post_pre_case(num_tokens, dim, seed=num_tokens)
    check_post_pre(mhc_triton.hc_post_pre(*case, HC, iters, EPS, EPS), *case, iters=iters)


@pytest.mark.triton
def test_triton_mix_partials_sum_to_the_mixes(mhc_triton):
    """The split-K GEMM with fn in three bf16 terms is as accurate as fp32: partials summed vs float64."""
    x, fn, _, _ = site(4, 1024, seed=5)
    x_flat = x.view(4, -1)
    part, sq = mhc_triton.mix_partials(x_flat, fn)
    assert part.shape[0] > 1                                     # K really is split
    want = x_flat.double() @ fn.double().t()
    assert float((part.sum(0).double() - want).abs().max()) <= 1e-6 * float(want.abs().max()) + 1e-7
    assert torch.allclose(sq.sum(0).double(), x_flat.double().square().sum(-1), rtol=1e-6)


@pytest.mark.triton
def test_triton_empty_batch(mhc_triton):
    x, fn, scale, base = site(0, 128, seed=6)
    h, post, comb = mhc_triton.hc_pre(x, fn, scale, base, HC, ITERS, EPS, EPS)
    assert h.shape == (0, 128) and post.shape == (0, HC) and comb.shape == (0, HC, HC)
    assert mhc_triton.hc_post(h, x, post, comb).shape == (0, HC, 128)

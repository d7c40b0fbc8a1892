"""Fast mHC Triton kernels (`dsv4.kernels.fast.mhc` on CUDA tensors) against the float64 reference on a CPU copy.

Tolerances: post and comb max relative error <= 3e-5 (the GPU's exp / division / rsqrt are approximate; ~2e-7
on the CPU); h, hc_post and hc_head outputs within one bf16 ulp of the reference in at most 1% of the elements.
Shapes: V4-Flash (D = 4096, hc = 4) at decode and prefill token counts, V4-Pro (D = 7168), the tiny preset; the
fused hc_post_pre against hc_post then hc_pre; one CUDA-graph capture + replay of a block's mHC.
"""

from __future__ import annotations

import pytest
import torch
from fast_inputs import mhc_site as site
from numerics_compare import assert_bf16_close as bf16_close

from dsv4.kernels.fast import mhc
from dsv4.model import mhc as ref_mhc

pytestmark = pytest.mark.gpu
DEV = "cuda"
HC, ITERS, EPS = 4, 20, 1e-6
SHAPES = [(1, 4096), (7, 4096), (64, 4096), (300, 4096), (4096, 4096), (64, 7168), (5, 128)]   # (T, D)


def _bf16(y: torch.Tensor) -> torch.Tensor:
    return y.to(torch.bfloat16)


def params() -> ref_mhc.HcParams:
    return ref_mhc.HcParams(HC, ITERS, EPS, EPS)


def to_dev(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEV) for t in tensors)


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.cpu().double() - want.double()).abs().max() / want.double().abs().max().clamp(min=1e-30))


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor, max_fraction: float = 0.01) -> None:
    """The shared bound with half an ulp of the row's largest element of slack (GPU math's last bits)."""
    bf16_close(got, want, max_fraction, row_ulps=0.5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_hc_pre_and_post_match_reference(shape):
    num_tokens, dim = shape
    x, fn, scale, base = site(num_tokens, dim, seed=num_tokens + dim)
    h, post, comb = mhc.hc_pre(*to_dev(x, fn, scale, base), HC, ITERS, EPS, EPS)
    want_h, want_post, want_comb = ref_mhc.hc_pre(x, fn, scale, base, params(), _bf16)
    print(f"post rel err {max_rel(post, want_post):.2e}, comb rel err {max_rel(comb, want_comb):.2e}")
    assert post.dtype == comb.dtype == torch.float32
    assert max_rel(post, want_post) <= 3e-5 and max_rel(comb, want_comb) <= 3e-5
    assert_bf16_close(h, want_h)
    f = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(1)).bfloat16()
    got = mhc.hc_post(*to_dev(f, x, want_post, want_comb))
    assert_bf16_close(got, ref_mhc.hc_post(f, x, want_post, want_comb, _bf16))


@pytest.mark.parametrize("shape", [(1, 4096), (64, 4096), (65, 4096), (4096, 4096), (64, 7168), (5, 128)],
                         ids=lambda s: "x".join(map(str, s)))
def test_hc_post_pre_matches_post_then_pre(shape):
    """The fused post + next site's pre: the new streams as hc_post's reference, the next site's outputs as
    hc_pre's reference on those streams."""
    num_tokens, dim = shape
    x, fn, scale, base = site(num_tokens, dim, seed=num_tokens + dim + 1)
    _, post, comb = ref_mhc.hc_pre(x, fn, scale, base, params(), _bf16)
    _, fn2, scale2, base2 = site(num_tokens, dim, seed=num_tokens + dim + 2)
    f = torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(3)).bfloat16()
    streams, h, new_post, new_comb = mhc.hc_post_pre(*to_dev(f, x, post, comb, fn2, scale2, base2), HC, ITERS, EPS,
                                                      EPS)
    assert_bf16_close(streams, ref_mhc.hc_post(f, x, post, comb, _bf16))
    streams = streams.cpu()
    want_h, want_post, want_comb = ref_mhc.hc_pre(streams, fn2, scale2, base2, params(), _bf16)
    assert max_rel(new_post, want_post) <= 3e-5 and max_rel(new_comb, want_comb) <= 3e-5
    assert_bf16_close(h, want_h)


@pytest.mark.parametrize("shape", [(1, 4096), (64, 4096), (3, 7168), (5, 128)], ids=lambda s: "x".join(map(str, s)))
def test_hc_head_matches_reference(shape):
    num_tokens, dim = shape
    x, fn, scale, base = site(num_tokens, dim, seed=dim, rows=HC, num_scales=1)
    got = mhc.hc_head(*to_dev(x, fn, scale, base), EPS, EPS)
    assert_bf16_close(got, ref_mhc.hc_head(x, fn, scale, base, params(), _bf16))


def test_empty_batch_and_extreme_streams():
    x, fn, scale, base = site(0, 4096, seed=2)
    h, post, comb = mhc.hc_pre(*to_dev(x, fn, scale, base), HC, ITERS, EPS, EPS)
    assert h.shape == (0, 4096) and post.shape == (0, HC) and comb.shape == (0, HC, HC)
    assert mhc.hc_post(h, x.to(DEV), post, comb).shape == (0, HC, 4096)
    # large and tiny stream magnitudes (the RMS factor rescales the mixes; no overflow in the sums of squares)
    x, fn, scale, base = site(4, 4096, seed=3)
    x = (x.float() * torch.tensor([2.0 ** 40, 2.0 ** -40, 1.0, 0.0]).view(4, 1, 1)).bfloat16()
    h, post, comb = mhc.hc_pre(*to_dev(x, fn, scale, base), HC, ITERS, EPS, EPS)
    want_h, want_post, want_comb = ref_mhc.hc_pre(x, fn, scale, base, params(), _bf16)
    assert max_rel(post, want_post) <= 3e-5 and max_rel(comb, want_comb) <= 3e-5
    assert_bf16_close(h, want_h)


def test_cuda_graph_capture_and_replay():
    """hc_pre, hc_post_pre and hc_post (one block's mHC) captured once, replayed on new streams: equal to eager
    calls on the same inputs."""
    x, fn, scale, base = to_dev(*site(64, 4096, seed=4))
    _, fn2, scale2, base2 = to_dev(*site(64, 4096, seed=5))
    f = torch.randn(64, 4096, device=DEV).bfloat16()

    def block():
        h, post, comb = mhc.hc_pre(x, fn, scale, base, HC, ITERS, EPS, EPS)
        x1, h1, post1, comb1 = mhc.hc_post_pre(f, x, post, comb, fn2, scale2, base2, HC, ITERS, EPS, EPS)
        return h, post, comb, x1, h1, post1, comb1, mhc.hc_post(f, x1, post1, comb1)

    block()                                          # warm-up: compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = block()
    for replay in range(3):
        new_x, _, _, _ = site(64, 4096, seed=10 + replay)
        x.copy_(new_x)
        f.copy_(torch.randn(64, 4096, device=DEV).bfloat16())
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(outs, block(), strict=True):
            assert torch.equal(got, want), replay

"""Fast norm / RoPE / KV-entry / window-append Triton kernels (`dsv4.kernels.fast.norm` on CUDA tensors) against
the references on a CPU copy.

Tolerances: rms_norm, rope, head_norm_rope (vs the official bf16 q norm) and kv_entry: bf16 outputs within one
bf16 ulp (+ half an ulp of the row's largest) of the reference, unequal in at most 1% of the elements (printed);
also head_norm_rope within 2^-5 of each head's largest value. kv_entry's FP8 step: bit-exact given the kernel's own
pre-quantization output. window_append: byte-exact (decode batch 128, prefill chunks longer than the window,
mixed chunks, slots outside the ring not written). V4-Flash / V4-Pro shapes; one CUDA-graph capture + replay.
"""

from __future__ import annotations

import pytest
import torch
from fast_inputs import gen, norm_weight, positions, scaled
from numerics_compare import assert_bf16_close as bf16_close

from dsv4.kernels import cache_ops, quant, ref_math
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import norm
from dsv4.kernels.kv_format import MainFp8Codec
from dsv4.model.layers import rope_inv_freq

pytestmark = pytest.mark.gpu
DEV = "cuda"
EPS = 1e-6
YARN = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))
PLAIN = rope_inv_freq(64, 10000.0, None)


def assert_bf16_close(got: torch.Tensor, want: torch.Tensor, max_fraction: float = 0.01) -> None:
    """The shared bound with half an ulp of the row's largest element of slack (GPU math's last bits)."""
    bf16_close(got, want, max_fraction, row_ulps=0.5)


def ref_rms_norm(x, w):
    return ref_math.rms_norm(x, w, EPS).to(torch.bfloat16)


def ref_kv_entry(kv, w, pos, freq):
    return quant.fake_quant_kv(ref_math.apply_rope(ref_rms_norm(kv, w), pos, freq), 2 * freq.shape[0])


def layout(chunks: list[tuple[int, int, int]], device: str = "cpu") -> BatchLayout:
    """chunks: (slot, start, length)."""
    return BatchLayout.from_chunks([(slot, start, n, [s]) for s, (slot, start, n) in enumerate(chunks)], 256,
                                   device)


# ---------------------------------------------------------------------------------------------- norms
@pytest.mark.parametrize("shape", [(1, 4096), (64, 4096), (4096, 4096), (64, 4, 4096), (128, 1024), (64, 512),
                                   (64, 7168), (64, 1536), (5, 128)], ids=lambda s: "x".join(map(str, s)))
def test_rms_norm_matches_reference(shape):
    g = gen(sum(shape))
    x = scaled(shape, g)
    w = norm_weight(shape[-1], g)
    assert_bf16_close(norm.rms_norm(x.to(DEV), w.to(DEV), EPS), ref_rms_norm(x, w))
    assert_bf16_close(norm.rms_norm(x.to(DEV), None, EPS), ref_rms_norm(x, None))


# ---------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("shape, freq", [((128, 64, 512), YARN), ((64, 64, 512), PLAIN), ((64, 64, 128), YARN),
                                         ((16, 128, 512), YARN), ((64, 512), YARN), ((3, 4, 128), PLAIN)],
                         ids=["flash-q", "flash-q-plain", "indexer-q", "pro-q", "kv", "tiny"])
def test_rope_and_head_norm_rope_match_reference(shape, freq):
    g = gen(shape[0] + shape[-1])
    q = scaled(shape, g)
    pos = positions(shape[0], g)
    qd, pd = q.to(DEV), pos.to(DEV)
    for inverse in (False, True):
        assert_bf16_close(norm.rope(qd, pd, freq.to(DEV), inverse), ref_math.apply_rope(q, pos, freq, inverse))
    if q.dim() == 3:   # the q norm as the official code computes it (bf16 op by op), then RoPE
        from dsv4.model.numerics_reference import ReferenceMath

        want = ReferenceMath(torch.bfloat16, True).head_norm_rope(q, pos, freq, EPS)
        assert_bf16_close(norm.head_norm_rope(qd, pd, freq.to(DEV), EPS), want)


def test_head_norm_rope_is_near_the_official_bf16_arithmetic():
    from dsv4.model.numerics_reference import ReferenceMath

    g = gen(1)
    q = scaled((64, 64, 512), g)
    pos = positions(64, g)
    official = ReferenceMath(torch.bfloat16, True).head_norm_rope(q, pos, YARN, EPS).float()
    got = norm.head_norm_rope(q.to(DEV), pos.to(DEV), YARN.to(DEV), EPS).cpu().float()
    assert bool(((got - official).abs() <= 2.0 ** -5 * official.abs().amax(-1, keepdim=True)).all())


# ---------------------------------------------------------------------------------------------- KV entries
@pytest.mark.parametrize("num_tokens, d, nope", [(1, 512, 448), (128, 512, 448), (4096, 512, 448), (7, 128, 64)])
def test_kv_entry_matches_reference_and_its_fp8_step_is_exact(num_tokens, d, nope):
    from dsv4.kernels.fast import _norm_triton

    g = gen(num_tokens + d)
    kv = scaled((num_tokens, d), g)
    w = norm_weight(d, g)
    pos = positions(num_tokens, g)
    kvd, wd, pd, fd = kv.to(DEV), w.to(DEV), pos.to(DEV), YARN.to(DEV)
    got = norm.kv_entry(kvd, wd, EPS, pd, fd, nope)
    want = ref_kv_entry(kv, w, pos, YARN)
    # the FP8 step turns a rare bf16-ulp difference before it into one e4m3 step (1/16 of the element; seen once
    # in 4096 x 448 elements on the H200): bound the rope dims as bf16, the nope dims by an e4m3 step
    assert_bf16_close(got[:, nope:].contiguous(), want[:, nope:].contiguous())
    step = (got[:, :nope].cpu().float() - want[:, :nope].float()).abs()
    assert bool((step <= want[:, :nope].float().abs() * 2.0 ** -3 + 2.0 ** -20).all())
    assert float((got[:, :nope].cpu() != want[:, :nope]).float().mean()) <= 1e-3
    before_quant = _norm_triton.norm_rope(kvd, pd, fd, norm=True, weight=wd, eps=EPS, quant=False)
    assert torch.equal(got.cpu(), quant.fake_quant_kv(before_quant.cpu(), d - nope))


# ---------------------------------------------------------------------------------------------- window append
WINDOW_CASES = {   # name: (d, nope, chunks (slot, start, length), num_slots)
    "decode-b128": (512, 448, [(s, 1000 + 13 * s, 1) for s in range(128)], 128),
    "prefill-4096": (512, 448, [(3, 0, 4096)], 8),
    "mixed": (512, 448, [(0, 0, 150), (1, 1000, 1), (2, 120, 20), (5, 0, 1), (6, 126, 3)], 8),
    "tiny": (128, 64, [(0, 0, 5), (1, 200, 1)], 4),
}


def ring_inputs(d, nope, chunks, num_slots, seed):
    codec = MainFp8Codec(nope, d - nope)
    g = gen(seed)
    lay = layout(chunks)
    ring = torch.randint(0, 256, (num_slots, 128, codec.width), generator=g, dtype=torch.uint8)
    kv = quant.fake_quant_kv(scaled((lay.num_tokens, d), g), d - nope)
    return codec, lay, ring, kv


@pytest.mark.parametrize("name", list(WINDOW_CASES))
def test_window_append_is_byte_exact(name):
    d, nope, chunks, num_slots = WINDOW_CASES[name]
    codec, lay, ring, kv = ring_inputs(d, nope, chunks, num_slots, seed=len(name))
    got = ring.to(DEV)
    norm.window_append(got, codec, kv.to(DEV), lay.to(DEV))
    cache_ops.window_append(ring, codec, kv, lay)
    assert torch.equal(got.cpu(), ring)


def test_window_append_skips_slots_outside_the_ring():
    codec, lay, ring, kv = ring_inputs(512, 448, [(1, 5, 2), (8, 9, 1), (-1, 3, 1), (1 << 40, 7, 1)], 8, seed=5)
    got = ring.to(DEV)
    norm.window_append(got, codec, kv.to(DEV), lay.to(DEV))
    cache_ops.window_append(ring, codec, kv[:2], layout([(1, 5, 2)]))
    assert torch.equal(got.cpu(), ring)


# ---------------------------------------------------------------------------------------------- graphs
def test_cuda_graph_capture_and_replay():
    """q finishing, kv entry, window append and the output's inverse RoPE, captured once and replayed."""
    g = gen(6)
    codec = MainFp8Codec(448, 64)
    q = scaled((32, 64, 512), g).to(DEV)
    kv = scaled((32, 512), g).to(DEV)
    w = norm_weight(512, g).to(DEV)
    lay = layout([(s, 500 + s, 1) for s in range(32)], DEV)
    freq = YARN.to(DEV)
    ring = torch.zeros(32, 128, codec.width, dtype=torch.uint8, device=DEV)

    def step():
        entry = norm.kv_entry(kv, w, EPS, lay.positions, freq, 448)
        norm.window_append(ring, codec, entry, lay)
        return (norm.head_norm_rope(q, lay.positions, freq, EPS), entry, norm.rope(q, lay.positions, freq, True),
                norm.rms_norm(kv, w, EPS))

    step()                                          # warm-up: compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for replay in range(3):
        q.copy_(scaled((32, 64, 512), g))
        kv.copy_(scaled((32, 512), g))
        lay.positions.add_(1)                       # positions are device data: the replay reads the new ones
        ring.zero_()
        graph.replay()
        torch.cuda.synchronize()
        ring_after = ring.clone()
        ring.zero_()
        for got, want in zip(outs, step(), strict=True):
            assert torch.equal(got, want), replay
        assert torch.equal(ring_after, ring), replay

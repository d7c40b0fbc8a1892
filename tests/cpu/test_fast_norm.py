"""Fast norms, RoPE, q / KV-entry finishing and window append (`dsv4.kernels.fast.norm`) against the references
(`ref_math.rms_norm` / `apply_rope` in float64, `quant.fake_quant_kv`, `cache_ops.window_append`).

Tolerances (observed in brackets): rms_norm, rope, head_norm_rope (vs the fp32-math composition), kv_entry: bf16
outputs within one bf16 ulp of the reference in at most 1% of the elements (0 seen at these shapes);
head_norm_rope vs the official bf16 op-by-op head norm: within 2^-6 of each head's largest value, and 2^-6
relative on the unrotated dims (the official rounds mean, rsqrt and product to bf16). kv_entry's quantization:
bit-exact given the same bf16 norm + RoPE output (the Triton kernel's own quant-off mode gives that intermediate).
window_append: byte-exact, including chunks longer than the window, several sequences and a slot outside the
ring (not written).

The Triton kernels run under Triton's interpreter at the tiny preset (d = 128: 64 nope + 64 rope, D = 128) and
at V4's 512-wide entry (448 + 64, the 584-byte layout) with few tokens.
"""

from __future__ import annotations

import pytest
import torch
from fast_inputs import gen, norm_weight, positions, scaled
from numerics_compare import assert_bf16_close

from dsv4.kernels import cache_ops, quant, ref_math
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import norm
from dsv4.kernels.kv_format import MainFp8Codec
from dsv4.model.layers import rope_inv_freq

EPS = 1e-6
YARN = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0))
PLAIN = rope_inv_freq(64, 10000.0, None)


@pytest.fixture(scope="module")
def norm_triton():
    pytest.importorskip("triton")
    from dsv4.kernels.fast import _norm_triton

    return _norm_triton


def ref_rms_norm(x, w):
    return ref_math.rms_norm(x, w, EPS).to(torch.bfloat16)


def ref_head_norm_rope(q, pos, freq):
    """The reference's q path: the per-head norm in bf16 op by op, as the official code (which the fast kernel
    reproduces, its sums in fp32), then RoPE."""
    from dsv4.model.numerics_reference import ReferenceMath

    return ReferenceMath(torch.bfloat16, True).head_norm_rope(q, pos, freq, EPS)


def ref_kv_entry(kv, w, pos, freq):
    return quant.fake_quant_kv(ref_math.apply_rope(ref_rms_norm(kv, w), pos, freq), 2 * freq.shape[0])


def layout(chunks: list[tuple[int, int, int]]) -> BatchLayout:
    """chunks: (slot, start, length)."""
    return BatchLayout.from_chunks([(slot, start, n, [s]) for s, (slot, start, n) in enumerate(chunks)], 256)


def ring_case(d: int, nope: int, chunks: list[tuple[int, int, int]], seed: int, num_ref_seqs: int | None = None):
    """A garbage-filled ring of 4 slots, kv entries for the chunks, and the ring after the reference append of the
    first num_ref_seqs chunks (all by default)."""
    codec = MainFp8Codec(nope, d - nope)
    g = gen(seed)
    lay = layout(chunks)
    ring = torch.randint(0, 256, (4, 128, codec.width), generator=g, dtype=torch.uint8)
    kv = quant.fake_quant_kv(scaled((lay.num_tokens, d), g), d - nope)
    ref_chunks = chunks[:num_ref_seqs]
    want = ring.clone()
    cache_ops.window_append(want, codec, kv[:sum(c[2] for c in ref_chunks)], layout(ref_chunks))
    return codec, lay, ring, kv, want


# Chunks: prefill longer than the window (only its last 128 stored), a decode token, a short chunk wrapping the
# ring, a token at position 0.
CHUNKS = [(1, 0, 150), (0, 1000, 1), (3, 120, 20), (2, 0, 1)]


# ---------------------------------------------------------------------------------------------- twins
@pytest.mark.parametrize("shape", [(5, 128), (3, 4, 128), (9, 4096)])
def test_twin_rms_norm(shape):
    g = gen(len(shape))
    x = scaled(shape, g)
    w = norm_weight(shape[-1], g)
    assert_bf16_close(norm.rms_norm(x, w, EPS), ref_rms_norm(x, w))
    assert_bf16_close(norm.rms_norm(x, None, EPS), ref_rms_norm(x, None))


@pytest.mark.parametrize("d, freq", [(128, YARN), (512, PLAIN)])
def test_twin_rope_and_head_norm_rope(d, freq):
    g = gen(d)
    q = scaled((20, 4, d), g)
    pos = positions(20, g)
    for inverse in (False, True):
        assert_bf16_close(norm.rope(q, pos, freq, inverse), ref_math.apply_rope(q, pos, freq, inverse))
    assert_bf16_close(norm.head_norm_rope(q, pos, freq, EPS), ref_head_norm_rope(q, pos, freq))


@pytest.mark.parametrize("d, nope", [(128, 64), (512, 448)])
def test_twin_kv_entry(d, nope):
    g = gen(d)
    kv = scaled((12, d), g)
    w = norm_weight(d, g)
    pos = positions(12, g)
    got = norm.kv_entry(kv, w, EPS, pos, YARN, nope)
    assert_bf16_close(got, ref_kv_entry(kv, w, pos, YARN))
    assert torch.equal(got, quant.fake_quant_kv(norm.rope(norm.rms_norm(kv, w, EPS), pos, YARN), d - nope))


@pytest.mark.parametrize("d, nope", [(128, 64), (512, 448)])
def test_twin_window_append(d, nope):
    codec, lay, ring, kv, want = ring_case(d, nope, CHUNKS, seed=d)
    norm.window_append(ring, codec, kv, lay)
    assert torch.equal(ring, want)


def test_twin_window_append_skips_a_slot_outside_the_ring():
    codec, lay, ring, kv, want = ring_case(128, 64, [(1, 5, 2), (7, 9, 1), (-1, 3, 1)], seed=3, num_ref_seqs=1)
    norm.window_append(ring, codec, kv, lay)
    assert torch.equal(ring, want)


# ---------------------------------------------------------------------------------------------- Triton
@pytest.mark.triton
def test_triton_sincos_is_fp32_accurate_up_to_1m_positions(norm_triton):
    """The RoPE kernels' fp32 sin/cos (no float64, no libdevice) against float64 of the same fp32 angles."""
    import triton
    import triton.language as tl

    global _sincos   # the interpreter resolves names in a kernel's module globals, not its closure
    _sincos = norm_triton.sincos

    @triton.jit
    def sincos_kernel(x_ptr, sin_ptr, cos_ptr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        sin, cos = _sincos(tl.load(x_ptr + offs))
        tl.store(sin_ptr + offs, sin)
        tl.store(cos_ptr + offs, cos)

    g = gen(7)
    pos = torch.cat([torch.arange(64), torch.randint(0, 1 << 20, (4032,), generator=g)])
    freqs = torch.cat([YARN, PLAIN, torch.ones(1)])
    angle = (pos.float()[:, None] * freqs[None, :]).flatten()[:8192]           # fp32 angles, 0 .. ~1e6 rad
    sin, cos = torch.empty_like(angle), torch.empty_like(angle)
    sincos_kernel[(angle.numel() // 1024,)](angle, sin, cos, BLOCK=1024)
    err = max(float((sin.double() - angle.double().sin()).abs().max()),
              float((cos.double() - angle.double().cos()).abs().max()))
    print(f"sin/cos max abs error {err:.2e}")
    assert err <= 2.5e-7, err


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(5, 128), (3, 4, 128), (2, 4096)])
def test_triton_rms_norm(norm_triton, shape):
    g = gen(len(shape) + 10)
    x = scaled(shape, g)
    w = norm_weight(shape[-1], g)
    assert_bf16_close(norm_triton.rms_norm(x, w, EPS), ref_rms_norm(x, w))
    assert_bf16_close(norm_triton.rms_norm(x, None, EPS), ref_rms_norm(x, None))


@pytest.mark.triton
@pytest.mark.parametrize("d, heads, freq", [(128, 4, YARN), (512, 3, PLAIN)])
def test_triton_rope_and_head_norm_rope(norm_triton, d, heads, freq):
    g = gen(d + 1)
    q = scaled((6, heads, d), g)
    pos = positions(6, g)
    for inverse in (False, True):
        assert_bf16_close(norm_triton.norm_rope(q, pos, freq, norm=False, inverse=inverse),
                          ref_math.apply_rope(q, pos, freq, inverse))
    assert_bf16_close(norm_triton.norm_rope(q, pos, freq, norm=True, eps=EPS), ref_head_norm_rope(q, pos, freq))
    kv = q[:, 0].contiguous()                                  # a [T, d] tensor (one head)
    assert_bf16_close(norm_triton.norm_rope(kv, pos, freq, norm=False), ref_math.apply_rope(kv, pos, freq))


@pytest.mark.triton
@pytest.mark.parametrize("d, nope", [(128, 64), (512, 448)])
def test_triton_kv_entry(norm_triton, d, nope):
    g = gen(d + 2)
    kv = scaled((5, d), g)
    w = norm_weight(d, g)
    pos = positions(5, g)
    got = norm_triton.norm_rope(kv, pos, YARN, norm=True, weight=w, eps=EPS, quant=True)
    assert_bf16_close(got, ref_kv_entry(kv, w, pos, YARN))
    before_quant = norm_triton.norm_rope(kv, pos, YARN, norm=True, weight=w, eps=EPS, quant=False)
    assert torch.equal(got, quant.fake_quant_kv(before_quant, d - nope))


@pytest.mark.triton
@pytest.mark.parametrize("d, nope", [(128, 64), (512, 448)])
def test_triton_window_append(norm_triton, d, nope):
    chunks = [(1, 0, 130), (0, 1000, 1), (3, 126, 4)] if d == 128 else [(1, 1000, 1), (0, 127, 2)]
    codec, lay, ring, kv, want = ring_case(d, nope, chunks, seed=d + 3)
    norm_triton.window_append(ring, nope, d - nope, kv, lay.positions, lay.token_seq, lay.seq_slot, lay.seq_start,
                              lay.seq_len)
    assert torch.equal(ring, want)


@pytest.mark.triton
def test_triton_window_append_skips_a_slot_outside_the_ring_and_takes_fp32(norm_triton):
    codec, lay, ring, kv, want = ring_case(128, 64, [(1, 5, 2), (7, 9, 1), (-1, 3, 1)], seed=4, num_ref_seqs=1)
    norm_triton.window_append(ring, 64, 64, kv.float(), lay.positions, lay.token_seq, lay.seq_slot, lay.seq_start,
                              lay.seq_len)
    assert torch.equal(ring, want)

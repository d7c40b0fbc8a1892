"""The quantizers against the spec's definitions, on crafted inputs (spec §4, §5.3, §6.2, §7.3)."""

import pytest
import torch

from dsv4.kernels import quant

E4M3_MAX = 448.0


def all_e4m3_values() -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return v[~v.isnan()]


def test_e4m3_round_trips_every_code():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]                 # 0x7F / 0xFF are NaN
    values = quant.e4m3_values(codes)
    assert torch.equal(quant.round_e4m3(values), values)
    assert torch.equal(quant.e4m3_codes(values), codes)


def test_e4m3_ties_go_to_even_mantissa():
    # 232 lies between 224 (1.110b x 2^7) and 240 (1.111b x 2^7): even mantissa -> 224.
    # 248 lies between 240 and 256 (1.000b x 2^8): even -> 256.
    # Subnormals step 2^-9: 2^-10 is a tie between 0 and 2^-9 -> 0; 3*2^-10 between 2^-9 and 2^-8 -> 2^-8.
    x = torch.tensor([232.0, 248.0, 2.0 ** -10, 3 * 2.0 ** -10, 1.0625, 1.1875, -232.0])
    expected = torch.tensor([224.0, 256.0, 0.0, 2.0 ** -8, 1.0, 1.25, -224.0])
    assert torch.equal(quant.round_e4m3(x), expected)


def test_e4m3_midpoints_match_torch_and_off_midpoints_round_to_nearest():
    v = all_e4m3_values().unique()
    mids = (v[1:] + v[:-1]) / 2
    assert torch.equal(quant.round_e4m3(mids), mids.to(torch.float8_e4m3fn).float())
    below = torch.nextafter(mids, torch.full_like(mids, -1e9))
    above = torch.nextafter(mids, torch.full_like(mids, 1e9))
    assert torch.equal(quant.round_e4m3(below), v[:-1])
    assert torch.equal(quant.round_e4m3(above), v[1:])


def test_e4m3_saturates():
    x = torch.tensor([448.0, 449.0, 464.0, 1e6, float("inf"), -1e6])
    assert torch.equal(quant.round_e4m3(x), torch.tensor([448.0, 448.0, 448.0, 448.0, 448.0, -448.0]))


def test_e4m3_matches_torch_cast_on_random_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-16, 10, (200_000,), generator=g).float())
    assert torch.equal(quant.round_e4m3(x), x.to(torch.float8_e4m3fn).float())


def test_e2m1_grid_ties_and_saturation():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.24, 0.26, 6.0, 7.0, 100.0, -0.75, -5.0])
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0, 0.5, 6.0, 6.0, 6.0, -1.0, -4.0])
    assert torch.equal(quant.round_e2m1(x), expected)
    grid = torch.tensor(quant.E2M1_GRID)
    assert torch.equal(quant.round_e2m1(grid), grid)


def test_e2m1_codes_and_nibble_order():
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    codes = quant.e2m1_codes(values)
    assert codes.tolist() == list(range(16))              # the spec's table order; -0 keeps its sign bit
    assert torch.equal(quant.e2m1_values(codes), values)
    packed = quant.pack_fp4(torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    assert packed.view(torch.uint8).tolist() == [[0x21, 0x0F]]   # element 2k in the low nibble
    assert quant.unpack_fp4(packed).tolist() == [[1, 2, 15, 0]]


def test_ue8m0_scale_choice():
    fp8 = quant.ue8m0_scale(torch.tensor([448.0, 448.01, 224.0, 1.0, 0.0, 1e-9, 448.0 * 2 ** -20]),
                            quant.FP8_MAX, quant.FP8_AMAX_FLOOR)
    # ceil(log2(amax/448)); amax floored at 1e-4 (-> 2^ceil(log2(1e-4/448)) = 2^-22)
    assert fp8.tolist() == [1.0, 2.0, 0.5, 2.0 ** -8, 2.0 ** -22, 2.0 ** -22, 2.0 ** -20]
    fp4 = quant.ue8m0_scale(torch.tensor([6.0, 6.01, 3.0, 0.0, 12.0]), quant.FP4_MAX, quant.FP4_AMAX_FLOOR)
    assert fp4.tolist() == [1.0, 2.0, 0.5, 2.0 ** -126, 2.0]
    assert quant.ue8m0_codes(torch.tensor([1.0, 2.0 ** -22, 2.0 ** 10])).tolist() == [127, 105, 137]
    assert quant.ue8m0_values(torch.tensor([127, 105, 137], dtype=torch.uint8)).tolist() == [1.0, 2.0 ** -22, 1024.0]


def test_fp8_blocks_are_independent():
    x = torch.full((2, 256), 0.5)
    x[0, 200] = 1000.0                                    # only block 1 of row 0 gets a large scale
    q, s = quant.quantize_fp8_blocks(x, 128)
    assert s.tolist() == [[2.0 ** -9, 4.0], [2.0 ** -9, 2.0 ** -9]]
    y = quant.dequantize_blocks(q, s)
    assert torch.equal(y[0, :128], x[0, :128]) and torch.equal(y[1], x[1])
    assert y[0, 200] == 1024.0                            # 1000 / 4 = 250 rounds to 256 in e4m3
    assert torch.all(y[0, 128:200] == 0.5)                # 0.5 / 4 = 2^-3 is exact


def test_fake_quant_is_round_to_scale():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 512, generator=g) * 3
    q, s = quant.quantize_fp8_blocks(x, 64)
    expected = quant.round_e4m3(x.unflatten(-1, (-1, 64)) / s[..., None]) * s[..., None]
    assert torch.equal(quant.fake_quant_fp8(x, 64), expected.flatten(-2))
    q4, s4 = quant.quantize_fp4_blocks(x, 32)
    expected4 = quant.round_e2m1(x.unflatten(-1, (-1, 32)) / s4[..., None]) * s4[..., None]
    assert torch.equal(quant.fake_quant_fp4(x), expected4.flatten(-2))


def test_kv_simulation_leaves_rope_dims():
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(4, 512, generator=g).bfloat16()
    out = quant.fake_quant_kv(kv, 64)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[:, 448:], kv[:, 448:])
    assert torch.equal(out[:, :448], quant.fake_quant_fp8(kv[:, :448], 64))
    assert not torch.equal(out[:, :448], kv[:, :448])


def test_weight_formats_round_trip_and_shapes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 260, generator=g)
    q, s = quant.quantize_weight_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu and tuple(s.shape) == (3, 3)
    deq = quant.dequantize_weight_fp8(q, s)
    assert torch.equal(quant.dequantize_weight_fp8(*quant.quantize_weight_fp8(deq)), deq)   # idempotent
    tile = w[128:256, 256:260]                            # a partial tile: the scale comes from its own amax
    assert quant.ue8m0_values(s.view(torch.uint8))[1, 2] == quant.ue8m0_scale(tile.abs().max(), 448, 1e-4)
    p, s4 = quant.quantize_weight_fp4(w[:, :256])
    assert p.dtype == torch.int8 and tuple(p.shape) == (300, 128) and tuple(s4.shape) == (300, 8)
    deq4 = quant.dequantize_weight_fp4(p, s4)
    assert torch.equal(quant.dequantize_weight_fp4(*quant.quantize_weight_fp4(deq4)), deq4)


def test_fp4_split_nibble_order():
    """Per 64 columns, split byte j = column j (low nibble) | column 32 + j (high); merge inverts it exactly."""
    g = torch.Generator().manual_seed(4)
    packed, scale = quant.quantize_weight_fp4(torch.randn(3, 128, generator=g))
    split = quant.split_fp4_nibbles(packed)
    assert split.dtype == torch.int8 and split.shape == packed.shape and not torch.equal(split, packed)
    codes, split_bytes = quant.unpack_fp4(packed), split.view(torch.uint8)
    for span in (0, 1):
        c = codes[:, 64 * span:64 * span + 64]
        assert torch.equal(split_bytes[:, 32 * span:32 * span + 32], c[:, :32] | (c[:, 32:] << 4))
    assert torch.equal(quant.merge_fp4_nibbles(split), packed)
    dense = quant.dequantize_weight_fp4(packed, scale)
    assert torch.equal(quant.dequantize_weight_fp4(split, scale, split=True), dense)
    with pytest.raises(ValueError, match="multiple of 64"):
        quant.split_fp4_nibbles(packed[:, :16])


def test_hadamard_is_orthonormal_natural_order():
    h = quant.hadamard_matrix(8)
    assert h[1].tolist() == [1, -1, 1, -1, 1, -1, 1, -1]  # Sylvester order
    assert torch.equal(h @ h.T, 8 * torch.eye(8, dtype=h.dtype))
    x = torch.randn(3, 128, dtype=torch.float64)
    assert torch.allclose(quant.hadamard_rotate(quant.hadamard_rotate(x)), x, atol=1e-6)   # fp32 result

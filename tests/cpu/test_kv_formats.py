"""KV storage formats: byte layouts and bit-exact round trips against the reference quantizers (spec §6.3)."""

import torch

from dsv4.kernels import quant
from dsv4.kernels.kv_format import Fp32Codec, IndexFp4Codec, MainFp8Codec, entry_bytes


def test_v4_entry_sizes():
    assert MainFp8Codec(448, 64).width == 584 == entry_bytes(MainFp8Codec(448, 64))
    assert IndexFp4Codec(128).width == 68
    assert MainFp8Codec(64, 64).width == 200      # tiny preset: 64 + 128 + 1, padded to a multiple of 8
    assert entry_bytes(Fp32Codec(512)) == 2048


def test_main_entry_round_trip_equals_the_kv_simulation():
    g = torch.Generator().manual_seed(0)
    codec = MainFp8Codec(448, 64)
    x = (torch.randn(300, 512, generator=g) * torch.exp2(torch.randint(-8, 8, (300, 1), generator=g))).bfloat16()
    decoded = codec.decode(codec.encode(x))
    assert decoded.dtype == torch.bfloat16
    assert torch.equal(decoded, quant.fake_quant_kv(x, 64))
    assert torch.equal(codec.decode(codec.encode(decoded)), decoded)   # stored values re-encode to themselves


def test_main_entry_byte_layout():
    codec = MainFp8Codec(448, 64)
    x = torch.zeros(1, 512)
    x[0, 0], x[0, 64], x[0, 447] = 1.0, 896.0, -0.5       # block 0 amax 1 -> scale 2^-8; block 1 amax 896 -> 2
    x[0, 448], x[0, 511] = 1.5, -2.0
    b = codec.encode(x)[0]
    assert b[0] == quant.e4m3_codes(torch.tensor([256.0]))[0]            # 1.0 / 2^-8
    assert b[64] == quant.e4m3_codes(torch.tensor([448.0]))[0]           # 896 / 2
    assert b[447] == quant.e4m3_codes(torch.tensor([-0.5 / 2 ** -9]))[0]  # block 6: amax 0.5 -> scale 2^-9
    assert b[448:450].view(torch.bfloat16).item() == 1.5                  # rope dims: bf16 little-endian
    assert b[574:576].view(torch.bfloat16).item() == -2.0
    assert b[576:583].tolist() == [127 - 8, 127 + 1, 127 - 22, 127 - 22, 127 - 22, 127 - 22, 127 - 9]
    assert b[583] == 0                                                     # padding


def test_index_key_round_trip_and_layout():
    g = torch.Generator().manual_seed(1)
    codec = IndexFp4Codec(128)
    x = torch.randn(64, 128, generator=g).bfloat16()
    stored = codec.encode(x)
    assert stored.shape == (64, 68) and stored.dtype == torch.uint8
    assert torch.equal(codec.decode(stored), quant.fake_quant_fp4(x))
    q, scale = quant.quantize_fp4_blocks(x.float(), 32)
    codes = quant.e2m1_codes(q)
    assert torch.equal(stored[:, :64] & 0xF, codes[:, 0::2]) and torch.equal(stored[:, :64] >> 4, codes[:, 1::2])
    assert torch.equal(stored[:, 64:], quant.ue8m0_codes(scale))


def test_fp32_format_is_exact():
    x = torch.randn(5, 512)
    assert torch.equal(Fp32Codec(512).decode(Fp32Codec(512).encode(x)), x)

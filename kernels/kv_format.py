"""Byte formats of KV-cache entries (spec §6.3), with encoders and decoders. These bind the flush, indexer, gather
and attention kernels together; the encoders are bit-exact with `dsv4.kernels.quant`.

Main entry (window or compressed), for head_dim = nope + rope (V4: 448 + 64):
    bytes [0, nope)                     e4m3 codes of the nope dims, one UE8M0 scale per 64
    bytes [nope, nope + 2*rope)         rope dims as bf16, little-endian
    bytes [nope + 2*rope, + nope/64)    UE8M0 scale bytes, one per 64 nope dims
    then zero padding to a multiple of 8 bytes                 -> 448 + 128 + 7 + 1 = 584 bytes for V4
Indexer key (CSA), for index_head_dim = di (V4: 128):
    bytes [0, di/2)                     e2m1 codes, two per byte, element 2k in the low nibble
    bytes [di/2, di/2 + di/32)          UE8M0 scale bytes, one per 32 elements  -> 64 + 4 = 68 bytes for V4
`exact-fp32` numerics store fp32 values instead (a debugging/parity format, 4 bytes per element).

Decoders return the values the official reference keeps in its bf16 caches, exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv4.kernels import quant


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True, slots=True)
class MainFp8Codec:
    """FP8 nope dims (64-blocks, UE8M0) + bf16 rope dims."""

    nope_dim: int
    rope_dim: int

    @property
    def num_scales(self) -> int:
        return self.nope_dim // quant.KV_BLOCK

    @property
    def width(self) -> int:
        """Stored bytes per entry."""
        return _round_up(self.nope_dim + 2 * self.rope_dim + self.num_scales, 8)

    storage_dtype = torch.uint8
    value_dtype = torch.bfloat16

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """[N, nope + rope] -> [N, width] uint8."""
        n = values.shape[0]
        q, scale = quant.quantize_fp8_blocks(values[:, :self.nope_dim].float(), quant.KV_BLOCK)
        out = torch.zeros(n, self.width, dtype=torch.uint8, device=values.device)
        out[:, :self.nope_dim] = quant.e4m3_codes(q)
        rope_end = self.nope_dim + 2 * self.rope_dim
        out[:, self.nope_dim:rope_end] = values[:, self.nope_dim:].to(torch.bfloat16).contiguous().view(torch.uint8)
        out[:, rope_end:rope_end + self.num_scales] = quant.ue8m0_codes(scale)
        return out

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """[..., width] uint8 -> [..., nope + rope] bf16."""
        rope_end = self.nope_dim + 2 * self.rope_dim
        values = quant.e4m3_values(stored[..., :self.nope_dim].contiguous())
        scale = quant.ue8m0_values(stored[..., rope_end:rope_end + self.num_scales].contiguous())
        nope = quant.dequantize_blocks(values, scale).to(torch.bfloat16)
        rope = stored[..., self.nope_dim:rope_end].contiguous().view(torch.bfloat16)
        return torch.cat([nope, rope], dim=-1)


@dataclass(frozen=True, slots=True)
class IndexFp4Codec:
    """MXFP4: e2m1 pairs + one UE8M0 scale per 32 elements."""

    dim: int

    @property
    def width(self) -> int:
        return self.dim // 2 + self.dim // quant.FP4_BLOCK

    storage_dtype = torch.uint8
    value_dtype = torch.bfloat16

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        q, scale = quant.quantize_fp4_blocks(values.float(), quant.FP4_BLOCK)
        packed = quant.pack_fp4(quant.e2m1_codes(q)).view(torch.uint8)
        return torch.cat([packed, quant.ue8m0_codes(scale)], dim=-1)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        values = quant.e2m1_values(quant.unpack_fp4(stored[..., :half].contiguous()))
        scale = quant.ue8m0_values(stored[..., half:].contiguous())
        return quant.dequantize_blocks(values, scale).to(torch.bfloat16)


@dataclass(frozen=True, slots=True)
class Fp32Codec:
    """Unquantized fp32 entries (exact-fp32 numerics)."""

    dim: int

    @property
    def width(self) -> int:
        return self.dim

    storage_dtype = torch.float32
    value_dtype = torch.float32

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values.float()

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        return stored.float()


EntryCodec = MainFp8Codec | IndexFp4Codec | Fp32Codec


def entry_bytes(codec: EntryCodec) -> int:
    return codec.width * torch.empty(0, dtype=codec.storage_dtype).element_size()

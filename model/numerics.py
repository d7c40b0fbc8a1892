"""The two numerics modes of the network.

- `reference`: DeepSeek's official `inference/model.py` numerics. Activations are bf16 between ops, the FP8 KV
  simulation (64-blocks, UE8M0) and the MXFP4 indexer q/k simulation are on, and every FP8/FP4 linear quantizes
  its input per 128 with a power-of-two scale. Weights are used as stored. KV entries are stored in the
  production byte formats (584-byte FP8 entries, 68-byte MXFP4 indexer keys), which decode to exactly these
  values.
- `exact-fp32`: the same function in fp32 with every quantization simulation off; KV entries are stored as fp32.
  This is what `transformers`' DeepseekV4ForCausalLM computes in fp32 (to ~1e-6), the mode for parity tests.

The accumulation rules that make results batch-invariant are in `dsv4.kernels.ref_math`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class NumericsMode(str, enum.Enum):
    REFERENCE = "reference"
    EXACT_FP32 = "exact-fp32"


@dataclass(frozen=True, slots=True)
class Numerics:
    mode: NumericsMode

    @classmethod
    def parse(cls, name: str | NumericsMode) -> Numerics:
        try:
            return cls(NumericsMode(name))
        except ValueError:
            raise ValueError(f"unknown numerics mode {name!r}; choose 'reference' or 'exact-fp32'") from None

    @property
    def act_dtype(self) -> torch.dtype:
        """dtype of activations between ops (the official model's default dtype is bf16)."""
        return torch.bfloat16 if self.mode is NumericsMode.REFERENCE else torch.float32

    @property
    def simulate_quant(self) -> bool:
        return self.mode is NumericsMode.REFERENCE

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the activation dtype (a bf16 round in reference mode, a no-op in exact-fp32 mode)."""
        return x.to(self.act_dtype)

"""The two numerics modes of the network, and the accumulation helpers every layer uses.

- `reference`: DeepSeek's official `inference/model.py` numerics. Activations are bf16 between ops, the FP8 KV
  simulation (64-blocks, UE8M0) and the MXFP4 indexer q/k simulation are on, and every FP8/FP4 linear quantizes
  its input per 128 with a power-of-two scale. Weights are used as stored.
- `exact-fp32`: the same function in fp32 with every quantization simulation off. This is what `transformers`'
  DeepseekV4ForCausalLM computes in fp32 (to ~1e-6), so it is the mode for parity tests.

Every reduction (matmul, softmax sum, norm mean) accumulates in float64, and every transcendental function
(exp, rsqrt, sigmoid, softplus, silu, cos, sin) is evaluated in float64, rounding to fp32 where the reference has
an fp32 result. That makes each token's result independent of how tokens are batched: CPU fp32 GEMMs block by
batch size, and CPU elementwise kernels take vectorized or scalar paths (with different last-ulp results)
depending on tensor size. Batch invariance is what lets the batched engine reproduce single-sequence results
token for token.
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


def matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T -> fp32 [..., N], accumulated in float64 (batch-invariant on every device)."""
    return torch.matmul(x.double(), w.double().transpose(-1, -2)).float()


def mean_sq(x: torch.Tensor) -> torch.Tensor:
    """mean(x^2) over the last dim, fp32 result, float64 accumulation; keepdim."""
    return x.double().square().mean(-1, keepdim=True).float()


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """fp32 softmax computed in float64 (the reference computes it in fp32)."""
    return torch.softmax(x.double(), dim=dim).float()


def exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.double()).float()


def rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(x.double()).float()


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x.double()).float()


def silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x.double()).float()


def sqrt_softplus(x: torch.Tensor) -> torch.Tensor:
    """sqrt(softplus(x)) with torch's softplus (beta 1, threshold 20): the router's score function."""
    return torch.nn.functional.softplus(x.double()).sqrt().float()


def cos_sin(angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a = angle.double()
    return a.cos().float(), a.sin().float()

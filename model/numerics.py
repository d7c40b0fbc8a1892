"""The three numerics modes of the network. A mode is a set of op-family implementations, chosen once when the
`Numerics` is made; the model's forward code calls the families and never branches on the mode.

- `reference`: DeepSeek's official `inference/model.py` numerics, bit for bit. Activations are bf16 between
  ops, the FP8 KV simulation (64-blocks, UE8M0) and the MXFP4 indexer q/k simulation are on, and every FP8/FP4
  linear quantizes its input per 128 with a power-of-two scale. KV entries are stored in the production byte
  formats (584-byte FP8 entries, 68-byte MXFP4 indexer keys), which decode to exactly these values. Reductions
  and transcendentals run in float64 (`dsv4.kernels.ref_math`), so results are batch-invariant.
- `exact-fp32`: the same function in fp32 with every quantization simulation off; KV entries are stored as fp32.
  This is what `transformers`' DeepseekV4ForCausalLM computes in fp32 (to ~1e-6), the mode for parity tests.
- `fast`: what a GPU serves with: the reference's quantization choices (FP8 activations per 1x128, FP8/FP4
  weights read in their checkpoint formats, the same KV byte formats) on tensor cores with fp32 accumulation,
  bf16 between ops, fp32 where the official code is fp32, no float64 (`dsv4.kernels.fast`). Judged by tolerance
  against `reference`; not batch-invariant.

The families (`dsv4.model.numerics_reference`, `dsv4.model.numerics_fast`):
  math        norms, RoPE, the q/kv entry finishing, SwiGLU, embedding lookup
  linear      quantized / bf16 / fp32 linears, the grouped wo_a, the fp32 head
  attention   attention over window + compressed entries with sink (inverse RoPE included), window append
  indexer     indexer query preparation and top-k selection
  compressor  the compressor flush (pooling, norm, RoPE, quantized store, state rotation)
  router      hash and score routing
  experts     routed-expert math on (row, expert, weight) pairs and the per-token combine
  mhc         hyper-connection pre / post mixes and the head collapse
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch


class NumericsMode(str, enum.Enum):
    REFERENCE = "reference"
    EXACT_FP32 = "exact-fp32"
    FAST = "fast"


NUMERICS_NAMES = tuple(m.value for m in NumericsMode)


@dataclass(frozen=True, slots=True)
class Numerics:
    mode: NumericsMode
    act_dtype: torch.dtype        # activations between ops
    simulate_quant: bool          # the official quantization (FP8 KV, MXFP4 indexer, FP8 activations) is applied
    math: Any = field(compare=False, repr=False)
    linear: Any = field(compare=False, repr=False)
    attention: Any = field(compare=False, repr=False)
    indexer: Any = field(compare=False, repr=False)
    compressor: Any = field(compare=False, repr=False)
    router: Any = field(compare=False, repr=False)
    experts: Any = field(compare=False, repr=False)
    mhc: Any = field(compare=False, repr=False)

    @classmethod
    def parse(cls, name: str | NumericsMode) -> Numerics:
        try:
            mode = NumericsMode(name)
        except ValueError:
            raise ValueError(f"unknown numerics mode {name!r}; choose one of {', '.join(NUMERICS_NAMES)}") from None
        if mode is NumericsMode.FAST:
            from dsv4.model.numerics_fast import fast_families

            return cls(mode, torch.bfloat16, True, **fast_families())
        from dsv4.model.numerics_reference import reference_families

        simulate = mode is NumericsMode.REFERENCE
        act_dtype = torch.bfloat16 if simulate else torch.float32
        return cls(mode, act_dtype, simulate, **reference_families(act_dtype, simulate))

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the activation dtype (a bf16 round in reference/fast, a no-op in exact-fp32 mode)."""
        return x.to(self.act_dtype)

    def prepare(self, model: torch.nn.Module) -> None:
        """Derive what this mode's kernels need from the loaded weights, once, before the first step (fast: expert
        weights stacked per layer, scale copies for cuBLAS). Formats stay the checkpoint's."""
        self.experts.prepare(model)      # first: stacking re-points expert weights, which linear data refers to
        self.linear.prepare(model)
        self.compressor.prepare(model)


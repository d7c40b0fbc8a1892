"""The one place the kernel layer reads its environment variables (DeepGEMM-style `DG_*` knobs, here `DSV4_*`).

- `DSV4_KERNELS` (default 1): 0 forces the PyTorch references everywhere (A/B runs).
- `DSV4_KERNEL_CHECKS` (default 1): data-dependent input validation (one device sync) before each kernel, skipped
  automatically while a CUDA graph is being captured; 0 skips it always.
- `DSV4_KERNEL_CACHE` (default `~/.cache/dsv4/kernels`): build cache root, one folder per hash of (sources, flags,
  torch, CUDA, arch).
- `DSV4_CUDA_ARCH` (default: the current device's, `90a` on Hopper): compile target, e.g. `90a`, `100a`.
- `DSV4_KERNEL_VERBOSE` (default 0): 1 shows the compiler command lines while building.

Read on every call (no cached module state), so tests and benchmarks can flip them at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in ("0", "false", "no", "off"):
        return False
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={value!r}: expected 0/1")


@dataclass(frozen=True, slots=True)
class KernelKnobs:
    kernels: bool            # use the CUDA kernels for CUDA tensors in production formats
    checks: bool             # validate data-dependent inputs (needs a sync) when not capturing a graph
    cache_dir: Path
    arch: str | None         # None: from the current device
    verbose: bool


def knobs() -> KernelKnobs:
    cache = os.environ.get("DSV4_KERNEL_CACHE") or str(Path.home() / ".cache" / "dsv4" / "kernels")
    return KernelKnobs(
        kernels=_flag("DSV4_KERNELS", True),
        checks=_flag("DSV4_KERNEL_CHECKS", True),
        cache_dir=Path(cache).expanduser(),
        arch=os.environ.get("DSV4_CUDA_ARCH") or None,
        verbose=_flag("DSV4_KERNEL_VERBOSE", False),
    )

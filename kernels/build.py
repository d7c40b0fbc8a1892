"""Builds and loads the dsv4 CUDA extension (kernels/csrc, one binding module) with
`torch.utils.cpp_extension.load` and ninja.

The build lands in `<DSV4_KERNEL_CACHE>/<key>/`, where the key hashes the sources, the compile flags, the torch
version, the CUDA version and the target arch, so a changed source, a new torch or another GPU generation never
loads a stale binary and an unchanged one is never rebuilt. Container images prebuild it:

    python -m dsv4.kernels.build --arch 90a        # prints the cache folder; ship it and set DSV4_KERNEL_CACHE

Flags: -O3 and line info only. No fast math: the kernels rely on IEEE fp32/fp64 rounding, denormals included,
to reproduce the references' bytes.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

from dsv4.kernels.knobs import knobs

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = ("bindings.cpp", "routing.cu", "router_certified.cu", "kv_store.cu", "compress.cu", "indexer.cu",
           "moe_decode.cu")
HEADERS = ("common.cuh", "routing.cuh", "ops.h")
CUDA_FLAGS = ("-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills")
CXX_FLAGS = ("-O3",)


def device_arch(device: int | None = None) -> str:
    """Compile target for a device: `90a` on Hopper (cluster launches and int8 mma), `100a` on Blackwell."""
    major, minor = torch.cuda.get_device_capability(device)
    suffix = "a" if major >= 9 else ""
    return f"{major}{minor}{suffix}"


def gencode_flags(arch: str) -> list[str]:
    # The explicit -gencode keeps torch from adding its own arch list (a plain sm_90 pass would reject sm_90a code).
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def cache_key(arch: str, csrc: Path = CSRC, torch_version: str | None = None, cuda_version: str | None = None) -> str:
    """Hash of everything that changes the binary."""
    h = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS):
        h.update(name.encode())
        h.update((csrc / name).read_bytes())
    for part in (torch_version or torch.__version__, cuda_version or str(torch.version.cuda), arch,
                 *CUDA_FLAGS, *CXX_FLAGS):
        h.update(b"\0" + part.encode())
    return h.hexdigest()[:16]


def build_dir(arch: str) -> Path:
    return knobs().cache_dir / f"sm{arch}-{cache_key(arch)}"


@functools.cache
def load(arch: str | None = None) -> ModuleType:
    """The extension module, compiled on first use for this process (or loaded from the cache)."""
    from torch.utils.cpp_extension import load as cpp_load

    arch = arch or knobs().arch or device_arch()
    folder = build_dir(arch)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"dsv4_kernels_{folder.name.replace('-', '_')}"
    fresh = not any(folder.glob(f"{name}*.so"))
    if fresh:
        print(f"dsv4.kernels: compiling {len(SOURCES)} sources for sm_{arch} into {folder} "
              "(first use; about a minute with ninja)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    module = cpp_load(name=name, sources=[str(CSRC / s) for s in SOURCES],
                      extra_cflags=list(CXX_FLAGS), extra_cuda_cflags=[*CUDA_FLAGS, *gencode_flags(arch)],
                      build_directory=str(folder), verbose=knobs().verbose)
    if fresh:
        print(f"dsv4.kernels: built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4.kernels.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=None, help="e.g. 90a (default: DSV4_CUDA_ARCH or the current GPU)")
    args = parser.parse_args(argv)
    arch = args.arch or knobs().arch
    if arch is None and not torch.cuda.is_available():
        parser.error("no GPU visible: pass --arch (e.g. 90a)")
    module = load(arch)
    print(Path(module.__file__).parent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

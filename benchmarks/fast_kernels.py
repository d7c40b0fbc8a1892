"""Times every fast-numerics kernel at V4-Flash (and some V4-Pro) shapes against its PyTorch reference on the same
GPU, in one run; checks each kernel's output first. The cases live beside this file, one module per op family
(`fast_cases_<family>.py`, each with `cases() -> list[Case]`); the protocol is `harness.py`'s.

    python benchmarks/fast_kernels.py [--out benchmarks/results] [--only moe]

Writes fast-kernels-<date>-<device>.json and .md under --out and prints the table.
"""

from __future__ import annotations

import importlib
import sys

from harness import run_cases

FAMILIES = ("linear", "moe", "attention", "indexer", "compressor", "router", "mhc", "norm")


def makers():
    out = []
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"fast_cases_{family}")
        except ImportError as e:            # a family without cases yet must not hide the others
            print(f"fast_cases_{family}: {e}", file=sys.stderr)
            continue
        out.append(module.cases)
    return out


if __name__ == "__main__":
    sys.exit(run_cases("fast-kernels", makers(), sys.argv[1:], __doc__))

"""`dsv4 checkpoint`: write a synthetic checkpoint in the official layout (the CLI dispatches here)."""

from __future__ import annotations

import argparse

from dsv4.model.config import ModelConfig, preset
from dsv4.model.synthetic import write_checkpoint


def run_checkpoint(args: argparse.Namespace) -> int:
    config = preset(args.preset) if args.preset else ModelConfig.from_file(args.config)
    out = write_checkpoint(config, args.out, seed=args.seed, shard_bytes=int(args.shard_gib * 2**30))
    print(f"wrote {out}")
    return 0

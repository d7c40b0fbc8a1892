"""`dsv4 checkpoint`: write a synthetic checkpoint in the official layout (the CLI dispatches here)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from dsv4.model.config import ModelConfig, preset
from dsv4.model.synthetic import write_checkpoint, write_generated_checkpoint


def config_overrides(settings: list[str]) -> dict[str, object]:
    """`--set KEY=VALUE` pairs (VALUE as JSON, else a string) as ModelConfig fields; a bad one names itself."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    changes: dict[str, object] = {}
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {setting!r}: expected KEY=VALUE with KEY a config field, e.g. "
                             f"n_routed_experts=64")
        try:
            changes[key] = json.loads(raw)
        except json.JSONDecodeError:
            changes[key] = raw
    return changes


def run_checkpoint(args: argparse.Namespace) -> int:
    config = preset(args.preset) if args.preset else ModelConfig.from_file(args.config)
    config = config.replace(**config_overrides(args.set or []))
    if args.weights == "on-load":
        out = write_generated_checkpoint(config, args.out, seed=args.seed)
        print(f"wrote {out} (config, tokenizer and hash tables; the weights are generated on the device at load)")
        return 0
    out = write_checkpoint(config, args.out, seed=args.seed, shard_bytes=int(args.shard_gib * 2**30))
    print(f"wrote {out}")
    return 0

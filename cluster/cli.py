"""The `dsv4` command. This module is the composition root: each subcommand imports what it wires together
inside its handler, so the rest of `dsv4.cluster` (coordinator, scheduler, server) never imports model code,
and `dsv4 generate` starts without loading torch."""

from __future__ import annotations

import argparse
import sys


def _checkpoint(args: argparse.Namespace) -> int:
    from dsv4.model.cli import run_checkpoint

    return run_checkpoint(args)


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="write a synthetic checkpoint in the official layout")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="built-in configuration: tiny, small, v4-flash, v4-pro")
    source.add_argument("--config", help="a DeepSeek-V4 config.json to build the checkpoint for")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--shard-gib", type=float, default=4.0, help="maximum shard size in GiB (default 4)")
    p.set_defaults(handler=_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 inference service")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_checkpoint(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:   # user-fixable: config, checkpoint, arguments
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

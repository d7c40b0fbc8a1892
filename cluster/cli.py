"""The `dsv4` command. This module is the composition root: each subcommand imports what it wires together
inside its handler, so the rest of `dsv4.cluster` (coordinator, scheduler, server) never imports model code,
and `dsv4 generate` starts without loading torch. The engine itself is composed here too (`start_engine`):
workers from `dsv4.workers`, the coordinator from `dsv4.cluster`, which never import each other.

    dsv4 serve                      a local Ray cluster, the tiny default model, gRPC on :50051
    dsv4 generate "PROMPT"          stream a completion from a running server
    dsv4 batch --input prompts.jsonl --output completions.jsonl     JSONL in, JSONL out, on its own engine
    dsv4 checkpoint --preset tiny --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsv4.cluster import package_version
from dsv4.cluster.metrics import DEFAULT_PORT as METRICS_PORT
from dsv4.wire.config import DEFAULT_PORT, NUMERICS, SchedulerConfig, ServeConfig, default_numerics

if TYPE_CHECKING:
    from dsv4.cluster.batch import BatchPrompt
    from dsv4.cluster.engine_ray import Engine
    from dsv4.cluster.tokenizer import ModelTokenizer


def _checkpoint(args: argparse.Namespace) -> int:
    from dsv4.model.cli import run_checkpoint

    return run_checkpoint(args)


def _generate(args: argparse.Namespace) -> int:
    from dsv4.cluster.client import generate_main

    return generate_main(args)


def _server_options(args: argparse.Namespace) -> dict[str, Any]:
    # `dsv4 batch` starts an engine but no server: its namespace has none of these, ServeConfig's defaults stand.
    if args.command != "serve":
        return {}
    return dict(host=args.host, port=args.port, served_model_name=args.served_model_name or "")


def kv_cache_bytes(gib: float | None, device: str) -> int:
    """--kv-cache-gib: given, that many bytes; absent, sized from the GPU's memory (0) or 256 MiB on CPUs."""
    if gib is not None:
        return int(gib * 2**30)
    return 0 if device == "cuda" else 256 << 20


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """Resolve defaults that need the machine: the model (tiny default, written on first run) and devices.
    Used by `serve` and `batch`, whose engine options are the same (`_add_engine_options`)."""
    from dsv4.workers.launch import available_gpus, ensure_default_model

    gpus = available_gpus() if args.device == "auto" or (args.workers is None and args.device == "cuda") else 0
    device = ("cuda" if gpus else "cpu") if args.device == "auto" else args.device
    workers = args.workers if args.workers is not None else (gpus if device == "cuda" else 2)
    model_dir = args.model or str(ensure_default_model())
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                max_prefill_chunk=args.max_prefill_chunk, max_waiting=args.max_waiting_requests)
    numerics = args.numerics or default_numerics(device)
    return ServeConfig(model_dir=model_dir, num_workers=workers, numerics=numerics, device=device,
                       kv_cache_bytes=kv_cache_bytes(args.kv_cache_gib, device),
                       gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=args.max_model_len,
                       scheduler=scheduler, seed=args.seed, enforce_eager=args.enforce_eager,
                       speculative_tokens=args.speculative_tokens,
                       prefix_cache_snapshots=prefix_cache_snapshots(args), **_server_options(args))


def prefix_cache_snapshots(args: argparse.Namespace) -> int:
    """--prefix-cache-snapshots if given, else with --enable-prefix-caching two per sequence slot, else 0 (off)."""
    if args.prefix_cache_snapshots is not None:
        return args.prefix_cache_snapshots
    return 2 * args.max_num_seqs if args.enable_prefix_caching else 0


def start_engine(config: ServeConfig) -> Engine:
    """The workers loaded and wired, then the coordinator over them; raises with a clear message if resources
    are missing. Used by `serve`, `batch` and the tests' engines."""
    from dsv4.cluster.engine_ray import start_coordinator
    from dsv4.workers.launch import start_workers

    group = start_workers(config)
    return start_coordinator(config, group.actors, group.infos, group.info, group.placement, group.num_hash_layers,
                             group.placement_group)


def constraint_check(tokenizer, info):
    """The server's structured-output check (workers/grammar.py), wired here: cluster never imports workers."""
    from dsv4.workers.grammar import ConstraintCheck

    return ConstraintCheck(tokenizer.path, info.vocab_size, info.eos_token_ids)


def _serve(args: argparse.Namespace) -> int:
    from dsv4.cluster.engine_ray import RayEngineClient
    from dsv4.cluster.server import serve_forever, tls_files
    from dsv4.cluster.tokenizer import ModelTokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tls = tls_files(args.ssl_certfile, args.ssl_keyfile)      # a bad file fails before anything starts
    config = serve_config(args)
    tokenizer = ModelTokenizer.from_dir(config.model_dir)     # before the workers: a bad file fails at once
    print(f"dsv4: starting {config.num_workers} {config.device} workers for {config.model_dir}", file=sys.stderr,
          flush=True)
    engine = start_engine(config)
    print(f"dsv4: serving {engine.info.served_model_name} on {config.host}:{config.port} "
          f"({config.numerics} numerics, max_model_len {engine.info.max_model_len})", file=sys.stderr, flush=True)
    asyncio.run(serve_forever(RayEngineClient(engine.coordinator, engine.info), tokenizer, config.host, config.port,
                              shutdown_grace_s=args.shutdown_grace, api_key=args.api_key or None,
                              metrics_port=args.metrics_port, reflection_on=args.enable_reflection,
                              check_constraint=constraint_check(tokenizer, engine.info), tls=tls))
    print("dsv4: stopped", file=sys.stderr, flush=True)
    return 0


def _batch(args: argparse.Namespace) -> int:
    from dsv4.cluster.batch import read_prompts, run_batch_file
    from dsv4.cluster.engine_ray import RayEngineClient
    from dsv4.cluster.tokenizer import ModelTokenizer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = read_prompts(args.input)  # a bad line fails here, before any worker starts
    if not Path(args.output).resolve().parent.is_dir():
        raise FileNotFoundError(f"--output {args.output}: the directory does not exist")
    config = serve_config(args)
    tokenizer = ModelTokenizer.from_dir(config.model_dir)     # before the workers: a bad file fails at once
    check_prompts(prompts, config, tokenizer, args.input)     # every line against the model, before any worker
    print(f"dsv4: {len(prompts)} prompts from {args.input}; starting {config.num_workers} {config.device} workers "
          f"for {config.model_dir}", file=sys.stderr, flush=True)
    engine = start_engine(config)
    summary = asyncio.run(run_batch_file(RayEngineClient(engine.coordinator, engine.info), tokenizer, prompts,
                                         args.output, args.max_concurrency, args.input,
                                         constraint_check(tokenizer, engine.info)))
    print(f"dsv4: wrote {summary.num_requests} completions ({summary.num_output_tokens} tokens) to {args.output}; "
          f"{summary.num_failed} failed", file=sys.stderr, flush=True)
    return 1 if summary.num_failed else 0


def check_prompts(prompts: list[BatchPrompt], config: ServeConfig, tokenizer: ModelTokenizer, input_path: str
                  ) -> None:
    """`dsv4 batch`'s prompts against the vocabulary, context and sampling limits the engine will serve, read off
    the checkpoint's config.json (no weights, no workers). Raises BatchInputError naming the first bad line."""
    from dsv4.cluster.batch import build_requests
    from dsv4.cluster.generation_service import RequestBuilder
    from dsv4.model.config import ModelConfig
    from dsv4.workers.model_info import model_info

    model = ModelConfig.from_file(Path(config.model_dir) / "config.json")
    build_requests(RequestBuilder(model_info(config, model), tokenizer), prompts, input_path)


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """What starts an engine: shared by `serve` and `batch`, resolved by `serve_config`."""
    defaults = SchedulerConfig()
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="of the server's log (info: one line per finished request)")
    p.add_argument("--model", help="checkpoint directory (default: a tiny synthetic model, created on first run)")
    p.add_argument("--workers", type=int, help="worker actors (default: one per GPU, or 2 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--numerics", choices=NUMERICS, default=None,
                   help="fast (default on GPUs), reference (default on CPUs: the exact oracle) or exact-fp32")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache per worker in GiB (default: what --gpu-memory-utilization leaves on a GPU, "
                        "0.25 on CPUs)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of each GPU's memory to use: weights, activations, CUDA graphs, KV cache (0.9)")
    p.add_argument("--max-model-len", type=int, default=0, help="context limit (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs,
                   help="running sequences per worker")
    p.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens,
                   help="tokens per worker per step")
    p.add_argument("--max-prefill-chunk", type=int, default=defaults.max_prefill_chunk,
                   help="prompt tokens of one request per step")
    p.add_argument("--max-waiting-requests", type=int, default=defaults.max_waiting,
                   help="requests queued for admission; beyond it new ones get RESOURCE_EXHAUSTED")
    p.add_argument("--seed", type=int, default=0, help="base seed for requests that bring none")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (fast numerics capture decode graphs)")
    p.add_argument("--enable-prefix-caching", action="store_true",
                   help="reuse the KV blocks of prompt prefixes earlier requests computed (full blocks of 256 tokens)")
    p.add_argument("--prefix-cache-snapshots", type=int, default=None, metavar="N",
                   help="per worker: how many prefix ends requests can resume from (each holds the window rings and "
                        "CSA states: ~4 MiB at V4-Flash; default with --enable-prefix-caching: 2 x max-num-seqs)")
    p.add_argument("--speculative-tokens", type=int, default=0, choices=range(ServeConfig.MAX_SPECULATIVE_TOKENS + 1),
                   metavar="N", help="draft N tokens per decoding request per step with the checkpoint's MTP block "
                                     "and verify them in one step (0-4; default 0: off; steps run without CUDA "
                                     "graphs while on)")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="start the service (gRPC) on a local or existing Ray cluster")
    _add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 serves other machines: "
                        "the manifests pass it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--served-model-name", help="model id reported to clients (default: the directory name)")
    p.add_argument("--metrics-port", type=int, default=METRICS_PORT,
                   help=f"Prometheus /metrics port (default {METRICS_PORT}; 0: off)")
    p.add_argument("--enable-reflection", action="store_true",
                   help="gRPC server reflection (grpcurl list / describe); off by default")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds the running streams get to finish after SIGTERM / SIGINT (default 30); new requests "
                        "get UNAVAILABLE and health NOT_SERVING at once")
    p.add_argument("--api-key", default=os.environ.get("DSV4_API_KEY"),
                   help="require 'authorization: Bearer <key>' on every call but health checks "
                        "(default: $DSV4_API_KEY; unset: no key)")
    p.add_argument("--ssl-certfile", help="serve gRPC over TLS with this PEM certificate (chain); needs "
                                          "--ssl-keyfile")
    p.add_argument("--ssl-keyfile", help="the PEM private key of --ssl-certfile")
    p.set_defaults(handler=_serve)


def _add_batch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="generate completions for a JSONL file of prompts on a local or existing "
                                     "Ray cluster (the format: pydoc dsv4.cluster.batch)")
    p.add_argument("--input", required=True, help='JSONL prompts: {"id": ..., "prompt": "..."} or '
                                                  '{"prompt_token_ids": [...]}, plus sampling fields')
    p.add_argument("--output", required=True, help="JSONL completions, one per prompt, in input order")
    p.add_argument("--max-concurrency", type=int, default=256,
                   help="requests in flight (default 256); the coordinator's scheduler batches them")
    _add_engine_options(p)
    p.set_defaults(handler=_batch)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from dsv4.cluster.client import add_generate_arguments

    add_generate_arguments(sub.add_parser("generate", help="stream a completion from a running server"))
    sub.choices["generate"].set_defaults(handler=_generate)


def _add_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("checkpoint", help="write a synthetic checkpoint in the official layout")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="built-in configuration: tiny, small, v4-flash, v4-pro")
    source.add_argument("--config", help="a DeepSeek-V4 config.json to build the checkpoint for")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (default 0)")
    p.add_argument("--shard-gib", type=float, default=4.0, help="maximum shard size in GiB (default 4)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set n_routed_experts=64 (repeatable)")
    p.add_argument("--weights", choices=("files", "on-load"), default="files",
                   help="files: safetensors shards; on-load: no weight files, each worker generates the seeded "
                        "weights in its device's memory at load (benchmarks of models larger than the disk)")
    p.set_defaults(handler=_checkpoint)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv4", description="DeepSeek-V4 inference service")
    parser.add_argument("--version", action="version", version=f"dsv4 {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_serve(sub)
    _add_generate(sub)
    _add_batch(sub)
    _add_checkpoint(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:   # user-fixable: config, checkpoint, resources
        print(f"dsv4 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

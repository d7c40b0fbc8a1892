"""A small blocking client for `dsv4.v1.Dsv4Engine`, and the `dsv4 generate "PROMPT"` command built on it.

Wiring for the CLI owner:

    add_generate_arguments(subparsers.add_parser("generate", help="stream a completion"))
    ...
    return generate_main(args)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from typing import Any, TextIO

import grpc

from dsv4.protos import dsv4_pb2, dsv4_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"


class GenerationError(RuntimeError):
    """The engine failed the request after it started (the stream's terminal `error` message)."""


def stream_generate(address: str, prompt: str, *, timeout_s: float | None = None,
                    request_id: str = "", **sampling: Any) -> Iterator[str]:
    """Yield the completion of `prompt` as text deltas, as the server streams them.

    `sampling` are `dsv4.v1.SamplingParams` fields (max_tokens, temperature, top_p, top_k, seed, min_tokens, stop,
    stop_token_ids, ignore_eos); None means "server default". Raises grpc.RpcError for a rejected request
    (INVALID_ARGUMENT names the field) and GenerationError if the engine fails mid-stream. Closing the iterator
    early cancels the call, which aborts the request on the server.
    """
    params = dsv4_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = dsv4_pb2.GenerateRequest(request_id=request_id, text=prompt, sampling_params=params)
    with grpc.insecure_channel(address) as channel:
        call = dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(request, timeout=timeout_s)
        try:
            for response in call:
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    if response.chunk.text:
                        yield response.chunk.text
                elif kind == "error":
                    raise GenerationError(response.error.message)
                else:
                    return
        finally:
            call.cancel()  # no-op when the stream already ended


def add_generate_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("prompt", help="prompt text (BOS is added by the server)")
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"server host:port (default {DEFAULT_ADDRESS})")
    parser.add_argument("--max-tokens", type=int, help="default: the rest of the context")
    parser.add_argument("--temperature", type=float, help="default 1.0; 0 is greedy")
    parser.add_argument("--top-p", type=float, help="default 1.0")
    parser.add_argument("--top-k", type=int, help="default 0 (off)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--min-tokens", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true", default=None)
    parser.add_argument("--timeout", type=float, help="seconds before the call is cancelled")
    return parser


def generate_main(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Stream the completion of `args.prompt` to `out`; returns a process exit code."""
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, min_tokens=args.min_tokens, stop=args.stop, ignore_eos=args.ignore_eos)
    try:
        for text in stream_generate(args.address, args.prompt, timeout_s=args.timeout, **sampling):
            out.write(text)
            out.flush()
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except GenerationError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    out.write("\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_generate_arguments(argparse.ArgumentParser(prog="dsv4 generate"))
    return generate_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

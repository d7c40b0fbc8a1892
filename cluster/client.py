"""A small blocking client for `dsv4.v1.Dsv4Engine`, and the `dsv4 generate "PROMPT"` command built on it.

Wiring for the CLI owner:

    add_generate_arguments(subparsers.add_parser("generate", help="stream a completion"))
    ...
    return generate_main(args)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any, TextIO

import grpc

from dsv4.protos import dsv4_pb2, dsv4_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"


class GenerationError(RuntimeError):
    """The engine failed the request after it started (the stream's terminal `error` message)."""


def stream_chunks(address: str, prompt: str, *, timeout_s: float | None = None,
                  request_id: str = "", **sampling: Any) -> Iterator[dsv4_pb2.GenerateChunk]:
    """Yield the `GenerateChunk`s of `prompt`'s completion (token ids, text, logprobs when asked) as the server
    streams them. Arguments, errors and cancellation as for `stream_generate`."""
    params = dsv4_pb2.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    request = dsv4_pb2.GenerateRequest(request_id=request_id, text=prompt, sampling_params=params)
    with grpc.insecure_channel(address) as channel:
        call = dsv4_pb2_grpc.Dsv4EngineStub(channel).Generate(request, timeout=timeout_s)
        try:
            for response in call:
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    yield response.chunk
                elif kind == "error":
                    raise GenerationError(response.error.message)
                else:
                    return
        finally:
            call.cancel()  # no-op when the stream already ended


def stream_generate(address: str, prompt: str, *, timeout_s: float | None = None,
                    request_id: str = "", **sampling: Any) -> Iterator[str]:
    """Yield the completion of `prompt` as text deltas, as the server streams them.

    `sampling` are `dsv4.v1.SamplingParams` fields (max_tokens, temperature, top_p, top_k, seed, min_tokens, stop,
    stop_token_ids, ignore_eos, logprobs); None means "server default". Raises grpc.RpcError for a rejected request
    (INVALID_ARGUMENT names the field) and GenerationError if the engine fails mid-stream. Closing the iterator
    early cancels the call, which aborts the request on the server.
    """
    # closing() so that closing this iterator cancels the call at once, not when the inner one is collected
    with contextlib.closing(stream_chunks(address, prompt, timeout_s=timeout_s, request_id=request_id,
                                          **sampling)) as chunks:
        for chunk in chunks:
            if chunk.text:
                yield chunk.text


def format_logprobs(token_ids: Sequence[int], logprobs: Sequence[dsv4_pb2.TokenLogprobs]) -> str:
    """One line per output token: its id, its logprob, then the most likely tokens as `id:logprob`."""
    lines = []
    for token_id, lp in zip(token_ids, logprobs, strict=True):
        top = " ".join(f"{t}:{v:.4f}" for t, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True))
        lines.append(f"{token_id}\t{lp.logprob:.4f}" + (f"\t{top}" if top else ""))
    return "".join(line + "\n" for line in lines)


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
    parser.add_argument("--logprobs", type=int, metavar="N",
                        help="after the text, print each token's id and logprob (and the N most likely) to stderr")
    parser.add_argument("--timeout", type=float, help="seconds before the call is cancelled")
    return parser


def generate_main(args: argparse.Namespace, out: TextIO = sys.stdout, err: TextIO | None = None) -> int:
    """Stream the completion of `args.prompt` to `out` (and with --logprobs, the logprobs to `err`); returns a
    process exit code."""
    err = err or sys.stderr
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, min_tokens=args.min_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
                    logprobs=args.logprobs)
    token_ids: list[int] = []
    logprobs: list[dsv4_pb2.TokenLogprobs] = []
    try:
        for chunk in stream_chunks(args.address, args.prompt, timeout_s=args.timeout, **sampling):
            token_ids.extend(chunk.token_ids)
            logprobs.extend(chunk.logprobs)
            if chunk.text:
                out.write(chunk.text)
                out.flush()
    except grpc.RpcError as exc:
        print(f"\nerror: {exc.code().name}: {exc.details()}", file=err)
        return 1
    except GenerationError as exc:
        print(f"\nerror: {exc}", file=err)
        return 1
    out.write("\n")
    if sampling["logprobs"] is not None:
        err.write(format_logprobs(token_ids, logprobs))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_generate_arguments(argparse.ArgumentParser(prog="dsv4 generate"))
    return generate_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

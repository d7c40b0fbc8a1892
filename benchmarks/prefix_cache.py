"""Prefix caching through the service: a multi-turn chat and a few-shot workload, each run twice on one server
started with `--enable-prefix-caching`: with the cache flushed before every request (`ResetPrefixCache`: every
prompt computed from scratch) and with it kept. Per request: prompt tokens, tokens served from the cache, and time
to first token both ways.

- chat: --turns turns; turn 1's prompt is a --system-len-token system prompt and a user message; each later turn's
  prompt is the previous prompt, its answer (--answer-len tokens) and a new --user-len-token message.
- few-shot: --shots requests sharing one --system-len-token block of examples, each with its own question.

Target (prefix-caching issue): the second and later turns' TTFT <= 25 % of the uncached TTFT at 4K shared tokens.

    python benchmarks/prefix_cache.py --preset tiny --device cpu --out results/                  # the CPU run
    python benchmarks/prefix_cache.py --preset v4-flash --set n_routed_experts=64 --weights on-load --device cuda \
        --workers 1 --numerics fast --kv-cache-gib 0 --max-prefill-chunk 4096 --system-len 4096 --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import grpc
import torch
from serve import start_server, stream

from dsv4.model.cli import config_overrides
from dsv4.model.config import preset
from dsv4.model.synthetic import write_checkpoint, write_generated_checkpoint
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc


def ask(stub, prompt: list[int], max_tokens: int, flush: bool) -> dict:
    """One greedy request (after a cache flush if asked): its answer, TTFT and the prompt tokens it found cached."""
    if flush:
        stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), timeout=60)
    r = stream(stub, prompt, max_tokens, temperature=0.0)
    return {"ids": r["ids"], "ttft_ms": 1000 * r["ttft"], "cached": r["cached"]}


def chat(stub, args, vocab: int, g: torch.Generator, flush: bool) -> list[dict]:
    prompt = torch.randint(2, vocab, (args.system_len + args.user_len,), generator=g).tolist()
    rows = []
    for turn in range(args.turns):
        r = ask(stub, prompt, args.answer_len, flush)
        rows.append({"turn": turn + 1, "prompt_tokens": len(prompt), "cached": r["cached"], "ttft_ms": r["ttft_ms"],
                     "answer": r["ids"]})
        prompt = prompt + r["ids"] + torch.randint(2, vocab, (args.user_len,), generator=g).tolist()
    return rows


def few_shot(stub, args, vocab: int, g: torch.Generator, flush: bool) -> list[dict]:
    examples = torch.randint(2, vocab, (args.system_len,), generator=g).tolist()
    rows = []
    for shot in range(args.shots):
        prompt = examples + torch.randint(2, vocab, (args.user_len,), generator=g).tolist()
        r = ask(stub, prompt, args.answer_len, flush)
        rows.append({"request": shot + 1, "prompt_tokens": len(prompt), "cached": r["cached"],
                     "ttft_ms": r["ttft_ms"], "answer": r["ids"]})
    return rows


def compare(uncached: list[dict], cached: list[dict], key: str) -> list[dict]:
    out = []
    for a, b in zip(uncached, cached, strict=True):
        out.append({key: a[key], "prompt_tokens": a["prompt_tokens"], "cached_tokens": b["cached"],
                    "ttft_uncached_ms": round(a["ttft_ms"], 1), "ttft_cached_ms": round(b["ttft_ms"], 1),
                    "ratio": round(b["ttft_ms"] / a["ttft_ms"], 3), "same_answer": a["answer"] == b["answer"]})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--weights", choices=("files", "on-load"), default="files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--numerics", default=None)
    p.add_argument("--port", type=int, default=50561)
    p.add_argument("--kv-cache-gib", type=float, default=1.0)
    p.add_argument("--max-num-seqs", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--max-prefill-chunk", type=int, default=4096)
    p.add_argument("--system-len", type=int, default=4096)
    p.add_argument("--user-len", type=int, default=200)
    p.add_argument("--answer-len", type=int, default=64)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--startup-timeout", type=float, default=900)
    p.add_argument("--commit", default=os.environ.get("DSV4_COMMIT", "unknown"))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    args.numerics = args.numerics or ("fast" if args.device == "cuda" else "reference")
    args.out.mkdir(parents=True, exist_ok=True)
    config = preset(args.preset).replace(**config_overrides(args.set))
    variant = "-".join(s.replace("=", "") for s in args.set)
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"dsv4-bench-{args.preset}{'-' + variant if variant else ''}"
    model_dir = model_dir.with_name(model_dir.name + ("-onload" if args.weights == "on-load" else ""))
    if not (model_dir / "config.json").exists():
        (write_generated_checkpoint if args.weights == "on-load" else write_checkpoint)(config, model_dir, seed=0)
    server = start_server(args, model_dir, args.out / "prefix-serve.log", ["--enable-prefix-caching"])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{args.port}") as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            ask(stub, list(range(2, 300)), 2, flush=True)            # warm-up
            results = {}
            for name, run, key in (("chat", chat, "turn"), ("few-shot", few_shot, "request")):
                uncached = run(stub, args, config.vocab_size, torch.Generator().manual_seed(1), flush=True)
                stub.ResetPrefixCache(pb.ResetPrefixCacheRequest(), timeout=60)     # the cached run starts cold
                cached = run(stub, args, config.vocab_size, torch.Generator().manual_seed(1), flush=False)
                results[name] = compare(uncached, cached, key)
                print(json.dumps({name: results[name]}), flush=True)
            extra = dict(stub.GetLoads(pb.GetLoadsRequest(), timeout=30).extra)
    finally:
        server.terminate()
        server.wait(60)
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    meta = {"date": date, "commit": args.commit, "device": name, "preset": args.preset, "overrides": args.set,
            "numerics": args.numerics, "system_len": args.system_len, "user_len": args.user_len,
            "answer_len": args.answer_len, "max_prefill_chunk": args.max_prefill_chunk}
    stem = f"prefix-cache-{args.device}-{args.preset}-{date}"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results, "gauges": extra}, indent=1))
    lines = [f"# Prefix caching, {args.preset} {' '.join(args.set)}, {name}, {args.numerics} numerics ({date})", "",
             f"commit {args.commit}; {args.system_len}-token shared prefix, {args.user_len}-token messages, "
             f"{args.answer_len}-token answers; uncached = the cache flushed before each request.", ""]
    for workload, rows in results.items():
        key = "turn" if workload == "chat" else "request"
        lines += [f"## {workload}", "", f"| {key} | prompt tokens | cached | TTFT uncached ms | TTFT cached ms | "
                  "ratio | same answer |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r[key]} | {r['prompt_tokens']} | {r['cached_tokens']} | {r['ttft_uncached_ms']} | "
                  f"{r['ttft_cached_ms']} | {r['ratio']} | {r['same_answer']} |" for r in rows]
        later = [r["ratio"] for r in rows[1:]]
        lines += ["", f"Mean ratio after the first: {sum(later) / max(len(later), 1):.3f} (target <= 0.25).", ""]
    (args.out / f"{stem}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if all(r["same_answer"] for rows in results.values() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

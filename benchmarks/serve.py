"""End to end: `dsv4 serve` on a synthetic checkpoint, checked and timed through the gRPC API.

1. Correctness: greedy completions streamed from the service (N workers, expert-parallel all-to-all) equal the
   single-process model's greedy decode, token for token.
2. Timing, in the anchors' protocol (SGLang's and vLLM's serving benchmarks): random token prompts of
   --prompt-len, --max-tokens outputs each (ignore_eos), at each --concurrency level a pool of that many clients
   runs --prompts-per-level x concurrency requests. Per level: TTFT and TPOT P50 / mean / P99, output and total
   tokens/s (and per GPU), and the engine's own step time beside the interval between step completions, so the
   control plane's cost is visible (`GetLoads` gauges over the level's last 100 steps). --request-rates adds
   open-loop levels (--prompts-per-level x 16 requests arriving as a Poisson process): TPOT while prompts prefill.

3. Log-probabilities (--logprob-check): 4 greedy requests with top-5 logprobs, each alone and again inside a batch
   of 32 other streams; token for token up to where they part, log-probabilities within --logprob-tolerance, and
   where they part only at a near tie (each run's token within the tolerance of the other's best).

    python benchmarks/serve.py --preset small --device cuda --workers 2 --out results/
    # the anchors' table on one H200: V4-Flash widths, one EP-4 rank's 64 experts, weights generated on the GPU
    python benchmarks/serve.py --preset v4-flash --set n_routed_experts=64 --weights on-load --device cuda \
        --workers 1 --numerics fast --kv-cache-gib 0 --max-num-seqs 64 --max-num-batched-tokens 4096 \
        --max-prefill-chunk 4096 --check-tokens 0 --logprob-check --prompt-len 8192 --max-tokens 1024 \
        --concurrency 1,16,64 --out results/
Writes serve-<device>-<preset>-<date>.json / .md and the server log into --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import grpc
import torch

from dsv4.model.checkpoint import load_model
from dsv4.model.cli import config_overrides
from dsv4.model.config import preset
from dsv4.model.generate import greedy_generate
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import write_checkpoint, write_generated_checkpoint
from dsv4.protos import dsv4_pb2 as pb
from dsv4.protos import dsv4_pb2_grpc


def start_server(args, model_dir: Path, log_path: Path, extra: list[str] = ()) -> subprocess.Popen:
    command = [sys.executable, "-m", "dsv4.cluster.cli", "serve", "--model", str(model_dir), "--workers",
               str(args.workers), "--device", args.device, "--port", str(args.port), "--host", "127.0.0.1",
               "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
               "--max-prefill-chunk", str(args.max_prefill_chunk), "--numerics", args.numerics, "--metrics-port", "0",
               *extra]
    if args.kv_cache_gib:     # 0: sized from the GPU's free memory (--gpu-memory-utilization)
        command += ["--kv-cache-gib", str(args.kv_cache_gib)]
    log = open(log_path, "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if "dsv4: serving" in log_path.read_text():
            return process
        if process.poll() is not None:
            raise RuntimeError(f"dsv4 serve exited:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"dsv4 serve did not come up:\n{log_path.read_text()[-4000:]}")


def stream(stub, prompt: list[int], max_tokens: int, **params) -> dict:
    """One request: its output ids (and log-probabilities if asked: the sampled token's, and the top ones as
    {token: logprob} per position), time to first token and total time, and the prompt tokens it found in the
    prefix cache."""
    request = pb.GenerateRequest(tokenized=pb.TokenIds(token_ids=prompt), sampling_params=pb.SamplingParams(
        max_tokens=max_tokens, ignore_eos=True, **params))
    start, first, ids, logprobs, tops, cached = time.perf_counter(), None, [], [], [], 0
    for response in stub.Generate(request, timeout=3600):
        if response.WhichOneof("response") == "chunk":
            first = first or time.perf_counter()
            ids += list(response.chunk.token_ids)
            logprobs += [entry.logprob for entry in response.chunk.logprobs]
            tops += [dict(zip(entry.top_token_ids, entry.top_logprobs, strict=True))
                     for entry in response.chunk.logprobs]
        elif response.WhichOneof("response") == "complete":
            cached = response.complete.cached_tokens
        elif response.WhichOneof("response") == "error":
            raise RuntimeError(response.error.message)
    end = time.perf_counter()
    return {"ids": ids, "logprobs": logprobs, "tops": tops, "ttft": (first or end) - start, "total": end - start,
            "cached": cached}


def logprob_check(stub, vocab: int, g: torch.Generator, max_tokens: int, tolerance: float,
                  num_prompts: int = 4) -> dict:
    """Greedy requests with log-probabilities, each alone and again inside a batch of 32 other streams. The fast
    path is not batch invariant, so the two runs may part where the top tokens are near-tied: compared token for
    token up to the first difference, log-probabilities within `tolerance`; where they part, each run's token
    must be in the other's top 5 within `tolerance` of its best (a near tie swapped, not a wrong distribution)."""
    prompts = [torch.randint(2, vocab, (300,), generator=g).tolist() for _ in range(num_prompts)]
    alone = [stream(stub, p, max_tokens, temperature=0.0, logprobs=5) for p in prompts]
    others = [torch.randint(2, vocab, (int(n),), generator=g).tolist() for n in torch.randint(64, 512, (32,))]
    with concurrent.futures.ThreadPoolExecutor(32 + num_prompts) as pool:
        background = [pool.submit(stream, stub, p, max_tokens + 16, temperature=0.0) for p in others]
        time.sleep(0.5)                                      # the others are running when these arrive
        batched = [f.result() for f in [pool.submit(stream, stub, p, max_tokens, temperature=0.0, logprobs=5)
                                        for p in prompts]]
        for f in background:
            f.result()
    cases = []
    for a, b in zip(alone, batched, strict=True):
        same = next((i for i, (x, y) in enumerate(zip(a["ids"], b["ids"], strict=True)) if x != y), len(a["ids"]))
        diffs = [abs(x - y) for x, y in zip(a["logprobs"][:same], b["logprobs"][:same], strict=True)]
        case = {"equal_prefix": same, "max_abs_logprob_diff": max(diffs, default=0.0),
                "mean_logprob": sum(a["logprobs"]) / max(len(a["logprobs"]), 1)}
        ok = len(a["logprobs"]) == len(a["ids"]) and case["max_abs_logprob_diff"] <= tolerance
        if same < len(a["ids"]):                             # where they part: a near tie?
            top_a, top_b = a["tops"][same], b["tops"][same]
            gap_a = max(top_a.values()) - top_a.get(b["ids"][same], float("-inf"))
            gap_b = max(top_b.values()) - top_b.get(a["ids"][same], float("-inf"))
            case.update(parted_at=same, gap_alone=gap_a, gap_batched=gap_b,
                        top2_gap_alone=sorted(top_a.values())[-1] - sorted(top_a.values())[-2])
            ok = ok and gap_a <= tolerance and gap_b <= tolerance
        case["passed"] = ok
        cases.append(case)
    return {"tokens": max_tokens, "tolerance": tolerance, "cases": cases, "passed": all(c["passed"] for c in cases)}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]

    return {"p50": at(0.5), "mean": sum(ordered) / len(ordered), "p99": at(0.99)}


def timing(stub, prompts: list[list[int]], max_tokens: int, concurrency: int, num_gpus: int,
           rate: float | None = None) -> dict:
    """Run every prompt with `concurrency` clients at a time, or (`rate`, requests/s) arriving as a Poisson
    process whatever is running; latency percentiles and throughput."""
    start = time.perf_counter()
    if rate is None:
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            runs = list(pool.map(lambda p: stream(stub, p, max_tokens, temperature=0.0), prompts))
    else:
        gaps = torch.distributions.Exponential(rate).sample((len(prompts),)).tolist()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            futures = []
            for prompt, gap in zip(prompts, gaps, strict=True):
                time.sleep(gap)
                futures.append(pool.submit(stream, stub, prompt, max_tokens, temperature=0.0))
            runs = [f.result() for f in futures]
    wall = time.perf_counter() - start
    outputs = sum(len(r["ids"]) for r in runs)
    total = outputs + sum(len(p) for p in prompts)
    ttft = percentiles([1000 * r["ttft"] for r in runs])
    tpot = percentiles([1000 * (r["total"] - r["ttft"]) / max(len(r["ids"]) - 1, 1) for r in runs])
    gauges = dict(stub.GetLoads(pb.GetLoadsRequest(), timeout=30).extra)
    interval, worker = gauges.get("mean_step_interval_seconds", 0.0), gauges.get("mean_worker_seconds", 0.0)
    return {"concurrency": concurrency if rate is None else f"rate {rate}/s", "requests": len(prompts),
            "prompt_tokens": sum(len(p) for p in prompts),
            "output_tokens": outputs, "wall_s": round(wall, 3), "output_tokens_per_s": round(outputs / wall, 2),
            "total_tokens_per_s": round(total / wall, 2),
            "total_tokens_per_s_per_gpu": round(total / wall / num_gpus, 2),
            "ttft_ms": {k: round(v, 2) for k, v in ttft.items()}, "tpot_ms": {k: round(v, 3) for k, v in tpot.items()},
            "step_interval_ms": round(1000 * interval, 3), "worker_step_ms": round(1000 * worker, 3),
            "control_plane_share": round((interval - worker) / interval, 3) if interval else None}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field of the preset, e.g. n_routed_experts=64 (repeatable)")
    parser.add_argument("--weights", choices=("files", "on-load"), default="files",
                        help="on-load: no weight files, the workers generate them on their devices")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--numerics", default="reference")
    parser.add_argument("--port", type=int, default=50551)
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="0: sized from the GPU's free memory")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-prefill-chunk", type=int, default=256)
    parser.add_argument("--check-tokens", type=int, default=32,
                        help="greedy tokens compared with the single-process model (0: no check, e.g. a model "
                             "too large to hold twice)")
    parser.add_argument("--logprob-check", action="store_true")
    parser.add_argument("--logprob-tolerance", type=float, default=0.05)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts, one level each")
    parser.add_argument("--request-rates", default="",
                        help="comma-separated arrival rates (requests/s, Poisson), one level each after the "
                             "concurrency levels: TTFT and TPOT while prompts keep arriving")
    parser.add_argument("--prompts-per-level", type=int, default=1,
                        help="requests per level = this x the concurrency (at least 1)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--commit", default=os.environ.get("DSV4_COMMIT", "unknown"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = preset(args.preset).replace(**config_overrides(args.set))
    variant = "-".join(s.replace("=", "") for s in args.set)
    model_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"dsv4-bench-{args.preset}{'-' + variant if variant else ''}"
    model_dir = model_dir.with_name(model_dir.name + ("-onload" if args.weights == "on-load" else ""))
    if not (model_dir / "config.json").exists():
        if args.weights == "on-load":
            write_generated_checkpoint(config, model_dir, seed=0)
        else:
            write_checkpoint(config, model_dir, seed=0)
    server = start_server(args, model_dir, args.out / "serve.log")
    equal, served, logprobs = [], [], None
    try:
        with grpc.insecure_channel(f"127.0.0.1:{args.port}") as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            vocab = config.vocab_size
            g = torch.Generator().manual_seed(0)
            if args.check_tokens:
                checks = [torch.randint(2, vocab, (n,), generator=g).tolist() for n in (5, 64, 129, 300)]
                served = [stream(stub, p, args.check_tokens, temperature=0.0)["ids"] for p in checks]
                device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
                # The service runs with the CUDA kernels; the single-process check runs the PyTorch references.
                os.environ["DSV4_KERNELS"] = "0"
                single = load_model(model_dir, device=device, progress=None)
                numerics = Numerics.parse(args.numerics)
                expected = [greedy_generate(single, p, args.check_tokens, numerics) for p in checks]
                equal = [a == b for a, b in zip(served, expected, strict=True)]
                del single
            if args.logprob_check:
                logprobs = logprob_check(stub, vocab, g, 32, args.logprob_tolerance)
                print(json.dumps({"logprob_check": logprobs}), flush=True)
            num_gpus = args.workers if args.device == "cuda" else 1
            runs = []
            for level in (int(c) for c in args.concurrency.split(",")):
                prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist()
                           for _ in range(max(1, args.prompts_per_level) * level)]
                runs.append(timing(stub, prompts, args.max_tokens, level, num_gpus))
                print(json.dumps(runs[-1]), flush=True)
                (args.out / "serve-partial.json").write_text(json.dumps(runs, indent=2))   # if cut off
            torch.manual_seed(0)                              # the arrival times
            for rate in (float(r) for r in args.request_rates.split(",") if r):
                prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist()
                           for _ in range(max(1, args.prompts_per_level) * 16)]
                runs.append(timing(stub, prompts, args.max_tokens, 0, num_gpus, rate=rate))
                print(json.dumps(runs[-1]), flush=True)
                (args.out / "serve-partial.json").write_text(json.dumps(runs, indent=2))   # if cut off
            loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=30)
    finally:
        server.terminate()
        server.wait(60)
    date = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor() or "cpu"
    result = {"date": date, "commit": args.commit, "device": name, "num_gpus": torch.cuda.device_count(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "preset": args.preset,
              "config_overrides": args.set, "weights": args.weights, "workers": args.workers,
              "numerics": args.numerics, "server": {k: getattr(args, k) for k in (
                  "max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "kv_cache_gib")},
              "greedy_equal_single_process": equal, "greedy_outputs": served, "logprob_check": logprobs,
              "timing": runs,
              "expert_token_counts_sum": sum(loads.expert_token_counts), "engine_gauges": dict(loads.extra)}
    stem = f"serve-{args.device}-{args.preset}{'-' + variant if variant else ''}-{date}"
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {r['concurrency']} | {r['requests']} | {r['wall_s']} | {r['output_tokens_per_s']} | "
                     f"{r['total_tokens_per_s_per_gpu']} | {r['ttft_ms']['p50']} / {r['ttft_ms']['mean']} / "
                     f"{r['ttft_ms']['p99']} | {r['tpot_ms']['p50']} / {r['tpot_ms']['mean']} / "
                     f"{r['tpot_ms']['p99']} | "
                     f"{r['worker_step_ms']} / {r['step_interval_ms']} | {r['control_plane_share']} |" for r in runs)
    (args.out / f"{stem}.md").write_text(
        f"# dsv4 serve, {' '.join([args.preset, *args.set])}, {args.workers} {args.device} workers\n\n"
        f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, commit {args.commit}, {date}, "
        f"{args.numerics} numerics, weights {args.weights}, server {result['server']}.\n\n"
        f"Greedy outputs streamed from the service (CUDA kernels where the device has them) equal the "
        f"single-process model's on the PyTorch reference path: {equal or 'not checked'}.\n\n"
        f"Log-probabilities of greedy requests alone and inside a batch of 32: {logprobs or 'not checked'}.\n\n"
        f"Prompts of {args.prompt_len} random tokens, {args.max_tokens} outputs each (ignore_eos).\n\n"
        f"| concurrency | requests | wall s | output tok/s | total tok/s/GPU | TTFT ms P50 / mean / P99 | "
        f"TPOT ms P50 / mean / P99 | worker step / step interval ms | control-plane share |\n"
        f"|---|---|---|---|---|---|---|---|---|\n{rows}\n\n"
        f"Engine gauges (last 100 steps): {dict(loads.extra)}\n")
    print((args.out / f"{stem}.md").read_text())
    return 0 if all(equal) and (logprobs is None or logprobs["passed"]) else 1


if __name__ == "__main__":
    sys.exit(main())

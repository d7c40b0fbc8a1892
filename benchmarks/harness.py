"""Timing harness shared by the kernel benchmarks (protocol: /work/shared/design/performance.md).

"cold" = median of >= 11 standalone calls, each after a 256 MiB memset that evicts L2; "graph" = one node of a
captured CUDA graph of 20 back-to-back calls (replayed 10 times, median / 20); floor = bytes moved / the copy
bandwidth measured in the same run. A `Case` is one kernel call at one shape with its reference and its check.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DEV = "cuda"
LAUNCH_COLD_US, LAUNCH_GRAPH_US = 4.5, 1.0                    # H100, measured (kernel-anchors.md §2.2)


@dataclass
class Result:
    kernel: str
    shape: str
    check: str
    cold_us: float
    graph_us: float
    bytes: int
    gbps: float
    floor_us: float
    pct_floor_cold: float          # (launch + bytes / BW) / cold
    pct_floor_graph: float         # (node + bytes / BW) / graph node
    torch_us: float
    speedup: float
    target: str
    met: str
    notes: str = ""


@dataclass
class Case:
    kernel: str
    shape: str
    run: Callable[[], object]              # the kernel call (validation off)
    reference: Callable[[], object]        # the PyTorch reference on the same GPU tensors
    check: Callable[[], str]               # compares kernel and reference outputs
    bytes: int
    target: str
    target_cold_us: float | None = None
    target_graph_us: float | None = None
    ref_reps: int = 11
    notes: str = ""
    graph: bool = True
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    def __init__(self):
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEV)

    def cold(self, fn: Callable[[], object], reps: int = 11) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        return statistics.median(times)

    @staticmethod
    def graph(fn: Callable[[], object], calls: int = 20, replays: int = 10) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        return statistics.median(times)


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) * 1e-3) / 1e9



def decode_flush_steps(batch: int = 128) -> dict[str, list[tuple[int, int, int]]]:
    """Decode steps of `batch` sequences, (slot, start, length = 1) each, for the compressor flush benchmarks:
    every CSA window completing, the typical 1 in 4, the typical HCA step (one of 128) and every HCA window."""
    return {"csa_all": [(s, 1000 + 4 * s + 3, 1) for s in range(batch)],
            "csa_quarter": [(s, 1000 + s, 1) for s in range(batch)],
            "hca_one": [(s, 1000 + s, 1) for s in range(batch)],
            "hca_all": [(s, 128 * 9 + 127, 1) for s in range(batch)]}


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


def measure(case: Case, timer: Timer, bandwidth: float) -> Result:
    check = case.check()
    cold = timer.cold(case.run)
    graph = timer.graph(case.run) if case.graph else math.nan
    torch_us = timer.cold(case.reference, reps=case.ref_reps)
    floor = case.bytes / (bandwidth * 1e3)
    met = []
    if case.target_cold_us is not None:
        met.append(cold <= case.target_cold_us)
    if case.target_graph_us is not None:
        met.append(graph <= case.target_graph_us)
    return Result(case.kernel, case.shape, check, cold, graph, case.bytes, case.bytes / (cold * 1e3), floor,
                  100 * (LAUNCH_COLD_US + floor) / cold, 100 * (LAUNCH_GRAPH_US + floor) / graph, torch_us,
                  torch_us / cold, case.target, ("yes" if all(met) else "no") if met else "-", case.notes)


def markdown(meta: dict, results: list[Result]) -> str:
    lines = [f"# dsv4 kernels on {meta['device']} ({meta['date']})", "",
             f"commit `{meta['commit']}`, torch {meta['torch']}, CUDA {meta['cuda']}, "
             f"measured copy bandwidth {meta['bandwidth_GBps']:.0f} GB/s (read + write).", "",
             "cold: median of 11 standalone calls after a 256 MiB L2 flush; graph: one node of a 20-call CUDA graph; "
             f"floor: bytes / measured bandwidth; % of floor = (launch + floor) / time, launch {LAUNCH_COLD_US} us "
             f"cold, {LAUNCH_GRAPH_US} us graph; torch: the PyTorch reference on the same GPU, cold.", "",
             "| kernel | shape | check | us cold | us graph | GB/s | floor us | % floor cold / graph | torch us | "
             "speedup | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.kernel} | {r.shape} | {r.check} | {r.cold_us:.1f} | {r.graph_us:.1f} | {r.gbps:.0f} | "
                     f"{r.floor_us:.2f} | {r.pct_floor_cold:.0f} / {r.pct_floor_graph:.0f} | {r.torch_us:.0f} | "
                     f"{r.speedup:.0f}x | {r.target} | {r.met} |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_cases(prefix: str, makers: list[Callable[[], list[Case]]], argv: list[str] | None, doc: str) -> int:
    """The benchmark command line: measure every case the makers return (or those --only selects), print one line
    per case, write <prefix>-<date>-<device>.json and .md under --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--commit", default=None)
    parser.add_argument("--only", default=None, help="substring of '<kernel> <shape>' selecting the cases")
    parser.add_argument("--profile", action="store_true", help="only call the selected kernels 5 times (for ncu)")
    args = parser.parse_args(argv)
    selected = [case for make in makers for case in make()
                if args.only is None or args.only in f"{case.kernel} {case.shape}"]
    if args.profile:
        for case in selected:
            for _ in range(5):
                case.run()
        torch.cuda.synchronize()
        return 0
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "sms": props.multi_processor_count, "date": datetime.date.today().isoformat(),
            "commit": args.commit or git_commit(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version()}
    timer = Timer()
    meta["bandwidth_GBps"] = copy_bandwidth()
    results = []
    for case in selected:
        try:
            r = measure(case, timer, meta["bandwidth_GBps"])
        except Exception as exc:   # keep going: one broken case must not hide the others' numbers
            r = Result(case.kernel, case.shape, f"ERROR {type(exc).__name__}: {exc}"[:200], math.nan, math.nan,
                       case.bytes, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, case.target, "no")
        results.append(r)
        print(f"{r.kernel[:40]:40s} {r.shape[:42]:42s} {r.check[:18]:18s} cold {r.cold_us:8.1f} us  graph "
              f"{r.graph_us:7.1f} us  {r.gbps:6.0f} GB/s  torch {r.torch_us:9.0f} us  x{r.speedup:6.0f}  "
              f"met {r.met}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{meta['date']}-{props.name.replace(' ', '_')}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    (out / f"{stem}.md").write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0

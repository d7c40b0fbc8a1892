"""What a speculative step costs: the MTP block drafting N tokens per sequence and the main model verifying them
in one step, against the plain decode step, on the engine benchmark's model (`engine.py`: V4-Flash dimensions,
one EP-4 rank's 64 FP4 experts, synthetic weights, fast numerics on a GPU).

Synthetic weights make the MTP block's drafts random, so the acceptance they measure says nothing about a real
checkpoint. What this measures is the cost side: one `Speculator.step` (the verify forward over 1 + N tokens per
sequence, sampling, the rollback of rejected drafts, N MTP passes) per batch size and N, eager, beside the plain
decode step (CUDA-graph replay where the device has graphs, else eager). The TPOT it projects at a mean
acceptance length L (tokens a step emits: 1 + accepted drafts) is step(N) / L; the anchors publish L ~ 2.5 for V4
MTP with 3 drafts (LMSYS's day-0 V4 blog, EAGLE 3/1/4, in `shared/reference/serving-anchors.md` 4.2). The
perfect-draft tests (`tests/cpu/test_speculative.py`) show the machinery emits N + 1 tokens per step when the
drafts are right. Target (issue: speculative decoding): at L = 2.5, TPOT at concurrency 1 <= 0.55x the plain one.

    python benchmarks/speculative.py [--layers 43] [--batches 1,8,32] [--context 8192] [--tokens 1,2,3,4]
                                     [--device cuda] [--out DIR]
    python benchmarks/speculative.py --device cpu --preset tiny --context 500     # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from engine import EP_RANKS, FoldedExperts, fill_cache, flash_config, log
from harness import git_commit

from dsv4.model.batch import Chunk
from dsv4.model.config import preset
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import synthetic_model
from dsv4.wire.request import SamplingParams
from dsv4.workers.model_runner import ModelRunner, RunnerConfig
from dsv4.workers.sequence import SequenceState
from dsv4.workers.speculative import Speculator

ANCHOR_ACCEPTANCE_LENGTH = 2.5


def timed(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() in ms (each call ends in the step's own host sync)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sequences(batch: int, context: int, blocks_per_seq: int, vocab: int, gen: torch.Generator) -> list[SequenceState]:
    """`batch` decoding sequences at position `context`, their caches already written (`fill_cache`)."""
    seqs = []
    for i in range(batch):
        tokens = torch.randint(0, vocab, (context + 1,), generator=gen).tolist()
        seqs.append(SequenceState(tokens, i, SamplingParams(max_tokens=1 << 20, temperature=0.0), i, 1, context,
                                  list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))))
    return seqs


def plain_step(runner: ModelRunner, seqs: list[SequenceState]):
    chunks = [Chunk(s.slot, s.blocks, s.num_computed, [s.tokens[-1]]) for s in seqs]
    return lambda: runner.step(chunks).cpu()


def speculative_step(speculator: Speculator, seqs: list[SequenceState], num_drafts: int, context: int, vocab: int,
                     gen: torch.Generator, accepted: list[float]):
    """One Speculator.step over the sequences, each time from the same state (the cost does not depend on it),
    with random drafts (what synthetic weights make of the MTP block's anyway); appends the acceptance."""
    def one():
        for s in seqs:
            del s.tokens[context + 1:]
            s.num_computed, s.num_outputs = context, 1
            s.drafts = torch.randint(0, vocab, (num_drafts,), generator=gen).tolist()
        step = speculator.step([(s, 1, num_drafts) for s in seqs])
        accepted.append(step.num_accepted / max(step.num_drafts, 1))
    return one


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--preset", default="v4-flash", help="v4-flash (the engine benchmark's rank) or tiny")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--tokens", default="1,2,3,4", help="drafts per sequence per step")
    p.add_argument("--device", default="cuda")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device).manual_seed(0)
    host_gen = torch.Generator().manual_seed(0)
    if args.preset == "v4-flash":
        config = flash_config(args.layers)
        held = list(range(config.n_routed_experts // EP_RANKS))
    else:
        config, held = preset(args.preset), None
    numerics = Numerics.parse("fast")
    model = synthetic_model(config, device, expert_ids=held, progress=log)
    numerics.prepare(model)
    if held is not None:
        FoldedExperts(model, numerics)
    batches, drafts = [int(b) for b in args.batches.split(",")], [int(n) for n in args.tokens.split(",")]
    blocks_per_seq = (args.context + max(drafts) + 2) // 256 + 1
    max_batch = max(batches)
    graphs = device.type == "cuda"
    storage = KVStorage(config, numerics, max_batch + 1, max_batch * blocks_per_seq, 256, device)
    fill_cache(storage, gen)
    runner = ModelRunner(model, storage, numerics,
                         RunnerConfig(max_batch, max_batch * (1 + max(drafts)), blocks_per_seq,
                                      tuple(batches) if graphs else ()))
    if graphs:
        runner.capture_graphs()
    max_len = args.context + 64
    rows = []
    for batch in batches:
        seqs = sequences(batch, args.context, blocks_per_seq, config.vocab_size, host_gen)
        plain_ms = timed(plain_step(runner, seqs), device, args.reps)
        log(f"batch {batch}: plain decode step {plain_ms:.2f} ms ({'graph' if graphs else 'eager'})")
        for n in drafts:
            accepted: list[float] = []
            step_ms = timed(speculative_step(Speculator(runner, n, max_len, lambda: None), seqs, n, args.context,
                                             config.vocab_size, host_gen, accepted), device, args.reps)
            length = min(ANCHOR_ACCEPTANCE_LENGTH, n + 1)
            row = {"batch": batch, "drafts": n, "plain_ms": plain_ms, "step_ms": step_ms,
                   "step_over_plain": step_ms / plain_ms, "projected_tpot_ms": step_ms / length,
                   "projected_tpot_over_plain": step_ms / length / plain_ms, "perfect_tpot_ms": step_ms / (n + 1),
                   "random_draft_acceptance": statistics.mean(accepted)}
            rows.append(row)
            log(f"batch {batch}, {n} drafts: step {step_ms:.2f} ms = {row['step_over_plain']:.2f}x plain; at "
                f"acceptance length {length}: TPOT {row['projected_tpot_ms']:.2f} ms "
                f"({row['projected_tpot_over_plain']:.2f}x plain); all drafts right: {row['perfect_tpot_ms']:.2f} ms")
    name = torch.cuda.get_device_name(device) if graphs else platform.processor() or "cpu"
    meta = {"device": name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__, "preset": args.preset, "layers": config.num_hidden_layers,
            "context": args.context, "graphs": graphs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"speculative-{meta['date']}-{name.replace(' ', '_')}-{meta['commit']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Speculative decoding step cost, {args.preset} ({config.num_hidden_layers} layers), {name}, "
             f"{meta['date']}", "", f"commit `{meta['commit']}`, torch {meta['torch']}, context {args.context}; "
             f"plain step {'CUDA-graph replay' if graphs else 'eager'}, speculative steps eager. Projected TPOT = "
             f"step / min({ANCHOR_ACCEPTANCE_LENGTH}, N + 1) (the anchors' acceptance length); perfect = step / "
             "(N + 1).", "",
             "| batch | drafts N | plain ms | spec step ms | x plain | projected TPOT ms | x plain | perfect TPOT ms |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['drafts']} | {r['plain_ms']:.2f} | {r['step_ms']:.2f} | "
              f"{r['step_over_plain']:.2f} | {r['projected_tpot_ms']:.2f} | {r['projected_tpot_over_plain']:.2f} | "
              f"{r['perfect_tpot_ms']:.2f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The engine step alone (no Ray, no gRPC) at V4-Flash scale on one GPU, in fast numerics, in one run.

The GPU stands for one rank of a 4-GPU expert-parallel deployment: V4-Flash dimensions, all 43 layers + the MTP
block, FP4 routed experts, 64 of the 256 experts held. The real 256-expert router runs; each chosen expert is
folded onto a local one (id % 64), so the per-GPU expert work equals a balanced EP-4 deployment's and the
all-to-all is replaced by the local permutation (its cost belongs to the multi-GPU run). Weights are synthetic,
built directly in GPU memory in the checkpoint formats; the KV cache is filled with random entries in the
production byte formats (decode cost does not depend on their values).

Reported, per decode batch size and context: the step time (CUDA-graph replay, median), its HBM floor (bytes of
all non-expert weights + the distinct experts the routing touched + the KV bytes read, over the copy bandwidth
measured in this run) and the ratio; prefill throughput of an 8K prompt; a profiler breakdown of one eager decode
step; the reference numerics on a few layers (extrapolated, stated as such) and transformers-bf16 on a few layers
as the everyday baseline when its DeepseekV4 model is importable.

    python benchmarks/engine.py [--layers 43] [--batches 1,8,32,64,128] [--context 8192]
                                [--long-context 131072 --long-batches 1,64] [--prefill 8192] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from harness import copy_bandwidth, git_commit

from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec
from dsv4.model.batch import Chunk
from dsv4.model.config import CSA_RATIO, ModelConfig, preset
from dsv4.model.kv_cache import KVStorage
from dsv4.model.moe import MoE, run_local_experts
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import synthetic_model
from dsv4.workers.model_runner import ModelRunner, RunnerConfig

EP_RANKS = 4


def log(msg: str) -> None:
    print(f"[engine {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- the model
def flash_config(num_layers: int) -> ModelConfig:
    """V4-Flash, or a slice of it: fewer layers alternate CSA and HCA (the 41 of 43 that are compressed) with one
    hash-routed layer, so per-layer timings extrapolate to the whole model."""
    c = preset("v4-flash")
    if num_layers == c.num_hidden_layers:
        return c
    ratios = tuple((4, 128)[i % 2] for i in range(num_layers)) + c.compress_ratios[c.num_hidden_layers:]
    return c.replace(num_hidden_layers=num_layers, compress_ratios=ratios, num_hash_layers=1)


class FoldedExperts:
    """Expert runner of one simulated EP rank: every chosen expert e runs as local expert e % held."""

    def __init__(self, model, numerics: Numerics):
        self.numerics = numerics
        self.record: dict[int, torch.Tensor] | None = None
        for block in list(model.layers) + list(model.mtp):
            block.ffn.expert_runner = self

    def __call__(self, moe: MoE, x, weights, ids, numerics):
        folded = ids % len(moe.held)          # the held experts are 0 .. held-1: folded ids are local ids
        if self.record is not None:
            self.record[moe.layer_id] = folded
        return run_local_experts(moe, x, weights, folded, numerics)


def fill_cache(storage: KVStorage, gen: torch.Generator) -> None:
    """Random entries in the production formats (valid FP8/MXFP4 bytes) in every pool, ring and state."""
    config = storage.config
    main = MainFp8Codec(config.nope_head_dim, config.qk_rope_head_dim)
    index = IndexFp4Codec(config.index_head_dim)
    dev = storage.layers[0].window.device
    main_bank = main.encode(torch.randn(4096, config.head_dim, generator=gen, device=dev))
    index_bank = index.encode(torch.randn(4096, config.index_head_dim, generator=gen, device=dev))

    def tile(pool: torch.Tensor, bank: torch.Tensor) -> None:
        flat = pool.view(-1, pool.shape[-1])
        for start in range(0, flat.shape[0], 1 << 20):
            rows = flat[start:start + (1 << 20)]
            rows.copy_(bank[torch.randint(0, bank.shape[0], (rows.shape[0],), generator=gen, device=dev)])

    for layer in storage.layers:
        tile(layer.window, main_bank)
        for name, c in layer.compressors.items():
            tile(c.pool, index_bank if name == "index" else main_bank)
            c.state_kv.normal_(generator=gen)
            c.state_score.normal_(generator=gen)


# ---------------------------------------------------------------------------------------------- byte counts
def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_bytes(model) -> tuple[int, int]:
    """(bytes of the main model's weights a decode step reads except routed experts, bytes of one routed expert).
    The embedding is a gather (not read whole); the MTP block does not run in a plain decode step."""
    expert = nbytes(model.layers[0].ffn.local_expert(0).buffers())
    routed = nbytes(b for block in model.layers for e in block.ffn.experts.values() for b in e.buffers())
    skipped = nbytes(model.embed.buffers()) + nbytes(model.mtp.buffers())
    return nbytes(model.buffers()) - routed - skipped, expert


def kv_bytes_per_token(config: ModelConfig, context: int) -> int:
    """KV bytes one decode token reads: its window in every layer, the selected CSA entries and all visible
    indexer keys in CSA layers, all visible HCA entries."""
    entry, key = 584, 68
    total = 0
    for layer in range(config.num_hidden_layers):
        ratio = config.compress_ratio(layer)
        total += config.sliding_window * entry
        if ratio == CSA_RATIO:
            total += min(config.index_topk, context // ratio) * entry + (context // ratio) * key
        elif ratio:
            total += (context // ratio) * entry
    return total


@dataclass
class DecodeRow:
    context: int
    batch: int
    step_ms: float
    eager_ms: float
    floor_ms: float
    ratio: float
    weight_gb: float
    kv_gb: float
    distinct_experts: float     # mean per MoE layer
    ms_per_token: float


# ---------------------------------------------------------------------------------------------- decode
def decode_rows(model, numerics: Numerics, folded: FoldedExperts, batches: list[int], context: int,
                bandwidth: float, gen: torch.Generator, profile: bool) -> tuple[list[DecodeRow], str]:
    config = model.config
    block_size = 256
    blocks_per_seq = context // block_size + 1
    max_batch = max(batches)
    storage = KVStorage(config, numerics, max_batch + 1, max_batch * blocks_per_seq, block_size, "cuda")
    fill_cache(storage, gen)
    runner = ModelRunner(model, storage, numerics, RunnerConfig(max_batch, max(8192, max_batch), blocks_per_seq,
                                                                tuple(batches)))
    log(f"context {context}: capturing {len(batches)} decode graphs")
    stats = runner.capture_graphs()
    log(f"captured in {stats['seconds']:.1f} s, {stats['bytes'] / 2**30:.2f} GiB")
    non_expert, expert_bytes = weight_bytes(model)
    rows, breakdown = [], ""
    for b in batches:
        tokens = torch.randint(0, config.vocab_size, (b,), generator=gen, device="cuda").tolist()
        chunks = [Chunk(i, range(i * blocks_per_seq, (i + 1) * blocks_per_seq), context, [tokens[i]])
                  for i in range(b)]
        folded.record = {}
        runner.graphs, graphs = {}, runner.graphs          # one eager step: routing record and eager time
        eager = time_it(lambda c=chunks: runner.step(c), reps=3)
        runner.graphs = graphs
        distinct = statistics.mean(int(f.unique().numel()) for layer, f in folded.record.items()
                                   if layer < config.num_hidden_layers)
        folded.record = None
        step = time_it(lambda c=chunks: runner.step(c), reps=20)
        w = non_expert + distinct * expert_bytes * config.num_hidden_layers
        kv = b * kv_bytes_per_token(config, context)
        floor = (w + kv) / (bandwidth * 1e9) * 1e3
        rows.append(DecodeRow(context, b, step, eager, floor, step / floor, w / 1e9, kv / 1e9, distinct, step / b))
        log(f"context {context} batch {b}: step {step:.2f} ms (eager {eager:.2f}), floor {floor:.2f} ms, "
            f"x{step / floor:.2f}, {distinct:.1f} experts/layer")
        if profile and b in (1, max_batch):
            table = profile_step(runner, chunks, f"decode batch {b}, context {context}")
            print(table, flush=True)     # in the log at once: a later failure must not lose it
            breakdown += table
    return rows, breakdown


def time_it(fn, reps: int) -> float:
    """Median wall time of fn() in ms, with a device sync after each call (a step ends with one)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_step(runner: ModelRunner, chunks, label: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    graphs, runner.graphs = runner.graphs, {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.step(chunks)
        torch.cuda.synchronize()
    runner.graphs = graphs
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    return f"\n### Profile: eager {label}\n\n```\n{table}\n```\n"


# ---------------------------------------------------------------------------------------------- prefill
def prefill_row(model, numerics: Numerics, length: int, gen: torch.Generator) -> dict:
    config = model.config
    blocks = length // 256 + 1
    storage = KVStorage(config, numerics, 2, blocks, 256, "cuda")
    runner = ModelRunner(model, storage, numerics, RunnerConfig(1, length, blocks, ()))
    tokens = torch.randint(0, config.vocab_size, (length,), generator=gen, device=gen.device).tolist()
    chunk = [Chunk(0, range(blocks), 0, tokens)]
    ms = time_it(lambda: runner.step(chunk), reps=3)
    active = active_params(model)
    tflops = 2 * active * length / (ms * 1e-3) / 1e12
    log(f"prefill {length}: {ms:.1f} ms, {length / ms * 1e3:.0f} tokens/s, {tflops:.0f} TFLOP/s (weights only)")
    return {"tokens": length, "ms": ms, "tokens_per_s": length / ms * 1e3, "weight_tflops": tflops}


def active_params(model) -> int:
    """Parameters one token multiplies with in the main model: everything but the embedding, the MTP block and
    the unchosen routed experts."""
    c = model.config
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    routed = sum(len(block.ffn.held) for block in model.layers) * per_expert
    chosen = c.num_experts_per_tok * per_expert * c.num_hidden_layers

    def params(module) -> int:   # FP4 bytes hold two parameters; scales are not parameters
        return sum(b.numel() * (2 if b.dtype == torch.int8 else 1) for b in module.buffers()
                   if b.dtype != torch.float8_e8m0fnu)
    return params(model) - params(model.mtp) - params(model.embed) - routed + chosen


# ---------------------------------------------------------------------------------------------- baselines
def reference_decode_ms(num_layers: int, gen: torch.Generator) -> float:
    """Reference numerics (float64 oracle, its PyTorch ops: no CUDA extension build) on a few layers, decode batch 1
    at a short context, per token."""
    import os

    os.environ["DSV4_KERNELS"] = "0"
    config = flash_config(num_layers)
    config = config.replace(num_nextn_predict_layers=0, compress_ratios=config.compress_ratios[:num_layers])
    numerics = Numerics.parse("reference")
    model = synthetic_model(config, "cuda", expert_ids=list(range(256 // EP_RANKS)), progress=None)
    FoldedExperts(model, numerics)
    storage = KVStorage(config, numerics, 1, 3, 256, "cuda")
    runner = ModelRunner(model, storage, numerics)
    prompt = torch.randint(0, config.vocab_size, (64,), generator=gen, device=gen.device).tolist()
    runner.step([Chunk(0, range(3), 0, prompt)])
    ms = time_it(lambda: runner.step([Chunk(0, range(3), 64, [5])]), reps=3)
    return ms


def transformers_decode_ms(num_layers: int) -> float | str:
    """transformers' DeepseekV4ForCausalLM in bf16 on a few V4-Flash layers, decode batch 1 with its cache."""
    try:
        from transformers import DeepseekV4Config, DeepseekV4ForCausalLM
    except ImportError as e:
        return f"unavailable: {e}"
    c = flash_config(num_layers)
    # 64 experts: the per-token expert work is the same (top-6), the memory a quarter
    c = c.replace(num_nextn_predict_layers=0, compress_ratios=c.compress_ratios[:num_layers], quantization_config=None,
                  expert_dtype=None, n_routed_experts=64)
    hf_config = DeepseekV4Config(**{k: v for k, v in c.to_dict().items() if k != "architectures"})
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = DeepseekV4ForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, c.vocab_size, (1, 64), device="cuda")
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = ids[:, -1:]

        def one():
            model(nxt, past_key_values=past, use_cache=True)
        return time_it(one, reps=5)


# ---------------------------------------------------------------------------------------------- report
def markdown(meta: dict, rows: list[DecodeRow], prefill: dict, baselines: dict, breakdown: str) -> str:
    lines = [f"# dsv4 engine step, fast numerics, on {meta['device']} ({meta['date']})", "",
             f"commit `{meta['commit']}`, torch {meta['torch']}, CUDA {meta['cuda']}, triton {meta['triton']}; "
             f"copy bandwidth {meta['bandwidth_GBps']:.0f} GB/s measured in this run. Model: V4-Flash dimensions, "
             f"{meta['layers']} layers (+ the MTP block, resident, not run), one EP-{EP_RANKS} rank (64 of 256 FP4 "
             "experts, every chosen expert folded onto a local one), synthetic weights in the checkpoint formats.", "",
             "step: CUDA-graph replay of the whole decode step (median of 20, host fill + replay + sync); eager: "
             "the same step without graphs; floor: (non-expert weights + distinct experts touched + KV bytes "
             "read) / copy bandwidth.", "",
             "| context | batch | step ms | eager ms | floor ms | step / floor | weights GB | KV GB | experts/layer | "
             "ms / token |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.context} | {r.batch} | {r.step_ms:.2f} | {r.eager_ms:.2f} | {r.floor_ms:.2f} | "
                     f"{r.ratio:.2f} | {r.weight_gb:.2f} | {r.kv_gb:.2f} | {r.distinct_experts:.1f} | "
                     f"{r.ms_per_token:.3f} |")
    if prefill:
        lines += ["", f"Prefill of one {prefill['tokens']}-token prompt (one chunk, eager): {prefill['ms']:.1f} ms, "
                      f"{prefill['tokens_per_s']:.0f} tokens/s, {prefill['weight_tflops']:.0f} TFLOP/s counting "
                      "weight FLOPs only."]
    if baselines:
        lines += ["", "Baselines (decode, batch 1):"]
        lines += [f"- {k}: {v}" for k, v in baselines.items()]
    return "\n".join(lines) + "\n" + breakdown


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=43)
    p.add_argument("--batches", default="1,8,32,64,128")
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--long-context", type=int, default=131072)
    p.add_argument("--long-batches", default="1,64")
    p.add_argument("--prefill", type=int, default=8192)
    p.add_argument("--reference-layers", type=int, default=2)
    p.add_argument("--hf-layers", type=int, default=2)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator("cuda").manual_seed(0)
    import triton

    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
            "python": platform.python_version(), "layers": args.layers, "bandwidth_GBps": copy_bandwidth()}
    log(f"copy bandwidth {meta['bandwidth_GBps']:.0f} GB/s")
    config = flash_config(args.layers)
    numerics = Numerics.parse("fast")
    model = synthetic_model(config, "cuda", expert_ids=list(range(config.n_routed_experts // EP_RANKS)),
                            progress=log)
    numerics.prepare(model)
    folded = FoldedExperts(model, numerics)
    log(f"model ready: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated")
    rows, breakdown = decode_rows(model, numerics, folded, [int(b) for b in args.batches.split(",")], args.context,
                                  meta["bandwidth_GBps"], gen, not args.no_profile)
    if args.long_context:
        long_rows, _ = decode_rows(model, numerics, folded, [int(b) for b in args.long_batches.split(",")],
                                   args.long_context, meta["bandwidth_GBps"], gen, False)
        rows += long_rows
    torch.cuda.empty_cache()
    prefill = prefill_row(model, numerics, args.prefill, gen) if args.prefill else {}
    del model
    torch.cuda.empty_cache()
    baselines = {}
    if args.reference_layers:
        ms = reference_decode_ms(args.reference_layers, gen)
        baselines["reference numerics"] = (f"{ms:.1f} ms for {args.reference_layers} layers, extrapolated "
                                           f"{ms * (args.layers + 1) / args.reference_layers:.0f} ms per token")
    if args.hf_layers:
        hf = transformers_decode_ms(args.hf_layers)
        baselines["transformers bf16"] = (hf if isinstance(hf, str) else
                                          f"{hf:.1f} ms for {args.hf_layers} layers, extrapolated "
                                          f"{hf * (args.layers + 1) / args.hf_layers:.0f} ms per token")
    for k, v in baselines.items():
        log(f"{k}: {v}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"engine-{meta['date']}-{props.name.replace(' ', '_')}-{meta['commit']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "decode": [r.__dict__ for r in rows],
                                                  "prefill": prefill, "baselines": baselines}, indent=1))
    text = markdown(meta, rows, prefill, baselines, breakdown)
    (out / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

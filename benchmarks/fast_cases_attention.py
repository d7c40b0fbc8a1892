"""Benchmark cases of the fast sparse attention (`dsv4.kernels.fast.attention`), V4-Flash shapes (and one V4-Pro).

Targets (H200, fast-path issue): decode CSA, 64 sequences x (128 window + 512 selected), as a graph node <= 1.3x
the floor of its KV bytes (584 B per entry read once per token + q/o bytes, over ~4.2 TB/s); prefill at 8K tokens
>= 40 % of the bf16 tensor-core peak (790 TFLOP/s; 2 * H * d * 2 FLOPs per (query, valid key) pair, QK and PV);
long context: a CSA and an HCA decode at 128K within 1.5x of the same at 4K (compare the paired rows).
Plan variants of the B = 64 decode (head block x key tile, splits, pipelining) are listed beside the default so
the heuristic in `_attention_triton.plan_for` can be tuned from one run.

    python benchmarks/fast_cases_attention.py [--only decode]
"""

from __future__ import annotations

import sys

import torch
from harness import DEV, Case, gen, run_cases

from dsv4.kernels import cache_ops, quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import _attention_triton, attention
from dsv4.kernels.kv_format import MainFp8Codec
from dsv4.kernels.ref_math import apply_rope
from dsv4.model.layers import rope_inv_freq

HEADS, HEAD, NOPE, ROPE, WINDOW, BLOCK, TOPK = 64, 512, 448, 64, 128, 256, 512     # V4-Flash
HBM_BPS, BF16_PEAK = 4.2e12, 790e12                                                 # H200, measured
Plan = _attention_triton.Plan


# ---------------------------------------------------------------------------------------------- inputs
def entry_values(n: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, HEAD, generator=g, device=DEV)
    x = x * torch.exp2(torch.randint(-2, 3, (n, 1), generator=g, device=DEV).float())
    return quant.fake_quant_kv(x.bfloat16(), ROPE)


def encoded(n: int, codec: MainFp8Codec, g: torch.Generator) -> torch.Tensor:
    """n stored entries: up to 64K distinct ones repeated at random (cheap for GB-sized pools)."""
    base = codec.encode(entry_values(min(n, 65536), g))
    return base[torch.randint(0, base.shape[0], (n,), generator=g, device=DEV)]


def scene(chunks: list[tuple[int, int]], ratio: int, heads: int = HEADS, topk: int = TOPK, seed: int = 0) -> dict:
    """Inputs of one layer's step: chunks (start, length) per sequence, blocks scattered over the pool."""
    g = gen(seed)
    codec = MainFp8Codec(NOPE, ROPE)
    max_blocks = max(-(-(s + n) // BLOCK) for s, n in chunks)
    num_blocks = len(chunks) * max_blocks
    table = torch.randperm(num_blocks, generator=g, device=DEV).view(len(chunks), max_blocks).cpu()
    layout = BatchLayout.from_chunks([(s, start, n, table[s].tolist()) for s, (start, n) in enumerate(chunks)],
                                     BLOCK, DEV)
    t = layout.num_tokens
    entries = None
    if ratio == 4:
        visible = (layout.positions + 1) // 4
        width = max(int(visible.max()), topk)
        scores = torch.rand(t, width, generator=g, device=DEV)
        scores = scores.masked_fill(torch.arange(width, device=DEV)[None, :] >= visible[:, None], -1.0)
        top, idx = scores.topk(topk, dim=1)
        entries = torch.where(top >= 0, idx, -1)
    return dict(q=(torch.randn(t, heads, HEAD, generator=g, device=DEV) * 1.5).bfloat16(),
                kv=entry_values(t, g),
                ring=encoded(len(chunks) * WINDOW, codec, g).view(len(chunks), WINDOW, -1),
                pool=encoded(num_blocks * (BLOCK // ratio), codec, g).view(num_blocks, BLOCK // ratio, -1)
                if ratio else None,
                codec=codec, layout=layout, ratio=ratio, entries=entries,
                sink=torch.randn(heads, generator=g, device=DEV),
                inv_freq=rope_inv_freq(ROPE, 160000.0, (16.0, 65536, 32.0, 1.0)).to(DEV))


def args(s: dict) -> tuple:
    return (s["q"], s["kv"], s["ring"], s["pool"], s["codec"], s["layout"], s["ratio"], s["entries"], s["sink"],
            s["inv_freq"])


def valid_keys(s: dict) -> torch.Tensor:
    """Keys each token attends to: its valid window positions plus its valid compressed entries. [T] int64."""
    lay, ratio = s["layout"], s["ratio"]
    count = torch.clamp(lay.positions + 1, max=WINDOW)
    if ratio == 4:
        count = count + (s["entries"] >= 0).sum(dim=1)
    elif ratio:
        count = count + torch.clamp((lay.positions + 1) // ratio, max=lay.block_table.shape[1] * (BLOCK // ratio))
    return count


def reference_rows(s: dict, rows: torch.Tensor) -> torch.Tensor:
    """The reference composition (float64 inside) for token rows `rows`, through a sub-layout."""
    lay, ratio = s["layout"], s["ratio"]
    sub = BatchLayout(lay.positions[rows], lay.token_seq[rows], lay.seq_slot, lay.seq_start, lay.seq_len,
                      lay.seq_first_row, lay.block_table, lay.block_size, lay.spans)
    keys, valid = cache_ops.window_gather(s["ring"], s["codec"], s["kv"], sub)
    if ratio:
        if s["entries"] is not None:
            entries = s["entries"][rows]
        else:
            width = lay.block_table.shape[1] * (BLOCK // ratio)
            entries = torch.arange(width, device=DEV)[None, :].expand(rows.shape[0], -1)
            entries = torch.where(entries < ((sub.positions + 1) // ratio)[:, None], entries, -1)
        extra, extra_valid = cache_ops.gather_entries(s["pool"], s["codec"], sub, entries, ratio)
        keys, valid = torch.cat([keys, extra], dim=1), torch.cat([valid, extra_valid], dim=1)
    o = cache_ops.sparse_attention(s["q"][rows], keys, valid, s["sink"], torch.bfloat16)
    return apply_rope(o, sub.positions, s["inv_freq"], inverse=True)


def reference(s: dict, rows_per_chunk: int = 64) -> torch.Tensor:
    t = s["layout"].num_tokens
    return torch.cat([reference_rows(s, torch.arange(b, min(t, b + rows_per_chunk), device=DEV))
                      for b in range(0, t, rows_per_chunk)])


def compare(got: torch.Tensor, ref: torch.Tensor) -> str:
    rel = float((got.float() - ref.float()).norm() / ref.float().norm())
    return f"{'' if rel <= 5e-3 else 'FAIL '}rel L2 {rel:.1e}"


# ---------------------------------------------------------------------------------------------- cases
def max_comp(s: dict) -> int:
    """Compressed keys a token may have, from shapes (what the kernel's launch plan sees)."""
    if not s["ratio"]:
        return 0
    if s["entries"] is not None:
        return s["entries"].shape[1]
    return s["layout"].block_table.shape[1] * (BLOCK // s["ratio"])


def decode_case(label: str, s: dict, plan: Plan | None = None, target_factor: float | None = None,
                notes: str = "") -> Case:
    t, heads = s["q"].shape[:2]
    moved = int(valid_keys(s).sum()) * s["codec"].width + 2 * t * heads * HEAD * 2
    run = lambda: _attention_triton.sparse_attention(*args(s), plan=plan)     # noqa: E731
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    chosen = plan or _attention_triton.plan_for(t, heads, HEAD, WINDOW, max_comp(s), num_sms)
    floor_us = moved / HBM_BPS * 1e6
    return Case("fast sparse_attention decode", f"{label}; plan {chosen.h_block}x{chosen.n_block} "
                f"s{chosen.num_splits} w{chosen.num_warps} st{chosen.num_stages}",
                run, lambda: reference(s), lambda: compare(run(), reference(s)), moved,
                f"<= {target_factor}x floor ({target_factor * floor_us:.1f} us graph)" if target_factor else "-",
                None, target_factor * floor_us if target_factor else None, notes=notes)


def prefill_case(label: str, s: dict) -> Case:
    t, heads = s["q"].shape[:2]
    flops = int(valid_keys(s).sum()) * 2 * heads * HEAD * 2
    target_us = flops / (0.4 * BF16_PEAK) * 1e6
    moved = int(valid_keys(s).sum()) * s["codec"].width + 2 * t * heads * HEAD * 2
    run = lambda: attention.sparse_attention(*args(s))      # noqa: E731
    sample = torch.cat([torch.arange(64, device=DEV), torch.arange(t - 64, t, device=DEV)])

    def check() -> str:
        return compare(run()[sample], reference_rows(s, sample))

    twin = lambda: attention._sparse_attention_twin(*args(s))    # noqa: E731  (fp32 torch, chunked)
    return Case("fast sparse_attention prefill", f"{label}, {flops / 1e9:.0f} GFLOP", run, twin, check, moved,
                f">= 40% of bf16 peak ({target_us:.0f} us cold)", target_us, None, ref_reps=2, graph=False,
                notes=f"TFLOP/s = {flops / 1e6:.4g} / cold_us; torch = the fp32 twin; check on 128 sampled rows")


def decode_chunks(batch: int, context: int) -> list[tuple[int, int]]:
    return [(context - 1 - (977 * s) % 512, 1) for s in range(batch)]


def cases() -> list[Case]:
    out: list[Case] = []
    csa64 = scene(decode_chunks(64, 32768), 4, seed=1)
    out.append(decode_case("CSA B=64 x (128 + 512), 32K ctx", csa64, target_factor=1.3))
    for plan, why in ((Plan(64, 16, 2, 8), "16-entry tiles (no spill at all, N = 16 wgmma)"),
                      (Plan(32, 32, 1, 8), "2 head blocks (mma.sync, spills), no split, no partials"),
                      (Plan(64, 32, 1, 8), "no split: 64 programs"),
                      (Plan(64, 32, 4, 8), "4 splits: 256 programs")):
        out.append(decode_case("CSA B=64 x (128 + 512), 32K ctx", csa64, plan, 1.3, notes=why))
    out.append(decode_case("CSA B=1 x (128 + 512), 32K ctx", scene(decode_chunks(1, 32768), 4, seed=2)))
    for ratio, name in ((4, "CSA"), (128, "HCA")):       # long context: 128K against 4K, same batch
        for batch in (1, 64):
            for context in (4096, 131072):
                s = scene(decode_chunks(batch, context), ratio, seed=3)
                out.append(decode_case(f"{name} B={batch}, {context // 1024}K ctx", s,
                                       notes="target: 128K <= 1.5x the 4K row"))
    pro = scene(decode_chunks(64, 32768), 4, heads=128, topk=1024, seed=4)
    out.append(decode_case("V4-Pro CSA B=64 x (128 + 1024), H=128, 32K ctx", pro))
    out.append(decode_case("SWA B=64 x 128", scene(decode_chunks(64, 32768), 0, seed=5)))
    out.append(prefill_case("CSA 8K tokens from position 0", scene([(0, 8192)], 4, seed=6)))
    out.append(prefill_case("CSA 8K tokens after 8K cached", scene([(8192, 8192)], 4, seed=7)))
    out.append(prefill_case("HCA 8K tokens after 8K cached", scene([(8192, 8192)], 128, seed=8)))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cases("fast-attention", [cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

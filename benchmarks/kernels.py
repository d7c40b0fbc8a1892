"""Times every dsv4 CUDA kernel at V4-Flash decode and prefill shapes (and the V4-Pro indexer extreme), against
its PyTorch reference on the same GPU, in one run; checks the kernel's output against the reference's first.

Protocol (/work/shared/design/performance.md): CUDA events; warm-up first; "cold" = median of >= 11 standalone
calls, each after a 256 MiB memset that evicts L2; "graph" = one node of a captured CUDA graph of 20 back-to-back
calls (replayed 10 times, median / 20); floor = bytes moved / the copy bandwidth measured in this run. The
reference is timed cold too (fewer repetitions when it takes milliseconds).

    python benchmarks/kernels.py [--out benchmarks/results] [--commit SHA] [--only indexer]

Writes kernels-<date>-<device>.json and .md under --out and prints the table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from harness import DEV, Case, decode_flush_steps, gen, run_cases

from dsv4.kernels import cache_ops, cuda_ops, quant, routing
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.kv_format import IndexFp4Codec, MainFp8Codec
from dsv4.model.layers import rope_inv_freq

HIDDEN, EXPERTS, TOPK, VOCAB = 4096, 256, 6, 129280          # V4-Flash
HEAD, NOPE, ROPE, WINDOW, BLOCK = 512, 448, 64, 128, 256
IDX_HEADS, IDX_DIM, IDX_TOPK = 64, 128, 512


# ---------------------------------------------------------------------------------------------- inputs
def layout(chunks: list[tuple[int, int, int]], max_blocks: int) -> BatchLayout:
    """chunks: (slot, start, length); sequence s owns blocks s*max_blocks .. (s+1)*max_blocks-1."""
    return BatchLayout.from_chunks(
        [(slot, start, n, range(s * max_blocks, (s + 1) * max_blocks)) for s, (slot, start, n) in enumerate(chunks)],
        BLOCK, DEV)


def same(a, b) -> str:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    for x, y in zip(a, b, strict=True):
        if x.dtype.is_floating_point and not torch.equal(x, y):
            err = float((x.float() - y.float()).abs().max())
            return f"max|diff| {err:.2g}"
        if not torch.equal(x, y):
            return f"MISMATCH ({int((x != y).sum())} elements)"
    return "exact"


def stateful(kernel_fn, ref_fn, tensors: list[torch.Tensor]) -> tuple[Callable, Callable, Callable]:
    """For ops that write into caches: kernel and reference run on separate copies, compared after one call."""
    ref_tensors = [t.clone() for t in tensors]
    snapshot = [t.clone() for t in tensors]

    def check() -> str:
        for t, s in zip(tensors, snapshot, strict=True):
            t.copy_(s)
        kernel_fn(tensors)
        ref_fn(ref_tensors)
        return same(tuple(tensors), tuple(ref_tensors))

    return (lambda: kernel_fn(tensors)), (lambda: ref_fn([t.clone() for t in snapshot])), check


# ---------------------------------------------------------------------------------------------- cases
def router_cases() -> list[Case]:
    out = []
    g = gen(0)
    w = (torch.randn(EXPERTS, HIDDEN, generator=g, device=DEV) * HIDDEN ** -0.5 * 4).bfloat16()
    bias = torch.randn(EXPERTS, generator=g, device=DEV) * 0.1
    tid2eid = torch.randint(0, EXPERTS, (VOCAB, TOPK), generator=g, device=DEV)
    ws = cuda_ops.router_workspace(DEV)   # persistent, as the model's Gate holds it
    for t in (1, 4, 8, 16, 64, 4096):
        # x in bf16: the dtype the model's gate receives in reference numerics (the routers upcast it exactly)
        x = torch.randn(t, HIDDEN, generator=g, device=DEV).bfloat16()
        tokens = torch.randint(0, VOCAB, (t,), generator=g, device=DEV)
        decode = t <= 64
        path = "fp64, one launch" if t <= 4 else ("certified tensor-core" if t <= 64 else "cuBLAS fp64")
        out.append(Case(
            "dense_route (gate GEMM + sqrt-softplus + bias + top-6 + renorm)", f"T={t}, 4096x256, x bf16, {path}",
            lambda x=x: cuda_ops.dense_route(x, w, bias, TOPK, 1.5, ws),
            lambda x=x: routing.dense_route(x, w, bias, TOPK, 1.5),
            lambda x=x: same(cuda_ops.dense_route(x, w, bias, TOPK, 1.5, ws),
                             routing.dense_route(x, w, bias, TOPK, 1.5)),
            x.numel() * 2 + w.numel() * 2 + t * TOPK * 12,
            "<= 5 us cold, <= 2.5 us graph" if decode else "<= 16 us",
            5.0 if decode else 16.0, 2.5 if decode else None,
            notes="reference-exact expert choice: fp64, or a certified tensor-core estimate + fp64 for the candidates"))
        if t in (4, 16):
            continue
        rows = min(t * TOPK, EXPERTS) * HIDDEN * 2
        out.append(Case(
            "hash_route (tid2eid + 6 chosen logits)", f"T={t}, x bf16",
            lambda x=x, tokens=tokens: cuda_ops.hash_route(x, w, tid2eid, tokens, 1.5, validate=False),
            lambda x=x, tokens=tokens: routing.hash_route(x, w, tid2eid, tokens, 1.5),
            lambda x=x, tokens=tokens: same(cuda_ops.hash_route(x, w, tid2eid, tokens, 1.5, validate=False),
                                            routing.hash_route(x, w, tid2eid, tokens, 1.5)),
            x.numel() * 2 + rows + t * TOPK * (8 + 12),
            "<= 2 us graph" if decode else "<= 14 us", None if decode else 14.0, 2.0 if decode else None))
    return out


def window_cases() -> list[Case]:
    g = gen(1)
    codec = MainFp8Codec(NOPE, ROPE)
    b = 128
    lay = layout([(s, 1000 + 13 * s, 1) for s in range(b)], 8)
    ring = codec.encode(torch.randn(b * WINDOW, HEAD, generator=g, device=DEV).bfloat16()).view(b, WINDOW, -1)
    kv = quant.fake_quant_kv(torch.randn(b, HEAD, generator=g, device=DEV).bfloat16(), ROPE)
    run, ref, check = stateful(lambda ts: cuda_ops.window_append(ts[0], codec, kv, lay, validate=False),
                               lambda ts: cache_ops.window_append(ts[0], codec, kv, lay), [ring.clone()])
    cases = [Case("window_append (FP8 quantize + ring store)", f"decode B={b}", run, ref, check,
                  b * (HEAD * 2 + codec.width), "<= 2 us graph", None, 2.0)]
    cases.append(Case(
        "window_gather (ring decode + this step, bf16 [T,128,512])", f"decode B={b}",
        lambda: cuda_ops.window_gather(ring, codec, kv, lay, validate=False),
        lambda: cache_ops.window_gather(ring, codec, kv, lay),
        lambda: same(cuda_ops.window_gather(ring, codec, kv, lay, validate=False),
                     cache_ops.window_gather(ring, codec, kv, lay)),
        b * (WINDOW - 1) * codec.width + b * WINDOW * HEAD * 2, "-", notes="to be fused into sparse attention"))
    return cases


def flush_case(name: str, ratio: int, d: int, rotate: bool, codec, chunks, state_rows: int) -> Case:
    """state_rows: state rows (of coff * d fp32, in each of kv and score) read or written per sequence."""
    g = gen(2)
    coff = 2 if ratio == 4 else 1
    max_blocks = max(-(-(c[1] + c[2]) // BLOCK) for c in chunks)
    lay = layout(chunks, max_blocks)
    t = lay.num_tokens
    slots = len(chunks)
    a = torch.randn(t, coff * d, generator=g, device=DEV)
    z = torch.randn(t, coff * d, generator=g, device=DEV)
    state = torch.randn(slots, coff * ratio, coff * d, generator=g, device=DEV)
    score = torch.randn(slots, coff * ratio, coff * d, generator=g, device=DEV)
    pool = torch.zeros(slots * max_blocks, BLOCK // ratio, codec.width, dtype=torch.uint8, device=DEV)
    nw = torch.ones(d, device=DEV).bfloat16()
    freq = rope_inv_freq(64, 160000.0, (16.0, 65536, 32.0, 1.0)).to(DEV)
    kfn = lambda ts: cuda_ops.compress_flush(a, z, ts[0], ts[1], lay, ratio, nw, 1e-6, freq, rotate, ts[2],   # noqa: E731
                                             codec, torch.bfloat16, validate=False)
    rfn = lambda ts: cache_ops.compress_flush(a, z, ts[0], ts[1], lay, ratio, nw, 1e-6, freq, rotate, ts[2],  # noqa: E731
                                              codec, torch.bfloat16)
    run, ref, check = stateful(kfn, rfn, [state, score, pool])
    windows = sum((c[1] % ratio + c[2]) // ratio for c in chunks)
    moved = 4 * coff * d * 2 * (t + slots * state_rows) + windows * codec.width
    decode = all(c[2] == 1 for c in chunks)
    return Case(f"compress_flush {name}", f"{'decode' if decode else 'prefill'} B={len(chunks)}, T={t}, "
                f"{windows} windows", run, ref, check, moved,
                "1 kernel, <= 3 us graph" if decode else "-", None, 3.0 if decode else None, ref_reps=3)


def flush_cases() -> list[Case]:
    main, index = MainFp8Codec(NOPE, ROPE), IndexFp4Codec(IDX_DIM)
    steps = decode_flush_steps(128)
    csa_all, csa_quarter, hca_one, hca_all = steps["csa_all"], steps["csa_quarter"], steps["hca_one"], steps["hca_all"]
    return [
        flush_case("CSA main (d=512, 584 B)", 4, HEAD, False, main, csa_all, 12),
        flush_case("CSA main (d=512, 584 B), 1 in 4 completing", 4, HEAD, False, main, csa_quarter, 3),
        flush_case("CSA indexer (d=128, Hadamard + MXFP4 68 B)", 4, IDX_DIM, True, index, csa_all, 12),
        flush_case("HCA main (d=512)", 128, HEAD, False, main, hca_one, 2),
        flush_case("HCA main (d=512), all completing", 128, HEAD, False, main, hca_all, 128),
        flush_case("CSA main (d=512, 584 B)", 4, HEAD, False, main, [(0, 0, 4096)], 4),
        flush_case("HCA main (d=512)", 128, HEAD, False, main, [(0, 0, 4096)], 0),
    ]


def indexer_case(b: int, entries: int, topk: int, label: str, target: str, cold: float | None) -> Case:
    g = gen(3)
    codec = IndexFp4Codec(IDX_DIM)
    epb = BLOCK // 4
    max_blocks = entries // epb
    lay = layout([(s, 4 * entries - 1, 1) for s in range(b)], max_blocks)
    keys = quant.hadamard_rotate(torch.randn(b * entries, IDX_DIM, generator=g, device=DEV).bfloat16())
    pool = codec.encode(keys).view(b * max_blocks, epb, codec.width)
    q = quant.fake_quant_fp4(quant.hadamard_rotate(torch.randn(b, IDX_HEADS, IDX_DIM, generator=g,
                                                               device=DEV).bfloat16()))
    w = (torch.randn(b, IDX_HEADS, generator=g, device=DEV) * 0.125).bfloat16()
    kfn = lambda: cuda_ops.indexer_topk(q, w, pool, codec, lay, 4, topk, torch.bfloat16, validate=False)  # noqa: E731
    rfn = lambda: cache_ops.indexer_topk(q, w, pool, codec, lay, 4, topk, torch.bfloat16)  # noqa: E731
    return Case("indexer_topk (MXFP4 score + top-k, fused pair)", label, kfn, rfn, lambda: same(kfn(), rfn()),
                b * entries * codec.width + b * (IDX_HEADS * IDX_DIM * 2 + topk * 8), target, cold,
                ref_reps=3, notes="68-byte MXFP4 keys; FP8-key targets scaled by bytes: see notes")


def indexer_cases() -> list[Case]:
    return [
        indexer_case(1, 32768, IDX_TOPK, "B=1, 32K entries (128K ctx), k=512", "<= 8 us", 8.0),
        indexer_case(64, 32768, IDX_TOPK, "B=64, 32K entries, k=512", "<= 110 us (FP8 keys); FP4 <= 65 us", 65.0),
        indexer_case(1, 262144, 1024, "V4-Pro B=1, 256K entries (1M ctx), k=1024", "-", None),
    ]


def gather_cases() -> list[Case]:
    out = []
    codec = MainFp8Codec(NOPE, ROPE)
    for b in (1, 64):
        g = gen(4)
        max_blocks = 128                                   # 32K positions -> 8192 CSA entries per sequence
        lay = layout([(s, 32768 - 1, 1) for s in range(b)], max_blocks)
        pool = codec.encode(torch.randn(b * max_blocks * 64, HEAD, generator=g, device=DEV).bfloat16())
        pool = pool.view(b * max_blocks, 64, codec.width)
        entries = torch.stack([torch.randperm(8192, generator=g, device=DEV)[:512] for _ in range(b)])
        kfn = lambda lay=lay, pool=pool, e=entries: cuda_ops.gather_entries(pool, codec, lay, e, 4,  # noqa: E731
                                                                            validate=False)
        rfn = lambda lay=lay, pool=pool, e=entries: cache_ops.gather_entries(pool, codec, lay, e, 4)  # noqa: E731
        out.append(Case("gather_entries (paged FP8 -> bf16 tile)", f"B={b} x 512 entries", kfn, rfn,
                        lambda k=kfn, r=rfn: same(k(), r()), b * 512 * (codec.width + HEAD * 2 + 8),
                        "<= 22 us cold" if b == 64 else "-", 22.0 if b == 64 else None))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cases("kernels", [router_cases, window_cases, flush_cases, indexer_cases, gather_cases], argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())

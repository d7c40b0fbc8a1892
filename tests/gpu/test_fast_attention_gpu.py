"""Fast sparse attention (Triton) on the GPU against the reference composition of Attention.forward
(window_gather + gather_entries + cache_ops.sparse_attention in float64 + inverse RoPE), at V4-Flash (64 heads,
top-512) and V4-Pro (128 heads, top-1024) shapes: decode B = 1 and 64, a prefill chunk of 1024 after 4096 cached
positions, fresh sequences from position 0, 128K context, split plans, and CUDA-graph capture + replay.

Tolerance: relative L2 error of o <= 5e-3 (expected ~1e-3, as the same tests run on the CPU through the twin and
Triton's interpreter: bf16 output rounding, which the reference applies twice on the rope dims, and bf16
probabilities relative to the running max); max |diff| <= 3e-2 of the head's largest |o| (expected ~8e-3).
"""

from __future__ import annotations

import pytest
import torch
from fast_inputs import Scene

from dsv4.kernels import cache_ops, quant
from dsv4.kernels.cache_ops import BatchLayout
from dsv4.kernels.fast import attention
from dsv4.kernels.kv_format import MainFp8Codec
from dsv4.kernels.ref_math import apply_rope
from dsv4.model.layers import rope_inv_freq

pytestmark = pytest.mark.gpu
pytest.importorskip("triton")
from dsv4.kernels.fast import _attention_triton  # noqa: E402  (needs triton)

DEV = "cuda"
NOPE, ROPE, WINDOW, BLOCK = 448, 64, 128, 256
FLASH, PRO = (64, 512), (128, 1024)          # (heads, CSA top-k)


def entry_values(n: int, g: torch.Generator) -> torch.Tensor:
    """KV entries as the model makes them: bf16, nope dims FP8-simulated; rows spread over powers of two."""
    x = torch.randn(n, NOPE + ROPE, generator=g, device=DEV)
    x = x * torch.exp2(torch.randint(-2, 3, (n, 1), generator=g, device=DEV).float())
    return quant.fake_quant_kv(x.bfloat16(), ROPE)


def encoded(n: int, codec: MainFp8Codec, g: torch.Generator) -> torch.Tensor:
    """n stored entries [n, 584]: up to 64K distinct ones, repeated at random (cheap for 1 GB pools)."""
    base = codec.encode(entry_values(min(n, 65536), g))
    return base[torch.randint(0, base.shape[0], (n,), generator=g, device=DEV)]


def csa_entries(positions: torch.Tensor, topk: int, g: torch.Generator) -> torch.Tensor:
    """Random top-k of the visible entries per token (indexer order = random), -1 padded; a few -1 holes."""
    visible = (positions + 1) // 4
    width = max(int(visible.max()), topk)
    scores = torch.rand(positions.shape[0], width, generator=g, device=DEV)
    scores = scores.masked_fill(torch.arange(width, device=DEV)[None, :] >= visible[:, None], -1.0)
    top, idx = scores.topk(topk, dim=1)
    entries = torch.where(top >= 0, idx, -1)
    holes = torch.rand(entries.shape, generator=g, device=DEV) < 0.02
    return entries.masked_fill(holes, -1)


def build(chunks: list[tuple[int, int]], heads: int, ratio: int, topk: int = 512, *, seed: int = 0,
          num_missing: int = 0, slack_blocks: int = 0) -> Scene:
    """chunks: (start, length) per sequence (slot = index), positions before the chunk in the ring and pool."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    codec = MainFp8Codec(NOPE, ROPE)
    max_blocks = max(-(-(s + n) // BLOCK) for s, n in chunks) + slack_blocks
    num_blocks = len(chunks) * max_blocks + 2
    table = torch.randperm(num_blocks, generator=g, device=DEV)[:len(chunks) * max_blocks]
    table = table.view(len(chunks), max_blocks).cpu()
    for k in range(num_missing):           # missing blocks among the used ones
        s = k % len(chunks)
        table[s, (7 * k + 1) % max(1, -(-chunks[s][0] // BLOCK))] = -1
    layout = BatchLayout.from_chunks([(s, start, n, table[s].tolist()) for s, (start, n) in enumerate(chunks)],
                                     BLOCK, DEV)
    ring = encoded(len(chunks) * WINDOW, codec, g).view(len(chunks), WINDOW, -1)
    pool = encoded(num_blocks * (BLOCK // ratio), codec, g).view(num_blocks, BLOCK // ratio, -1) if ratio else None
    t = layout.num_tokens
    q = (torch.randn(t, heads, NOPE + ROPE, generator=g, device=DEV) * 1.5).bfloat16()
    entries = csa_entries(layout.positions, topk, g) if ratio == 4 else None
    sink = torch.randn(heads, generator=g, device=DEV)
    inv_freq = rope_inv_freq(ROPE, 160000.0, (16.0, 65536, 32.0, 1.0)).to(DEV)
    return Scene(q, entry_values(t, g), ring, pool, codec, layout, ratio, entries, sink, inv_freq)


def reference(scene: Scene, rows_per_chunk: int = 64) -> torch.Tensor:
    """The reference composition, a chunk of tokens at a time (sub-layouts keep the float64 tiles small);
    entries of missing blocks dropped (the reference cannot address them, the kernel masks them)."""
    lay, out = scene.layout, []
    for begin in range(0, lay.num_tokens, rows_per_chunk):
        rows = torch.arange(begin, min(lay.num_tokens, begin + rows_per_chunk), device=DEV)
        sub = BatchLayout(lay.positions[rows], lay.token_seq[rows], lay.seq_slot, lay.seq_start, lay.seq_len,
                          lay.seq_first_row, lay.block_table, lay.block_size, lay.spans)
        keys, valid = cache_ops.window_gather(scene.ring, scene.codec, scene.kv, sub)
        if scene.ratio:
            if scene.entries is not None:
                entries = scene.entries[rows].long()
            else:
                width = lay.block_table.shape[1] * (BLOCK // scene.ratio)
                entries = torch.arange(width, device=DEV)[None, :].expand(rows.shape[0], -1)
                entries = torch.where(entries < ((sub.positions + 1) // scene.ratio)[:, None], entries, -1)
            block = lay.block_table[sub.token_seq[:, None], (entries.clamp(min=0) * scene.ratio) // BLOCK]
            entries = torch.where(block >= 0, entries, -1)
            extra, extra_valid = cache_ops.gather_entries(scene.pool, scene.codec, sub, entries, scene.ratio)
            keys, valid = torch.cat([keys, extra], dim=1), torch.cat([valid, extra_valid], dim=1)
        o = cache_ops.sparse_attention(scene.q[rows], keys, valid, scene.sink, torch.bfloat16)
        out.append(apply_rope(o, sub.positions, scene.inv_freq, inverse=True))
    return torch.cat(out)


def assert_close(got: torch.Tensor, ref: torch.Tensor, label: str) -> None:
    assert got.shape == ref.shape and got.dtype == torch.bfloat16, (got.shape, got.dtype)
    assert bool(torch.isfinite(got).all()), f"{label}: non-finite output"
    diff = got.float() - ref.float()
    rel = float(diff.norm() / ref.float().norm())
    worst = float((diff.abs() / ref.float().abs().amax(dim=-1, keepdim=True)).max())
    print(f"{label}: rel L2 {rel:.2e}, max |diff| / head max {worst:.2e}")
    assert rel <= 5e-3, f"{label}: relative L2 error {rel:.3g}"
    assert worst <= 3e-2, f"{label}: max relative-to-head error {worst:.3g}"


def decode_chunks(batch: int, base: int = 3000) -> list[tuple[int, int]]:
    return [(base + (977 * s) % 5000, 1) for s in range(batch)]


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("ratio", [0, 4, 128])
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("model", [FLASH, PRO], ids=["flash", "pro"])
def test_decode_matches_reference(model, batch, ratio):
    heads, topk = model
    scene = build(decode_chunks(batch), heads, ratio, topk, seed=batch + ratio, num_missing=2 if ratio else 0)
    assert_close(attention.sparse_attention(*scene.args()), reference(scene), f"decode H={heads} B={batch} m={ratio}")


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_prefill_chunk_after_cached_context(ratio):
    """1024 tokens after 4096 cached positions: the first 127 windows cross from the ring into the chunk."""
    scene = build([(4096, 1024)], 64, ratio, seed=5, num_missing=1 if ratio else 0)
    assert_close(attention.sparse_attention(*scene.args()), reference(scene), f"prefill 4096+1024 m={ratio}")


@pytest.mark.parametrize("ratio", [0, 4, 128])
def test_fresh_sequences_from_position_zero(ratio):
    """Partial windows, fewer visible entries than top-k (-1 padding), no visible HCA entry yet, a prompt of
    300 tokens beside decode tokens at positions 0..2."""
    scene = build([(0, 1), (1, 1), (2, 1), (0, 300)], 64, ratio, seed=6)
    assert_close(attention.sparse_attention(*scene.args()), reference(scene), f"fresh m={ratio}")


@pytest.mark.parametrize("ratio", [4, 128])
def test_long_context_decode(ratio):
    """128K context: 32K CSA entries to choose from, 1024 visible HCA entries (runtime loop bound)."""
    scene = build(decode_chunks(4, base=131072 - 8), 64, ratio, seed=7)
    assert_close(attention.sparse_attention(*scene.args()), reference(scene), f"128K m={ratio}")


@pytest.mark.parametrize("plan", [_attention_triton.Plan(64, 32, 1, 8), _attention_triton.Plan(64, 32, 7, 8),
                                  _attention_triton.Plan(32, 32, 4, 4), _attention_triton.Plan(16, 64, 1, 4),
                                  _attention_triton.Plan(64, 32, 2, 8, num_stages=2)],
                         ids=["64x32-s1", "64x32-s7", "32x32-s4", "16x64-s1", "64x32-s2-stages2"])
def test_plans_agree(plan):
    """Every launch plan computes the same function (split + combine, head blocks, tiles, pipelining)."""
    scene = build(decode_chunks(8), 64, 4, seed=8, num_missing=1)
    got = _attention_triton.sparse_attention(*scene.args(), plan=plan)
    assert_close(got, reference(scene), f"plan {plan}")


def test_missing_blocks_are_masked_not_read():
    """A -1 block contributes nothing: the same output as listing its entries as -1."""
    scene = build(decode_chunks(16), 64, 4, seed=9, num_missing=8)
    lay = scene.layout
    block = lay.block_table[lay.token_seq[:, None], (scene.entries.clamp(min=0) * 4) // BLOCK]
    assert bool(((block < 0) & (scene.entries >= 0)).any())
    got = attention.sparse_attention(*scene.args())
    scene.entries = torch.where(block >= 0, scene.entries, -1)
    assert torch.equal(got, attention.sparse_attention(*scene.args()))


# ---------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("ratio", [4, 128])
def test_cuda_graph_capture_and_replay(ratio):
    """Capture one call; then change q, kv, the CSA entries and (HCA) advance every position by a whole entry
    in place, and replay: equal to an eager call on the new inputs, bit for bit, and to the reference."""
    scene = build(decode_chunks(64), 64, ratio, seed=10, slack_blocks=2)
    attention.sparse_attention(*scene.args())          # compile outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention.sparse_attention(*scene.args())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.sparse_attention(*scene.args())
    g = torch.Generator(device=DEV).manual_seed(11)
    for replay in range(3):
        scene.q.copy_((torch.randn(scene.q.shape, generator=g, device=DEV) * 1.5).bfloat16())
        scene.kv.copy_(entry_values(scene.kv.shape[0], g))
        if ratio == 4:
            scene.entries.copy_(csa_entries(scene.layout.positions, scene.entries.shape[1], g))
        else:                                       # one more visible entry per token: a device-side length
            scene.layout.positions.add_(ratio)
            scene.layout.seq_start.add_(ratio)
        graph.replay()
        torch.cuda.synchronize()
        eager = attention.sparse_attention(*scene.args())
        assert torch.equal(out, eager), f"replay {replay}"
        assert_close(out, reference(scene), f"graph replay {replay} m={ratio}")

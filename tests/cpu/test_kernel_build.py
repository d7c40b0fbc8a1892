"""CPU-side contracts of the kernel layer: the build cache key, the environment knobs, the dispatch falling back to
the references for CPU tensors and exact-fp32 storage, and the validation checks the CUDA path runs before a launch."""

from __future__ import annotations

import shutil

import pytest
import torch

from dsv4.kernels import build, cache_ops, cuda_ops, ops, routing
from dsv4.kernels.knobs import knobs
from dsv4.kernels.kv_format import Fp32Codec, IndexFp4Codec, MainFp8Codec


def test_cache_key_changes_with_sources_torch_cuda_and_arch(tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    base = build.cache_key("90a", csrc, "2.11.0", "13.0")
    assert base == build.cache_key("90a", csrc, "2.11.0", "13.0")
    assert base != build.cache_key("100a", csrc, "2.11.0", "13.0")
    assert base != build.cache_key("90a", csrc, "2.12.0", "13.0")
    assert base != build.cache_key("90a", csrc, "2.11.0", "12.8")
    (csrc / "indexer.cu").write_text((csrc / "indexer.cu").read_text() + "\n// edited\n")
    assert base != build.cache_key("90a", csrc, "2.11.0", "13.0")


def test_build_sources_exist_and_flags_pin_the_arch():
    for name in build.SOURCES + build.HEADERS:
        assert (build.CSRC / name).is_file(), name
    assert build.gencode_flags("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert not any("fast-math" in f or "fast_math" in f for f in build.CUDA_FLAGS)   # the kernels need IEEE rounding


def test_knobs_read_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DSV4_KERNELS", raising=False)
    monkeypatch.delenv("DSV4_KERNEL_CHECKS", raising=False)
    assert knobs().kernels and knobs().checks
    monkeypatch.setenv("DSV4_KERNELS", "0")
    monkeypatch.setenv("DSV4_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("DSV4_CUDA_ARCH", "90a")
    k = knobs()
    assert not k.kernels and k.cache_dir == tmp_path and k.arch == "90a"
    assert build.build_dir("90a").parent == tmp_path
    monkeypatch.setenv("DSV4_KERNELS", "maybe")
    with pytest.raises(ValueError, match="DSV4_KERNELS"):
        knobs()


def test_cpu_tensors_take_the_references():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 32, generator=g), torch.randn(16, 32, generator=g).bfloat16()
    bias, tid2eid = torch.zeros(16), torch.randint(0, 16, (50, 6), generator=g)
    assert not cuda_ops.enabled(x, w)
    for got, ref in ((ops.dense_route(x, w, bias, 6, 1.5), routing.dense_route(x, w, bias, 6, 1.5)),
                     (ops.hash_route(x, w, tid2eid, torch.tensor([1, 2, 3]), 1.5),
                      routing.hash_route(x, w, tid2eid, torch.tensor([1, 2, 3]), 1.5))):
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))


def test_support_predicates_route_only_production_formats_to_kernels():
    ring = torch.zeros(2, 128, 584, dtype=torch.uint8)
    assert cuda_ops.supports_main_codec(MainFp8Codec(448, 64), ring)
    assert not cuda_ops.supports_main_codec(Fp32Codec(512), torch.zeros(2, 128, 512))
    a, nw, freq = torch.zeros(4, 1024), torch.ones(512), torch.ones(32)
    pool = torch.zeros(4, 64, 584, dtype=torch.uint8)
    assert cuda_ops.supports_flush(a, 4, nw, freq, False, pool, MainFp8Codec(448, 64), torch.bfloat16)
    assert not cuda_ops.supports_flush(a, 4, nw, freq, False, pool, MainFp8Codec(448, 64), torch.float32)
    assert not cuda_ops.supports_flush(a, 4, nw, freq, True, pool, MainFp8Codec(448, 64), torch.bfloat16)
    ipool = torch.zeros(4, 64, 68, dtype=torch.uint8)
    assert cuda_ops.supports_flush(torch.zeros(4, 256), 4, torch.ones(128), freq, True, ipool, IndexFp4Codec(128),
                                   torch.bfloat16)
    layout = _layout([(0, 10, 2)], max_blocks=1)
    q, wts = torch.zeros(2, 64, 128).bfloat16(), torch.zeros(2, 64).bfloat16()
    assert cuda_ops.supports_indexer(q, wts, ipool, IndexFp4Codec(128), layout, 4, 512, torch.bfloat16)
    assert not cuda_ops.supports_indexer(q, wts, ipool, IndexFp4Codec(128), layout, 4, 2048, torch.bfloat16)
    assert not cuda_ops.supports_indexer(q[:, :48], wts[:, :48], ipool, IndexFp4Codec(128), layout, 4, 512,
                                         torch.bfloat16)
    assert cuda_ops.supports_route(torch.zeros(1, 8), torch.zeros(512, 8).bfloat16(), 16)
    assert not cuda_ops.supports_route(torch.zeros(1, 8), torch.zeros(513, 8).bfloat16(), 6)


def _layout(chunks, max_blocks, block_size=256):
    """chunks: (slot, start, length); sequence s owns blocks s*max_blocks .. (s+1)*max_blocks-1."""
    return cache_ops.BatchLayout.from_chunks(
        [(slot, start, n, range(s * max_blocks, (s + 1) * max_blocks)) for s, (slot, start, n) in enumerate(chunks)],
        block_size)


def test_validation_checks_raise_on_what_the_kernels_would_mask():
    with pytest.raises(ValueError, match="token id 50 is outside the vocabulary"):
        cuda_ops.check_hash_ids(torch.zeros(50, 6, dtype=torch.long), torch.tensor([50]), 16)
    table = torch.zeros(50, 6, dtype=torch.long)
    table[3, 1] = 16
    with pytest.raises(ValueError, match="expert id 16 outside"):
        cuda_ops.check_hash_ids(table, torch.tensor([3]), 16)
    cuda_ops.check_hash_ids(table, torch.tensor([2, 4]), 16)

    layout = _layout([(0, 250, 10), (3, 0, 1)], max_blocks=2)
    cuda_ops.check_slots(layout, 4)
    with pytest.raises(ValueError, match="outside"):
        cuda_ops.check_slots(layout, 3)
    cuda_ops.check_flush(layout, 4, 4, 4)
    layout.block_table[0, 1] = -1                     # positions 256..259 complete entry 64: its block is gone
    with pytest.raises(ValueError, match="misses a block"):
        cuda_ops.check_flush(layout, 4, 4, 4)
    cuda_ops.check_flush(layout, 128, 4, 4)           # HCA entry 1 (positions 128..255) lives in block 0
    with pytest.raises(ValueError, match="misses a block"):
        cuda_ops.check_indexer(layout, 4, 4)
    entries = torch.tensor([[0, 63, -1]] * 10 + [[0, -1, -1]])
    cuda_ops.check_gather(layout, entries, 4, 4)
    with pytest.raises(ValueError, match="does not hold"):
        cuda_ops.check_gather(layout, torch.tensor([[64, -1, -1]] * 10 + [[0, -1, -1]]), 4, 4)
    with pytest.raises(ValueError, match="past its sequence's block table"):
        cuda_ops.check_gather(layout, torch.tensor([[0, -1, -1]] * 10 + [[200, -1, -1]]), 4, 4)

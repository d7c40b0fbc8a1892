"""The engine step: one forward over a mix of prefill chunks and decode tokens of many sequences, reading and
writing only the paged cache.

The scheduler (or a test) decides which tokens of which sequences run, and reserves their slots and blocks with a
`dsv4.cache.manager.KVCacheManager` beforehand; the runner only executes. A chunk that starts at position 0 is
a new sequence (or one restarted after preemption): its slot is reset first, so nothing of the slot's previous
sequence can reach it.

Inputs go through persistent buffers (`InputBatch`). With CUDA graphs (fast numerics on a GPU), decode steps of
up to the largest captured batch size replay a graph captured at start-up for the smallest size that fits,
padded with the runner's spare slot; prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.model.batch import Chunk, ForwardBatch, check_chunks
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.model.speculative import Recorder
from dsv4.model.transformer import ForwardOutput, Transformer
from dsv4.workers.input_batch import InputBatch

DEFAULT_GRAPH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256)
# Prefill sizes `warm_up` runs. Triton compiles a kernel per tile configuration (chosen by the token count) and per
# specialization of its integer arguments (== 1, divisible by 16, neither) on first use: odd and aligned sizes
# across the tile buckets, on the real cache (its strides are arguments too). A cold H200 made a 300-token prompt
# wait 28.6 s with no warm-up, 6.3 s after one on a one-slot scratch cache.
WARM_UP_TOKENS = (7, 16, 67, 128, 300, 1001, 2048)


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    max_num_seqs: int              # sequences per step (the scheduler's slots)
    max_num_tokens: int            # tokens per step
    max_table_width: int           # blocks per sequence (max_model_len / block_size)
    graph_sizes: tuple[int, ...]   # decode batch sizes to capture; () = eager only

    def __post_init__(self) -> None:
        if min(self.max_num_seqs, self.max_num_tokens, self.max_table_width) < 1:
            raise ValueError(f"runner limits must be positive: {self}")
        if any(b < 1 or b > min(self.max_num_seqs, self.max_num_tokens) for b in self.graph_sizes):
            raise ValueError(f"graph sizes {self.graph_sizes} must lie in [1, max_num_seqs={self.max_num_seqs}]")


def graph_sizes_up_to(max_num_seqs: int) -> tuple[int, ...]:
    """The captured decode batch sizes: the default ladder up to max_num_seqs, and max_num_seqs itself."""
    return tuple(sorted({b for b in DEFAULT_GRAPH_SIZES if b < max_num_seqs} | {max_num_seqs}))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor           # [B, vocab] fp32, the graph's output buffer


class ModelRunner:
    def __init__(self, model: Transformer, storage: KVStorage, numerics: Numerics,
                 config: RunnerConfig | None = None):
        """With graphs, `storage` must hold one slot more than `config.max_num_seqs`: the padding slot."""
        self.model, self.storage, self.numerics = model, storage, numerics
        device = storage.layers[0].window.device
        self.config = config or RunnerConfig(storage.num_slots, 8192, max(storage.num_blocks, 1), ())
        if self.config.graph_sizes and storage.num_slots <= self.config.max_num_seqs:
            raise ValueError(f"CUDA graphs need a padding slot: storage has {storage.num_slots} slots for "
                             f"max_num_seqs={self.config.max_num_seqs}")
        self.pad_slot = storage.num_slots - 1
        self.inputs = InputBatch(self.config.max_num_tokens, max(self.config.max_num_seqs, *self.config.graph_sizes,
                                                                 1),
                                 self.config.max_table_width, self.pad_slot, storage.block_size, device)
        self.graphs: dict[int, _Graph] = {}
        numerics.prepare(model)

    # ------------------------------------------------------------------------------------------ steps
    @torch.inference_mode()
    def step(self, chunks: Sequence[Chunk]) -> torch.Tensor:
        """Run one step; returns the next-token logits after each chunk's last token, [len(chunks), vocab] fp32, on
        the device."""
        check_chunks(self.storage, chunks, self.model.config.vocab_size)
        for c in chunks:
            if c.start == 0:
                self.storage.reset_slot(c.slot)
        graph_size = self._graph_size(chunks)
        if graph_size is not None:
            self.inputs.fill(chunks, self.inputs.shape_for(chunks, graph_size, self.config.max_table_width))
            entry = self.graphs[graph_size]
            entry.graph.replay()
            return entry.logits[:len(chunks)]
        token_ids, layout = self.inputs.fill(chunks, self.inputs.shape_for(chunks))
        return self.model(ForwardBatch(token_ids, layout, self.storage, self.numerics)).logits

    @torch.inference_mode()
    def forward(self, chunks: Sequence[Chunk], logits_rows: Sequence[int], record: bool = False
                ) -> tuple[ForwardOutput, Recorder | None]:
        """An eager step that keeps what speculative decoding needs: the logits at the given flat rows, the final
        residual streams of every row (the MTP block's input) and, with `record`, the compressors' projections
        (`ForwardBatch.recorder`)."""
        check_chunks(self.storage, chunks, self.model.config.vocab_size)
        for c in chunks:
            if c.start == 0:
                self.storage.reset_slot(c.slot)
        token_ids, layout = self.inputs.fill(chunks, self.inputs.shape_for(chunks))
        recorder: Recorder | None = {} if record else None
        rows = torch.as_tensor(list(logits_rows), dtype=torch.int64).to(token_ids.device)
        return self.model(ForwardBatch(token_ids, layout, self.storage, self.numerics, recorder), rows), recorder

    @torch.inference_mode()
    def forward_mtp(self, chunks: Sequence[Chunk], streams: torch.Tensor, logits_rows: Sequence[int]
                    ) -> ForwardOutput:
        """The MTP block over chunks whose token ids are each position's *next* token, with `streams` [T, hc, D]
        the main model's final streams at those positions (or an earlier MTP pass's output, when chaining)."""
        check_chunks(self.storage, chunks, self.model.config.vocab_size)
        token_ids, layout = self.inputs.fill(chunks, self.inputs.shape_for(chunks))
        rows = torch.as_tensor(list(logits_rows), dtype=torch.int64).to(token_ids.device)
        return self.model.forward_mtp(streams, ForwardBatch(token_ids, layout, self.storage, self.numerics),
                                      logits_rows=rows)

    @torch.inference_mode()
    def warm_up(self, sizes: Sequence[int] = WARM_UP_TOKENS) -> torch.Tensor:
        """Before any request, the step kinds serving runs, on the real cache: for each size n (capped by the step
        and table limits) a prefill from position 0, its continuation, and (with two slots) a mixed step, a
        prefill beside a decode token, in slots 0 and 1, which their next sequence resets. Kernels then compile
        for the cache's own shapes and strides now, not inside the first requests' time to first token. Returns
        the last step's logits."""
        if not any(n >= 1 for n in sizes):
            raise ValueError(f"warm-up sizes must hold a positive size, got {tuple(sizes)}")
        two = self.storage.num_slots > 1
        bs, vocab = self.storage.block_size, self.model.config.vocab_size
        width = min(self.config.max_table_width, self.storage.num_blocks // (2 if two else 1))
        limit = min(self.config.max_num_tokens // 2, (width * bs - 1) // 2)
        if limit < 1:
            raise ValueError(f"the cache is too small to warm up: {self.storage.num_blocks} blocks of {bs}")
        tokens = torch.randint(0, vocab, (2 * limit + 1,), generator=torch.Generator().manual_seed(0)).tolist()
        first, second = range(0, width), range(width, 2 * width)
        for n in sorted({min(n, limit) for n in sizes if n >= 1}):
            self.step([Chunk(0, first, 0, tokens[:n])])
            logits = self.step([Chunk(0, first, n, tokens[n:2 * n])])
            if two:
                logits = self.step([Chunk(1, second, 0, tokens[:n]), Chunk(0, first, 2 * n, [tokens[2 * n]])])
        return logits

    def _graph_size(self, chunks: Sequence[Chunk]) -> int | None:
        """The smallest captured batch size holding this step, if it is all decode tokens."""
        if any(len(c.token_ids) != 1 for c in chunks):
            return None
        fits = [b for b in self.graphs if b >= len(chunks)]
        return min(fits) if fits else None

    # ------------------------------------------------------------------------------------------ CUDA graphs
    @torch.inference_mode()
    def capture_graphs(self, progress=None) -> dict[str, float]:
        """Capture one decode graph per configured batch size, largest first, into one memory pool. Each graph is
        warmed up eagerly first (kernel compilation, workspaces). Returns seconds and bytes spent."""
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info()[0]
        pool = torch.cuda.graph_pool_handle()
        for size in sorted(self.config.graph_sizes, reverse=True):
            shape = self.inputs.shape_for([], size, self.config.max_table_width)
            token_ids, layout = self.inputs.fill([], shape)
            batch = ForwardBatch(token_ids, layout, self.storage, self.numerics)
            rows = self.inputs.rows[:size]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(batch, logits_rows=rows)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self.model(batch, logits_rows=rows).logits
            self.graphs[size] = _Graph(graph, logits)
            if progress:
                progress(f"captured the decode graph for batch {size}")
        torch.cuda.synchronize()
        return {"seconds": time.perf_counter() - start,
                "bytes": float(free_before - torch.cuda.mem_get_info()[0])}

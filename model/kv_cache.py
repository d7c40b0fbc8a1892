"""What the attention layers keep between steps, and where (spec §6): the storage schema of the KV cache.

Per sequence *slot* (one per running sequence), for every layer: a ring of the last `sliding_window` raw KV
entries, and for each compressor its fp32 pooling state. Per *block* (`block_size` consecutive positions of one
sequence, the same block id in every layer), for every CSA/HCA layer: the compressed entries of those positions
(block_size / ratio of them) and, for CSA, as many indexer keys. Entries are stored in the numerics mode's
format: production bytes (584-byte FP8 entries, 68-byte MXFP4 keys) for `reference`, fp32 for `exact-fp32`.

The shapes are defined once here; `dsv4.cache` sizes pools from them and hands out slots and blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4.kernels.kv_format import EntryCodec, Fp32Codec, IndexFp4Codec, MainFp8Codec
from dsv4.model.config import CSA_RATIO, ModelConfig
from dsv4.model.numerics import Numerics

ATTN, INDEX = "attn", "index"   # compressor names: main KV compressor, CSA indexer-key compressor
DEFAULT_BLOCK_SIZE = 256        # positions per block: a multiple of every compression ratio (vLLM uses 256 too)


@dataclass(frozen=True, slots=True)
class CompressorGeometry:
    """Shape of one compressor. CSA (ratio 4) pools 8 slots from two overlapping series (width 2*head_dim)."""

    ratio: int
    head_dim: int

    @property
    def coff(self) -> int:
        return 2 if self.ratio == CSA_RATIO else 1

    @property
    def state_shape(self) -> tuple[int, int]:
        """[slots, width]: CSA keeps the previous window (slots 0..m-1) and the current one (m..2m-1)."""
        return self.coff * self.ratio, self.coff * self.head_dim


def compressors_of_layer(config: ModelConfig, layer_id: int) -> dict[str, CompressorGeometry]:
    ratio = config.compress_ratio(layer_id)
    if ratio == 0:
        return {}
    geometry = {ATTN: CompressorGeometry(ratio, config.head_dim)}
    if ratio == CSA_RATIO:
        geometry[INDEX] = CompressorGeometry(ratio, config.index_head_dim)
    return geometry


def codec_for(config: ModelConfig, numerics: Numerics, name: str) -> EntryCodec:
    """Entry format of window/main entries (name ATTN) or indexer keys (INDEX) in a numerics mode."""
    if not numerics.simulate_quant:
        return Fp32Codec(config.head_dim if name == ATTN else config.index_head_dim)
    if name == ATTN:
        return MainFp8Codec(config.nope_head_dim, config.qk_rope_head_dim)
    return IndexFp4Codec(config.index_head_dim)


@dataclass(frozen=True, slots=True)
class TensorShape:
    per: str                  # "slot", "block" or "snapshot": what the leading dimension counts
    shape: tuple[int, ...]    # without the leading dimension
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty(0, dtype=self.dtype).element_size()
        for dim in self.shape:
            n *= dim
        return n


def layer_tensors(config: ModelConfig, numerics: Numerics, layer_id: int, block_size: int
                  ) -> dict[str, TensorShape]:
    """Every cache tensor of one layer, keyed "window", "pool.<name>", "state_kv.<name>", "state_score.<name>",
    and the prefix snapshots' "snapshot.window", "snapshot.state_kv.<name>", "snapshot.state_score.<name>".

    A prefix snapshot is what a sequence needs, besides the blocks of its prefix, to continue from a block
    boundary: the ring of its last window entries and, for CSA compressors (ratio 4, overlapping windows), the
    pooling state whose previous window the next entry reads. At a block boundary (a multiple of every ratio) no
    window is partly filled, so HCA states hold nothing needed."""
    window_codec = codec_for(config, numerics, ATTN)
    window = (config.sliding_window, window_codec.width)
    out = {"window": TensorShape("slot", window, window_codec.storage_dtype),
           "snapshot.window": TensorShape("snapshot", window, window_codec.storage_dtype)}
    for name, g in compressors_of_layer(config, layer_id).items():
        codec = codec_for(config, numerics, name)
        out[f"pool.{name}"] = TensorShape("block", (block_size // g.ratio, codec.width), codec.storage_dtype)
        for state in ("state_kv", "state_score"):
            out[f"{state}.{name}"] = TensorShape("slot", g.state_shape, torch.float32)
            if g.coff == 2:
                out[f"snapshot.{state}.{name}"] = TensorShape("snapshot", g.state_shape, torch.float32)
    return out


def check_block_size(config: ModelConfig, block_size: int) -> None:
    ratios = {r for r in config.compress_ratios if r}
    if block_size <= 0 or any(block_size % r for r in ratios):
        raise ValueError(f"block_size {block_size} must be a positive multiple of every compression ratio "
                         f"{sorted(ratios)}")


def bytes_per_block(config: ModelConfig, numerics: Numerics, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes one block (block_size positions of context) takes across all layers."""
    return sum(t.nbytes for layer in range(config.num_layers_with_mtp)
               for t in layer_tensors(config, numerics, layer, block_size).values() if t.per == "block")


def bytes_per_slot(config: ModelConfig, numerics: Numerics, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Fixed bytes per running sequence: window rings and compressor states of all layers."""
    return sum(t.nbytes for layer in range(config.num_layers_with_mtp)
               for t in layer_tensors(config, numerics, layer, block_size).values() if t.per == "slot")


def bytes_per_snapshot(config: ModelConfig, numerics: Numerics, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
    """Bytes of one prefix snapshot (`layer_tensors`): window rings and CSA pooling states of all layers."""
    return sum(t.nbytes for layer in range(config.num_layers_with_mtp)
               for t in layer_tensors(config, numerics, layer, block_size).values() if t.per == "snapshot")


@dataclass
class CompressorStorage:
    geometry: CompressorGeometry
    codec: EntryCodec
    pool: torch.Tensor          # [num_blocks, block_size // ratio, width]
    state_kv: torch.Tensor      # [num_slots, slots, width] fp32
    state_score: torch.Tensor
    snapshot_kv: torch.Tensor | None = None       # [num_snapshots, slots, width] (CSA only)
    snapshot_score: torch.Tensor | None = None


@dataclass
class LayerStorage:
    window: torch.Tensor        # [num_slots, sliding_window, width]
    window_codec: EntryCodec
    compressors: dict[str, CompressorStorage]
    snapshot_window: torch.Tensor | None = None   # [num_snapshots, sliding_window, width]


@dataclass
class SlotCheckpoint:
    """Per-slot state some sequences had before a step that may be taken back (`KVStorage.checkpoint`)."""

    slots: torch.Tensor                  # [S] int64
    positions: torch.Tensor              # [S, N] int64 positions whose ring rows were saved, -1 = none
    layer_ids: tuple[int, ...]
    windows: list[torch.Tensor]          # per saved layer: [S, N, width] those ring rows
    states: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]   # per saved layer: name -> (kv, score) [S, ...]


class KVStorage:
    """The cache tensors of every layer for `num_slots` sequences and `num_blocks` blocks, on one device."""

    def __init__(self, config: ModelConfig, numerics: Numerics, num_slots: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, device: torch.device | str = "cpu", num_snapshots: int = 0):
        check_block_size(config, block_size)
        self.config, self.numerics, self.block_size = config, numerics, block_size
        self.num_slots, self.num_blocks, self.num_snapshots = num_slots, num_blocks, num_snapshots
        count = {"slot": num_slots, "block": num_blocks, "snapshot": num_snapshots}
        self.layers: list[LayerStorage] = []
        for layer_id in range(config.num_layers_with_mtp):
            t = {key: torch.zeros((count[s.per], *s.shape), dtype=s.dtype, device=device)
                 for key, s in layer_tensors(config, numerics, layer_id, block_size).items()}
            compressors = {name: CompressorStorage(g, codec_for(config, numerics, name), t[f"pool.{name}"],
                                                   t[f"state_kv.{name}"], t[f"state_score.{name}"],
                                                   t.get(f"snapshot.state_kv.{name}"),
                                                   t.get(f"snapshot.state_score.{name}"))
                           for name, g in compressors_of_layer(config, layer_id).items()}
            self.layers.append(LayerStorage(t["window"], codec_for(config, numerics, ATTN), compressors,
                                            t["snapshot.window"]))
        for slot in range(num_slots):
            self.reset_slot(slot)

    def layer(self, layer_id: int) -> LayerStorage:
        return self.layers[layer_id]

    def reset_slot(self, slot: int) -> None:
        """A new sequence in this slot starts from an empty window and fresh compressor state: no previous window
        (score -inf = weight 0), so nothing of the slot's last sequence can leak into it."""
        for layer in self.layers:
            layer.window[slot].zero_()
            for c in layer.compressors.values():
                c.state_kv[slot].zero_()
                c.state_score[slot].fill_(float("-inf"))

    def save_snapshot(self, slot: int, snapshot: int) -> None:
        """Keep the slot's state at a block boundary (`layer_tensors`: the rings, the CSA states) in a snapshot."""
        for layer in self.layers:
            layer.snapshot_window[snapshot].copy_(layer.window[slot])
            for c in layer.compressors.values():
                if c.snapshot_kv is not None:
                    c.snapshot_kv[snapshot].copy_(c.state_kv[slot])
                    c.snapshot_score[snapshot].copy_(c.state_score[slot])

    def load_snapshot(self, snapshot: int, slot: int) -> None:
        """Start the slot from a snapshot: a new sequence continuing at the snapshot's block boundary (its prefix
        blocks shared). The slot's HCA states and the CSA current windows are not read before they are written."""
        for layer in self.layers:
            layer.window[slot].copy_(layer.snapshot_window[snapshot])
            for c in layer.compressors.values():
                if c.snapshot_kv is not None:
                    c.state_kv[slot].copy_(c.snapshot_kv[snapshot])
                    c.state_score[slot].copy_(c.snapshot_score[snapshot])

    def checkpoint(self, slots: Sequence[int], positions: torch.Tensor, layer_ids: Sequence[int]) -> SlotCheckpoint:
        """Save what a step about to write speculatively may clobber in these slots: in each listed layer, the ring
        rows of `positions` ([S, N] per slot, -1 = none) and every compressor's pooling state."""
        device = self.layers[0].window.device
        slot_t = torch.as_tensor(list(slots), dtype=torch.int64, device=device)
        positions = positions.to(device)
        rows = positions.clamp(min=0) % self.config.sliding_window
        windows, states = [], []
        for layer_id in layer_ids:
            layer = self.layers[layer_id]
            windows.append(layer.window[slot_t[:, None], rows].clone())
            states.append({name: (c.state_kv[slot_t].clone(), c.state_score[slot_t].clone())
                           for name, c in layer.compressors.items()})
        return SlotCheckpoint(slot_t, positions, tuple(layer_ids), windows, states)

    def restore(self, saved: SlotCheckpoint, seqs: Sequence[int], from_positions: Sequence[int]) -> None:
        """Put back, for the checkpoint's sequences `seqs` (indices into its slots), the saved ring rows of the
        positions >= from_positions[i] and the whole compressor states, in every saved layer."""
        if not seqs:
            return
        device = saved.slots.device
        idx = torch.as_tensor(list(seqs), dtype=torch.int64, device=device)
        first = torch.as_tensor(list(from_positions), dtype=torch.int64, device=device)
        positions = saved.positions[idx]                                          # [R, N]
        back = (positions >= first[:, None]) & (positions >= 0)
        slots = saved.slots[idx][:, None].expand_as(positions)[back]
        rows = positions[back] % self.config.sliding_window
        for layer_id, window, states in zip(saved.layer_ids, saved.windows, saved.states, strict=True):
            layer = self.layers[layer_id]
            layer.window[slots, rows] = window[idx][back]
            for name, (kv, score) in states.items():
                layer.compressors[name].state_kv[saved.slots[idx]] = kv[idx]
                layer.compressors[name].state_score[saved.slots[idx]] = score[idx]

    def blocks_for(self, num_positions: int) -> int:
        """Blocks a sequence needs to hold the entries of positions 0 .. num_positions-1."""
        return -(-num_positions // self.block_size)

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in self.layers:
            tensors = [layer.window, layer.snapshot_window]
            for c in layer.compressors.values():
                tensors += [c.pool, c.state_kv, c.state_score, c.snapshot_kv, c.snapshot_score]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return total


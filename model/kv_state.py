"""What an attention layer keeps per sequence between forward calls, as a protocol, plus a dense implementation.

Per (sequence, layer) the attention needs (spec §6.1, §3.5):
- the window ring: the last `sliding_window` raw KV entries (slot = position % window);
- per compressor (named "attn" for the main one, "index" for the CSA indexer's): the fp32 pooling state and the
  list of compressed entries emitted so far (entry w covers tokens [w*m, (w+1)*m)).

`DenseSequenceCache` stores entries as plain tensors in the activation dtype: exactly the values the official
reference keeps in its bf16 buffers. The paged cache (`dsv4.cache`) implements the same protocol over block pools
in the production byte formats, decoding to the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from dsv4.model.config import CSA_RATIO, ModelConfig

ATTN, INDEX = "attn", "index"   # compressor names: main KV compressor, CSA indexer-key compressor


@dataclass(frozen=True, slots=True)
class CompressorGeometry:
    """Shape of one compressor. CSA (ratio 4) pools 8 slots from two overlapping series (width 2*head_dim)."""

    ratio: int
    head_dim: int

    @property
    def overlap(self) -> bool:
        return self.ratio == CSA_RATIO

    @property
    def coff(self) -> int:
        return 2 if self.overlap else 1

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


@dataclass(slots=True)
class CompressorState:
    """Mutable fp32 pooling state: projected values and gate scores (ape already added) per slot."""

    kv: torch.Tensor      # [slots, width]
    score: torch.Tensor   # [slots, width]; -inf marks "no token" (weight 0 after softmax)

    @classmethod
    def fresh(cls, geometry: CompressorGeometry, device: torch.device | str = "cpu") -> CompressorState:
        shape = geometry.state_shape
        return cls(torch.zeros(shape, dtype=torch.float32, device=device),
                   torch.full(shape, float("-inf"), dtype=torch.float32, device=device))


class LayerKV(Protocol):
    """One sequence's cache for one attention layer."""

    def window(self, start: int) -> torch.Tensor:
        """Entries at positions max(0, start - window + 1) .. start - 1, oldest first: [n, head_dim]."""
        ...

    def write_window(self, start: int, kv: torch.Tensor) -> None:
        """Store entries kv [n, head_dim] for positions start .. start + n - 1 (only the last `window` stay)."""
        ...

    def compressor_state(self, name: str) -> CompressorState: ...

    def append_entries(self, name: str, first: int, entries: torch.Tensor) -> None:
        """Store compressed entries [n, d] at indices first .. first + n - 1 (first == number stored so far)."""
        ...

    def entries(self, name: str, count: int) -> torch.Tensor:
        """Compressed entries 0 .. count - 1: [count, d]."""
        ...


class SequenceCache(Protocol):
    def layer(self, layer_id: int) -> LayerKV: ...


class DenseLayerKV:
    def __init__(self, config: ModelConfig, layer_id: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.window_size = config.sliding_window
        self.ring = torch.zeros(self.window_size, config.head_dim, dtype=dtype, device=device)
        self.geometry = compressors_of_layer(config, layer_id)
        self.states = {name: CompressorState.fresh(g, device) for name, g in self.geometry.items()}
        self.store = {name: torch.zeros(max_len // g.ratio, g.head_dim, dtype=dtype, device=device)
                      for name, g in self.geometry.items()}
        self.count = dict.fromkeys(self.geometry, 0)

    def window(self, start: int) -> torch.Tensor:
        positions = torch.arange(max(0, start - self.window_size + 1), start)
        return self.ring[positions % self.window_size]

    def write_window(self, start: int, kv: torch.Tensor) -> None:
        n = kv.shape[0]
        keep = min(n, self.window_size)
        positions = torch.arange(start + n - keep, start + n)
        self.ring[positions % self.window_size] = kv[n - keep:].to(self.ring.dtype)

    def compressor_state(self, name: str) -> CompressorState:
        return self.states[name]

    def append_entries(self, name: str, first: int, entries: torch.Tensor) -> None:
        store = self.store[name]
        if first != self.count[name]:
            raise AssertionError(f"compressor {name}: appending at {first}, but {self.count[name]} entries stored")
        if first + entries.shape[0] > store.shape[0]:
            raise ValueError(f"sequence exceeds the cache's max_len ({store.shape[0]} {name} entries)")
        store[first:first + entries.shape[0]] = entries.to(store.dtype)
        self.count[name] = first + entries.shape[0]

    def entries(self, name: str, count: int) -> torch.Tensor:
        return self.store[name][:count]


class DenseSequenceCache:
    """Per-sequence state of every attention layer (including MTP blocks), fresh at construction."""

    def __init__(self, config: ModelConfig, max_len: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.max_len = max_len
        self.layers = [DenseLayerKV(config, i, max_len, dtype, device) for i in range(config.num_layers_with_mtp)]

    def layer(self, layer_id: int) -> DenseLayerKV:
        return self.layers[layer_id]

"""Where a request's hash-routed tokens will go, under an expert map (`dsv4.wire.placement.ExpertPlacement`).

The first MoE layers route by token id (`tid2eid`), so their destinations are known as soon as a prompt is
tokenized: `HashAffinity` turns a prompt into the fraction of its hash-layer (token, expert) pairs each worker
owns, which placement uses to keep tokens near their experts.
Tables are read with safetensors' numpy API: the coordinator never imports torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors import safe_open

from dsv4.wire.placement import ExpertPlacement


class HashAffinity:
    """Per prompt, the share of its hash-layer (token, expert) pairs that each worker's experts would serve."""

    def __init__(self, tables: Sequence[np.ndarray], placement: ExpertPlacement):
        owner = np.asarray(placement.owner)
        self.num_workers = placement.num_workers
        # token id -> [layers x k] owning ranks, flattened: a prompt's destinations by one fancy index
        self.token_ranks = np.concatenate([owner[t] for t in tables], axis=1) if tables else None

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path, num_hash_layers: int, placement: ExpertPlacement
                        ) -> HashAffinity:
        return cls(read_hash_tables(model_dir, num_hash_layers), placement)

    def __call__(self, token_ids: Sequence[int]) -> list[float]:
        if self.token_ranks is None or not token_ids:
            return [0.0] * self.num_workers
        ranks = self.token_ranks[np.asarray(token_ids)].ravel()
        return (np.bincount(ranks, minlength=self.num_workers) / ranks.size).tolist()


def read_hash_tables(model_dir: str | Path, num_hash_layers: int) -> list[np.ndarray]:
    """`layers.{i}.ffn.gate.tid2eid` for the hash-routed layers, as numpy [vocab, k] arrays."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    names = [f"layers.{i}.ffn.gate.tid2eid" for i in range(num_hash_layers)]
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {n: model_dir / weight_map[n] for n in names}
    else:
        files = {}
        for shard in sorted(model_dir.glob("*.safetensors")):
            with safe_open(str(shard), framework="np") as f:
                files.update({n: shard for n in names if n in f.keys()})
    tables = []
    for name in names:
        with safe_open(str(files[name]), framework="np") as f:
            tables.append(f.get_tensor(name))
    return tables

"""Shared fixtures: synthetic checkpoints written once per session, and GPU-tier skipping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsv4.model.checkpoint import load_model
from dsv4.model.config import preset
from dsv4.model.synthetic import write_checkpoint


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multigpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two or more CUDA GPUs"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset, seed 0, in several shards (so sharded loading is exercised)."""
    return write_checkpoint(preset("tiny"), tmp_path_factory.mktemp("tiny"), seed=0, shard_bytes=1 << 20,
                            progress=None)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(tiny_checkpoint, progress=None)

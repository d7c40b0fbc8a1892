"""Shared fixtures: synthetic checkpoints written once per session, GPU-tier skipping, and Triton's interpreter for
the fast kernels on machines without a GPU."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from dsv4.model.checkpoint import load_model
from dsv4.model.config import preset
from dsv4.model.synthetic import write_checkpoint

# Without a GPU the fast path's Triton kernels run in Triton's CPU interpreter (chosen before any kernel module is
# imported: the fast ops import theirs on first use), with the simulator fixes of tests/triton_interpreter.py.
sys.path.insert(0, str(Path(__file__).parent))     # helpers shared by the test tiers (numerics_compare, ...)
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    import triton_interpreter

    triton_interpreter.patch()


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "triton" in item.keywords and not HAS_TRITON:
            item.add_marker(pytest.mark.skip(reason="needs the triton package (Linux x86-64)"))
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


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster for the session. Logical CPUs beyond the machine's let several small engines coexist."""
    import ray

    ray.init(num_cpus=8, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def start_test_engine(checkpoint, **overrides):
    from dsv4.cluster.cli import start_engine
    from dsv4.wire.config import SchedulerConfig, ServeConfig

    settings = dict(num_workers=2, device="cpu", max_model_len=512, kv_cache_bytes=64 << 20,
                    scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=256, max_prefill_chunk=128))
    config = ServeConfig(model_dir=str(checkpoint), **{**settings, **overrides})
    return start_engine(config)


@pytest.fixture(scope="session")
def ray_service(ray_cluster, tiny_checkpoint):
    """THE engine of the service and API tests: 2 CPU worker actors holding half of the experts each (expert
    parallel over gloo), the coordinator actor, on the tiny checkpoint."""
    return start_test_engine(tiny_checkpoint)

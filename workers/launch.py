"""Start the workers on Ray: one worker actor per GPU (or CPU process) in a placement group, their process group
from a rank map (rank 0 picks a free port, no hard-coded ports), each loaded with its shard of the experts.

The engine is these workers plus the coordinator actor that drives them; `dsv4.cluster.cli.start_engine` (the
composition root) starts one after the other, since `workers` and `cluster` never import each other. Used by
`dsv4 serve` and `dsv4 batch` (and so by `ray job submit ... -- dsv4 serve`): with RAY_ADDRESS set it joins that
cluster, otherwise it starts a local one in-process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from dsv4.model.config import ModelConfig, preset
from dsv4.wire.config import ServeConfig
from dsv4.wire.messages import WorkerInfo
from dsv4.wire.model_info import ModelInfo
from dsv4.wire.placement import ExpertPlacement
from dsv4.workers.model_info import model_info
from dsv4.workers.worker import Worker

PLACEMENT_TIMEOUT_S = 600


def default_model_dir() -> Path:
    """Where `dsv4 serve` keeps the tiny default model ($DSV4_HOME, default ~/.cache/dsv4)."""
    home = Path(os.environ.get("DSV4_HOME", Path.home() / ".cache" / "dsv4"))
    return home / "models" / "tiny-seed0"


def ensure_default_model() -> Path:
    """The tiny DeepSeek-V4 model in the real checkpoint format, written on first use."""
    from dsv4.model.synthetic import write_checkpoint

    path = default_model_dir()
    if not (path / "model.safetensors.index.json").exists():
        print(f"creating the default tiny DeepSeek-V4 checkpoint in {path}", file=sys.stderr, flush=True)
        tmp = path.with_name(path.name + ".partial")
        write_checkpoint(preset("tiny"), tmp, seed=0)
        tmp.replace(path)
    return path


def init_ray(num_workers: int) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], logging_level="WARNING")
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, num_workers + 1), include_dashboard=False,
                 logging_level="WARNING")


def available_gpus() -> int:
    """GPUs the workers can use: the Ray cluster's when joining one (its head may have none), else this
    machine's."""
    if os.environ.get("RAY_ADDRESS"):
        init_ray(0)
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass
class WorkerGroup:
    """Loaded, wired workers: everything the coordinator is started with, besides the serving config."""

    actors: list[ray.actor.ActorHandle]     # by rank
    infos: list[WorkerInfo]                 # by rank: each worker's cache geometry and experts
    info: ModelInfo
    placement: ExpertPlacement
    num_hash_layers: int                    # the hash-routed MoE layers, for the coordinator's HashAffinity
    placement_group: PlacementGroup         # the workers' reserved resources (removed when the engine stops)


def start_workers(config: ServeConfig) -> WorkerGroup:
    """Workers loaded and wired into one process group. Raises with a clear message if resources are missing."""
    model = ModelConfig.from_file(Path(config.model_dir) / "config.json")
    init_ray(config.num_workers)
    placement = ExpertPlacement.contiguous(model.n_routed_experts, config.num_workers)
    bundle = {"CPU": 1, "GPU": 1} if config.device == "cuda" else {"CPU": 1}
    group = placement_group([bundle] * config.num_workers, strategy="PACK")
    ready, _ = ray.wait([group.ready()], timeout=PLACEMENT_TIMEOUT_S)
    if not ready:
        raise RuntimeError(f"the Ray cluster cannot place {config.num_workers} workers with {bundle} each "
                           f"(available: {ray.available_resources()})")
    actor = ray.remote(Worker)
    workers = [actor.options(num_cpus=1, num_gpus=1 if config.device == "cuda" else 0,
                             scheduling_strategy=PlacementGroupSchedulingStrategy(group, rank)
                             ).remote(rank, config.num_workers, config, placement.owner)
               for rank in range(config.num_workers)]
    host, port = ray.get(workers[0].rendezvous_address.remote())
    ray.get([w.init_distributed.remote(host, port) for w in workers])
    infos = ray.get([w.load.remote() for w in workers])
    return WorkerGroup(workers, infos, model_info(config, model, infos), placement, model.num_hash_layers, group)

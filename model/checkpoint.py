"""Load DeepSeek-V4 checkpoints in the official release layout (spec §7), or with transformers' tensor names.

- Sharded safetensors with `model.safetensors.index.json`, or any `*.safetensors` in the directory.
- Tensors are read one at a time through `safe_open` (memory-mapped): only the tensors the model instance holds
  are touched, so a rank holding a subset of the routed experts never reads the others.
- Every tensor is checked against the model's own buffers (name, shape, dtype); a missing, misshapen or
  mistyped tensor, a tensor holding NaN or Inf, or a corrupt file, raises `CheckpointError` naming the file and
  the tensor.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dsv4.kernels import quant
from dsv4.model.checkpoint_names import merged_experts_kind, split_merged_experts, to_official_name
from dsv4.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
# A checkpoint directory whose weights are generated on the device at load (`dsv4 checkpoint --weights on-load`):
# config, tokenizer and hash-routing tables on disk, the seed in this file. For models larger than the disk.
GENERATED_WEIGHTS_FILE = "generated-weights.json"
log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file and tensor at fault."""


@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    tensors_read: list[str] = field(default_factory=list)    # official names, in read order
    bytes_read: int = 0
    seconds: float = 0.0


Progress = Callable[[str], None]


def print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name (as stored) -> file, from the index if there is one, else from every shard's header."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.exists():
                raise CheckpointError(f"{index} lists {file.name}, which does not exist")
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{path}: no {INDEX_FILE} and no *.safetensors files")
    files = {}
    for shard in shards:
        with _open(shard) as handle:
            files.update(dict.fromkeys(handle.keys(), shard))
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def _convert(name: str, file: Path, tensor: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Checkpoint tensor -> the model buffer's dtype, where that is lossless; else a CheckpointError."""
    if tuple(tensor.shape) != tuple(expected.shape):
        raise CheckpointError(f"{file.name}: tensor {name} has shape {list(tensor.shape)}, "
                              f"expected {list(expected.shape)}")
    if tensor.dtype == expected.dtype:
        return tensor
    if expected.dtype == torch.float8_e8m0fnu and tensor.dtype == torch.float32:
        # -Base checkpoints store their (power-of-two) scales as F32.
        codes = quant.ue8m0_codes(tensor)
        if not torch.equal(quant.ue8m0_values(codes), tensor):
            raise CheckpointError(f"{file.name}: tensor {name} holds F32 scales that are not powers of two")
        return codes.view(torch.float8_e8m0fnu)
    if expected.dtype == torch.int64 and tensor.dtype in (torch.int32, torch.int16):
        return tensor.to(torch.int64)
    if expected.dtype in (torch.float32, torch.bfloat16) and tensor.dtype in (torch.float32, torch.bfloat16):
        if expected.dtype == torch.bfloat16 and not torch.equal(tensor.to(torch.bfloat16).float(), tensor.float()):
            raise CheckpointError(f"{file.name}: tensor {name} is {tensor.dtype} and not exactly representable in "
                                  f"the expected {expected.dtype}")
        return tensor.to(expected.dtype)
    raise CheckpointError(f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected {expected.dtype}")


def _check_finite(name: str, file: Path, tensor: torch.Tensor) -> torch.Tensor:
    """tensor, if it holds no NaN or Inf (float formats; FP8 e4m3fn's NaN bytes are 0x7F / 0xFF, UE8M0's 0xFF;
    packed FP4 has none); else a CheckpointError naming it. One reduction on the tensor's device."""
    if tensor.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        bad = ~torch.isfinite(tensor)
    elif tensor.dtype == torch.float8_e4m3fn:
        bad = (tensor.view(torch.uint8) & 0x7F) == 0x7F
    elif tensor.dtype == torch.float8_e8m0fnu:
        bad = tensor.view(torch.uint8) == 0xFF
    else:
        return tensor
    count = int(bad.sum())
    if count:
        raise CheckpointError(f"{file.name}: tensor {name} holds {count} NaN or Inf values")
    return tensor


def load_checkpoint(model: torch.nn.Module, path: str | Path, progress: Progress | None = print_progress,
                    device: torch.device | str = "cpu") -> LoadReport:
    """Fill every buffer of `model` (a `Transformer`, possibly holding a subset of experts, possibly built on the
    meta device) from `path`, placing the tensors on `device`."""
    start = time.monotonic()
    path = Path(path)
    files = checkpoint_files(path)
    expected = model.state_dict()
    official = {to_official_name(name): name for name in files}
    report = LoadReport()
    loaded: dict[str, torch.Tensor] = {}
    plan = _read_plan(expected, official, files)
    total = len(plan)
    for i, (file, stored_names) in enumerate(sorted(plan.items(), key=lambda kv: kv[0].name)):
        report.files.append(file.name)
        with _open(file) as handle:
            for stored in stored_names:
                try:
                    tensor = handle.get_tensor(stored)
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise CheckpointError(f"{file.name}: cannot read tensor {stored} ({e})") from None
                report.bytes_read += tensor.numel() * tensor.element_size()
                name = to_official_name(stored)
                report.tensors_read.append(name)
                for key, value in _place(name, file, tensor, expected).items():
                    loaded[key] = _check_finite(key, file, value.to(device))
        if progress:
            progress(f"loading weights: {i + 1}/{total} files, {report.bytes_read / 2**30:.2f} GiB "
                     f"({file.name})")
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensors missing, e.g. {missing[:5]}")
    model.load_state_dict(loaded, strict=True, assign=True)
    report.seconds = time.monotonic() - start
    return report


def _read_plan(expected: dict[str, torch.Tensor], official: dict[str, str], files: dict[str, Path]
               ) -> dict[Path, list[str]]:
    """Which stored tensors to read, grouped by file: exactly those the model holds (plus merged expert
    tensors that contain held experts)."""
    plan: dict[Path, list[str]] = {}
    for name, stored in official.items():
        merged = merged_experts_kind(name)
        wanted = name in expected or (merged is not None and any(k.startswith(merged[0] + ".") for k in expected))
        if wanted:
            plan.setdefault(files[stored], []).append(stored)
    missing = [n for n in expected if n not in official and not _covered_by_merged(n, official)]
    if missing:
        raise CheckpointError(f"checkpoint lacks {len(missing)} tensors the model needs, e.g. "
                              f"{sorted(missing)[:5]}")
    return plan


def _covered_by_merged(name: str, official: dict[str, str]) -> bool:
    parts = name.split(".")
    if len(parts) < 6 or parts[2:4] != ["ffn", "experts"]:
        return False
    kind = "down_proj" if parts[5] == "w2" else "gate_up_proj"
    return ".".join(parts[:4] + [kind]) in official


def _place(name: str, file: Path, tensor: torch.Tensor, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    merged = merged_experts_kind(name)
    if merged is None:
        return {name: _convert(name, file, tensor, expected[name])}
    held = sorted({int(k.split(".")[4]) for k in expected if k.startswith(merged[0] + ".")})
    parts = split_merged_experts(merged[0], merged[1], tensor, held)
    return {k: _convert(k, file, v, expected[k]) for k, v in parts.items() if k in expected}


def generated_weights_seed(path: str | Path) -> int | None:
    """The seed of a checkpoint whose weights are generated at load, None for one whose weights are files."""
    marker = Path(path) / GENERATED_WEIGHTS_FILE
    if not marker.exists():
        return None
    try:
        seed = json.loads(marker.read_text())["seed"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{marker}: expected {{\"seed\": <int>}} ({e})") from None
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise CheckpointError(f"{marker}: seed must be an integer, got {seed!r}")
    return seed


def load_model(path: str | Path, expert_ids: list[int] | None = None, progress: Progress | None = print_progress,
               device: torch.device | str = "cpu"):
    """Build a `Transformer` from `path/config.json` and load its weights (only `expert_ids` of the experts)."""
    from dsv4.model.transformer import Transformer

    if not Path(path).is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    config = ModelConfig.from_file(Path(path) / "config.json")
    seed = generated_weights_seed(path)
    if seed is not None:
        from dsv4.model.synthetic import synthetic_model

        log.warning("%s: weights generated on %s from seed %d (a synthetic checkpoint)", path, device, seed)
        return synthetic_model(config, device, seed, expert_ids, progress)
    if config.num_nextn_predict_layers and not any(to_official_name(n).startswith("mtp.")
                                                   for n in checkpoint_files(Path(path))):
        # transformers drops the MTP block when it converts a checkpoint; serve without it.
        log.warning("%s has no mtp.* tensors: loading without the MTP block", path)
        config = config.replace(num_nextn_predict_layers=0,
                                compress_ratios=config.compress_ratios[: config.num_hidden_layers])
    with torch.device("meta"):   # no memory until each tensor arrives from the checkpoint
        model = Transformer(config, expert_ids)
    load_checkpoint(model, path, progress, device)
    return model.to(device)      # the derived (non-persistent) RoPE tables were built on the CPU

"""Write synthetic DeepSeek-V4 checkpoints in exactly the official layout (spec §7), for any config and seed.

The tensor list comes from the model itself (built on the meta device, so nothing is allocated): names, shapes
and dtypes cannot drift from what the loader expects. Random weights are drawn at scales that keep activations
O(1) through the network, then genuinely quantized: FP8 e4m3 with UE8M0 128x128 scales, FP4 e2m1 experts packed
two per byte (low nibble first) with UE8M0 1x32 scales. Each tensor's values depend only on (seed, name), so
shard boundaries do not change them. Shards are written one at a time: memory stays bounded by the shard size.

`synthetic_model` builds the same kind of model directly in a device's memory, without a checkpoint (a V4-Flash
checkpoint is ~150 GB): the same initialisers and quantizers, drawn from device generators (so the values differ
from the CPU writer's, their statistics do not). The hash-routing tables are drawn on the CPU everywhere, so
`write_generated_checkpoint` can store them (the coordinator's placement reads them) exactly as every device
builds them: a directory `load_model` serves with weights generated at load.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from dsv4.kernels import quant
from dsv4.model.checkpoint import GENERATED_WEIGHTS_FILE, INDEX_FILE, Progress, print_progress
from dsv4.model.config import ModelConfig
from dsv4.model.tokenizer_file import write_tokenizer_files

DEFAULT_SHARD_BYTES = 4 << 30


def _generator(seed: int, name: str, device: torch.device | str = "cpu") -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _normal(shape: tuple[int, ...], std: float, g: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32, device=g.device) * std + mean


def _random_value(name: str, spec: torch.Tensor, config: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """fp32 (or int64) values for one tensor, scaled by what the tensor does."""
    shape, leaf = tuple(spec.shape), name.rsplit(".", 1)[-1]
    if leaf == "tid2eid":   # each token's k hash-routed experts: distinct, uniformly spread
        return torch.rand(shape[0], config.n_routed_experts, generator=g, device=g.device).argsort(dim=1)[:, :shape[1]]
    if name.endswith("norm.weight"):
        return _normal(shape, 0.1, g, mean=1.0)
    if leaf.endswith("_fn"):             # mHC mixes of an RMS-normalised [hc*D] input: O(0.5) logits
        return _normal(shape, 0.5 / math.sqrt(shape[1]), g)
    if leaf.endswith("_base"):
        return _normal(shape, 0.5, g)
    if leaf.endswith("_scale"):
        return _normal(shape, 0.1, g, mean=1.0)
    if leaf in ("attn_sink", "ape"):
        return _normal(shape, 1.0 if leaf == "attn_sink" else 0.5, g)
    if leaf == "bias":                  # router correction bias: selection only
        return _normal(shape, 0.1, g)
    if name == "embed.weight":
        return _normal(shape, 1.0, g)
    if leaf == "weight" and len(shape) == 2:   # a linear [out, in]: unit-variance outputs for unit inputs
        return _normal(shape, 1.0 / math.sqrt(shape[1]), g)
    raise ValueError(f"no synthetic initialiser for tensor {name} {list(shape)}")


def synthetic_tensors(config: ModelConfig, seed: int, expert_ids: list[int] | None = None,
                      device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) in the official layout and dtypes, in state-dict order (only the held experts' when
    `expert_ids` is given), generated on `device`."""
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        schema = Transformer(config, expert_ids).state_dict()
    for name, spec in schema.items():
        if name.endswith(".scale") and name[:-len(".scale")] + ".weight" in schema:
            continue   # emitted together with its weight
        # hash tables from a CPU generator: the same values on every device (see `write_generated_checkpoint`)
        g = _generator(seed, name, "cpu" if name.endswith(".tid2eid") else device)
        if spec.dtype == torch.float8_e4m3fn:
            width = spec.shape[1]
            yield from zip((name, name[:-len("weight")] + "scale"),
                           quant.quantize_weight_fp8(_normal(tuple(spec.shape), 1 / math.sqrt(width), g)), strict=True)
        elif spec.dtype == torch.int8:    # FP4 packed: logical width is twice the stored one
            width = 2 * spec.shape[1]
            w = _normal((spec.shape[0], width), 1 / math.sqrt(width), g)
            yield from zip((name, name[:-len("weight")] + "scale"), quant.quantize_weight_fp4(w), strict=True)
        else:
            yield name, _random_value(name, spec, config, g).to(device=device, dtype=spec.dtype)


def synthetic_model(config: ModelConfig, device: torch.device | str, seed: int = 0,
                    expert_ids: list[int] | None = None, progress: Progress | None = print_progress):
    """A `Transformer` with synthetic weights in the checkpoint formats, generated directly on `device`."""
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(config, expert_ids)
    state, total, last = {}, 0, 0
    for name, tensor in synthetic_tensors(config, seed, expert_ids, device):
        state[name] = tensor
        total += tensor.numel() * tensor.element_size()
        if progress and total - last >= 4 << 30:
            progress(f"synthetic weights: {total / 2**30:.1f} GiB on {device}")
            last = total
    model.load_state_dict(state, strict=True, assign=True)
    if progress:
        progress(f"synthetic weights: {total / 2**30:.1f} GiB on {device}, done")
    return model.to(device)      # the derived (non-persistent) tables were built on the CPU


def write_checkpoint(config: ModelConfig, out_dir: str | Path, seed: int = 0,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, progress: Progress | None = print_progress) -> Path:
    """Write config.json, generation_config.json, tokenizer files and sharded safetensors + index to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model-*.safetensors"):
        stale.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    written: list[tuple[Path, list[str]]] = []
    size = total = 0

    def flush() -> None:
        nonlocal size
        if shards[-1]:
            tmp = out / f"shard-{len(written):05d}.tmp"
            save_file(shards[-1], str(tmp), metadata={"format": "pt"})
            written.append((tmp, list(shards[-1])))
            if progress:
                progress(f"writing checkpoint: shard {len(written)}, {total / 2**30:.2f} GiB so far")
        shards[-1], size = {}, 0

    for name, tensor in synthetic_tensors(config, seed):
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > shard_bytes:
            flush()
        shards[-1][name] = tensor.contiguous()
        size, total = size + nbytes, total + nbytes
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written):
        final = out / f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        tmp.rename(final)
        weight_map.update(dict.fromkeys(names, final.name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    _write_model_files(config, out)
    return out


def write_generated_checkpoint(config: ModelConfig, out_dir: str | Path, seed: int = 0) -> Path:
    """A checkpoint directory without weight files: config, tokenizer, the hash-routing tables (what the
    coordinator reads) and the seed; `load_model` generates the weights on the device it loads to."""
    from dsv4.model.transformer import Transformer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    with torch.device("meta"):
        schema = Transformer(config, []).state_dict()
    names = [f"layers.{i}.ffn.gate.tid2eid" for i in range(config.num_hash_layers)]
    tables = {n: _random_value(n, schema[n], config, _generator(seed, n)).to(schema[n].dtype).contiguous()
              for n in names}
    if tables:
        save_file(tables, str(out / "hash-tables.safetensors"), metadata={"format": "pt"})
    (out / GENERATED_WEIGHTS_FILE).write_text(json.dumps({"seed": seed}) + "\n")
    _write_model_files(config, out)
    return out


def _write_model_files(config: ModelConfig, out: Path) -> None:
    """config.json, generation_config.json and the tokenizer files."""
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id, "do_sample": True,
                  "temperature": 1.0, "top_p": 1.0}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_tokenizer_files(out, config.vocab_size, config.max_position_embeddings)

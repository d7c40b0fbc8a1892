"""DeepSeek-V4 model configuration: the `config.json` of a checkpoint, typed and validated (spec §1).

Field names are the checkpoint's `config.json` keys. `ModelConfig.from_dict` also reads configs written by
`transformers` (`layer_types`, `compress_rates`, `mlp_layer_types`, `rope_parameters`, `partial_rotary_factor`)
and folds them back into these keys. Every inconsistency raises `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CSA_RATIO = 4            # compressed sparse attention: overlapping windows of 4, lightning indexer
KV_QUANT_BLOCK = 64      # FP8 KV simulation block over the non-rope dims
ACT_QUANT_BLOCK = 128    # per-token activation quantization block of FP8/FP4 linears


class ConfigError(ValueError):
    """An invalid or inconsistent model config; `key` names the config.json key at fault."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """YaRN parameters (`rope_scaling` in config.json); applied only to layers with a compressor."""

    factor: float = 16.0
    original_max_position_embeddings: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    type: str = "yarn"


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    """`quantization_config`: FP8 e4m3 weights with UE8M0 128x128 block scales and dynamic activation scales."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    scale_fmt: str = "ue8m0"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    num_hash_layers: int
    routed_scaling_factor: float
    swiglu_limit: float
    sliding_window: int
    compress_ratios: tuple[int, ...]   # one per main layer, then one per MTP block
    compress_rope_theta: float
    rope_theta: float
    max_position_embeddings: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    quantization_config: QuantizationConfig | None = field(default_factory=QuantizationConfig)
    expert_dtype: str | None = "fp4"   # "fp4" (instruct), "fp8" (-Base), None = same as the other weights
    num_key_value_heads: int = 1
    n_shared_experts: int = 1
    scoring_func: str = "sqrtsoftplus"
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek_v4"

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------------------------------ derived facts
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    def compress_ratio(self, layer_id: int) -> int:
        """0 = sliding window only (SWA), 4 = CSA, >4 = HCA. Layer ids >= num_hidden_layers are MTP blocks."""
        return self.compress_ratios[layer_id]

    def is_hash_layer(self, layer_id: int) -> bool:
        return layer_id < self.num_hash_layers

    @property
    def weights_quantized(self) -> bool:
        return self.quantization_config is not None

    @property
    def experts_format(self) -> str:
        """Storage format of routed experts: "fp4", "fp8" or "bf16"."""
        if self.expert_dtype is not None:
            return self.expert_dtype
        return "fp8" if self.weights_quantized else "bf16"

    # ------------------------------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        raw = _fold_transformers_keys(dict(raw))
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in raw:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f.name, "missing (required)")
                continue
            kwargs[f.name] = _coerce(f.name, raw[f.name])
        return cls(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"model config not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError("<file>", f"{path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError("<file>", f"{path} must hold a JSON object")
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint `config.json`, with the keys `transformers` needs to load it too."""
        out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"]}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
                if "weight_block_size" in value:
                    value["weight_block_size"] = list(value["weight_block_size"])
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        out["max_position_embeddings"] = self.max_position_embeddings
        # transformers maps compress_ratios through a fixed {0, 4, 128} table; an explicit layer_types and
        # compress_rates keep it loading configs whose HCA ratio is not 128.
        hca = sorted({r for r in self.compress_ratios[: self.num_hidden_layers] if r > CSA_RATIO}) or [128]
        out["layer_types"] = [_LAYER_TYPE[min(r, 5)] for r in self.compress_ratios[: self.num_hidden_layers]]
        out["compress_rates"] = {"compressed_sparse_attention": CSA_RATIO, "heavily_compressed_attention": hca[0]}
        return out

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention", 5: "heavily_compressed_attention"}


def _coerce(key: str, value: Any) -> Any:
    """JSON value -> field value, with a ConfigError naming the key when the type is wrong."""
    if key == "rope_scaling":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be an object or null, got {value!r}")
        kind = value.get("type", value.get("rope_type", "yarn"))
        known = {f.name for f in dataclasses.fields(RopeScaling)}
        return RopeScaling(**{k: v for k, v in value.items() if k in known and k != "type"}, type=kind)
    if key == "quantization_config":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be an object or null, got {value!r}")
        known = {f.name for f in dataclasses.fields(QuantizationConfig)}
        kwargs = {k: v for k, v in value.items() if k in known}
        if "weight_block_size" in kwargs:
            kwargs["weight_block_size"] = tuple(kwargs["weight_block_size"])
        return QuantizationConfig(**kwargs)
    if key == "compress_ratios":
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) for v in value):
            raise ConfigError(key, f"must be a list of integers, got {value!r}")
        return tuple(value)
    if key == "eos_token_id" and isinstance(value, list):
        if not value:
            raise ConfigError(key, "must not be an empty list")
        return int(value[0])
    return value


def _fold_transformers_keys(raw: dict[str, Any]) -> dict[str, Any]:
    """Accept a config saved by transformers' DeepseekV4Config, whose __post_init__ renames several keys."""
    n = raw.get("num_hidden_layers")
    if "compress_ratios" not in raw and "layer_types" in raw and isinstance(n, int):
        rates = raw.get("compress_rates") or {}
        table = {"sliding_attention": 0,
                 "compressed_sparse_attention": rates.get("compressed_sparse_attention", CSA_RATIO),
                 "heavily_compressed_attention": rates.get("heavily_compressed_attention", 128)}
        try:
            ratios = [table[t] for t in raw["layer_types"]]
        except (KeyError, TypeError):
            raise ConfigError("layer_types", f"unknown layer type in {raw['layer_types']!r}") from None
        raw["compress_ratios"] = ratios + [0] * int(raw.get("num_nextn_predict_layers", 1))
    if "num_hash_layers" not in raw and isinstance(raw.get("mlp_layer_types"), list):
        raw["num_hash_layers"] = sum(1 for t in raw["mlp_layer_types"] if t == "hash_moe")
    if "qk_rope_head_dim" not in raw and "partial_rotary_factor" in raw and "head_dim" in raw:
        raw["qk_rope_head_dim"] = int(round(raw["head_dim"] * raw["partial_rotary_factor"]))
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("compress"), dict):
        compress = params["compress"]
        raw.setdefault("compress_rope_theta", compress.get("rope_theta"))
        if isinstance(params.get("main"), dict):
            raw.setdefault("rope_theta", params["main"].get("rope_theta"))
        if "rope_scaling" not in raw and compress.get("rope_type") == "yarn":
            raw["rope_scaling"] = {k: compress[k] for k in
                                   ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")
                                   if k in compress}
    quant = raw.get("quantization_config")
    if isinstance(quant, dict) and "expert_dtype" not in raw and "expert_dtype" in quant:
        raw["expert_dtype"] = quant["expert_dtype"]
    return raw


# ---------------------------------------------------------------------------------------------- validation
def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _validate(c: ModelConfig) -> None:
    ints = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
            "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
            "num_experts_per_tok", "moe_intermediate_size", "sliding_window", "max_position_embeddings",
            "index_n_heads", "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters")
    for key in ints:
        value = getattr(c, key)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, key,
                 f"must be a positive integer, got {value!r}")
    for key in ("num_hash_layers", "num_nextn_predict_layers", "bos_token_id", "eos_token_id"):
        value = getattr(c, key)
        _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, key,
                 f"must be a non-negative integer, got {value!r}")
    for key in ("routed_scaling_factor", "swiglu_limit", "compress_rope_theta", "rope_theta", "hc_eps",
                "rms_norm_eps"):
        value = getattr(c, key)
        _require(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                 and value > 0, key, f"must be a positive number, got {value!r}")

    # Fixed by the architecture (spec §1.1): anything else is a different model.
    fixed = {"num_key_value_heads": 1, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
             "topk_method": "noaux_tc", "norm_topk_prob": True, "hidden_act": "silu", "attention_bias": False,
             "tie_word_embeddings": False, "model_type": "deepseek_v4"}
    for key, expected in fixed.items():
        _require(getattr(c, key) == expected, key,
                 f"DeepSeek-V4 requires {expected!r}, got {getattr(c, key)!r}")

    _require(c.bos_token_id < c.vocab_size, "bos_token_id", f"{c.bos_token_id} is outside the vocabulary")
    _require(c.eos_token_id < c.vocab_size, "eos_token_id", f"{c.eos_token_id} is outside the vocabulary")
    _require(c.qk_rope_head_dim % 2 == 0 and c.qk_rope_head_dim < c.head_dim, "qk_rope_head_dim",
             f"must be even and smaller than head_dim={c.head_dim}, got {c.qk_rope_head_dim}")
    _require(c.nope_head_dim % KV_QUANT_BLOCK == 0, "head_dim",
             f"head_dim - qk_rope_head_dim = {c.nope_head_dim} must be a multiple of {KV_QUANT_BLOCK} "
             "(FP8 KV blocks)")
    _require(c.num_attention_heads % c.o_groups == 0, "o_groups",
             f"num_attention_heads={c.num_attention_heads} must be divisible by o_groups={c.o_groups}")
    _require(c.num_experts_per_tok <= c.n_routed_experts, "num_experts_per_tok",
             f"{c.num_experts_per_tok} exceeds n_routed_experts={c.n_routed_experts}")
    _require(c.num_hash_layers <= c.num_hidden_layers, "num_hash_layers",
             f"{c.num_hash_layers} exceeds num_hidden_layers={c.num_hidden_layers}")
    _require(c.max_position_embeddings >= c.sliding_window, "max_position_embeddings",
             f"must be at least sliding_window={c.sliding_window}")
    _require(_is_pow2(c.index_head_dim) and c.index_head_dim >= max(32, c.qk_rope_head_dim), "index_head_dim",
             f"must be a power of two >= max(32, qk_rope_head_dim) (Hadamard, MXFP4 blocks), got {c.index_head_dim}")

    _require(len(c.compress_ratios) == c.num_layers_with_mtp, "compress_ratios",
             f"has {len(c.compress_ratios)} entries, expected num_hidden_layers + num_nextn_predict_layers = "
             f"{c.num_layers_with_mtp}")
    for i, ratio in enumerate(c.compress_ratios):
        _require(ratio in (0, CSA_RATIO) or (ratio > CSA_RATIO and _is_pow2(ratio)), "compress_ratios",
                 f"entry {i} is {ratio}; allowed: 0 (sliding window), 4 (CSA) or a power of two > 4 (HCA)")
    for i in range(c.num_hidden_layers, c.num_layers_with_mtp):
        _require(c.compress_ratios[i] == 0, "compress_ratios",
                 f"entry {i} belongs to an MTP block, which is sliding-window only (0), got {c.compress_ratios[i]}")

    if c.rope_scaling is not None:
        rs = c.rope_scaling
        _require(rs.type == "yarn", "rope_scaling", f"only YaRN is supported, got type {rs.type!r}")
        _require(rs.factor >= 1 and rs.original_max_position_embeddings > 0 and rs.beta_fast > rs.beta_slow > 0,
                 "rope_scaling", f"needs factor >= 1, original_max_position_embeddings > 0, "
                                 f"beta_fast > beta_slow > 0; got {rs}")
    if c.quantization_config is not None:
        q = c.quantization_config
        _require(q.quant_method == "fp8" and q.fmt == "e4m3", "quantization_config",
                 f"only fp8 e4m3 is supported, got quant_method={q.quant_method!r} fmt={q.fmt!r}")
        _require(q.scale_fmt == "ue8m0", "quantization_config", f"scale_fmt must be 'ue8m0', got {q.scale_fmt!r}")
        _require(tuple(q.weight_block_size) == (128, 128), "quantization_config",
                 f"weight_block_size must be [128, 128], got {list(q.weight_block_size)}")
        # Per-128 activation quantization needs every quantized linear's input width to be a multiple of 128.
        for key, width in (("hidden_size", c.hidden_size), ("q_lora_rank", c.q_lora_rank),
                           ("moe_intermediate_size", c.moe_intermediate_size),
                           ("o_lora_rank", c.o_groups * c.o_lora_rank)):
            _require(width % ACT_QUANT_BLOCK == 0, key,
                     f"input width {width} of an FP8 linear must be a multiple of {ACT_QUANT_BLOCK}")
    _require(c.expert_dtype in (None, "fp4", "fp8"), "expert_dtype",
             f"must be 'fp4', 'fp8' or null, got {c.expert_dtype!r}")
    if c.experts_format == "fp4":
        _require(c.hidden_size % 32 == 0 and c.moe_intermediate_size % 32 == 0, "moe_intermediate_size",
                 "FP4 experts need hidden_size and moe_intermediate_size to be multiples of 32")


# ---------------------------------------------------------------------------------------------- presets
_FLASH = dict(
    vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
    qk_rope_head_dim=64, q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_routed_experts=256,
    num_experts_per_tok=6, moe_intermediate_size=2048, num_hash_layers=3, routed_scaling_factor=1.5,
    swiglu_limit=10.0, sliding_window=128,
    compress_ratios=(0, 0) + (4, 128) * 20 + (4,) + (0,),
    compress_rope_theta=160000.0, rope_theta=10000.0, max_position_embeddings=1048576,
    index_n_heads=64, index_head_dim=128, index_topk=512,
)
_PRO = dict(
    _FLASH, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, o_groups=16,
    n_routed_experts=384, moe_intermediate_size=3072, routed_scaling_factor=2.5,
    compress_ratios=(128, 128) + (4, 128) * 29 + (4,) + (0,), index_topk=1024,
)
# Small presets keep every feature: SWA, CSA and HCA layers, 3 hash-routed layers, hc_mult 4, YaRN, one MTP
# block, FP8 weights and FP4 experts. "tiny" uses a 128-wide head (64 FP8 + 64 rope dims); "small" the real
# 512-wide head, so its KV entries have the production 584-byte layout.
_TINY = dict(
    vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, head_dim=128,
    qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=64, n_routed_experts=16,
    num_experts_per_tok=6, moe_intermediate_size=128, num_hash_layers=3, routed_scaling_factor=1.5,
    swiglu_limit=10.0, sliding_window=128, compress_ratios=(0, 4, 128, 4, 0),
    compress_rope_theta=160000.0, rope_theta=10000.0, max_position_embeddings=4096,
    index_n_heads=16, index_head_dim=128, index_topk=8,
)
_SMALL = dict(
    _TINY, vocab_size=2048, hidden_size=256, num_hidden_layers=6, num_attention_heads=8, head_dim=512,
    q_lora_rank=256, o_groups=4, o_lora_rank=64, n_routed_experts=32, moe_intermediate_size=256,
    routed_scaling_factor=2.5, compress_ratios=(128, 0, 4, 128, 4, 0, 0), index_n_heads=16, index_topk=16,
    max_position_embeddings=16384,
)
PRESETS: dict[str, dict[str, Any]] = {"v4-flash": _FLASH, "v4-pro": _PRO, "tiny": _TINY, "small": _SMALL}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**PRESETS[name])

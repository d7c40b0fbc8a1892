"""Model config: real key names, presets, transformers-saved configs, and errors that name the key."""

import json

import pytest
from transformers import DeepseekV4Config

from dsv4.model.config import PRESETS, ConfigError, ModelConfig, preset

# DeepSeek-V4-Flash's shipped config.json (HF repo @60d8d70), verbatim keys and values.
FLASH_CONFIG_JSON = {
    "architectures": ["DeepseekV4ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 0, "eos_token_id": 1, "expert_dtype": "fp4", "hc_eps": 1e-06, "hc_mult": 4,
    "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_act": "silu", "hidden_size": 4096, "index_head_dim": 128,
    "index_n_heads": 64, "index_topk": 512, "initializer_range": 0.02, "max_position_embeddings": 1048576,
    "model_type": "deepseek_v4", "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 6, "num_hidden_layers": 43,
    "num_hash_layers": 3, "num_key_value_heads": 1, "num_nextn_predict_layers": 1, "o_groups": 8,
    "o_lora_rank": 1024, "q_lora_rank": 1024, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "tie_word_embeddings": False, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.57.1", "use_cache": True, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_official_flash_config_equals_preset():
    config = ModelConfig.from_dict(FLASH_CONFIG_JSON)
    assert config == preset("v4-flash")
    assert [config.compress_ratio(i) for i in (0, 1, 2, 3, 41, 42, 43)] == [0, 0, 4, 128, 128, 4, 0]
    assert config.is_hash_layer(2) and not config.is_hash_layer(3)
    assert config.experts_format == "fp4"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json_and_transformers(name, tmp_path):
    config = preset(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    assert ModelConfig.from_file(path) == config
    # transformers renames several keys when it saves (layer_types, mlp_layer_types, rope_parameters, ...)
    hf = DeepseekV4Config(**{k: v for k, v in config.to_dict().items() if k != "architectures"})
    assert ModelConfig.from_dict(hf.to_dict()) == config


def test_small_presets_keep_every_feature():
    for name in ("tiny", "small"):
        c = preset(name)
        main = c.compress_ratios[: c.num_hidden_layers]
        assert {0, 4} <= set(main) and any(r > 4 for r in main), name            # SWA, CSA and HCA layers
        assert c.num_hash_layers == 3 and c.num_hidden_layers > 3, name          # hash and score routing
        assert c.hc_mult == 4 and c.rope_scaling is not None and c.num_nextn_predict_layers == 1, name
        assert c.weights_quantized and c.experts_format == "fp4", name


@pytest.mark.parametrize("change, key", [
    ({"compress_ratios": [0, 4, 128, 4]}, "compress_ratios"),
    ({"compress_ratios": [0, 4, 100, 4, 0]}, "compress_ratios"),
    ({"compress_ratios": [0, 4, 128, 4, 4]}, "compress_ratios"),
    ({"hidden_size": 200}, "hidden_size"),
    ({"num_key_value_heads": 2}, "num_key_value_heads"),
    ({"o_groups": 3}, "o_groups"),
    ({"num_experts_per_tok": 17}, "num_experts_per_tok"),
    ({"head_dim": 160}, "head_dim"),
    ({"index_head_dim": 96}, "index_head_dim"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config"),
    ({"expert_dtype": "int4"}, "expert_dtype"),
    ({"vocab_size": -5}, "vocab_size"),
    ({"eos_token_id": 5000}, "eos_token_id"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
])
def test_invalid_configs_name_the_key(change, key):
    raw = {**preset("tiny").to_dict(), **change}
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict(raw)
    assert err.value.key == key and key in str(err.value)


def test_missing_key_is_named():
    raw = preset("tiny").to_dict()
    del raw["index_topk"]
    with pytest.raises(ConfigError, match="index_topk"):
        ModelConfig.from_dict(raw)


def test_unreadable_config_file_is_named(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_file(bad)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ModelConfig.from_file(tmp_path / "nowhere")

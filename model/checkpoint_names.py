"""Tensor names: the official checkpoint layout is canonical; `transformers`' names are mapped onto it.

transformers (`conversion_mapping["deepseek_v4"]`, spec §7.4) renames modules, calls scales `weight_scale_inv`,
prefixes `model.`, and merges routed experts into `experts.gate_up_proj` [E, 2I, D] / `experts.down_proj`
[E, D, I]. `to_official_name` undoes the renames; merged expert tensors are split by `split_merged_experts`.
"""

from __future__ import annotations

import re

import torch

# Applied in order to a transformers name (after stripping "model."). Order matters where patterns overlap.
_HF_TO_OFFICIAL: tuple[tuple[str, str], ...] = (
    (r"^embed_tokens\.weight$", "embed.weight"),
    (r"^lm_head\.weight$", "head.weight"),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.sinks$", ".attn_sink"),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.compressor\.kv_norm\.", ".compressor.norm."),
    (r"\.position_bias$", ".ape"),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.weight_scale_inv$", ".scale"),
)
_MERGED_EXPERTS = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(gate_up_proj|down_proj)$")


def to_official_name(name: str) -> str:
    """A tensor name in either layout -> the official one (official names pass through unchanged)."""
    if name.startswith("model."):
        name = name[len("model."):]
    for pattern, replacement in _HF_TO_OFFICIAL:
        name = re.sub(pattern, replacement, name)
    return name


def merged_experts_kind(official_name: str) -> tuple[str, str] | None:
    """For transformers' merged expert tensors: (module prefix, "gate_up_proj" | "down_proj"), else None."""
    match = _MERGED_EXPERTS.match(official_name)
    return (match.group(1), match.group(2)) if match else None


def split_merged_experts(prefix: str, kind: str, tensor: torch.Tensor, expert_ids: list[int]
                         ) -> dict[str, torch.Tensor]:
    """Merged [E, ...] expert tensor -> official per-expert weights for `expert_ids` (w1 then w3 in gate_up)."""
    out = {}
    for e in expert_ids:
        if kind == "gate_up_proj":
            w1, w3 = tensor[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.w1.weight"], out[f"{prefix}.{e}.w3.weight"] = w1, w3
        else:
            out[f"{prefix}.{e}.w2.weight"] = tensor[e]
    return out

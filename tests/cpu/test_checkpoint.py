"""Checkpoints: the official layout on disk, lazy subset loading, transformers names, and clear errors."""

import json
import re
import shutil
import struct
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv4.kernels import quant
from dsv4.model.checkpoint import INDEX_FILE, CheckpointError, load_model
from dsv4.model.config import preset
from dsv4.model.generate import forward_logits
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import write_checkpoint


def header(path):
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n])


def all_headers(ckpt):
    out = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        out.update({k: v for k, v in header(shard).items() if k != "__metadata__"})
    return out


def test_layout_matches_the_official_release(tiny_checkpoint):
    c = preset("tiny")
    h = all_headers(tiny_checkpoint)
    index = json.loads((tiny_checkpoint / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(h) and len(set(index["weight_map"].values())) > 1
    d, inter, q = c.hidden_size, c.moe_intermediate_size, c.q_lora_rank
    expect = {
        "embed.weight": ("BF16", [c.vocab_size, d]), "head.weight": ("BF16", [c.vocab_size, d]),
        "hc_head_fn": ("F32", [4, 4 * d]), "hc_head_scale": ("F32", [1]),
        "layers.1.attn.wq_a.weight": ("F8_E4M3", [q, d]), "layers.1.attn.wq_a.scale": ("F8_E8M0", [1, 1]),
        "layers.1.attn.wo_a.weight": ("F8_E4M3", [c.o_groups * c.o_lora_rank, c.num_attention_heads * c.head_dim
                                                  // c.o_groups]),
        "layers.1.attn.attn_sink": ("F32", [c.num_attention_heads]),
        "layers.1.attn.compressor.wkv.weight": ("BF16", [2 * c.head_dim, d]),
        "layers.1.attn.compressor.ape": ("F32", [4, 2 * c.head_dim]),
        "layers.1.attn.indexer.compressor.ape": ("F32", [4, 2 * c.index_head_dim]),
        "layers.1.attn.indexer.weights_proj.weight": ("BF16", [c.index_n_heads, d]),
        "layers.2.attn.compressor.ape": ("F32", [128, c.head_dim]),
        "layers.0.ffn.gate.tid2eid": ("I64", [c.vocab_size, 6]),
        "layers.3.ffn.gate.bias": ("F32", [c.n_routed_experts]),
        "layers.3.ffn.experts.7.w1.weight": ("I8", [inter, d // 2]),
        "layers.3.ffn.experts.7.w1.scale": ("F8_E8M0", [inter, d // 32]),
        "layers.3.ffn.experts.7.w2.weight": ("I8", [d, inter // 2]),
        "layers.3.ffn.shared_experts.w2.weight": ("F8_E4M3", [d, inter]),
        "layers.3.attn_norm.weight": ("BF16", [d]),
        "layers.3.hc_ffn_fn": ("F32", [24, 4 * d]),
        "mtp.0.e_proj.weight": ("F8_E4M3", [d, d]), "mtp.0.hc_head_base": ("F32", [4]),
    }
    for name, (dtype, shape) in expect.items():
        assert (h[name]["dtype"], h[name]["shape"]) == (dtype, shape), name
    assert "layers.1.attn.indexer.compressor.norm.weight" in h and "layers.0.attn.compressor.ape" not in h
    tid2eid = load_file(tiny_checkpoint / index["weight_map"]["layers.0.ffn.gate.tid2eid"])["layers.0.ffn.gate.tid2eid"]
    assert all(len(set(row)) == 6 for row in tid2eid[:200].tolist())     # distinct experts per token
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["compress_ratios"] == list(c.compress_ratios) and config["num_hash_layers"] == 3
    assert (tiny_checkpoint / "tokenizer.json").exists()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    c = preset("tiny")
    a = write_checkpoint(c, tmp_path / "a", seed=7, progress=None)
    b = write_checkpoint(c, tmp_path / "b", seed=7, shard_bytes=1 << 20, progress=None)  # other sharding
    other = write_checkpoint(c, tmp_path / "c", seed=8, progress=None)
    ta = load_file(next(a.glob("model-*.safetensors")))
    tb = {}
    for shard in b.glob("model-*.safetensors"):
        tb.update(load_file(shard))
    tc = load_file(next(other.glob("model-*.safetensors")))
    assert ta.keys() == tb.keys()
    assert all(torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)) for k in ta)
    name = "layers.1.attn.wq_b.weight"
    assert not torch.equal(ta[name].view(torch.uint8), tc[name].view(torch.uint8))


def test_random_weights_give_input_dependent_logits(tiny_model):
    num = Numerics.parse("reference")
    a = forward_logits(tiny_model, [5, 6, 7, 8], num)
    b = forward_logits(tiny_model, [9, 6, 7, 8], num)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() > 0.1                      # the first token changes every later logit
    assert a[-1].std() > 0.3 and len(set(a.argmax(-1).tolist())) > 1


def test_expert_subset_reads_only_those_experts(tiny_checkpoint):
    from dsv4.model.checkpoint import load_checkpoint
    from dsv4.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(preset("tiny"), expert_ids=[1, 5])
    report = load_checkpoint(model, tiny_checkpoint, progress=None)
    expert_tensors = [n for n in report.tensors_read if ".ffn.experts." in n]
    assert {n.split(".")[4] for n in expert_tensors} == {"1", "5"}
    # 5 blocks (4 layers + MTP) x 2 experts x (w1, w2, w3) x (weight, scale)
    assert len(expert_tensors) == 5 * 2 * 3 * 2
    assert all(".ffn.experts." not in n or n.split(".")[4] in ("1", "5") for n in model.state_dict())
    full = sum(1 for _ in all_headers(tiny_checkpoint))
    assert len(report.tensors_read) < full


def test_subset_model_computes_its_experts_like_the_full_model(tiny_model, tiny_checkpoint):
    part = load_model(tiny_checkpoint, expert_ids=[2, 3], progress=None)
    x = torch.randn(5, 128).bfloat16()
    num = Numerics.parse("reference")
    full_expert, part_expert = tiny_model.layers[3].ffn.experts["3"], part.layers[3].ffn.experts["3"]
    assert torch.equal(full_expert(x, num), part_expert(x, num))


def _rewrite(ckpt, tmp_path, edit, name="layers.1.attn.wq_a.weight"):
    """Copy a checkpoint, then apply edit(tensors of the shard holding tensor `name`)."""
    out = tmp_path / "edited"
    shutil.copytree(ckpt, out)
    index = json.loads((out / INDEX_FILE).read_text())
    shard = out / index["weight_map"][name]
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard)
    return out, shard.name


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    out, _ = _rewrite(tiny_checkpoint, tmp_path, lambda t: t.pop("layers.1.attn.wq_a.scale"))
    index = json.loads((out / INDEX_FILE).read_text())
    del index["weight_map"]["layers.1.attn.wq_a.scale"]
    (out / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_a\.scale"):
        load_model(out, progress=None)


def test_wrong_shape_is_named_with_file(tiny_checkpoint, tmp_path):
    def edit(t):
        t["layers.1.attn.wq_a.weight"] = t["layers.1.attn.wq_a.weight"][:, :64].contiguous()

    out, shard = _rewrite(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"{shard}.*layers\.1\.attn\.wq_a\.weight.*shape"):
        load_model(out, progress=None)


def test_wrong_expert_shape_is_named_with_file(tiny_checkpoint, tmp_path):
    def edit(t):
        t["layers.2.ffn.experts.5.w2.weight"] = t["layers.2.ffn.experts.5.w2.weight"][:64].contiguous()

    out, shard = _rewrite(tiny_checkpoint, tmp_path, edit, "layers.2.ffn.experts.5.w2.weight")
    with pytest.raises(CheckpointError, match=rf"{shard}.*layers\.2\.ffn\.experts\.5\.w2\.weight.*shape"):
        load_model(out, progress=None)


def test_f32_scales_must_be_powers_of_two(tiny_checkpoint, tmp_path):
    """-Base checkpoints store their scales as F32: accepted when every one is a power of two, named otherwise."""
    def as_f32(scale, factor):
        return quant.ue8m0_values(scale) * factor

    name = "layers.1.attn.wq_b.scale"
    good, _ = _rewrite(tiny_checkpoint, tmp_path / "good", lambda t: t.update({name: as_f32(t[name], 1.0)}), name)
    assert torch.equal(load_model(good, progress=None).state_dict()[name].view(torch.uint8),
                       load_model(tiny_checkpoint, progress=None).state_dict()[name].view(torch.uint8))
    bad, shard = _rewrite(tiny_checkpoint, tmp_path / "bad", lambda t: t.update({name: as_f32(t[name], 1.5)}), name)
    with pytest.raises(CheckpointError, match=rf"{shard}.*{name}.*powers of two"):
        load_model(bad, progress=None)


@pytest.mark.parametrize("name, poison", [
    ("layers.1.attn.wq_a.weight", 0x7F),          # FP8 e4m3fn NaN
    ("layers.1.attn.wq_b.scale", 0xFF),           # UE8M0 NaN
    ("layers.1.attn_norm.weight", float("inf")),  # bf16 Inf
    ("layers.2.attn.attn_sink", float("nan")),    # fp32 NaN
])
def test_non_finite_weights_are_named(tiny_checkpoint, tmp_path, name, poison):
    def edit(t):
        tensor = t[name].clone()
        if isinstance(poison, int):
            tensor.view(torch.uint8).view(-1)[3] = poison
        else:
            tensor.view(-1)[3] = poison
        t[name] = tensor

    out, shard = _rewrite(tiny_checkpoint, tmp_path, edit, name)
    with pytest.raises(CheckpointError, match=rf"{shard}.*{re.escape(name)}.*1 NaN or Inf"):
        load_model(out, progress=None)


def test_wrong_dtype_is_named(tiny_checkpoint, tmp_path):
    def edit(t):
        t["layers.1.attn.wq_a.weight"] = t["layers.1.attn.wq_a.weight"].float()

    out, shard = _rewrite(tiny_checkpoint, tmp_path, edit)
    with pytest.raises(CheckpointError, match=rf"{shard}.*wq_a\.weight.*dtype"):
        load_model(out, progress=None)


def test_truncated_and_corrupt_files_are_named(tiny_checkpoint, tmp_path):
    out = tmp_path / "trunc"
    shutil.copytree(tiny_checkpoint, out)
    shard = sorted(out.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(out, progress=None)
    shard.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=shard.name):
        load_model(out, progress=None)


def test_bad_directories_are_explained(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "absent", progress=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", empty)
    with pytest.raises(CheckpointError, match="no .*safetensors"):
        load_model(empty, progress=None)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    (broken / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=INDEX_FILE):
        load_model(broken, progress=None)


def test_transformers_tensor_names_load(tiny_checkpoint, tiny_model, tmp_path):
    """transformers' own names (model.*, self_attn, q_a_proj, attn_hc.fn, merged experts.gate_up_proj ...), as
    its in-memory state dict has them, load, and compute what the official-layout checkpoint computes."""
    import transformers
    from transformers import DeepseekV4ForCausalLM

    transformers.logging.set_verbosity_error()
    hf = DeepseekV4ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).float()
    out = tmp_path / "hf_names"
    out.mkdir()
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert "model.layers.3.mlp.experts.gate_up_proj" in state and "lm_head.weight" in state
    save_file(state, out / "model.safetensors")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    config.update(quantization_config=None, expert_dtype=None)   # the tensors are dequantized
    (out / "config.json").write_text(json.dumps(config))
    model = load_model(out, progress=None)
    assert model.config.num_nextn_predict_layers == 0            # transformers does not keep the MTP block
    num = Numerics.parse("exact-fp32")
    ids = torch.arange(3, 300, 7)
    assert torch.equal(forward_logits(model, ids, num), forward_logits(tiny_model, ids, num))


def test_cli_writes_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, "-m", "dsv4.cluster.cli", "checkpoint", "--preset", "tiny", "--out",
                           str(out), "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "writing checkpoint" in proc.stderr                      # progress is shown
    model = load_model(out, progress=None)
    assert model.config == preset("tiny")
    bad = subprocess.run([sys.executable, "-m", "dsv4.cluster.cli", "checkpoint", "--config",
                          str(tmp_path / "none.json"), "--out", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "none.json" in bad.stderr and "Traceback" not in bad.stderr


def test_generated_weights_checkpoint_builds_the_seeded_model_and_stores_its_hash_tables(tmp_path):
    """`--weights on-load`: no weight files; every load generates the same seeded model, whose hash-routing tables
    are the ones on disk (what the coordinator's placement reads)."""
    from dsv4.cluster.placement import read_hash_tables
    from dsv4.model.synthetic import synthetic_model, write_generated_checkpoint

    c = preset("tiny")
    out = write_generated_checkpoint(c, tmp_path / "gen", seed=5)
    assert not list(out.glob("model-*.safetensors")) and not (out / INDEX_FILE).exists()
    model = load_model(out, expert_ids=[1, 3], progress=None)
    expected = synthetic_model(c, "cpu", seed=5, expert_ids=[1, 3], progress=None).state_dict()
    state = model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert not torch.equal(state["embed.weight"],
                           synthetic_model(c, "cpu", seed=6, progress=None).state_dict()["embed.weight"])
    tables = read_hash_tables(out, c.num_hash_layers)
    assert len(tables) == c.num_hash_layers > 0
    for i, table in enumerate(tables):
        assert torch.equal(torch.from_numpy(table), state[f"layers.{i}.ffn.gate.tid2eid"])
    (out / "generated-weights.json").write_text('{"seed": "five"}')
    with pytest.raises(CheckpointError, match="generated-weights.json.*seed must be an integer"):
        load_model(out, progress=None)


def test_cli_overrides_config_fields_and_names_a_bad_one(tmp_path):
    out = tmp_path / "gen"
    proc = subprocess.run([sys.executable, "-m", "dsv4.cluster.cli", "checkpoint", "--preset", "tiny", "--out",
                           str(out), "--set", "n_routed_experts=12", "--weights", "on-load"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    model = load_model(out, progress=None)
    assert model.config == preset("tiny").replace(n_routed_experts=12)
    assert len(model.layers[0].ffn.experts) == 12
    bad = subprocess.run([sys.executable, "-m", "dsv4.cluster.cli", "checkpoint", "--preset", "tiny", "--out",
                          str(tmp_path / "x"), "--set", "n_routed_expert=12"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "n_routed_expert=12" in bad.stderr and "Traceback" not in bad.stderr

"""`fast` numerics (here: the CPU twins of its kernels) against the `reference` oracle, teacher-forced over 4096
positions, with transformers' DeepseekV4ForCausalLM in bf16 against the same oracle as the yardstick: the fast
path must be at least as close to the reference as transformers-bf16 is, on all three numbers."""

import contextlib

import pytest
import torch
import transformers
from numerics_compare import Bf16MatmulsInFp32, logit_distance, slow_bf16_matmuls
from transformers import DeepseekV4ForCausalLM

from dsv4.model.checkpoint import load_model
from dsv4.model.config import preset
from dsv4.model.generate import forward_logits
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import write_checkpoint

REFERENCE, FAST = Numerics.parse("reference"), Numerics.parse("fast")
POSITIONS, CHUNK = 4096, 1024


def teacher_forced(model, numerics, ids):
    numerics.prepare(model)
    return forward_logits(model, ids, numerics, [CHUNK] * (ids.numel() // CHUNK))


@pytest.fixture(scope="module", params=["tiny", "small"])
def checkpoint(request, tmp_path_factory):
    config = preset(request.param)
    if config.max_position_embeddings < POSITIONS:
        config = config.replace(max_position_embeddings=POSITIONS)
    return write_checkpoint(config, tmp_path_factory.mktemp(request.param), seed=1, progress=None)


@pytest.mark.slow
def test_fast_is_at_least_as_close_to_the_reference_as_transformers_bf16(checkpoint):
    model = load_model(checkpoint, progress=None)
    ids = torch.randint(0, model.config.vocab_size, (POSITIONS,), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = teacher_forced(model, REFERENCE, ids)
        fast = teacher_forced(model, FAST, ids)
    transformers.logging.set_verbosity_error()
    hf = DeepseekV4ForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    # on a CPU without bf16 units its bf16 GEMMs take half an hour here: the same products as fp32 GEMMs of the bf16
    # operands, rounded to bf16 (fp32 accumulation either way; only the order of the sums differs)
    emulate = Bf16MatmulsInFp32() if slow_bf16_matmuls() else contextlib.nullcontext()
    with torch.no_grad(), emulate:
        hf_logits = hf(ids[None]).logits[0].float()
    ours, yardstick = logit_distance(ref, fast), logit_distance(ref, hf_logits)
    print(f"\n{checkpoint.name}: fast vs reference: {ours}\n{checkpoint.name}: transformers-bf16 vs reference: "
          f"{yardstick}")
    assert ours.rel_l2 <= yardstick.rel_l2, (ours, yardstick)
    assert ours.kl <= yardstick.kl, (ours, yardstick)
    assert ours.top1 >= yardstick.top1, (ours, yardstick)


def test_fast_numerics_is_a_mode():
    assert FAST.mode.value == "fast" and FAST.act_dtype == torch.bfloat16 and FAST.simulate_quant
    assert Numerics.parse("fast") == FAST
    with pytest.raises(ValueError, match="fast"):
        Numerics.parse("fp8")


def test_fast_weights_stay_in_checkpoint_formats(tiny_checkpoint):
    """After `prepare`, the resident weight bytes are the checkpoint's plus at most 5 % (the FP8 linears' fp32
    scale copies): the routed and shared experts are stacked, their per-expert buffers views of the stack; FP4
    stays 4-bit, nothing is dequantized."""
    from dsv4.model.checkpoint import load_model

    model = load_model(tiny_checkpoint, progress=None)
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    FAST.prepare(model)
    storages: dict[int, int] = {}
    for t in model.state_dict().values():     # distinct storages: a view of a stack counts once
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for module in model.modules():
        derived = getattr(module, "fast_weight", None)
        for t in (getattr(derived, "mm_scale", None),):
            if t is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stacked = [getattr(module, name, None) for name in ("fast_experts", "fast_shared")]
        for weights in filter(None, stacked):
            for t in (weights.w13, weights.s13, weights.w2, weights.s2):
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    resident = sum(storages.values())
    assert checkpoint_bytes <= resident <= 1.05 * checkpoint_bytes, (resident, checkpoint_bytes)
    expert = model.layers[1].ffn.local_expert(0)
    assert expert.w1.weight.dtype == torch.int8 and expert.w1._dense is None        # FP4 bytes, no dense copy
    assert expert.w1.weight.untyped_storage().data_ptr() == \
        model.layers[1].ffn.fast_experts.w13.untyped_storage().data_ptr()

"""`fast` numerics on the GPU (the Triton kernels) against the `reference` oracle, teacher-forced over 4096
positions, on the small preset (with transformers-bf16 against the same oracle as the yardstick, where the
installed transformers has DeepseekV4) and on a 2-layer V4-Flash-width config (one CSA and one HCA layer, hash
and score routed, 64 of the 256 experts held; bounds only). Prints every number."""

import pytest
import torch
from numerics_compare import logit_distance

from dsv4.model.checkpoint import load_model
from dsv4.model.config import preset
from dsv4.model.generate import forward_logits
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import synthetic_model, write_checkpoint

pytestmark = pytest.mark.gpu
REFERENCE, FAST = Numerics.parse("reference"), Numerics.parse("fast")
POSITIONS, CHUNK = 4096, 1024


def teacher_forced(model, ids):
    with torch.inference_mode():
        ref = forward_logits(model, ids, REFERENCE, [CHUNK] * (POSITIONS // CHUNK))
        FAST.prepare(model)
        fast = forward_logits(model, ids, FAST, [CHUNK] * (POSITIONS // CHUNK))
    return ref, fast


def transformers_bf16(checkpoint, ids):
    """transformers' model in bf16 (the yardstick), run on the CPU with the checkpoint's FP8/FP4 weights
    dequantized at load (`dequantize=True`: where a GPU is visible it would otherwise keep them quantized and want
    the `kernels` package)."""
    try:
        import transformers
        from transformers import AutoConfig, DeepseekV4ForCausalLM, FineGrainedFP8Config
    except ImportError:
        return None
    transformers.logging.set_verbosity_error()
    quantization = dict(AutoConfig.from_pretrained(checkpoint).quantization_config, dequantize=True)
    hf = DeepseekV4ForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map="cpu",
                                               quantization_config=FineGrainedFP8Config.from_dict(quantization)).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


def test_small_preset_fast_is_closer_to_the_reference_than_transformers_bf16(tmp_path):
    checkpoint = write_checkpoint(preset("small").replace(max_position_embeddings=POSITIONS + 1), tmp_path, seed=3,
                                  progress=None)
    model = load_model(checkpoint, progress=None, device="cuda")
    ids = torch.randint(0, model.config.vocab_size, (POSITIONS,), generator=torch.Generator().manual_seed(9))
    ref, fast = teacher_forced(model, ids)
    ours = logit_distance(ref.cpu(), fast.cpu())
    print(f"\nsmall: fast vs reference: {ours}")
    hf_logits = transformers_bf16(checkpoint, ids)
    if hf_logits is None:
        pytest.skip("the installed transformers has no DeepseekV4 (the yardstick)")
    hf = logit_distance(ref.cpu(), hf_logits)
    print(f"small: transformers-bf16 vs reference: {hf}")
    assert ours.rel_l2 <= hf.rel_l2 and ours.kl <= hf.kl and ours.top1 >= hf.top1, (ours, hf)


def test_flash_width_fast_against_reference():
    c = preset("v4-flash")
    config = c.replace(num_hidden_layers=2, num_hash_layers=1, compress_ratios=(4, 128, 0),
                       max_position_embeddings=POSITIONS + 1)
    model = synthetic_model(config, "cuda", seed=3, expert_ids=list(range(64)), progress=None)
    ids = torch.randint(0, config.vocab_size, (POSITIONS,), generator=torch.Generator().manual_seed(9))
    ref, fast = teacher_forced(model, ids)
    ours = logit_distance(ref, fast)
    print(f"\nV4-Flash width, 2 layers: fast vs reference: {ours}")
    # a regression bound, not the yardstick (transformers at this width does not fit the test's time): measured
    # on the H200 at 17a977c: rel L2 5.1e-2, KL 1.3e-3, top-1 89.2 % (the synthetic model amplifies every
    # rounding difference; on the CPU presets transformers-bf16 sits at 1.2-1.4x the fast twin's rel L2)
    assert ours.rel_l2 < 0.1 and ours.kl < 5e-3 and ours.top1 > 0.85, ours

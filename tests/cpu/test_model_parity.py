"""exact-fp32 numerics against transformers' DeepseekV4ForCausalLM, loading the same synthetic checkpoint."""

import pytest
import torch
import transformers
from transformers import DeepseekV4ForCausalLM

from dsv4.model.generate import forward_logits, greedy_generate
from dsv4.model.numerics import Numerics

EXACT = Numerics.parse("exact-fp32")


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    transformers.logging.set_verbosity_error()
    # transformers dequantizes the FP8/FP4 tensors itself (no GPU here); .float() upcasts what it left in bf16.
    return DeepseekV4ForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval().float()


def test_config_covers_every_layer_type(tiny_model):
    c = tiny_model.config
    ratios = set(c.compress_ratios[: c.num_hidden_layers])
    assert ratios == {0, 4, 128} and c.num_hash_layers == 3 and c.hc_mult == 4


def test_full_forward_matches_transformers_at_every_position(tiny_model, hf_model):
    c = tiny_model.config
    length = 400
    assert length // 128 >= 3                      # >= 3 HCA entries
    assert length // 4 > c.index_topk              # more visible CSA entries than the indexer keeps
    ids = torch.randint(0, c.vocab_size, (length,), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        expected = hf_model(ids[None]).logits[0]
    ours = forward_logits(tiny_model, ids, EXACT)
    per_position = (ours - expected).abs().max(dim=-1).values
    assert per_position.max() <= 1e-4, f"worst position {int(per_position.argmax())}: {per_position.max():.2e}"


def test_greedy_generation_matches_transformers_generate(tiny_model, hf_model):
    prompt = torch.randint(2, tiny_model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(12))
    new = 40
    with torch.no_grad():
        expected = hf_model.generate(prompt[None], max_new_tokens=new, do_sample=False, eos_token_id=None,
                                     pad_token_id=0)[0, prompt.numel():].tolist()
    assert greedy_generate(tiny_model, prompt.tolist(), new, EXACT) == expected

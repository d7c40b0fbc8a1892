"""Incremental decode and chunked prefill reproduce the full forward exactly, in both numerics modes."""

import copy

import pytest
import torch

from dsv4.model.generate import StaticCaches, forward_logits
from dsv4.model.kv_cache import ATTN
from dsv4.model.numerics import Numerics

REFERENCE, EXACT = Numerics.parse("reference"), Numerics.parse("exact-fp32")


@pytest.fixture(scope="module")
def sequence(tiny_model):
    return torch.randint(0, tiny_model.config.vocab_size, (270,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def full_logits(tiny_model, sequence):
    return {num: forward_logits(tiny_model, sequence, num) for num in (REFERENCE, EXACT)}


def decode_after_prefill(model, ids, prefill, numerics):
    """Prefill `prefill` tokens, then feed the rest one token at a time."""
    return forward_logits(model, ids, numerics, [prefill] + [1] * (ids.numel() - prefill))


@pytest.mark.parametrize("prefill, total", [(1, 140), (3, 140), (4, 140), (5, 140), (127, 150), (128, 150),
                                            (129, 150), (250, 270)])
def test_decode_after_prefill_equals_full_forward(tiny_model, sequence, full_logits, prefill, total):
    # total crosses an HCA window end (127 or 255) during decode for each prefill length
    ids = sequence[:total]
    got = decode_after_prefill(tiny_model, ids, prefill, REFERENCE)
    assert torch.equal(got, full_logits[REFERENCE][:total])


@pytest.mark.parametrize("prefill", [1, 129])
def test_exact_mode_decode_equals_full_forward(tiny_model, sequence, full_logits, prefill):
    got = decode_after_prefill(tiny_model, sequence[:150], prefill, EXACT)
    assert torch.equal(got, full_logits[EXACT][:150])


def test_random_chunks_equal_full_forward(tiny_model, sequence, full_logits):
    g = torch.Generator().manual_seed(9)
    sizes, left = [], sequence.numel()
    while left:
        sizes.append(min(left, int(torch.randint(1, 70, (1,), generator=g))))
        left -= sizes[-1]
    assert torch.equal(forward_logits(tiny_model, sequence, REFERENCE, sizes), full_logits[REFERENCE])


def test_sequence_state_lives_only_in_the_cache(tiny_model, sequence):
    """Nothing of a sequence stays in the model: a short request after a long one computes exactly what it
    computes alone (the official code leaks CSA state into prompts shorter than 4 tokens; we do not)."""
    before = copy.deepcopy(tiny_model.state_dict())
    alone = forward_logits(tiny_model, sequence[:2], REFERENCE)
    forward_logits(tiny_model, sequence[:37], REFERENCE)
    assert torch.equal(forward_logits(tiny_model, sequence[:2], REFERENCE), alone)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)) for k in before)
    fresh = StaticCaches(tiny_model, REFERENCE, 64).storage.layer(1).compressors[ATTN]
    assert torch.all(fresh.state_kv == 0) and torch.all(fresh.state_score == float("-inf"))


def test_batched_sequences_equal_each_alone(tiny_model, sequence, full_logits):
    """Two sequences in one forward call do not see each other."""
    other = torch.flip(sequence[:100], dims=[0])
    caches = StaticCaches(tiny_model, REFERENCE, 300, num_seqs=2)
    batch = caches.batch([caches.chunk(0, 0, sequence[:60]), caches.chunk(1, 0, other)])
    rows = torch.arange(160)
    logits = tiny_model(batch, logits_rows=rows).logits
    assert torch.equal(logits[:60], full_logits[REFERENCE][:60])
    assert torch.equal(logits[60:], forward_logits(tiny_model, other, REFERENCE))


def test_out_of_vocabulary_token_is_rejected(tiny_model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        forward_logits(tiny_model, [1, tiny_model.config.vocab_size], REFERENCE)

"""Structured output (`workers/grammar.py` + the sampler's mask): on the byte-level tokenizer of the synthetic
checkpoints, random logits sampled under a constraint always give text the constraint accepts."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from dsv4.model.tokenizer_file import write_tokenizer_files
from dsv4.wire.request import InvalidRequest, SamplingParams, StructuredOutput
from dsv4.workers.grammar import Grammars, unpack_bitmask
from dsv4.workers.sampler import SampleSpec, SamplingBatch, sample

pytest.importorskip("xgrammar")

VOCAB, EOS = 1024, 1
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "ok", "n", "tags"],
          "properties": {"name": {"type": "string", "pattern": "^[a-zA-Z ]{1,12}$"}, "ok": {"type": "boolean"},
                         "n": {"type": "integer", "minimum": -5, "maximum": 300},
                         "tags": {"type": "array", "items": {"enum": ["a", "b c", "ü"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(path, VOCAB, 4096)
    return path


@pytest.fixture(scope="module")
def grammars(tokenizer_dir) -> Grammars:
    return Grammars(tokenizer_dir, VOCAB, (EOS,))


@pytest.fixture(scope="module")
def decode(tokenizer_dir):
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def constrained_run(grammars, structured, seed, temperature=1.0, max_tokens=400, scale=3.0, favour=()):
    """Sample token by token from random logits under the constraint until EOS; the output ids (EOS dropped).
    `favour`: token ids the model leans to (so open-ended JSON closes)."""
    state = grammars.matcher(structured)
    params = SamplingParams(temperature=temperature, structured=structured)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index in range(max_tokens):
        logits = torch.randn(1, VOCAB, generator=gen) * scale
        logits[0, EOS] += 4.0                      # a model that wants to stop: EOS wherever it is allowed
        logits[0, list(favour)] += 6.0
        token = sample(logits, SamplingBatch([SampleSpec(params, seed, index, allowed=state.allowed())], "cpu"))
        token = int(token[0])
        if token == EOS:
            return out
        state.accept(token)
        out.append(token)
    raise AssertionError(f"no EOS within {max_tokens} tokens: {out}")


def test_json_schema_outputs_parse_and_validate_for_20_seeds(grammars, decode):
    # (A pattern bounds the string: xgrammar 0.2.9 compiles maxLength to a character class that admits raw
    # control characters, which strict JSON parsers refuse; the grammar module's docstring says so.)
    structured = StructuredOutput("json_schema", json.dumps(SCHEMA))
    texts = [decode(constrained_run(grammars, structured, seed)) for seed in range(20)]
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10                    # the constraint leaves the sampling free where it can be


def test_regex_choice_and_grammar_outputs_match(grammars, decode):
    for seed in range(10):
        text = decode(constrained_run(grammars, StructuredOutput("regex", r"[a-z]{2,5}-\d{1,3}"), seed))
        assert re.fullmatch(r"[a-z]{2,5}-\d{1,3}", text), text
        choices = ("yes", "no", "maybe so", 'say "hi"')
        assert decode(constrained_run(grammars, StructuredOutput("choice", choices=choices), seed)) in choices
        grammar = 'root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?'
        text = decode(constrained_run(grammars, StructuredOutput("grammar", grammar), seed))
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text), text
        closers = [t for t in range(VOCAB) if decode([t]) in ('"', "}", "7")]
        obj = json.loads(decode(constrained_run(grammars, StructuredOutput("json_object"), seed, favour=closers)))
        assert isinstance(obj, dict)


def test_greedy_under_a_choice_takes_the_allowed_argmax(grammars, decode):
    structured = StructuredOutput("choice", choices=("ab", "xyz"))
    state = grammars.matcher(structured)
    logits = torch.zeros(1, VOCAB)
    logits[0, 5] = 50.0                              # the unconstrained argmax, not a start of either choice
    spec = SampleSpec(SamplingParams(temperature=0.0, structured=structured), 0, 0, allowed=state.allowed())
    token = int(sample(logits, SamplingBatch([spec, SampleSpec(SamplingParams(temperature=0.0), 0, 0)], "cpu"))[0])
    assert token != 5 and decode([token]) in ("a", "ab", "x", "xy", "xyz")
    both = sample(logits.repeat(2, 1), SamplingBatch([spec, SampleSpec(SamplingParams(temperature=0.0), 0, 0)], "cpu"))
    assert int(both[1]) == 5                          # the unconstrained row in the same batch is untouched


def test_unpacked_bitmask_equals_xgrammars_own_mask(grammars):
    import xgrammar
    state = grammars.matcher(StructuredOutput("json_schema", json.dumps(SCHEMA)), [])
    bits = state.allowed()
    logits = torch.zeros(1, VOCAB)
    xgrammar.apply_token_bitmask_inplace(logits, bits[None].clone())
    assert torch.equal(unpack_bitmask(bits[None], VOCAB)[0], logits[0] == 0)
    assert 0 < int(unpack_bitmask(bits[None], VOCAB).sum()) < VOCAB


def test_a_resumed_matcher_continues_where_the_outputs_left_it(grammars, decode):
    structured = StructuredOutput("choice", choices=("hello world",))
    first = constrained_run(grammars, structured, 0)
    resumed = grammars.matcher(structured, first[:2])           # a preempted request re-admitted with 2 outputs
    allowed = unpack_bitmask(resumed.allowed()[None], VOCAB)[0]
    assert decode(first[:2]) + decode([int(allowed.nonzero()[0])]) in "hello world" or allowed[first[2]]


@pytest.mark.parametrize("structured, field", [
    (StructuredOutput("json_schema", "{not json"), "sampling_params.json_schema"),
    (StructuredOutput("json_schema", '{"type": "nonsense"}'), "sampling_params.json_schema"),
    (StructuredOutput("regex", "([a-z"), "sampling_params.regex"),
    (StructuredOutput("grammar", "root ::= missing_rule"), "sampling_params.grammar"),
])
def test_a_constraint_that_does_not_compile_names_its_field(grammars, structured, field):
    with pytest.raises(InvalidRequest) as err:
        grammars.compile(structured)
    assert err.value.field == field


@pytest.mark.parametrize("structured, field", [
    (StructuredOutput("yaml", "x"), "sampling_params.structured_output"),
    (StructuredOutput("regex", ""), "sampling_params.regex"),
    (StructuredOutput("choice"), "sampling_params.choice"),
    (StructuredOutput("choice", choices=("a", "")), "sampling_params.choice"),
    (StructuredOutput("json_schema", "x" * (64 * 1024 + 1)), "sampling_params.json_schema"),
])
def test_malformed_constraints_are_refused_by_field(structured, field):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(structured=structured).validate(VOCAB)
    assert err.value.field == field

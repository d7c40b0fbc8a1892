"""The batched sampler: greedy, temperature, top-k, top-p, min-p, penalties and logit bias, seeded reproducibility
whatever the batch, and the log-probabilities of the raw distribution for the rows that ask."""

import collections

import pytest
import torch

from dsv4.wire.request import InvalidRequest, SamplingParams
from dsv4.workers.sampler import SampleSpec, SamplingBatch, sample, sample_to_host, uniform


def spec(seed=1, index=0, **params):
    return SampleSpec(SamplingParams(**params), seed, index)


def run(logits, specs):
    return sample(logits, SamplingBatch(specs, logits.device)).tolist()


def test_greedy_takes_the_argmax_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 1.0, 5.0, 0.0]])
    assert run(logits, [spec(temperature=0.0), spec(temperature=0.0)]) == [1, 0]


def test_same_seed_same_tokens_whatever_the_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=gen) * 2
    specs = [spec(seed=s, index=i, temperature=t, top_k=k, top_p=p) for s, i, t, k, p in
             [(1, 0, 1.0, 0, 1.0), (2, 5, 0.7, 50, 1.0), (3, 1, 1.3, 0, 0.8), (4, 9, 1.0, 10, 0.5),
              (5, 2, 0.0, 0, 1.0), (6, 3, 2.0, 0, 1.0)]]
    together = run(logits, specs)
    alone = [run(logits[i:i + 1], [s])[0] for i, s in enumerate(specs)]
    shuffled = run(logits.flip(0), specs[::-1])[::-1]
    assert together == alone == shuffled
    assert run(logits, [spec(seed=1, index=0)] * 6) != run(logits, [spec(seed=1, index=1)] * 6)


def test_top_k_and_top_p_keep_only_their_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1)
    seen_k = {run(logits, [spec(seed=s, top_k=2)])[0] for s in range(300)}
    assert seen_k == {0, 1}
    probs = logits.softmax(-1)[0]                      # mass: 0.64, 0.24, 0.09, ...
    seen_p = {run(logits, [spec(seed=s, top_p=float(probs[0]) + 0.01)])[0] for s in range(300)}
    assert seen_p == {0, 1}                            # the prefix whose mass reaches p: two tokens
    assert {run(logits, [spec(seed=s, top_p=0.01)])[0] for s in range(50)} == {0}   # always >= 1 token
    assert {run(logits, [spec(seed=s, top_k=1)])[0] for s in range(50)} == {0}


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    counts = collections.Counter(run(logits, [spec(seed=7, index=i)])[0] for i in range(3000))
    expected = logits.softmax(-1)[0] * 3000
    for token in range(3):
        assert abs(counts[token] - expected[token]) < 5 * expected[token].sqrt() + 5
    hot = collections.Counter(run(logits, [spec(seed=7, index=i, temperature=0.05)])[0] for i in range(200))
    assert hot[2] == 200


def test_uniforms_are_in_the_open_unit_interval_and_depend_on_every_key():
    seeds = torch.tensor([0, 1, (1 << 62) + 3], dtype=torch.int64)
    u = uniform(seeds, torch.tensor([0, 0, 0]), torch.arange(1000))
    assert bool((u > 0).all() and (u < 1).all())
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[1], u[2])
    assert abs(float(u.mean()) - 0.5) < 0.02


# ---------------------------------------------------------------------------------------------- log-probabilities
def _mixed_specs() -> list[SampleSpec]:
    return [spec(seed=1, temperature=0.0, logprobs=5),                 # greedy
            spec(seed=2, index=3, temperature=0.7, top_k=50, logprobs=3),
            spec(seed=3, temperature=1.0),                             # does not ask
            spec(seed=4, index=1, temperature=1.3, top_p=0.8, logprobs=0),
            spec(seed=5, index=7, temperature=2.0, logprobs=20),
            spec(seed=6, temperature=0.0)]                             # greedy, does not ask


def test_logprobs_are_the_raw_log_softmax_with_the_top_n_sorted():
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(1)) * 3
    specs = _mixed_specs()
    tokens, logprobs = sample_to_host(logits, SamplingBatch(specs, logits.device))
    assert tokens == run(logits, specs)                # asking for logprobs does not change the tokens
    expected = torch.log_softmax(logits, dim=-1)       # the raw distribution, whatever the temperature / top-k / p
    for row, (s, token, lp) in enumerate(zip(specs, tokens, logprobs, strict=True)):
        n = s.sampling.logprobs
        if n is None:
            assert lp is None
            continue
        assert lp.logprob == float(expected[row, token])
        assert len(lp.top_token_ids) == len(lp.top_logprobs) == n
        assert list(lp.top_logprobs) == sorted(lp.top_logprobs, reverse=True)
        assert list(lp.top_logprobs) == expected[row].topk(n).values.tolist()
        assert list(lp.top_logprobs) == [float(expected[row, t]) for t in lp.top_token_ids]
        if s.sampling.temperature == 0.0 and n:        # greedy: the chosen token is the most likely one
            assert lp.top_token_ids[0] == token and lp.top_logprobs[0] == lp.logprob


def test_logprobs_do_not_depend_on_the_batch():
    logits = torch.randn(6, 3000, generator=torch.Generator().manual_seed(2))
    specs = _mixed_specs()
    together = sample_to_host(logits, SamplingBatch(specs, logits.device))
    alone = [sample_to_host(logits[i:i + 1], SamplingBatch([s], logits.device)) for i, s in enumerate(specs)]
    assert together[0] == [tokens[0] for tokens, _ in alone]
    assert together[1] == [lps[0] if lps else None for _, lps in alone]


def _log_softmax_inputs(logits, specs) -> list[list[int]]:
    """The shapes of every log_softmax that sampling the batch runs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        sample_to_host(logits, SamplingBatch(specs, logits.device))
    return [e.input_shapes[0] for e in prof.events() if e.name == "aten::_log_softmax"]


def test_rows_that_do_not_ask_cost_nothing():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(3))
    plain = [spec(seed=s) for s in range(4)]
    tokens, logprobs = sample_to_host(logits, SamplingBatch(plain, logits.device))
    assert tokens == run(logits, plain) and logprobs == []
    assert _log_softmax_inputs(logits, plain) == []                  # no row asks: no extra kernel at all
    one = plain[:2] + [spec(seed=9, logprobs=2)] + plain[3:]
    assert _log_softmax_inputs(logits, one) == [[1, 1000]]           # only the asking row is computed


# ---------------------------------------------------------------------------------------------- adjustments
def adjusted(logits, specs):
    batch = SamplingBatch(specs, logits.device)
    return batch.adjustments.apply(logits) if batch.adjustments is not None else logits


def expected_penalties(row, prompt, outputs, repetition=1.0, frequency=0.0, presence=0.0):
    """SamplingParams' definitions, token by token."""
    out = row.clone()
    for token in range(row.shape[0]):
        count = outputs.count(token)
        if token in prompt or count:
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
        out[token] -= frequency * count + presence * (count > 0)
    return out


def test_penalties_follow_their_definitions_per_row():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 40, generator=gen) * 3
    prompt, outputs = [1, 2, 3, 3], [3, 5, 5, 5, 7]
    history = tuple(prompt + outputs)
    specs = [SampleSpec(SamplingParams(temperature=0.0, repetition_penalty=1.3), 0, 5, history, 4),
             SampleSpec(SamplingParams(temperature=0.0, frequency_penalty=0.5, presence_penalty=-0.25), 0, 5,
                        history, 4),
             spec(temperature=0.0),                                   # nothing: untouched
             SampleSpec(SamplingParams(temperature=0.0, repetition_penalty=0.8, frequency_penalty=-1.0,
                                       presence_penalty=2.0), 0, 5, history, 4)]
    out = adjusted(logits, specs)
    torch.testing.assert_close(out[0], expected_penalties(logits[0], prompt, outputs, repetition=1.3))
    torch.testing.assert_close(out[1], expected_penalties(logits[1], prompt, outputs, frequency=0.5,
                                                          presence=-0.25))
    assert torch.equal(out[2], logits[2])
    torch.testing.assert_close(out[3], expected_penalties(logits[3], prompt, outputs, 0.8, -1.0, 2.0))
    assert not torch.equal(out[1], logits[1])


def test_logit_bias_moves_only_its_tokens_and_minus_100_removes_the_greedy_choice():
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0], [0.0, 5.0, 4.0, 1.0]])
    banned = spec(temperature=0.0, logit_bias=((1, -100.0),))
    assert run(logits, [banned, spec(temperature=0.0)]) == [2, 1]
    out = adjusted(logits, [spec(logit_bias=((0, 2.5), (3, -1.0))), spec()])
    assert out.tolist() == [[2.5, 5.0, 4.0, 0.0], [0.0, 5.0, 4.0, 1.0]]
    assert {run(logits, [spec(seed=s, logit_bias=((1, -100.0), (2, -100.0)))])[0] for s in range(100)} <= {0, 3}


def test_penalties_steer_greedy_decoding_away_from_repeats():
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0]])
    history = (0, 1)                                       # the prompt is token 0, the first output token 1
    assert run(logits, [SampleSpec(SamplingParams(temperature=0.0), 0, 1, history, 1)]) == [1]
    assert run(logits, [SampleSpec(SamplingParams(temperature=0.0, presence_penalty=0.5), 0, 1, history, 1)]) == [2]
    assert run(logits, [SampleSpec(SamplingParams(temperature=0.0, repetition_penalty=1.1), 0, 1, history,
                                   1)]) == [2]


def test_min_p_drops_the_tail_relative_to_the_most_likely_token():
    logits = torch.tensor([[2.0, 1.5, 0.0, -1.0]]).log_softmax(-1)   # probs ~ .52 .31 .07 .03
    probs = logits.softmax(-1)[0]
    threshold = float(probs[2] / probs[0]) + 0.01                  # keeps 0 and 1 only
    seen = collections.Counter(run(logits, [spec(seed=s, min_p=threshold)])[0] for s in range(600))
    assert set(seen) == {0, 1}
    ratio = seen[0] / seen[1]                                      # renormalised among the kept: .62 / .38
    assert abs(ratio - float(probs[0] / probs[1])) < 0.5
    assert set(collections.Counter(run(logits, [spec(seed=s, min_p=0.0)])[0] for s in range(600))) == {0, 1, 2, 3}
    assert {run(logits, [spec(seed=s, min_p=1.0)])[0] for s in range(50)} == {0}


def test_logprobs_stay_raw_under_penalties_and_bias():
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(4))
    params = SamplingParams(temperature=0.0, logprobs=3, frequency_penalty=1.0, logit_bias=((5, 9.0),))
    tokens, lps = sample_to_host(logits, SamplingBatch([SampleSpec(params, 0, 2, (1, 2, 3), 1)], "cpu"))
    assert tokens == [5]                                   # the bias decided the token ...
    raw = logits.log_softmax(-1)[0]
    assert abs(lps[0].logprob - float(raw[5])) < 1e-6      # ... its logprob is the model's
    assert list(lps[0].top_token_ids) == raw.topk(3).indices.tolist()


def test_sampling_params_refuse_out_of_range_adjustments():
    bad = [("presence_penalty", dict(presence_penalty=2.5)), ("frequency_penalty", dict(frequency_penalty=-3.0)),
           ("frequency_penalty", dict(frequency_penalty=float("nan"))),
           ("repetition_penalty", dict(repetition_penalty=0.0)), ("min_p", dict(min_p=1.5)),
           ("logit_bias", dict(logit_bias=((40, 1.0),))), ("logit_bias", dict(logit_bias=((1, 101.0),))),
           ("logit_bias", dict(logit_bias=((1, 1.0), (1, 2.0))))]
    for field, params in bad:
        with pytest.raises(InvalidRequest) as err:
            SamplingParams(**params).validate(vocab_size=32)
        assert err.value.field == f"sampling_params.{field}"
    SamplingParams(presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=2.0, min_p=1.0,
                   logit_bias=((31, -100.0),)).validate(vocab_size=32)

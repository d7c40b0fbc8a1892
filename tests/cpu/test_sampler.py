"""The batched sampler: greedy, temperature, top-k, top-p, seeded reproducibility whatever the batch, and the
log-probabilities of the raw distribution for the rows that ask."""

import collections

import torch

from dsv4.wire.request import SamplingParams
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

"""Speculative decoding with the MTP block: taking a verify step back to its accepted tokens leaves the cache as if
only those tokens had run (bit for bit in reference numerics), across window-ring wraps and CSA / HCA window
boundaries."""

import pytest
import torch
from engine_loop import run_requests

from dsv4.model.generate import StaticCaches
from dsv4.model.numerics import Numerics
from dsv4.model.speculative import Rejection, rollback

REFERENCE = Numerics.parse("reference")


def run(model, caches, start, tokens, recorder=None):
    batch = caches.batch([caches.chunk(0, start, tokens)])
    if recorder is not None:
        batch = type(batch)(batch.token_ids, batch.layout, batch.storage, batch.numerics, recorder)
    return model(batch, logits_rows=torch.arange(len(tokens))).logits


@pytest.mark.parametrize("prefix,num_drafts,kept", [(125, 4, 2), (126, 3, 1), (250, 4, 1), (255, 2, 3), (60, 1, 1)])
def test_rollback_equals_running_only_the_kept_tokens(tiny_model, prefix, num_drafts, kept):
    """A verify chunk of kept + rejected tokens, rolled back, then 20 more tokens: the logits equal those of a run
    that never saw the rejected ones. Prefixes put the chunk across an HCA window end (127, 255), CSA windows
    and the wrap of the 128-entry ring (positions >= 128 overwrite rows the next queries still read)."""
    ids = torch.randint(0, 1024, (prefix + num_drafts + 21,), generator=torch.Generator().manual_seed(prefix)).tolist()
    plain, spec = (StaticCaches(tiny_model, REFERENCE, len(ids) + 1) for _ in range(2))
    run(tiny_model, plain, 0, ids[:prefix])
    run(tiny_model, spec, 0, ids[:prefix])
    kept_ids = ids[prefix:prefix + kept]
    wrong = [(t + 1) % 1024 for t in ids[prefix + kept:prefix + num_drafts + 1]]
    expected = run(tiny_model, plain, prefix, kept_ids)

    positions = torch.arange(prefix + 1, prefix + num_drafts + 1)[None, :]
    saved = spec.storage.checkpoint([0], positions, range(tiny_model.config.num_hidden_layers))
    recorder = {}
    verified = run(tiny_model, spec, prefix, kept_ids + wrong, recorder)
    assert torch.equal(verified[:kept], expected)                   # the kept rows are right before the rollback
    rollback(tiny_model, spec.storage, REFERENCE, saved, recorder,
             [Rejection(0, 0, prefix, 0, kept, spec.chunk(0, 0, []).block_table)])

    rest = ids[prefix + kept:prefix + kept + 20]
    assert torch.equal(run(tiny_model, spec, prefix + kept, rest), run(tiny_model, plain, prefix + kept, rest))
    for mine, theirs in zip(spec.storage.layers, plain.storage.layers, strict=True):
        assert torch.equal(mine.window, theirs.window)
        for name, c in mine.compressors.items():
            assert torch.equal(c.state_kv, theirs.compressors[name].state_kv)
            assert torch.equal(c.state_score, theirs.compressors[name].state_score)


# ---------------------------------------------------------------------------------------------- the engine
def generate(checkpoint, requests, speculative_tokens=0, drafter=None, in_flight=1, **overrides):
    return run_requests(checkpoint, requests, speculative_tokens=speculative_tokens, drafter=drafter,
                        in_flight=in_flight, **overrides)[:3]


def workload(seed, temperature=0.0, logprobs=None):
    """Prompts that put decoding across HCA window ends (127, 255) and ring wraps, beside short ones."""
    from dsv4.wire.request import SamplingParams

    g = torch.Generator().manual_seed(seed)
    lengths = [3, 60, 118, 126, 200, 250, 9]
    return [(torch.randint(2, 1024, (n,), generator=g).tolist(),
             SamplingParams(max_tokens=12 + 2 * i, temperature=temperature, ignore_eos=True, logprobs=logprobs))
            for i, n in enumerate(lengths)]


@pytest.fixture(scope="module")
def plain_greedy(tiny_checkpoint):
    return generate(tiny_checkpoint, workload(1))[0]


@pytest.mark.parametrize("speculative_tokens", [1, 3])
def test_mtp_speculation_keeps_greedy_outputs(tiny_checkpoint, tiny_model, plain_greedy, speculative_tokens):
    """Greedy outputs with the MTP block drafting 1 or 3 tokens are token for token those without, which are the
    single-sequence model's."""
    from dsv4.model.generate import greedy_generate

    spec, drafts, _ = generate(tiny_checkpoint, workload(1), speculative_tokens)
    assert drafts > 0
    assert {i: t for i, (t, _) in spec.items()} == {i: t for i, (t, _) in plain_greedy.items()}
    prompt, sampling = workload(1)[4]
    assert plain_greedy[4][0] == greedy_generate(tiny_model, prompt, sampling.max_tokens, REFERENCE)


def answer_drafter(requests, answers, mode):
    """Drafts from the known outputs: all right ("perfect"), all wrong ("wrong"), or right for a prefix whose
    length varies from step to step ("partial")."""
    expected = {tuple(prompt): answers[i][0] for i, (prompt, _) in enumerate(requests)}

    def drafter(seq, count):
        truth = expected[tuple(seq.tokens[:len(seq.tokens) - seq.num_outputs])][seq.num_outputs:][:count]
        right = {"perfect": count, "wrong": 0, "partial": (seq.num_outputs * 7 + len(seq.tokens)) % (count + 1)}[mode]
        return truth[:right] + [(t + 1) % 1024 for t in truth[right:]]

    return drafter


@pytest.mark.parametrize("mode,in_flight", [("perfect", 1), ("wrong", 1), ("partial", 1), ("perfect", 2),
                                            ("partial", 2)])
def test_drafts_right_or_wrong_keep_the_outputs(tiny_checkpoint, plain_greedy, mode, in_flight):
    """Drafts from the known answer are all accepted (each verify step then emits 4 + 1 tokens); drafts that are
    always wrong none; drafts right up to a varying point are accepted that far, and the cache is taken back to
    them; the outputs stay the same, also with two steps in flight (each planned before the previous step's
    extra tokens are known)."""
    requests = workload(1)
    spec, drafts, accepted = generate(tiny_checkpoint, requests, 4, answer_drafter(requests, plain_greedy, mode),
                                      in_flight)
    assert {i: t for i, (t, _) in spec.items()} == {i: t for i, (t, _) in plain_greedy.items()}
    assert drafts > 0
    assert accepted == {"perfect": drafts, "wrong": 0}.get(mode, accepted)
    assert mode != "partial" or 0 < accepted < drafts


def test_seeded_sampling_and_logprobs_are_unchanged_by_speculation(tiny_checkpoint):
    """At temperature 0.9 with seeds, the tokens and their log-probabilities are the same with and without
    speculation, with the MTP block's drafts and with drafts partly right: each emitted token is the target's own
    sample, drawn with the same (seed, output index) noise."""
    requests = workload(2, temperature=0.9, logprobs=2)
    plain = generate(tiny_checkpoint, requests)[0]
    assert all(len(lps) == len(tokens) for tokens, lps in plain.values())
    spec, drafts, _ = generate(tiny_checkpoint, requests, 3)
    assert drafts > 0 and spec == plain
    spec, drafts, accepted = generate(tiny_checkpoint, requests, 3, answer_drafter(requests, plain, "partial"))
    assert 0 < accepted < drafts and spec == plain


def test_speculation_under_preemption_and_small_chunks(tiny_checkpoint, tiny_model, monkeypatch):
    """A cache of 3 blocks for 2 sequences whose decodes both cross position 256 (the newer first): when the older
    needs the last block, the newer is preempted, and later re-prefilled; prompts run in chunks of 40 tokens.
    Greedy outputs equal the plain engine's under the same pressure, with the MTP block's drafts, and with drafts
    partly right and two steps in flight (where the older request's room for drafts may take the block first: no
    preemption then)."""
    from dsv4.cache.spec import plan_cache
    from dsv4.cluster.scheduler import Scheduler
    from dsv4.wire.config import SchedulerConfig

    preempted = []
    preempt = Scheduler._preempt
    monkeypatch.setattr(Scheduler, "_preempt", lambda self, state: (preempted.append(state.request_id),
                                                                      preempt(self, state)))

    plan = plan_cache(tiny_model.config, REFERENCE, 1 << 30, 2)
    cramped = dict(kv_cache_bytes=2 * plan.bytes_per_slot + 3 * plan.bytes_per_block,
                   scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=128, max_prefill_chunk=40))
    from dsv4.wire.request import SamplingParams

    g = torch.Generator().manual_seed(9)
    requests = [(torch.randint(2, 1024, (n,), generator=g).tolist(),
                 SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)) for n in (240, 250)]
    plain = generate(tiny_checkpoint, requests, **cramped)[0]
    preempted.clear()
    spec = generate(tiny_checkpoint, requests, 2, **cramped)[0]
    assert preempted and spec == plain
    spec, _, accepted = generate(tiny_checkpoint, requests, 3, answer_drafter(requests, plain, "partial"), in_flight=2,
                                 **cramped)
    assert accepted and spec == plain


def test_the_service_speculates_over_two_expert_parallel_workers(ray_cluster, tiny_checkpoint, tiny_model):
    """The real service: two worker actors holding half of the experts each (gloo all-to-all, the MTP block's
    MoE included: every worker runs the same passes each step), the coordinator keeping two steps in flight
    while accepted drafts move requests on by several tokens; 8 concurrent greedy streams equal the
    single-process model, acceptance is reported, and every block comes back."""
    import concurrent.futures

    import grpc
    from api_fakes import TIMEOUT_S, wait_until
    from conftest import start_test_engine
    from test_service import generate_ids, prompts, serve

    from dsv4.model.generate import greedy_generate
    from dsv4.protos import dsv4_pb2 as pb
    from dsv4.protos import dsv4_pb2_grpc

    engine = start_test_engine(tiny_checkpoint, speculative_tokens=2)
    server = serve(engine, tiny_checkpoint)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = dsv4_pb2_grpc.Dsv4EngineStub(channel)
            cases = [(p, 6 + 3 * (i % 5)) for i, p in enumerate(prompts(8, seed=11))]
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(lambda c: generate_ids(stub, c[0], c[1])[0], cases))
            for (prompt, n), got in zip(cases, results, strict=True):
                assert got == greedy_generate(tiny_model, prompt, n, REFERENCE)

            def idle():
                loads = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S)
                return all(w.num_running_requests == 0 and w.free_blocks == w.total_blocks for w in loads.workers)

            wait_until(idle, "every block to come back")
            extra = stub.GetLoads(pb.GetLoadsRequest(), timeout=TIMEOUT_S).extra
            assert extra["spec_decode_num_draft_tokens"] > 0
            assert 0 <= extra["spec_decode_num_accepted_tokens"] <= extra["spec_decode_num_draft_tokens"]
    finally:
        server.stop()
        engine.shutdown()


def test_acceptance_counters_follow_the_engine_totals():
    """The metrics' draft and accepted counters advance by what the engine's cumulative totals grew."""
    from dsv4.cluster.engine_client import LoadReport
    from dsv4.cluster.metrics import ServerMetrics

    metrics = ServerMetrics("tiny")
    for drafts, accepted in ((10, 4), (25, 9), (25, 9)):
        metrics.observe_loads(LoadReport(0, 0, (), (), {"spec_decode_num_draft_tokens": drafts,
                                                        "spec_decode_num_accepted_tokens": accepted}))
    label = {"model_name": "tiny"}
    assert metrics.registry.get_sample_value("dsv4:spec_decode_num_draft_tokens_total", label) == 25
    assert metrics.registry.get_sample_value("dsv4:spec_decode_num_accepted_tokens_total", label) == 9

"""The fixed-capacity expert exchange (fast numerics, no host synchronisation) over gloo: two worker processes
holding half of the experts each give the logits of the single-process fast model, within the fast numerics'
tolerance, with one hot expert taking every token and with a worker that has no tokens at all."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv4.model.checkpoint import load_model
from dsv4.model.generate import StaticCaches
from dsv4.model.numerics import Numerics
from dsv4.workers.expert_parallel import FixedCapacityExpertParallel, LocalExperts

FAST = Numerics.parse("fast")
WORLD, PREFILL = 2, 22


def make_hot(model, expert: int) -> None:
    """Every token picks `expert`: in hash layers through tid2eid's first column, elsewhere through its bias."""
    for block in model.layers:
        gate = block.ffn.gate
        if gate.is_hash:
            gate.tid2eid[:, 0] = expert
            gate.tid2eid[:, 1:] = torch.where(gate.tid2eid[:, 1:] == expert, (expert + 1) % gate.weight.shape[0],
                                              gate.tid2eid[:, 1:])
        else:
            gate.bias[expert] = 1e4


def steps(tokens, prefill):
    """(start, chunk) of each step: a prefill, then one decode token at a time."""
    return [(0, tokens[:prefill])] + [(i, tokens[i:i + 1]) for i in range(prefill, len(tokens))]


def forward(model, tokens, prefill, before_step=lambda num_tokens: None):
    """The logits [n, vocab] of every position, fed as `steps`."""
    caches = StaticCaches(model, FAST, len(tokens) + 4)
    out = []
    for start, chunk in steps(tokens, prefill):
        before_step(len(chunk))
        out.append(model(caches.batch([caches.chunk(0, start, chunk)]), logits_rows=torch.arange(len(chunk))).logits)
    return torch.cat(out)


def worker(rank, checkpoint, port, hot, tokens, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        probe = load_model(checkpoint, progress=None)
        n = probe.config.n_routed_experts
        owner = [e * WORLD // n for e in range(n)]
        model = load_model(checkpoint, expert_ids=[e for e in range(n) if owner[e] == rank], progress=None)
        if hot is not None:
            make_hot(model, hot)
        FAST.prepare(model)
        exchange = FixedCapacityExpertParallel(model, owner, rank, WORLD)
        with torch.inference_mode():
            if rank == 0:
                results[rank] = forward(model, tokens, PREFILL, exchange.set_capacity)
            else:   # no tokens: serve rank 0's pairs in every layer of each of its steps
                for _, chunk in steps(tokens, PREFILL):
                    exchange.set_capacity(len(chunk))   # the largest worker's tokens: the same on every rank
                    exchange.idle_pass(FAST)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("hot", [None, 3], ids=["uniform", "one-hot-expert"])
def test_fixed_capacity_exchange_equals_single_process_fast(tiny_checkpoint, hot):
    tokens = torch.randint(0, 1024, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    single = load_model(tiny_checkpoint, progress=None)
    if hot is not None:
        make_hot(single, hot)
    FAST.prepare(single)
    LocalExperts(single)
    with torch.inference_mode():
        expected = forward(single, tokens, PREFILL)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, (tiny_checkpoint, free_port(), hot, tokens, results), nprocs=WORLD, join=True)
        got = results[0]
    rel = float((got - expected).norm() / expected.norm())
    assert rel < 1e-2, rel
    assert float((got.argmax(-1) == expected.argmax(-1)).float().mean()) >= 0.9

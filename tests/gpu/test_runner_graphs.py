"""The GPU runner: decode steps replayed from CUDA graphs (padded to the captured batch size) equal eager steps
within the fast numerics' tolerance, for every captured size; prefill and mixed steps run eagerly."""

import pytest
import torch

from dsv4.model.batch import Chunk
from dsv4.model.config import preset
from dsv4.model.kv_cache import KVStorage
from dsv4.model.numerics import Numerics
from dsv4.model.synthetic import synthetic_model
from dsv4.workers.model_runner import ModelRunner, RunnerConfig

pytestmark = pytest.mark.gpu
FAST = Numerics.parse("fast")
SIZES = (1, 2, 4, 8)


def test_graph_replay_equals_eager_for_every_bucket():
    config = preset("small")
    model = synthetic_model(config, "cuda", seed=1, progress=None)
    max_seqs, blocks = 8, 4
    storages = [KVStorage(config, FAST, max_seqs + 1, max_seqs * blocks, 256, "cuda") for _ in range(2)]
    graphed = ModelRunner(model, storages[0], FAST, RunnerConfig(max_seqs, 4096, blocks, SIZES))
    eager = ModelRunner(model, storages[1], FAST, RunnerConfig(max_seqs, 4096, blocks, ()))
    graphed.capture_graphs()
    gen = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(5, 300, (max_seqs,), generator=gen)]
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    table = [range(s * blocks, (s + 1) * blocks) for s in range(max_seqs)]
    prefill = [Chunk(s, table[s], 0, prompts[s]) for s in range(max_seqs)]
    for runner in (graphed, eager):
        runner.step(prefill)                               # mixed-length prefill: eager in both
    positions = list(lengths)
    for num_seqs in (1, 3, 5, 8, 2, 7):                    # every bucket, padded and exact
        chunks = [Chunk(s, table[s], positions[s], [int(torch.randint(0, config.vocab_size, (1,), generator=gen))])
                  for s in range(num_seqs)]
        a, b = graphed.step(chunks), eager.step(chunks)
        assert graphed._graph_size(chunks) is not None
        rel = float((a - b).norm() / b.norm())
        assert rel < 2e-2, (num_seqs, rel)
        assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.99
        for s in range(num_seqs):
            positions[s] += 1


def test_prefill_and_mixed_steps_do_not_use_graphs():
    config = preset("small")
    model = synthetic_model(config, "cuda", seed=2, progress=None)
    storage = KVStorage(config, FAST, 3, 8, 256, "cuda")
    runner = ModelRunner(model, storage, FAST, RunnerConfig(2, 512, 4, (1, 2)))
    runner.capture_graphs()
    mixed = [Chunk(0, range(4), 0, [1, 2, 3]), Chunk(1, range(4, 8), 0, [4])]
    assert runner._graph_size(mixed) is None
    assert runner.step(mixed).shape == (2, config.vocab_size)
    assert runner._graph_size([Chunk(0, range(4), 3, [5])]) == 1

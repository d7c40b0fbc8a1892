"""The sampler on the GPU picks the same tokens as on the CPU for the same logits and seeds."""

import pytest
import torch

from dsv4.wire.request import SamplingParams
from dsv4.workers.sampler import SampleSpec, SamplingBatch, sample

pytestmark = pytest.mark.gpu


def spec(seed=1, index=0, **params):
    return SampleSpec(SamplingParams(**params), seed, index)


def run(logits, specs):
    return sample(logits, SamplingBatch(specs, logits.device)).tolist()


def test_device_sampler_equals_the_cpu_sampler():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(32, 129280, generator=gen) * 3
    specs = [spec(seed=100 + i, index=i, temperature=[0.0, 0.8, 1.0, 1.5][i % 4], top_k=[0, 40][i % 2],
                  top_p=[1.0, 0.9, 0.7][i % 3]) for i in range(32)]
    assert run(logits.cuda(), specs) == run(logits, specs)


def test_device_adjustments_equal_the_cpu_ones():
    """Penalties over a long history, logit bias and min-p: the same tokens on both devices."""
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(16, 129280, generator=gen) * 3
    history = torch.randint(0, 129280, (3000,), generator=gen).tolist()
    specs = [SampleSpec(SamplingParams(temperature=[0.0, 0.9][i % 2], min_p=[0.0, 0.1][i // 8],
                                       presence_penalty=0.5 * (i % 3), frequency_penalty=-0.25 * (i % 2),
                                       repetition_penalty=[1.0, 1.2, 0.9][i % 3],
                                       logit_bias=((history[i], 5.0), (7, -100.0)) if i % 4 else ()),
                        200 + i, i, history[:1000 + 100 * i], 700) for i in range(16)]
    assert run(logits.cuda(), specs) == run(logits, specs)

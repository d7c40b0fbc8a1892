"""How much of a request's hash-layer expert traffic stays on its own worker, by placement policy.

The first MoE layers route by token id (`tid2eid`), so a prompt's hash-layer destinations are known before it
runs. Placing a request on the worker owning most of them keeps those (token, expert) pairs off the all-to-all.
This measures the local share of hash-layer pairs under: a fixed worker (what headroom-only placement gives on
an idle cluster), the best worker for each prompt (affinity), and the expectation for a uniform table (1/N).

    python benchmarks/hash_affinity.py --model DIR --workers 2 --prompts 200 --length 512
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from dsv4.cluster.placement import HashAffinity
from dsv4.model.config import ModelConfig
from dsv4.wire.placement import ExpertPlacement


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = ModelConfig.from_file(f"{args.model}/config.json")
    placement = ExpertPlacement.contiguous(config.n_routed_experts, args.workers)
    affinity = HashAffinity.from_checkpoint(args.model, config.num_hash_layers, placement)
    rng = np.random.default_rng(args.seed)
    shares = np.array([affinity(rng.integers(0, config.vocab_size, args.length).tolist())
                       for _ in range(args.prompts)])                                  # [prompts, workers]
    result = {"workers": args.workers, "prompt_length": args.length, "prompts": args.prompts,
              "local_share_fixed_worker": round(float(shares[:, 0].mean()), 4),
              "local_share_affinity": round(float(shares.max(axis=1).mean()), 4),
              "uniform_expectation": round(1 / args.workers, 4)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

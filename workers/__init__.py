"""dsv4.workers: the per-GPU side — model runner (the engine step), sampler, expert-parallel communication and
the Ray worker actor."""

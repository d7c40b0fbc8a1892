"""The worker: one per GPU (or one CPU process), run as a Ray actor by `dsv4.workers.launch`.

It owns its device, the attention weights, its shard of the routed experts and the KV pools of the sequences the
coordinator placed on it. Each step it applies the coordinator's plan (new requests in full, then deltas),
runs one engine step (or, with no tokens, an idle pass that still joins every MoE all-to-all), samples the
requests whose chunk reached their last token, and returns the sampled token ids.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import torch
import torch.distributed as dist

from dsv4.cache.pools import allocate_pools
from dsv4.cache.spec import plan_cache
from dsv4.kernels.build import load as load_kernels
from dsv4.kernels.knobs import knobs
from dsv4.model.batch import Chunk
from dsv4.model.checkpoint import load_model
from dsv4.model.numerics import Numerics, NumericsMode
from dsv4.wire.config import ServeConfig
from dsv4.wire.messages import WorkerInfo, WorkerPlan, WorkerResult
from dsv4.wire.request import SamplingParams
from dsv4.workers.expert_parallel import ExpertParallel, FixedCapacityExpertParallel, LocalExperts
from dsv4.workers.grammar import Grammars
from dsv4.workers.memory import kv_cache_budget
from dsv4.workers.model_runner import ModelRunner, RunnerConfig, graph_sizes_up_to
from dsv4.workers.sampler import SampleSpec, SamplingBatch, sample_to_host
from dsv4.workers.sequence import SequenceState, StepTokens
from dsv4.workers.speculative import Speculator

SLOW_STEP_SECONDS = 2.0   # steps slower than this are logged with their shape


class Worker:
    def __init__(self, rank: int, world_size: int, config: ServeConfig, expert_owner: tuple[int, ...]):
        self.rank, self.world_size, self.config, self.owner = rank, world_size, config, expert_owner
        self.numerics = Numerics.parse(config.numerics)
        if config.device == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(world_size, 1)))
        self.device = torch.device("cuda", 0) if config.device == "cuda" else torch.device("cpu")
        self.sequences: dict[str, SequenceState] = {}
        self._injected_faults: list[str] = []     # `inject_step_faults`: messages the next steps raise
        self._grammar_compiler: Grammars | None = None

    # ------------------------------------------------------------------------------------------ setup
    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port, for rank 0 to host the process group's store."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def init_distributed(self, host: str, port: int) -> None:
        if self.world_size == 1:
            return
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world_size)

    def load(self) -> WorkerInfo:
        local = tuple(e for e, r in enumerate(self.owner) if r == self.rank)
        build = None
        if self.device.type == "cuda" and knobs().kernels:   # compile (or load) the CUDA extension meanwhile
            build = threading.Thread(target=load_kernels, name="dsv4-kernel-build", daemon=True)
            build.start()
        self.model = load_model(self.config.model_dir, expert_ids=list(local), device=self.device,
                                progress=lambda m: print(f"[worker {self.rank}] {m}", flush=True))
        if build is not None:
            build.join()      # before any kernel runs (a failed build raises again, in this thread, on first use)
        sched = self.config.scheduler
        # CUDA graphs (fast numerics on a GPU) pad decode batches with a spare slot the scheduler never sees. With
        # several workers the graphs would capture NCCL all-to-alls, not yet run on a multi-GPU machine: eager there.
        # Speculative steps (verify chunks, MTP passes) run eagerly for now: no graphs with them.
        use_graphs = (self.device.type == "cuda" and self.numerics.mode is NumericsMode.FAST
                      and not self.config.enforce_eager and self.world_size == 1
                      and not self.config.speculative_tokens)
        spare = 1 if use_graphs else 0
        self.numerics.prepare(self.model)
        budget = self.config.kv_cache_bytes
        if budget == 0:   # size the cache from what the GPU has left once the weights are resident
            memory = kv_cache_budget(self.model, self.numerics, self.config.gpu_memory_utilization,
                                     sched.max_num_batched_tokens, self.config.block_size, use_graphs)
            print(f"[worker {self.rank}] {memory.describe()}", flush=True)
            budget = memory.kv_cache_bytes
        plan = plan_cache(self.model.config, self.numerics, budget, sched.max_num_seqs + spare,
                          self.config.block_size, self.config.prefix_cache_snapshots)
        snapshots = (f", {plan.num_snapshots} prefix snapshots of {plan.bytes_per_snapshot / 2**20:.2f} MiB"
                     if plan.num_snapshots else "")
        print(f"[worker {self.rank}] KV cache: {plan.num_blocks} blocks of {plan.block_size} positions = "
              f"{plan.max_context_tokens} tokens of context, {sched.max_num_seqs} sequence slots{snapshots}",
              flush=True)
        storage = allocate_pools(self.model.config, self.numerics, plan, self.device)
        max_len = self.config.max_model_len or self.model.config.max_position_embeddings
        runner_config = RunnerConfig(sched.max_num_seqs, sched.max_num_batched_tokens,
                                     min(-(-max_len // plan.block_size), max(plan.num_blocks, 1)),
                                     graph_sizes_up_to(sched.max_num_seqs) if use_graphs else ())
        self.runner = ModelRunner(self.model, storage, self.numerics, runner_config)
        fast = self.numerics.mode is NumericsMode.FAST
        exchange = FixedCapacityExpertParallel if fast else ExpertParallel
        self.experts = (exchange(self.model, self.owner, self.rank, self.world_size) if self.world_size > 1
                        else LocalExperts(self.model))
        self.speculator = None
        if self.config.speculative_tokens:
            self.speculator = Speculator(self.runner, self.config.speculative_tokens, max_len,
                                         lambda: self.experts.idle_pass(self.numerics, self.model.mtp))
        if self.device.type == "cuda":
            self._warm_up()
        if use_graphs:
            stats = self.runner.capture_graphs(lambda m: print(f"[worker {self.rank}] {m}", flush=True))
            print(f"[worker {self.rank}] CUDA graphs: {len(self.runner.graphs)} decode sizes in "
                  f"{stats['seconds']:.1f} s, {stats['bytes'] / 2**20:.0f} MiB", flush=True)
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return WorkerInfo(self.rank, plan.num_slots - spare, plan.num_blocks, plan.block_size, plan.bytes_per_token,
                          name, local, plan.num_snapshots)

    def _warm_up(self) -> None:
        """Compile before the first request: the runner's prefill, continuation and mixed steps on the real cache,
        then the sampler's greedy, filtered and log-probability paths on their logits."""
        start = time.perf_counter()
        logits = self.runner.warm_up()
        specs = [SampleSpec(SamplingParams(temperature=0.0, logprobs=5), 0, 0),
                 SampleSpec(SamplingParams(temperature=0.8, top_p=0.9, top_k=50, logprobs=0), 1, 0)]
        with torch.inference_mode():
            sample_to_host(logits, SamplingBatch(specs, logits.device))
            sample_to_host(logits, SamplingBatch([SampleSpec(SamplingParams(), 2, 0)] * len(logits), logits.device))
        print(f"[worker {self.rank}] warm-up steps in {time.perf_counter() - start:.1f} s", flush=True)

    def _grammars(self) -> Grammars:
        """The structured-output compiler for the served tokenizer, made on the first constrained request."""
        if self._grammar_compiler is None:
            config = self.model.config
            self._grammar_compiler = Grammars(self.config.model_dir, config.vocab_size, (config.eos_token_id,))
        return self._grammar_compiler

    def inject_step_faults(self, messages: list[str]) -> None:
        """Fault drills: each of the next steps that runs tokens raises RuntimeError(message) where the forward
        would, after the plan is applied (as a kernel failure would)."""
        self._injected_faults.extend(messages)

    # ------------------------------------------------------------------------------------------ steps
    def execute(self, plan: WorkerPlan) -> WorkerResult:
        start = time.perf_counter()
        for request_id in plan.finished_ids:
            self.sequences.pop(request_id, None)
        for new in plan.new_requests:
            seq = SequenceState(list(new.token_ids), new.slot, new.sampling, new.seed, new.num_prior_outputs,
                                new.num_cached_tokens, list(new.prefix_block_ids))
            if new.sampling.structured is not None:   # past the outputs it has (a preempted request resumes)
                seq.grammar = self._grammars().matcher(new.sampling.structured,
                                                       seq.tokens[len(seq.tokens) - seq.num_outputs:])
            self.sequences[new.request_id] = seq
            if new.snapshot is not None:   # a cached prefix: its blocks are shared, the slot starts from its end
                with torch.inference_mode():
                    self.runner.storage.load_snapshot(new.snapshot, new.slot)
        runs = []
        for chunk in plan.chunks:
            seq = self.sequences[chunk.request_id]
            seq.blocks.extend(chunk.new_block_ids)
            end = seq.num_computed + chunk.num_tokens
            if end > len(seq.tokens):
                raise AssertionError(f"request {chunk.request_id}: asked to run up to token {end}, "
                                     f"have {len(seq.tokens)}")
            runs.append((seq, chunk.num_tokens, chunk.max_drafts))
        if isinstance(self.experts, FixedCapacityExpertParallel):   # every worker sizes the exchange alike
            self.experts.set_capacity(plan.max_worker_tokens)
        step = StepTokens([], [])
        if runs:
            if self._injected_faults:
                raise RuntimeError(self._injected_faults.pop(0))
            step = self.speculator.step(runs) if self.speculator is not None else self._step(runs)
        else:   # no tokens here: still serve the other workers' pairs in every MoE layer
            with torch.inference_mode():
                self.experts.idle_pass(self.numerics)
            if self.speculator is not None:
                self.speculator.idle()
        with torch.inference_mode():
            for chunk in plan.chunks:           # prefix caching: the state where a prefix ends, for later requests
                if chunk.save_snapshot is not None:
                    self.runner.storage.save_snapshot(self.sequences[chunk.request_id].slot, chunk.save_snapshot)
        sampled, logprobs = [], []
        asked = any(step.logprobs)
        for chunk, tokens, token_logprobs in zip(plan.chunks, step.tokens, step.logprobs, strict=True):
            sampled.extend((chunk.request_id, token) for token in tokens)
            if asked:   # aligned with sampled: the request's own, or None where it did not ask
                logprobs.extend(token_logprobs or [None] * len(tokens))
        seconds = time.perf_counter() - start
        if seconds > SLOW_STEP_SECONDS:   # a first-use compile (or a stall) shows in the log, with its shape
            print(f"[worker {self.rank}] slow step {plan.step_id}: {plan.num_tokens} tokens of {len(runs)} "
                  f"sequences ({sum(n > 1 for _, n, _ in runs)} prefill chunks) took {seconds:.2f} s", flush=True)
        return WorkerResult(plan.step_id, self.rank, tuple(sampled), self.experts.take_counts(), plan.num_tokens,
                            seconds, tuple(logprobs), step.num_drafts, step.num_accepted)

    def _step(self, runs: list[tuple[SequenceState, int, int]]) -> StepTokens:
        """One step without speculation (decode steps replay CUDA graphs where captured): each sequence's next n
        tokens, then one token sampled for each that reached its last token."""
        logits = self.runner.step([Chunk(seq.slot, seq.blocks, seq.num_computed,
                                         seq.tokens[seq.num_computed:seq.num_computed + n]) for seq, n, _ in runs])
        step = StepTokens([[] for _ in runs], [[] for _ in runs])
        rows, specs = [], []
        for i, (seq, n, _) in enumerate(runs):
            seq.num_computed += n
            if seq.num_computed == len(seq.tokens):   # the chunk reached the end: sample the next token
                rows.append(i)
                specs.append(seq.sample_spec())
        if rows:
            with torch.inference_mode():
                picked = logits[torch.tensor(rows, device=logits.device)]
                # the step's one sync: token ids, and log-probabilities for the requests that ask
                tokens, logprobs = sample_to_host(picked, SamplingBatch(specs, logits.device))
            for j, (i, token) in enumerate(zip(rows, tokens, strict=True)):
                seq = runs[i][0]
                seq.add_outputs([token])
                step.tokens[i] = [token]
                if logprobs and logprobs[j] is not None:
                    step.logprobs[i] = [logprobs[j]]
        return step

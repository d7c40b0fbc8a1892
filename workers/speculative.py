"""Speculative decoding with the checkpoint's MTP block (spec §2.5), inside one worker step.

A decoding sequence carries up to N drafts of its next tokens. The step runs its last token and the drafts as one
chunk (the *verify*) and samples the target token at each of those positions with the request's own sampler and
noise (seed, output index); it keeps the drafts up to the first one that differs from the target's token, then
that target token. The tokens are therefore exactly those of decoding without speculation, at any temperature.
The drafts are drawn with the same noise as the target token they guess (the argmax at temperature 0), so they
agree as often as the MTP block's distribution and the model's allow. The cache then goes back to the kept
tokens (`dsv4.model.speculative`).

Then the MTP block runs over every position the step committed (its own window ring needs all of them) and its
last logits give each decoding sequence's first draft; N - 1 chained passes give the rest, each one position
further on, with the block's own output streams and its previous draft as input; their ring rows are put back
afterwards, since those positions are guesses. Every step runs exactly N MTP passes, idle ones included: with
several workers the MTP block's MoE exchanges need every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dsv4.model.batch import Chunk
from dsv4.model.speculative import Rejection, rollback
from dsv4.model.transformer import ForwardOutput
from dsv4.wire.config import ServeConfig
from dsv4.wire.request import TokenLogprobs
from dsv4.workers.model_runner import ModelRunner
from dsv4.workers.sampler import SamplingBatch, sample_to_host
from dsv4.workers.sequence import SequenceState, StepTokens

MAX_SPECULATIVE_TOKENS = ServeConfig.MAX_SPECULATIVE_TOKENS
# tests: (sequence, how many) -> drafts, in place of the MTP block (a perfect or an always-wrong guesser)
Drafter = Callable[[SequenceState, int], list[int]]


class Speculator:
    def __init__(self, runner: ModelRunner, num_tokens: int, max_model_len: int, idle_pass: Callable[[], None],
                 drafter: Drafter | None = None):
        """idle_pass: one MTP pass with no tokens (joins the other workers' MoE exchanges)."""
        if not 1 <= num_tokens <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative tokens must be in [1, {MAX_SPECULATIVE_TOKENS}], got {num_tokens}")
        if not runner.model.config.num_nextn_predict_layers or not len(runner.model.mtp):
            raise ValueError("speculative decoding needs the checkpoint's MTP block (num_nextn_predict_layers >= 1)")
        self.runner, self.num_tokens, self.max_model_len = runner, num_tokens, max_model_len
        self.idle_pass, self.drafter = idle_pass, drafter
        self.storage = runner.storage
        self.mtp_layer = runner.model.config.num_hidden_layers

    # ------------------------------------------------------------------------------------------ verify
    @torch.inference_mode()
    def step(self, runs: Sequence[tuple[SequenceState, int, int]]) -> StepTokens:
        """Run each sequence's next `n` tokens (plus up to `max_drafts` of its drafts, when they reach its last
        token), sample, keep the agreeing drafts, take the cache back to them, and draft again for the next
        step."""
        chunks, rows, specs, first_rows, drafts_of = [], [], [], [], []
        row = 0
        for seq, n, max_drafts in runs:
            start, end = seq.num_computed, seq.num_computed + n
            reaches_end = end == len(seq.tokens)
            drafts = seq.drafts[:min(max_drafts, self._room(seq, end))] if reaches_end else []
            chunks.append(Chunk(seq.slot, seq.blocks, start, seq.tokens[start:end] + drafts))
            if reaches_end:             # the target token after the last known one and after each draft
                rows.extend(range(row + n - 1, row + n + len(drafts)))
                specs.extend(seq.sample_spec(drafts[:j]) for j in range(len(drafts) + 1))
            first_rows.append(row)
            drafts_of.append(drafts)
            row += n + len(drafts)
        verify = [i for i, drafts in enumerate(drafts_of) if drafts]
        saved_at = {i: v for v, i in enumerate(verify)}         # a verified run's row in the checkpoint
        saved = None
        if verify:   # the ring rows the drafts overwrite, and the compressor states, of the verified sequences
            positions = torch.full((len(verify), self.num_tokens), -1, dtype=torch.int64)
            for v, i in enumerate(verify):
                end = chunks[i].start + runs[i][1]
                positions[v, :len(drafts_of[i])] = torch.arange(end, end + len(drafts_of[i]))
            saved = self.storage.checkpoint([chunks[i].slot for i in verify], positions,
                                            range(self.runner.model.config.num_hidden_layers))
        out, recorder = self.runner.forward(chunks, rows, record=bool(verify))
        sampled, logprobs = sample_to_host(out.logits, SamplingBatch(specs, out.logits.device)) if specs else ([], [])

        result, rejections, k = StepTokens([], []), [], 0
        for i, (seq, n, _) in enumerate(runs):
            start, drafts = seq.num_computed, drafts_of[i]
            emitted: list[int] = []
            kept_logprobs: list[TokenLogprobs] = []
            accepted = 0
            if start + n == len(seq.tokens):
                targets = sampled[k:k + len(drafts) + 1]
                while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
                    accepted += 1
                emitted = targets[:accepted + 1]
                kept_logprobs = [lp for lp in logprobs[k:k + accepted + 1] if lp is not None] if logprobs else []
                k += len(drafts) + 1
                if accepted < len(drafts):
                    rejections.append(Rejection(saved_at[i], seq.slot, start, first_rows[i], n + accepted,
                                                list(seq.blocks)))
            result.num_drafts += len(drafts)
            result.num_accepted += accepted
            seq.num_computed = start + n + accepted
            seq.add_outputs(emitted)
            seq.drafts = []
            result.tokens.append(emitted)
            result.logprobs.append(kept_logprobs)
        if saved is not None:
            rollback(self.runner.model, self.storage, self.runner.numerics, saved, recorder, rejections)
        self._draft(runs, [c.start for c in chunks], first_rows, out.streams)
        return result

    @torch.inference_mode()
    def idle(self) -> None:
        """A step with no tokens on this worker: its MTP passes still join the other workers' exchanges."""
        for _ in range(self.num_tokens if self.drafter is None else 0):
            self.idle_pass()

    def _room(self, seq: SequenceState, end: int) -> int:
        """How many drafts may follow position end - 1: the blocks this step holds, the context, max_tokens."""
        capacity = min(len(seq.blocks) * self.storage.block_size, self.max_model_len)
        wanted = seq.sampling.max_tokens - seq.num_outputs - 1
        if seq.grammar is not None:     # constrained output: not drafted for (its mask would need each draft)
            return 0
        return max(0, min(self.num_tokens, capacity - end, wanted))

    # ------------------------------------------------------------------------------------------ drafting
    def _draft(self, runs: Sequence[tuple[SequenceState, int, int]], starts: Sequence[int],
               first_rows: Sequence[int], streams: torch.Tensor) -> None:
        """The MTP block over the positions each run committed, then the chained passes: seq.drafts for the next
        step of every decoding sequence."""
        wanted = [self._room(seq, seq.num_computed + 1) if seq.decoding else 0 for seq, _, _ in runs]
        if self.drafter is not None:
            for (seq, _, _), count in zip(runs, wanted, strict=True):
                seq.drafts = self.drafter(seq, count) if count else []
            return
        chunks, parts, rows, live, row = [], [], [], [], 0
        for i, ((seq, _, _), start, first_row) in enumerate(zip(runs, starts, first_rows, strict=True)):
            count = seq.num_computed - start                     # positions this step committed
            if count <= 0:
                continue
            # the MTP block at position t reads the main model's streams at t and the token at t + 1
            chunks.append(Chunk(seq.slot, seq.blocks, start, seq.tokens[start + 1:seq.num_computed + 1]))
            parts.append(streams[first_row:first_row + count])
            row += count
            if wanted[i]:
                rows.append(row - 1)
                live.append(i)
        out = self._mtp_pass(chunks, torch.cat(parts) if parts else streams[:0], rows)
        saved = None
        if self.num_tokens > 1 and live:    # the chained passes write guessed positions: put them back after
            positions = torch.stack([torch.arange(runs[i][0].num_computed, runs[i][0].num_computed
                                                  + self.num_tokens - 1) for i in live])
            saved = self.storage.checkpoint([runs[i][0].slot for i in live], positions, [self.mtp_layer])
        drafted = list(live)
        for depth in range(self.num_tokens):
            if depth:   # one position on: the previous pass's output streams and its draft as the next token
                keep = [v for v, i in enumerate(live) if wanted[i] > depth]
                seqs = [runs[live[v]][0] for v in keep]
                chunks = [Chunk(s.slot, s.blocks, s.num_computed + depth - 1, [s.drafts[-1]]) for s in seqs]
                picked = out.streams[[rows[v] for v in keep]] if keep else streams[:0]
                out = self._mtp_pass(chunks, picked, range(len(keep)))
                live, rows = [live[v] for v in keep], list(range(len(keep)))
            if not live:
                continue
            specs = [runs[i][0].sample_spec(runs[i][0].drafts, logprobs=False) for i in live]
            tokens, _ = sample_to_host(out.logits, SamplingBatch(specs, out.logits.device))
            for i, token in zip(live, tokens, strict=True):
                runs[i][0].drafts.append(token)
        if saved is not None:
            self.storage.restore(saved, range(len(drafted)), [runs[i][0].num_computed for i in drafted])

    def _mtp_pass(self, chunks: list[Chunk], streams: torch.Tensor, rows: Sequence[int]) -> ForwardOutput | None:
        if not chunks:
            self.idle_pass()
            return None
        return self.runner.forward_mtp(chunks, streams, rows)

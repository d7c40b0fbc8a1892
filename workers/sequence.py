"""A request's state on the worker that holds its cache."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from dsv4.wire.request import SamplingParams, TokenLogprobs
from dsv4.workers.grammar import GrammarState
from dsv4.workers.sampler import SampleSpec


@dataclass
class SequenceState:
    tokens: list[int]                 # prompt + outputs so far (the last one not yet run, once decoding)
    slot: int
    sampling: SamplingParams
    seed: int
    num_outputs: int                  # outputs in `tokens` (the next one sampled has this output index)
    num_computed: int = 0             # positions whose cache is written (tokens[:num_computed] have run)
    blocks: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)   # speculative guesses of the next tokens (MTP block)
    grammar: GrammarState | None = None              # structured output: where the request is in its constraint

    @property
    def decoding(self) -> bool:
        """Every token has run but the last sampled one."""
        return self.num_computed == len(self.tokens) - 1 and self.num_outputs > 0

    def sample_spec(self, drafts: Sequence[int] = (), logprobs: bool = True) -> SampleSpec:
        """How to sample the output that follows `tokens` and then `drafts` (guesses of the next outputs): its
        output index, and the history the penalties count (copied only when the request has penalties)."""
        sampling = self.sampling if logprobs else dataclasses.replace(self.sampling, logprobs=None)
        history = (*self.tokens, *drafts) if sampling.penalizes_history else ()
        assert self.grammar is None or not drafts, "constrained requests are not drafted for"
        return SampleSpec(sampling, self.seed, self.num_outputs + len(drafts), history,
                          len(self.tokens) - self.num_outputs,
                          self.grammar.allowed() if self.grammar is not None else None)

    def add_outputs(self, tokens: Sequence[int]) -> None:
        """Sampled tokens become the request's next outputs (and move its constraint on)."""
        self.tokens.extend(tokens)
        self.num_outputs += len(tokens)
        if self.grammar is not None:
            for token in tokens:
                self.grammar.accept(token)


@dataclass
class StepTokens:
    """What one step sampled, per scheduled chunk: the tokens it emits (none for a prefill chunk short of the
    prompt's end; several when speculative drafts were accepted) and their log-probabilities where the request
    asks (else empty); and the step's drafts verified and accepted."""

    tokens: list[list[int]]
    logprobs: list[list[TokenLogprobs]]
    num_drafts: int = 0
    num_accepted: int = 0

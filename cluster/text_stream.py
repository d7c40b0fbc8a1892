"""Per-request text state: engine token deltas in, text deltas and one final result out.

This is the one place that turns tokens into streamed text for every API the server hosts: incremental
detokenization, stop strings (matched across token boundaries, text truncated before the match) and the final
tally. It does no I/O; `GenerationService` feeds it engine outputs and aborts the engine when `stop_matched`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.wire.request import FinishReason, GenerateRequest, RequestOutput, TokenLogprobs


@dataclass(frozen=True, slots=True)
class TextDelta:
    token_ids: tuple[int, ...]  # tokens sampled since the previous delta
    text: str                   # text settled since the previous delta (may lag token_ids, see StopStringMatcher)
    num_prompt_tokens: int
    num_output_tokens: int      # cumulative, including token_ids
    logprobs: tuple[TokenLogprobs, ...] | None = None   # aligned with token_ids; None unless the request asked
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


@dataclass(frozen=True, slots=True)
class TextFinal:
    finish_reason: FinishReason
    output_ids: tuple[int, ...]
    text: str                   # == the concatenated texts of all deltas
    num_prompt_tokens: int
    matched_stop_token_id: int | None = None
    matched_stop_str: str | None = None
    error: str | None = None
    output_logprobs: tuple[TokenLogprobs, ...] | None = None   # aligned with output_ids; None unless asked
    num_cached_tokens: int = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)


StreamEvent = TextDelta | TextFinal


class StopStringMatcher:
    """Accumulates output text, finds the earliest stop string and releases only text that is settled.

    A stop string may begin in text that has already arrived, so the last `len(longest stop) - 1` characters are
    held back until more text shows they do not start a match (or the stream ends).
    """

    def __init__(self, stops: Sequence[str]):
        self._stops = tuple(stops)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._text = ""
        self._released = 0
        self._end: int | None = None  # where the text ends once a stop string matched
        self.matched: str | None = None

    def add(self, piece: str, check: bool = True) -> bool:
        """Append `piece`; with `check`, look for a stop string ending in it. True once one has matched."""
        start = len(self._text)
        self._text += piece
        if check and piece and self.matched is None:
            hits = [(pos, stop) for stop in self._stops
                    if (pos := self._text.find(stop, max(0, start - len(stop) + 1))) >= 0]
            if hits:
                self._end, self.matched = min(hits, key=lambda hit: hit[0])
        return self.matched is not None

    def release(self, final: bool = False) -> str:
        """Text that can no longer change: all of it once `final` or matched, else all but the held-back tail."""
        if self._end is not None:
            limit = self._end
        elif final:
            limit = len(self._text)
        else:
            limit = len(self._text) - self._hold
        out = self._text[self._released:limit] if limit > self._released else ""
        self._released = max(self._released, limit)
        return out

    @property
    def text(self) -> str:
        return self._text if self._end is None else self._text[:self._end]


class TextStream:
    """Feed it a request's `RequestOutput`s in order; it returns the events to stream."""

    def __init__(self, tokenizer: ModelTokenizer, request: GenerateRequest):
        self._detokenizer = tokenizer.detokenizer(skip_special_tokens=True)
        self._stops = StopStringMatcher(request.sampling.stop)
        self._min_tokens = request.sampling.min_tokens
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._output_ids: list[int] = []
        self._wants_logprobs = request.sampling.logprobs is not None
        self._output_logprobs: list[TokenLogprobs] = []
        self._num_cached_tokens = 0

    @property
    def stop_matched(self) -> bool:
        """A stop string matched: the stream is over, and the engine is still generating this request."""
        return self._stops.matched is not None

    def on_output(self, output: RequestOutput) -> list[StreamEvent]:
        self._num_prompt_tokens = output.num_prompt_tokens or self._num_prompt_tokens
        self._num_cached_tokens = output.num_cached_tokens or self._num_cached_tokens
        if self._wants_logprobs and len(output.new_logprobs) != len(output.new_token_ids):
            raise RuntimeError(f"the engine returned {len(output.new_logprobs)} log-probabilities for "
                               f"{len(output.new_token_ids)} tokens")
        new_ids: list[int] = []
        # one at a time: tokens after a stop-string match are dropped, and their logprobs with them
        for i, token_id in enumerate(output.new_token_ids):
            new_ids.append(token_id)
            self._output_ids.append(token_id)
            if self._wants_logprobs:
                self._output_logprobs.append(output.new_logprobs[i])
            if self._stops.add(self._detokenizer.add(token_id), self._stop_strings_active()):
                return self._finish(new_ids, FinishReason.STOP)
        if output.finished:
            if self._stops.add(self._detokenizer.flush(), self._stop_strings_active()):
                return self._finish(new_ids, FinishReason.STOP)
            return self._finish(new_ids, output.finish_reason, output.matched_stop_token_id, output.error)
        text = self._stops.release()
        return [self._delta(new_ids, text)] if new_ids or text else []

    def on_error(self, message: str) -> list[StreamEvent]:
        """The last events for a request the engine failed without reporting it as finished."""
        return self._finish([], FinishReason.ERROR, error=message)

    def _stop_strings_active(self) -> bool:
        # Like EOS and stop token ids, stop strings cannot end the output before min_tokens tokens.
        return len(self._output_ids) >= self._min_tokens

    def _finish(self, new_ids: list[int], reason: FinishReason, stop_token_id: int | None = None,
                error: str | None = None) -> list[StreamEvent]:
        text = self._stops.release(final=True)
        events: list[StreamEvent] = [self._delta(new_ids, text)] if new_ids or text else []
        events.append(self._final(reason, stop_token_id, error))
        return events

    def _delta(self, new_ids: list[int], text: str) -> TextDelta:
        logprobs = None
        if self._wants_logprobs:  # new_ids are the newest outputs: their logprobs are the same-length tail
            logprobs = tuple(self._output_logprobs[len(self._output_logprobs) - len(new_ids):])
        return TextDelta(tuple(new_ids), text, self._num_prompt_tokens, len(self._output_ids), logprobs,
                         self._num_cached_tokens)

    def _final(self, reason: FinishReason, stop_token_id: int | None, error: str | None) -> TextFinal:
        if reason == FinishReason.STOP and self._stops.matched is not None:
            stop_token_id = None  # the stop string ended the output, whatever the engine says
        return TextFinal(reason, tuple(self._output_ids), self._stops.text, self._num_prompt_tokens,
                         stop_token_id, self._stops.matched, error,
                         tuple(self._output_logprobs) if self._wants_logprobs else None, self._num_cached_tokens)

"""Typed request and output messages shared by the server, the coordinator and the scheduler; the workers' sampler
reads `SamplingParams` and returns `TokenLogprobs`.

A request travels in full once (server -> coordinator); after that only `RequestOutput` deltas come back.
Everything a user can get wrong is checked in `SamplingParams.validate` / `GenerateRequest.validate`, which raise
`InvalidRequest` naming the field; the server maps that to gRPC INVALID_ARGUMENT.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class InvalidRequest(ValueError):
    """A request a client can fix. `field` names the offending request field (e.g. `sampling_params.top_p`)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message = field_name, message

    def __reduce__(self):   # crosses process boundaries (Ray) with both arguments
        return InvalidRequest, (self.field, self.message)


class EngineOverloaded(RuntimeError):
    """The engine's waiting queue is full: retry later (the servicers answer RESOURCE_EXHAUSTED)."""


class EngineFailed(RuntimeError):
    """The engine has failed (a worker died, or its steps keep failing) and refuses new requests (the servicers
    answer UNAVAILABLE; health says not serving)."""


class FinishReason(str, enum.Enum):
    STOP = "stop"      # an EOS / stop token id, or a stop string matched by the server
    LENGTH = "length"  # max_tokens reached, or the context is full
    ABORT = "abort"    # cancelled by the client (Abort RPC or stream closed)
    ERROR = "error"    # the engine failed this request; `RequestOutput.error` says why


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. temperature 0 means greedy; top_k 0 and top_p 1 mean "no cut-off"."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None            # same seed + same prompt + same params => same tokens
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()         # stop strings: matched on detokenized text by the server
    ignore_eos: bool = False
    min_tokens: int = 0
    # None: no log-probabilities; 0: the sampled token's; n >= 1: also the n most likely tokens (`TokenLogprobs`)
    logprobs: int | None = None

    MAX_TEMPERATURE = 100.0
    MAX_LOGPROBS = 20                  # OpenAI's cap on top_logprobs (and vLLM's default max_logprobs)
    # Size limits: every stop string is matched against each new token's text, every stop id against each token,
    # so unbounded lists cost every step of the request (and travel with it to the coordinator).
    MAX_STOP_STRINGS = 32
    MAX_STOP_CHARS = 1024              # per stop string
    MAX_STOP_TOKEN_IDS = 256

    def validate(self, vocab_size: int) -> None:
        if not 1 <= self.max_tokens <= 1 << 24:
            raise InvalidRequest("sampling_params.max_tokens", f"must be in [1, 16777216], got {self.max_tokens}")
        if not (0.0 <= self.temperature <= self.MAX_TEMPERATURE):  # also rejects NaN
            raise InvalidRequest("sampling_params.temperature",
                                 f"must be in [0, {self.MAX_TEMPERATURE}], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequest("sampling_params.top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= vocab_size:
            raise InvalidRequest("sampling_params.top_k", f"must be in [0, {vocab_size}], got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 1 << 63:
            raise InvalidRequest("sampling_params.seed", f"must be in [0, 2^63), got {self.seed}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequest("sampling_params.min_tokens",
                                 f"must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if len(self.stop_token_ids) > self.MAX_STOP_TOKEN_IDS:
            raise InvalidRequest("sampling_params.stop_token_ids",
                                 f"at most {self.MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        if len(self.stop) > self.MAX_STOP_STRINGS:
            raise InvalidRequest("sampling_params.stop",
                                 f"at most {self.MAX_STOP_STRINGS} strings, got {len(self.stop)}")
        for token_id in self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest("sampling_params.stop_token_ids",
                                     f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        for text in self.stop:
            if not text:
                raise InvalidRequest("sampling_params.stop", "stop strings must not be empty")
            if len(text) > self.MAX_STOP_CHARS:
                raise InvalidRequest("sampling_params.stop",
                                     f"stop strings have at most {self.MAX_STOP_CHARS} characters, got {len(text)}")
        max_logprobs = min(self.MAX_LOGPROBS, vocab_size)
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise InvalidRequest("sampling_params.logprobs", f"must be in [0, {max_logprobs}], got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)

    MAX_ID_CHARS = 256                 # the id is echoed in every response and travels with every plan

    def validate(self, vocab_size: int, max_model_len: int) -> None:
        if not self.request_id:
            raise InvalidRequest("request_id", "must not be empty")
        if len(self.request_id) > self.MAX_ID_CHARS:
            raise InvalidRequest("request_id", f"at most {self.MAX_ID_CHARS} characters, got {len(self.request_id)}")
        if not self.prompt_token_ids:
            raise InvalidRequest("prompt", "must not be empty")
        for token_id in self.prompt_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest("prompt.token_ids",
                                     f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
        check_prompt_length(len(self.prompt_token_ids), max_model_len)
        self.sampling.validate(vocab_size)


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probabilities at one output position, under the model's raw next-token distribution: the log-softmax
    of the logits before temperature, top-k and top-p (what vLLM returns by default, `logprobs_mode=raw_logprobs`),
    so they describe the model whatever the sampling parameters. The sampled token id is the one at the same
    position of the output; it need not be among the top tokens (sampling can pick a less likely one)."""

    logprob: float                            # of the sampled token
    top_token_ids: tuple[int, ...] = ()       # the request's `logprobs` most likely tokens, most likely first
    top_logprobs: tuple[float, ...] = ()      # theirs, aligned with top_token_ids (non-increasing)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """One delta of a request's stream: tokens sampled since the last delta, and the end if it ended."""

    request_id: str
    new_token_ids: tuple[int, ...]
    num_prompt_tokens: int
    num_output_tokens: int                 # cumulative, including new_token_ids
    finish_reason: FinishReason | None = None
    matched_stop_token_id: int | None = None
    error: str | None = None
    # one per new_token_ids entry when the request asked for `logprobs`, else empty
    new_logprobs: tuple[TokenLogprobs, ...] = ()
    num_cached_tokens: int = 0             # prompt tokens served from the prefix cache (not computed)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def check_prompt_length(num_tokens: int, max_model_len: int) -> None:
    """A prompt of num_tokens must leave one position of the context to generate in."""
    if num_tokens >= max_model_len:
        raise InvalidRequest("prompt", f"{num_tokens} tokens do not fit the context of {max_model_len} tokens "
                                       "(one position must remain to generate)")

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
class StructuredOutput:
    """A constraint on the output's text, enforced token by token in the sampler (`workers/grammar.py`): the
    output is a prefix of a string the constraint accepts, and ends (EOS) only where one is complete."""

    kind: str                          # one of KINDS; the request field that set it is sampling_params.<kind>
    spec: str = ""                     # the JSON schema (JSON text), regex or EBNF grammar; "" for json_object
    choices: tuple[str, ...] = ()      # kind "choice": the output is exactly one of them

    KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
    MAX_SPEC_CHARS = 64 * 1024
    MAX_CHOICES = 1024

    @property
    def field(self) -> str:
        return f"sampling_params.{self.kind}"

    def validate(self) -> None:
        """The shape; whether the schema, regex or grammar compiles is checked where it is compiled."""
        if self.kind not in self.KINDS:
            raise InvalidRequest("sampling_params.structured_output",
                                 f"unknown kind {self.kind!r} (known: {', '.join(self.KINDS)})")
        size = len(self.spec) + sum(len(c) for c in self.choices)
        if size > self.MAX_SPEC_CHARS:
            raise InvalidRequest(self.field, f"at most {self.MAX_SPEC_CHARS} characters, got {size}")
        if self.kind in ("json_schema", "regex", "grammar") and not self.spec:
            raise InvalidRequest(self.field, "must not be empty")
        if self.kind == "choice":
            if not self.choices or len(self.choices) > self.MAX_CHOICES:
                raise InvalidRequest(self.field, f"1 to {self.MAX_CHOICES} choices, got {len(self.choices)}")
            if not all(self.choices):
                raise InvalidRequest(self.field, "choices must not be empty strings")


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
    # Logit adjustments, in vLLM's order and with its (OpenAI's) definitions, applied before temperature:
    # repetition (CTRL: a positive logit of a token seen in the prompt or the output is divided by it, a negative
    # one multiplied; 1 = off), then frequency and presence (logit -= frequency * count in the output + presence *
    # [count > 0]), then the bias of listed tokens. min_p drops the tokens whose probability after temperature is
    # below min_p times the most likely token's. They apply to greedy requests too; log-probabilities stay raw.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()    # (token id, added to its logit)
    structured: StructuredOutput | None = None          # JSON schema, regex, grammar or choice

    MAX_TEMPERATURE = 100.0
    MAX_LOGPROBS = 20                  # OpenAI's cap on top_logprobs (and vLLM's default max_logprobs)
    # Size limits: every stop string is matched against each new token's text, every stop id against each token,
    # so unbounded lists cost every step of the request (and travel with it to the coordinator).
    MAX_STOP_STRINGS = 32
    MAX_STOP_CHARS = 1024              # per stop string
    MAX_STOP_TOKEN_IDS = 256
    MAX_PENALTY = 2.0                  # OpenAI's range for presence and frequency: [-2, 2]
    MAX_REPETITION_PENALTY = 2.0
    MAX_LOGIT_BIAS = 100.0             # OpenAI's range for a bias: [-100, 100]
    MAX_LOGIT_BIAS_TOKENS = 1024

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
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -self.MAX_PENALTY <= value <= self.MAX_PENALTY:
                raise InvalidRequest(f"sampling_params.{name}",
                                     f"must be in [-{self.MAX_PENALTY}, {self.MAX_PENALTY}], got {value}")
        if not 0.0 < self.repetition_penalty <= self.MAX_REPETITION_PENALTY:
            raise InvalidRequest("sampling_params.repetition_penalty",
                                 f"must be in (0, {self.MAX_REPETITION_PENALTY}], got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequest("sampling_params.min_p", f"must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > self.MAX_LOGIT_BIAS_TOKENS:
            raise InvalidRequest("sampling_params.logit_bias",
                                 f"at most {self.MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}")
        seen: set[int] = set()
        for token_id, bias in self.logit_bias:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequest("sampling_params.logit_bias",
                                     f"token id {token_id} is outside the vocabulary [0, {vocab_size})")
            if token_id in seen:
                raise InvalidRequest("sampling_params.logit_bias", f"token id {token_id} is listed twice")
            seen.add(token_id)
            if not -self.MAX_LOGIT_BIAS <= bias <= self.MAX_LOGIT_BIAS:
                raise InvalidRequest("sampling_params.logit_bias", f"the bias of token {token_id} must be in "
                                     f"[-{self.MAX_LOGIT_BIAS}, {self.MAX_LOGIT_BIAS}], got {bias}")
        if self.structured is not None:
            self.structured.validate()
        max_logprobs = min(self.MAX_LOGPROBS, vocab_size)
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise InvalidRequest("sampling_params.logprobs", f"must be in [0, {max_logprobs}], got {self.logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def penalizes_history(self) -> bool:
        """The logits depend on the tokens seen so far (the sampler needs the request's history)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        return self.penalizes_history or bool(self.logit_bias)


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
        room = max_model_len - len(self.prompt_token_ids)
        if self.sampling.max_tokens > room:     # vLLM's answer too, rather than a silent cap at the context
            raise InvalidRequest("sampling_params.max_tokens",
                                 f"{self.sampling.max_tokens} tokens do not fit after the {len(self.prompt_token_ids)}"
                                 f"-token prompt in the context of {max_model_len} tokens (at most {room})")


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

"""Batch generation: JSONL prompts in, JSONL completions out, through any `EngineClient`.

`dsv4 batch --input prompts.jsonl --output completions.jsonl` (and so `ray job submit ... -- dsv4 batch ...`)
starts an engine as `dsv4 serve` does and runs every line through it concurrently; the coordinator's scheduler
batches them. Text, stop strings and validation go through the same `GenerationService` as the gRPC APIs, so a
line behaves exactly like the same request sent to `dsv4 serve`.

Input: one JSON object per line (blank lines are skipped).

    {"id": "q1", "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0}
    {"id": 7, "prompt_token_ids": [0, 17, 4], "ignore_eos": true, "stop": ["\\n"]}

* `id`: a string or an integer naming the output line (default: the line number). Unique in the file.
* exactly one of `prompt` (text; BOS is added) and `prompt_token_ids` (taken as given).
* optional sampling fields, as in `dsv4.v1.SamplingParams`: `max_tokens` (default: the rest of the context),
  `temperature` (default 1; 0 is greedy), `top_p`, `top_k`, `min_p`, `seed`, `min_tokens`, `stop` (a string or
  a list), `stop_token_ids`, `ignore_eos`, `presence_penalty`, `frequency_penalty`, `repetition_penalty`,
  `logit_bias` (an object: token id -> bias, as OpenAI's).

Output: one line per input line, in input order.

    {"id": "q1", "text": " Paris...", "token_ids": [...], "finish_reason": "length", "num_prompt_tokens": 6,
     "num_output_tokens": 32}

plus `matched_stop` (the stop string or stop token id that ended it) and, with `finish_reason` "error", `error`
when the engine failed that request. The file appears under its name only when every line is written (it is
written as `NAME.partial` and renamed), so a reader never takes a half-written file for a finished one.

Every line is checked before the first request runs: the JSON shape before the engine starts, the model-dependent
limits (vocabulary, context) right after. A bad line stops the run with an error naming the file, the line and
the field.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dsv4.cluster.engine_client import EngineClient
from dsv4.cluster.generation_service import GenerationService, RequestBuilder
from dsv4.cluster.text_stream import TextFinal
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.wire.request import FinishReason, GenerateRequest, InvalidRequest, StructuredOutput


class BatchInputError(ValueError):
    """A line of the input file a user can fix: `FILE:LINE: FIELD: what is wrong`."""

    def __init__(self, path: str | Path, line: int, field: str, message: str):
        super().__init__(f"{path}:{line}: {field}: {message}")
        self.path, self.line, self.field, self.message = str(path), line, field, message


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def _int(value: Any) -> int:
    if not _is_int(value):
        raise TypeError(f"must be an integer, got {value!r}")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else _int(value)


def _number(value: Any) -> float:
    if not (_is_int(value) or isinstance(value, float)):
        raise TypeError(f"must be a number, got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, got {value!r}")
    return value


def _strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TypeError(f"must be a string or a list of strings, got {value!r}")
    return tuple(items)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's object of token id (a string of digits, in JSON) -> bias."""
    if not isinstance(value, dict):
        raise TypeError(f"must be an object of token id -> bias, got {value!r}")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise TypeError(f"token ids are non-negative integers, got {key!r}")
        out.append((int(key), _number(bias)))
    return tuple(sorted(out))


def _ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(_is_int(item) for item in value):
        raise TypeError(f"must be a list of integers, got {value!r}")
    return tuple(value)


# Optional per-line fields: name -> converter (raises TypeError). All but max_tokens are SamplingParams fields.
_SAMPLING_FIELDS = {
    "max_tokens": _optional_int,
    "temperature": _number,
    "top_p": _number,
    "top_k": _int,
    "seed": _optional_int,
    "min_tokens": _int,
    "stop": _strings,
    "stop_token_ids": _ints,
    "ignore_eos": _bool,
    "min_p": _number,
    "presence_penalty": _number,
    "frequency_penalty": _number,
    "repetition_penalty": _number,
    "logit_bias": _logit_bias,
}
_PROMPT_FIELDS = ("prompt", "prompt_token_ids")
_KNOWN_FIELDS = ("id", *_PROMPT_FIELDS, *_SAMPLING_FIELDS)


@dataclass(frozen=True, slots=True)
class BatchPrompt:
    """One input line, with its JSON shape checked (the model-dependent limits are checked later)."""

    line: int                               # 1-based line number in the input file
    id: str | int
    text: str | None                        # exactly one of text and token_ids is set
    token_ids: tuple[int, ...] | None
    max_tokens: int | None                  # None: the rest of the context
    sampling: Mapping[str, Any]             # the other SamplingParams fields the line sets


@dataclass(frozen=True, slots=True)
class BatchSummary:
    num_requests: int
    num_failed: int                         # lines whose finish_reason is "error"
    num_output_tokens: int


def parse_prompt(raw: str, line: int, path: str | Path = "<input>") -> BatchPrompt:
    """One input line -> BatchPrompt. Raises BatchInputError naming the line and the field."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BatchInputError(path, line, "line", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise BatchInputError(path, line, "line", f"must be a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(_KNOWN_FIELDS))
    if unknown:  # a misspelt sampling field must not be ignored silently
        raise BatchInputError(path, line, unknown[0], f"unknown field (known: {', '.join(_KNOWN_FIELDS)})")
    prompt_id = record.get("id", line)
    if not (_is_int(prompt_id) or (isinstance(prompt_id, str) and prompt_id)):
        raise BatchInputError(path, line, "id", f"must be a non-empty string or an integer, got {prompt_id!r}")
    given = [name for name in _PROMPT_FIELDS if name in record]
    if len(given) != 1:
        raise BatchInputError(path, line, "prompt", "set exactly one of prompt and prompt_token_ids")
    text, token_ids = record.get("prompt"), None
    if "prompt" in record and not isinstance(text, str):
        raise BatchInputError(path, line, "prompt", f"must be a string, got {text!r}")
    if "prompt_token_ids" in record:
        try:
            token_ids = _ints(record["prompt_token_ids"])
        except TypeError as exc:
            raise BatchInputError(path, line, "prompt_token_ids", str(exc)) from None
    sampling: dict[str, Any] = {}
    for name, convert in _SAMPLING_FIELDS.items():
        if name in record:
            try:
                sampling[name] = convert(record[name])
            except TypeError as exc:
                raise BatchInputError(path, line, name, str(exc)) from None
    max_tokens = sampling.pop("max_tokens", None)
    return BatchPrompt(line, prompt_id, text, token_ids, max_tokens, sampling)


def read_prompts(path: str | Path) -> list[BatchPrompt]:
    """Every prompt of a JSONL file, checked. Raises BatchInputError for the first bad line."""
    prompts: list[BatchPrompt] = []
    first_line_of: dict[str | int, int] = {}
    with open(path, encoding="utf-8") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            prompt = parse_prompt(raw, number, path)
            if prompt.id in first_line_of:
                raise BatchInputError(path, number, "id",
                                      f"{prompt.id!r} is already used on line {first_line_of[prompt.id]}")
            first_line_of[prompt.id] = number
            prompts.append(prompt)
    if not prompts:
        raise BatchInputError(path, 1, "line", "the file holds no prompts")
    return prompts


def _input_field(prompt: BatchPrompt, request_field: str) -> str:
    """The input file's name for a request field that InvalidRequest names as the gRPC API spells it."""
    if request_field.split(".")[0] == "prompt":
        return "prompt" if prompt.text is not None else "prompt_token_ids"
    return request_field.removeprefix("sampling_params.")


def build_requests(service: RequestBuilder, prompts: Sequence[BatchPrompt],
                   path: str | Path = "<input>") -> list[GenerateRequest]:
    """Validated engine requests, one per prompt: vocabulary, context length and sampling limits of the served
    model. Raises BatchInputError naming the line and field of the first prompt that breaks one."""
    run = uuid.uuid4().hex[:8]  # request ids unique beyond this run, should the engine be shared
    requests = []
    for prompt in prompts:
        try:
            prompt_ids = service.prompt_token_ids(prompt.text, prompt.token_ids)
            requests.append(service.build_request(f"batch-{run}-{prompt.line}", prompt_ids, prompt.max_tokens,
                                                  **prompt.sampling))
        except InvalidRequest as exc:
            raise BatchInputError(path, prompt.line, _input_field(prompt, exc.field), exc.message) from None
    return requests


def completion_record(prompt: BatchPrompt, final: TextFinal) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": prompt.id, "text": final.text, "token_ids": list(final.output_ids),
        "finish_reason": final.finish_reason.value, "num_prompt_tokens": final.num_prompt_tokens,
        "num_output_tokens": final.num_output_tokens}
    if final.matched_stop_str is not None:
        record["matched_stop"] = final.matched_stop_str
    elif final.matched_stop_token_id is not None:
        record["matched_stop"] = final.matched_stop_token_id
    if final.error is not None:
        record["error"] = final.error
    return record


async def _final(service: GenerationService, request: GenerateRequest) -> TextFinal:
    """The request's final result; an engine that rejects it (e.g. its prompt fits no worker's KV cache) makes an
    error result for this line rather than ending the whole batch."""
    try:
        async with contextlib.aclosing(service.stream(request)) as events:
            async for event in events:
                if isinstance(event, TextFinal):
                    return event
    except InvalidRequest as exc:
        return TextFinal(FinishReason.ERROR, (), "", len(request.prompt_token_ids), error=str(exc))
    return TextFinal(FinishReason.ERROR, (), "", len(request.prompt_token_ids), error="the stream ended early")


class _OrderedWriter:
    """Writes JSONL records in input order while they complete in any order (finished lines wait their turn)."""

    def __init__(self, out: TextIO):
        self._out = out
        self._next = 0
        self._held: dict[int, dict[str, Any]] = {}

    def put(self, index: int, record: dict[str, Any]) -> None:
        self._held[index] = record
        while self._next in self._held:
            self._out.write(json.dumps(self._held.pop(self._next), ensure_ascii=False) + "\n")
            self._next += 1


async def run_batch(service: GenerationService, prompts: Sequence[BatchPrompt],
                    requests: Sequence[GenerateRequest], out: TextIO, max_concurrency: int) -> BatchSummary:
    """Run the requests with at most `max_concurrency` in flight; write one record per prompt to `out`."""
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    writer = _OrderedWriter(out)
    gate = asyncio.Semaphore(max_concurrency)
    running: set[asyncio.Task] = set()
    num_failed = num_output_tokens = 0

    async def one(index: int) -> None:
        nonlocal num_failed, num_output_tokens
        try:
            final = await _final(service, requests[index])
        finally:
            gate.release()
        num_failed += final.finish_reason == FinishReason.ERROR
        num_output_tokens += final.num_output_tokens
        writer.put(index, completion_record(prompts[index], final))

    for index in range(len(requests)):
        await gate.acquire()  # tasks start as slots free up: a million lines never make a million tasks
        task = asyncio.create_task(one(index))
        running.add(task)
        task.add_done_callback(running.discard)
    await asyncio.gather(*running)
    return BatchSummary(len(requests), num_failed, num_output_tokens)


async def run_batch_file(engine: EngineClient, tokenizer: ModelTokenizer, prompts: Sequence[BatchPrompt],
                         output: str | Path, max_concurrency: int, input_path: str | Path = "<input>",
                         check_constraint: Callable[[StructuredOutput], None] | None = None) -> BatchSummary:
    """Check every prompt against the served model, then run them all and write `output` (atomically)."""
    service = GenerationService(engine, tokenizer, check_constraint=check_constraint)
    requests = build_requests(service, prompts, input_path)
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    with open(partial, "w", encoding="utf-8") as out:
        summary = await run_batch(service, prompts, requests, out, max_concurrency)
    os.replace(partial, output)
    return summary

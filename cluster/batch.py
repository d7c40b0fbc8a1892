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

OpenAI's batch format (`{"custom_id", "method", "url", "body"}` lines for /v1/chat/completions and
/v1/completions) is read too, line by line, and answered in kind (`batch_openai.py`); the two formats may mix.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from dsv4.cluster.batch_input import BatchInputError, BatchPrompt, load_record, parse_record
from dsv4.cluster.batch_openai import openai_record, parse_openai
from dsv4.cluster.engine_client import EngineClient
from dsv4.cluster.generation_service import GenerationService, RequestBuilder
from dsv4.cluster.text_stream import TextFinal
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.wire.request import FinishReason, GenerateRequest, InvalidRequest, StructuredOutput


@dataclass(frozen=True, slots=True)
class BatchSummary:
    num_requests: int
    num_failed: int                         # lines whose finish_reason is "error"
    num_output_tokens: int


def read_prompts(path: str | Path) -> list[BatchPrompt]:
    """Every prompt of a JSONL file, checked. Raises BatchInputError for the first bad line."""
    prompts: list[BatchPrompt] = []
    first_line_of: dict[str | int, int] = {}
    with open(path, encoding="utf-8") as lines:
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            record = load_record(raw, number, path)
            prompt = (parse_openai if "custom_id" in record else parse_record)(record, number, path)
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
    body = "body." if prompt.endpoint is not None else ""
    if request_field.split(".")[0] == "prompt":
        if prompt.endpoint is not None:
            return "body.messages" if prompt.messages is not None else "body.prompt"
        return "prompt" if prompt.text is not None else "prompt_token_ids"
    field = request_field.removeprefix("sampling_params.")
    if prompt.endpoint is not None and prompt.sampling.get("structured") is not None \
            and field == prompt.sampling["structured"].kind:
        field = "response_format"
    return body + field


def build_requests(service: RequestBuilder, prompts: Sequence[BatchPrompt],
                   path: str | Path = "<input>") -> list[GenerateRequest]:
    """Validated engine requests, one per prompt: vocabulary, context length and sampling limits of the served
    model. Raises BatchInputError naming the line and field of the first prompt that breaks one."""
    run = uuid.uuid4().hex[:8]  # request ids unique beyond this run, should the engine be shared
    requests = []
    for prompt in prompts:
        try:
            text = (service.tokenizer.apply_chat_template(prompt.messages) if prompt.messages is not None
                    else prompt.text)
            prompt_ids = service.prompt_token_ids(text, prompt.token_ids)
            request = service.build_request(f"batch-{run}-{prompt.line}", prompt_ids, prompt.max_tokens,
                                            **prompt.sampling)
            service.samples(request, prompt.n)          # n in range
            requests.append(request)
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


async def _finals(service: GenerationService, request: GenerateRequest, n: int) -> list[TextFinal]:
    """The final result of each of the request's n samples; an engine that rejects it (e.g. its prompt fits no
    worker's KV cache) makes error results for this line rather than ending the whole batch."""
    def failed(error: str) -> list[TextFinal]:
        return [TextFinal(FinishReason.ERROR, (), "", len(request.prompt_token_ids), error=error)] * n

    finals: dict[int, TextFinal] = {}
    try:
        async with contextlib.aclosing(service.stream_samples(request, n)) as events:
            async for index, event in events:
                if isinstance(event, TextFinal):
                    finals[index] = event
    except InvalidRequest as exc:
        return failed(str(exc))
    return [finals[i] for i in range(n)] if len(finals) == n else failed("the stream ended early")


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
        prompt = prompts[index]
        try:
            finals = await _finals(service, requests[index], prompt.n)
        finally:
            gate.release()
        num_failed += any(f.finish_reason == FinishReason.ERROR for f in finals)
        num_output_tokens += sum(f.num_output_tokens for f in finals)
        writer.put(index, completion_record(prompt, finals[0]) if prompt.endpoint is None else
                   openai_record(prompt, finals, service.model_info.served_model_name, service.tokenizer.decode))

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

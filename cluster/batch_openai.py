"""OpenAI's batch format for `dsv4 batch` (what the OpenAI Batch API and vLLM's `run_batch` read and write).

Input: one request per line,

    {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}}

with `url` /v1/chat/completions (`messages`, rendered with the model's chat template) or /v1/completions
(`prompt`: a string or a list of token ids). Body fields: `model`, `max_tokens` / `max_completion_tokens`,
`temperature`, `top_p`, `n`, `seed`, `stop`, `presence_penalty`, `frequency_penalty`, `logit_bias`,
`response_format` (text, json_object, json_schema), `logprobs` (chat: true with `top_logprobs` 0-20; completions:
0-20), `user`, `stream` (false only); and vLLM's extras `top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`. Anything else (tools, echo, suffix, ...) stops the run naming `body.<field>`:
never silently ignored. Log-probabilities come back in OpenAI's shapes (chat: `content` entries with `token`,
`logprob`, `bytes`, `top_logprobs`; completions: `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`).

Output: one line per input line, in input order,

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code": 200, "request_id": "...",
     "body": {"object": "chat.completion", "choices": [...], "usage": {...}, ...}}, "error": null}

and, where the engine failed the request, `"response": null, "error": {"code": "engine_error", "message": ...}`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dsv4.cluster.batch_input import (
    SAMPLING_FIELDS,
    BatchInputError,
    BatchPrompt,
    as_bool,
    as_int,
    as_ints,
)
from dsv4.cluster.text_stream import TextFinal
from dsv4.wire.request import FinishReason, StructuredOutput

ENDPOINTS = {"/v1/chat/completions": "chat.completion", "/v1/completions": "text_completion"}
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos",
             "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
_IGNORED = ("model", "user", "stream")                   # checked, then not used (stream must be false)


def _response_format(value: Any) -> StructuredOutput | None:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise TypeError(f"must be an object with a type, got {value!r}")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise TypeError("json_schema.schema must be an object")
        return StructuredOutput("json_schema", json.dumps(schema))
    raise TypeError(f"type must be text, json_object or json_schema, got {kind!r}")


def _messages(value: Any) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value):
        raise TypeError("must be a non-empty list of {role, content} objects with string contents")
    return tuple(value)


def parse_openai(record: dict[str, Any], line: int, path: str | Path = "<input>") -> BatchPrompt:
    """One OpenAI batch line -> BatchPrompt. Raises BatchInputError naming the line and the field."""
    def fail(field: str, message: str):
        return BatchInputError(path, line, field, message)

    unknown = sorted(set(record) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise fail(unknown[0], "unknown field (an OpenAI batch line has custom_id, method, url, body)")
    custom_id = record["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        raise fail("custom_id", f"must be a non-empty string, got {custom_id!r}")
    if record.get("method", "POST") != "POST":
        raise fail("method", f"must be POST, got {record.get('method')!r}")
    endpoint = ENDPOINTS.get(record.get("url"))
    if endpoint is None:
        raise fail("url", f"must be one of {', '.join(ENDPOINTS)}, got {record.get('url')!r}")
    body = record.get("body")
    if not isinstance(body, dict):
        raise fail("body", "must be a JSON object")
    chat = endpoint == "chat.completion"
    prompt_field = "messages" if chat else "prompt"
    logprob_fields = ("logprobs", "top_logprobs") if chat else ("logprobs",)
    known = {prompt_field, "max_tokens", "max_completion_tokens", "n", "response_format", *logprob_fields,
             *_SAMPLING, *_IGNORED}
    unknown = sorted(set(body) - known)
    if unknown:
        raise fail(f"body.{unknown[0]}", f"is not supported in batch requests (supported: {', '.join(sorted(known))})")
    if prompt_field not in body:
        raise fail(f"body.{prompt_field}", "is required")
    try:
        text = token_ids = messages = None
        if chat:
            messages = _messages(body["messages"])
        elif isinstance(body["prompt"], str):
            text = body["prompt"]
        else:
            token_ids = as_ints(body["prompt"])
    except TypeError as exc:
        raise fail(f"body.{prompt_field}", str(exc)) from None
    sampling: dict[str, Any] = {}
    max_tokens, n, model = None, 1, body.get("model")
    for name, value in body.items():
        try:
            if name in ("max_tokens", "max_completion_tokens"):
                max_tokens = None if value is None else as_int(value)
            elif name == "n":
                n = as_int(value)
            elif name == "response_format":
                sampling["structured"] = _response_format(value)
            elif name == "logprobs" and chat:
                if as_bool(value):
                    sampling["logprobs"] = as_int(body.get("top_logprobs") or 0)
            elif name == "logprobs":
                if value is not None:
                    sampling["logprobs"] = as_int(value)
            elif name == "top_logprobs" and not as_bool(body.get("logprobs", False)):
                raise TypeError("needs logprobs: true")
            elif name in _SAMPLING:
                sampling[name] = SAMPLING_FIELDS[name](value)
            elif name == "stream" and as_bool(value):
                raise TypeError("batch requests do not stream: leave it out or false")
            elif name == "model" and not isinstance(value, str):
                raise TypeError(f"must be a string, got {value!r}")
        except TypeError as exc:
            raise fail(f"body.{name}", str(exc)) from None
    return BatchPrompt(line, custom_id, text, token_ids, max_tokens, sampling, messages=messages, n=n,
                       endpoint=endpoint, model=model)


def _chat_logprobs(final: TextFinal, decode: Callable[[Sequence[int]], str]) -> dict[str, Any]:
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for token_id, lp in zip(final.output_ids, final.output_logprobs or (), strict=True):
        top = [entry(i, v) for i, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)]
        content.append(entry(token_id, lp.logprob) | {"top_logprobs": top})
    return {"content": content}


def _completion_logprobs(final: TextFinal, decode: Callable[[Sequence[int]], str]) -> dict[str, Any]:
    tokens = [decode([t]) for t in final.output_ids]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    logprobs = final.output_logprobs or ()
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [{decode([i]): v for i, v in zip(lp.top_token_ids, lp.top_logprobs, strict=True)}
                             for lp in logprobs],
            "text_offset": offsets}


def openai_record(prompt: BatchPrompt, finals: Sequence[TextFinal], served_model: str,
                  decode: Callable[[Sequence[int]], str]) -> dict[str, Any]:
    """The output line of an OpenAI batch request: its samples as choices, or the engine's error. `decode`: token
    ids -> text (the log-probabilities' token strings)."""
    line: dict[str, Any] = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": prompt.id}
    failed = [f for f in finals if f.finish_reason == FinishReason.ERROR]
    if failed:
        return line | {"response": None, "error": {"code": "engine_error", "message": failed[0].error}}
    chat = prompt.endpoint == "chat.completion"
    choices = []
    for index, final in enumerate(finals):
        logprobs = None
        if final.output_logprobs is not None:
            logprobs = (_chat_logprobs if chat else _completion_logprobs)(final, decode)
        choice: dict[str, Any] = {"index": index, "finish_reason": final.finish_reason.value, "logprobs": logprobs}
        choice |= {"message": {"role": "assistant", "content": final.text}} if chat else {"text": final.text}
        choices.append(choice)
    prompt_tokens = finals[0].num_prompt_tokens
    completion_tokens = sum(f.num_output_tokens for f in finals)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "object": prompt.endpoint,
            "created": int(time.time()), "model": prompt.model or served_model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    return line | {"response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}, "error": None}

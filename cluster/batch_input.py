"""The input lines of `dsv4 batch`: their JSON shape checked and turned into `BatchPrompt`s, before any engine
starts (the model-dependent limits are checked by `batch.build_requests`). Two formats: dsv4's own (this module,
described in `batch.py`) and OpenAI's batch format (`batch_openai.py`), told apart by `custom_id`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class BatchInputError(ValueError):
    """A line of the input file a user can fix: `FILE:LINE: FIELD: what is wrong`."""

    def __init__(self, path: str | Path, line: int, field: str, message: str):
        super().__init__(f"{path}:{line}: {field}: {message}")
        self.path, self.line, self.field, self.message = str(path), line, field, message


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not 1


def as_int(value: Any) -> int:
    if not is_int(value):
        raise TypeError(f"must be an integer, got {value!r}")
    return value


def as_optional_int(value: Any) -> int | None:
    return None if value is None else as_int(value)


def as_number(value: Any) -> float:
    if not (is_int(value) or isinstance(value, float)):
        raise TypeError(f"must be a number, got {value!r}")
    return float(value)


def as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"must be true or false, got {value!r}")
    return value


def as_strings(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise TypeError(f"must be a string or a list of strings, got {value!r}")
    return tuple(items)


def as_logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's object of token id (a string of digits, in JSON) -> bias."""
    if not isinstance(value, dict):
        raise TypeError(f"must be an object of token id -> bias, got {value!r}")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit()):
            raise TypeError(f"token ids are non-negative integers, got {key!r}")
        out.append((int(key), as_number(bias)))
    return tuple(sorted(out))


def as_ints(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(is_int(item) for item in value):
        raise TypeError(f"must be a list of integers, got {value!r}")
    return tuple(value)


# Optional per-line fields: name -> converter (raises TypeError). All but max_tokens are SamplingParams fields.
SAMPLING_FIELDS = {
    "max_tokens": as_optional_int,
    "temperature": as_number,
    "top_p": as_number,
    "top_k": as_int,
    "seed": as_optional_int,
    "min_tokens": as_int,
    "stop": as_strings,
    "stop_token_ids": as_ints,
    "ignore_eos": as_bool,
    "min_p": as_number,
    "presence_penalty": as_number,
    "frequency_penalty": as_number,
    "repetition_penalty": as_number,
    "logit_bias": as_logit_bias,
}
_PROMPT_FIELDS = ("prompt", "prompt_token_ids")
_KNOWN_FIELDS = ("id", *_PROMPT_FIELDS, *SAMPLING_FIELDS)


@dataclass(frozen=True, slots=True)
class BatchPrompt:
    """One input line, with its JSON shape checked (the model-dependent limits are checked later)."""

    line: int                               # 1-based line number in the input file
    id: str | int
    text: str | None                        # exactly one of text, token_ids and messages is set
    token_ids: tuple[int, ...] | None
    max_tokens: int | None                  # None: the rest of the context
    sampling: Mapping[str, Any]             # the other SamplingParams fields the line sets
    # OpenAI's batch format (`batch_openai.py`): the chat messages (rendered with the model's chat template; text
    # and token_ids are then None), the samples per prompt, and the response object's kind and model name.
    messages: tuple[Mapping[str, Any], ...] | None = None
    n: int = 1
    endpoint: str | None = None             # "chat.completion" or "text_completion"; None: dsv4's own format
    model: str | None = None




def load_record(raw: str, line: int, path: str | Path = "<input>") -> dict[str, Any]:
    """One input line's JSON object. Raises BatchInputError naming the line."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise BatchInputError(path, line, "line", f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise BatchInputError(path, line, "line", f"must be a JSON object, got {type(record).__name__}")
    return record


def parse_prompt(raw: str, line: int, path: str | Path = "<input>") -> BatchPrompt:
    """One input line in dsv4's format -> BatchPrompt. Raises BatchInputError naming the line and the field."""
    return parse_record(load_record(raw, line, path), line, path)


def parse_record(record: dict[str, Any], line: int, path: str | Path = "<input>") -> BatchPrompt:
    unknown = sorted(set(record) - set(_KNOWN_FIELDS))
    if unknown:  # a misspelt sampling field must not be ignored silently
        raise BatchInputError(path, line, unknown[0], f"unknown field (known: {', '.join(_KNOWN_FIELDS)})")
    prompt_id = record.get("id", line)
    if not (is_int(prompt_id) or (isinstance(prompt_id, str) and prompt_id)):
        raise BatchInputError(path, line, "id", f"must be a non-empty string or an integer, got {prompt_id!r}")
    given = [name for name in _PROMPT_FIELDS if name in record]
    if len(given) != 1:
        raise BatchInputError(path, line, "prompt", "set exactly one of prompt and prompt_token_ids")
    text, token_ids = record.get("prompt"), None
    if "prompt" in record and not isinstance(text, str):
        raise BatchInputError(path, line, "prompt", f"must be a string, got {text!r}")
    if "prompt_token_ids" in record:
        try:
            token_ids = as_ints(record["prompt_token_ids"])
        except TypeError as exc:
            raise BatchInputError(path, line, "prompt_token_ids", str(exc)) from None
    sampling: dict[str, Any] = {}
    for name, convert in SAMPLING_FIELDS.items():
        if name in record:
            try:
                sampling[name] = convert(record[name])
            except TypeError as exc:
                raise BatchInputError(path, line, name, str(exc)) from None
    max_tokens = sampling.pop("max_tokens", None)
    return BatchPrompt(line, prompt_id, text, token_ids, max_tokens, sampling)

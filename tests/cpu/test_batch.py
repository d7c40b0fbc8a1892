"""Batch generation (`dsv4 batch`, dsv4.cluster.batch): both input formats (dsv4's and OpenAI's) and their errors,
the run on the real engine (two CPU workers with expert parallelism) against the single-process model, and what one
failed request does.

The same command submitted as a Ray job to a `ray start` cluster is tested in test_deploy_job.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from api_fakes import FakeEngine, tokenizer, tokenizer_dir  # noqa: F401

from dsv4.cluster.batch import read_prompts, run_batch, run_batch_file
from dsv4.cluster.batch_input import BatchInputError, parse_prompt
from dsv4.cluster.cli import build_parser, serve_config
from dsv4.cluster.engine_ray import RayEngineClient
from dsv4.cluster.generation_service import GenerationService
from dsv4.cluster.tokenizer import ModelTokenizer
from dsv4.model.generate import greedy_generate
from dsv4.model.numerics import Numerics
from dsv4.wire.config import DEFAULT_PORT, ServeConfig
from dsv4.wire.request import GenerateRequest, InvalidRequest, RequestOutput, StructuredOutput

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_PROMPTS = ROOT / "deploy" / "jobs" / "batch" / "prompts.jsonl"
GREEDY = {"temperature": 0, "ignore_eos": True}


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- the input format ---------------------------------------------------------------------------------------------

def test_a_line_names_its_prompt_and_sampling_fields():
    prompt = parse_prompt('{"id": "q1", "prompt": "Hi", "max_tokens": 4, "temperature": 0, "top_p": 0.5, '
                          '"top_k": 3, "seed": 9, "min_tokens": 1, "stop": "x", "stop_token_ids": [7], '
                          '"ignore_eos": true}', 12)
    assert (prompt.line, prompt.id, prompt.text, prompt.token_ids, prompt.max_tokens) == (12, "q1", "Hi", None, 4)
    assert prompt.sampling == {"temperature": 0.0, "top_p": 0.5, "top_k": 3, "seed": 9, "min_tokens": 1,
                               "stop": ("x",), "stop_token_ids": (7,), "ignore_eos": True}
    adjusted = parse_prompt('{"prompt": "Hi", "min_p": 0.1, "presence_penalty": 1, "frequency_penalty": -0.5, '
                            '"repetition_penalty": 1.1, "logit_bias": {"50": -100, "7": 2.5}}', 1)
    assert adjusted.sampling == {"min_p": 0.1, "presence_penalty": 1.0, "frequency_penalty": -0.5,
                                 "repetition_penalty": 1.1, "logit_bias": ((7, 2.5), (50, -100.0))}
    tokens = parse_prompt('{"prompt_token_ids": [0, 5, 6], "stop": ["a", "b"]}', 3)
    assert (tokens.id, tokens.text, tokens.token_ids, tokens.max_tokens) == (3, None, (0, 5, 6), None)
    assert tokens.sampling == {"stop": ("a", "b")}


@pytest.mark.parametrize("line, field, words", [
    ('{"prompt": "a"', "line", "not valid JSON"),
    ('["a"]', "line", "must be a JSON object"),
    ('{"prompt": "a", "max_token": 3}', "max_token", "unknown field"),
    ('{"id": "x"}', "prompt", "exactly one of"),
    ('{"prompt": "a", "prompt_token_ids": [1]}', "prompt", "exactly one of"),
    ('{"prompt": 5}', "prompt", "must be a string"),
    ('{"prompt": null}', "prompt", "must be a string"),
    ('{"prompt_token_ids": [1, "2"]}', "prompt_token_ids", "list of integers"),
    ('{"prompt": "a", "max_tokens": true}', "max_tokens", "must be an integer"),
    ('{"prompt": "a", "temperature": "0"}', "temperature", "must be a number"),
    ('{"prompt": "a", "stop": [1]}', "stop", "string or a list of strings"),
    ('{"prompt": "a", "ignore_eos": 1}', "ignore_eos", "true or false"),
    ('{"id": 1.5, "prompt": "a"}', "id", "non-empty string or an integer"),
    ('{"prompt": "a", "logit_bias": [[1, 2]]}', "logit_bias", "object of token id"),
    ('{"prompt": "a", "logit_bias": {"x": 2}}', "logit_bias", "non-negative integers"),
    ('{"prompt": "a", "logit_bias": {"1": "2"}}', "logit_bias", "must be a number"),
])
def test_a_bad_line_is_named_by_file_line_and_field(line, field, words):
    with pytest.raises(BatchInputError) as err:
        parse_prompt(line, 7, "prompts.jsonl")
    assert (err.value.line, err.value.field) == (7, field)
    assert str(err.value).startswith(f"prompts.jsonl:7: {field}: ") and words in str(err.value)


def test_a_file_skips_blank_lines_and_rejects_repeated_ids(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"id": "b", "prompt": "b"}\n')
    assert [(p.line, p.id) for p in read_prompts(path)] == [(1, 1), (3, "b")]
    path.write_text('{"prompt": "a"}\n{"id": 1, "prompt": "b"}\n')   # the first line's id is its number
    with pytest.raises(BatchInputError, match=r"p.jsonl:2: id: 1 is already used on line 1"):
        read_prompts(path)
    path.write_text("\n")
    with pytest.raises(BatchInputError, match="no prompts"):
        read_prompts(path)


def test_the_example_job_prompts_parse_and_fit_the_default_model(tiny_checkpoint):
    """Every line of the shipped example is valid for the default (tiny) model: vocabulary and context."""
    from dsv4.cluster.batch import build_requests
    from dsv4.cluster.generation_service import GenerationService
    from dsv4.cluster.tokenizer import ModelTokenizer

    prompts = read_prompts(EXAMPLE_PROMPTS)
    assert len(prompts) >= 2
    default = ModelTokenizer.from_dir(tiny_checkpoint)
    assert len(build_requests(GenerationService(FakeEngine(default), default), prompts)) == len(prompts)


def test_batch_takes_the_engine_options_of_serve():
    parser = build_parser()
    engine_options = ["--model", "/m", "--workers", "3", "--device", "cpu", "--numerics", "exact-fp32",
                      "--kv-cache-gib", "0.5", "--max-model-len", "64", "--max-num-seqs", "4",
                      "--max-num-batched-tokens", "32", "--max-prefill-chunk", "16", "--seed", "5"]
    serve = parser.parse_args(["serve", *engine_options])
    batch = parser.parse_args(["batch", "--input", "in.jsonl", "--output", "out.jsonl", *engine_options])
    serve_cfg, batch_cfg = serve_config(serve), serve_config(batch)
    assert (serve_cfg.host, serve_cfg.port) == ("127.0.0.1", DEFAULT_PORT)  # serve binds this machine only
    assert batch_cfg == dataclasses.replace(serve_cfg, host=ServeConfig.__dataclass_fields__["host"].default)


# --- OpenAI's batch format --------------------------------------------------------------------------------------

def openai_line(url="/v1/chat/completions", **body) -> dict:
    return {"custom_id": "r1", "method": "POST", "url": url, "body": body}


def test_an_openai_line_maps_its_body_to_the_request():
    chat = parse_prompt_any(openai_line(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, n=2,
                                        temperature=0.5, stop="x", logit_bias={"9": -100}, seed=3,
                                        response_format={"type": "json_object"}))
    assert (chat.id, chat.messages, chat.text, chat.max_tokens, chat.n, chat.endpoint, chat.model) == \
        ("r1", ({"role": "user", "content": "Hi"},), None, 5, 2, "chat.completion", "m")
    assert chat.sampling == {"temperature": 0.5, "stop": ("x",), "logit_bias": ((9, -100.0),), "seed": 3,
                             "structured": StructuredOutput("json_object")}
    text = parse_prompt_any(openai_line("/v1/completions", prompt=[0, 5, 6], max_completion_tokens=4,
                                        response_format={"type": "json_schema",
                                                         "json_schema": {"name": "x", "schema": {"type": "object"}}}))
    assert (text.token_ids, text.max_tokens, text.endpoint, text.n) == ((0, 5, 6), 4, "text_completion", 1)
    assert text.sampling["structured"] == StructuredOutput("json_schema", '{"type": "object"}')
    chat_lp = parse_prompt_any(openai_line(messages=[{"role": "user", "content": "a"}], logprobs=True,
                                           top_logprobs=3))
    assert chat_lp.sampling == {"logprobs": 3}
    assert parse_prompt_any(openai_line(messages=[{"role": "user", "content": "a"}], logprobs=False)).sampling == {}
    assert parse_prompt_any(openai_line("/v1/completions", prompt="a", logprobs=2)).sampling == {"logprobs": 2}


def parse_prompt_any(record: dict, line: int = 4):
    from dsv4.cluster.batch_openai import parse_openai
    return parse_openai(record, line, "batch.jsonl")


@pytest.mark.parametrize("record, field, words", [
    ({**openai_line(), "url": "/v1/embeddings"}, "url", "must be one of"),
    ({**openai_line(), "method": "GET"}, "method", "must be POST"),
    ({**openai_line(), "custom_id": ""}, "custom_id", "non-empty string"),
    ({**openai_line(), "extra": 1}, "extra", "unknown field"),
    (openai_line(max_tokens=3), "body.messages", "is required"),
    (openai_line(messages=[{"role": "user"}]), "body.messages", "list of {role, content}"),
    (openai_line(messages=[{"role": "user", "content": "a"}], tools=[]), "body.tools", "not supported"),
    (openai_line(messages=[{"role": "user", "content": "a"}], stream=True), "body.stream", "do not stream"),
    (openai_line(messages=[{"role": "user", "content": "a"}], response_format={"type": "yaml"}),
     "body.response_format", "text, json_object or json_schema"),
    (openai_line(messages=[{"role": "user", "content": "a"}], temperature="hot"), "body.temperature",
     "must be a number"),
    (openai_line("/v1/completions", prompt=[1, "2"]), "body.prompt", "list of integers"),
    (openai_line(messages=[{"role": "user", "content": "a"}], top_logprobs=2), "body.top_logprobs",
     "needs logprobs: true"),
    (openai_line("/v1/completions", prompt="a", top_logprobs=2), "body.top_logprobs", "not supported"),
])
def test_a_bad_openai_line_is_named_by_line_and_field(record, field, words):
    with pytest.raises(BatchInputError) as err:
        parse_prompt_any(record)
    assert (err.value.line, err.value.field) == (4, field) and words in str(err.value), str(err.value)


@pytest.mark.parametrize("body, field", [
    ({"n": 500}, "body.n"),
    ({"max_tokens": 1 << 20}, "body.max_tokens"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}},
     "body.response_format"),
])
def test_an_openai_line_outside_the_models_limits_names_its_body_field(tokenizer, tmp_path, body, field):  # noqa: F811
    from dsv4.workers.grammar import ConstraintCheck
    path = write_jsonl(tmp_path / "p.jsonl", [openai_line(messages=[{"role": "user", "content": "a"}], **body)])
    engine = FakeEngine(tokenizer)
    info = engine.model_info()
    with pytest.raises(BatchInputError) as err:
        asyncio.run(run_batch_file(engine, tokenizer, read_prompts(path), tmp_path / "out.jsonl", 4, path,
                                   ConstraintCheck(tokenizer.path, info.vocab_size, info.eos_token_ids)))
    assert (err.value.line, err.value.field) == (1, field), err.value


# --- on the real engine -------------------------------------------------------------------------------------------

def test_completions_come_back_in_input_order_and_equal_the_model(ray_service, tiny_model, tiny_checkpoint,
                                                                   tmp_path):
    tok = ModelTokenizer.from_dir(tiny_checkpoint)
    g = torch.Generator().manual_seed(11)
    records = [{"id": "text-0", "prompt": "The DeepSeek-V4 model is", "max_tokens": 9, **GREEDY},
               {"id": "text-1", "prompt": "Ray actors", "max_tokens": 2, **GREEDY}]
    records += [{"id": 100 + i, "prompt_token_ids": torch.randint(2, 1024, (n,), generator=g).tolist(),
                 "max_tokens": m, **GREEDY} for i, (n, m) in enumerate([(150, 3), (7, 8), (60, 5)])]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    out = tmp_path / "completions.jsonl"
    engine = RayEngineClient(ray_service.coordinator, ray_service.info)
    summary = asyncio.run(run_batch_file(engine, tok, read_prompts(path), out, max_concurrency=2))

    got = read_jsonl(out)
    assert [r["id"] for r in got] == [r["id"] for r in records]
    assert (summary.num_requests, summary.num_failed) == (5, 0)
    for record, completion in zip(records, got, strict=True):
        prompt_ids = record.get("prompt_token_ids") or tok.encode(record["prompt"])
        expected = greedy_generate(tiny_model, prompt_ids, record["max_tokens"], Numerics.parse("reference"))
        assert completion["token_ids"] == expected, completion["id"]
        assert completion["text"] == tok.decode(expected)
        assert (completion["finish_reason"], completion["num_prompt_tokens"], completion["num_output_tokens"]) == \
            ("length", len(prompt_ids), len(expected))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["completions.jsonl", "prompts.jsonl"]   # no .partial


def test_openai_batch_lines_run_on_the_engine_and_answer_in_openai_objects(ray_service, tiny_model, tiny_checkpoint,
                                                                             tmp_path):
    from dsv4.workers.grammar import ConstraintCheck

    tok = ModelTokenizer.from_dir(tiny_checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a color."}]
    schema = {"type": "object", "additionalProperties": False, "required": ["ok"],
              "properties": {"ok": {"type": "boolean"}}}
    records = [openai_line(model="tiny", messages=messages, max_tokens=6, **GREEDY),
               {**openai_line("/v1/completions", prompt=[0, 17, 4, 99], max_tokens=4, n=2, seed=8,
                              temperature=1.0, ignore_eos=True, logprobs=2), "custom_id": "r2"},
               {**openai_line(messages=messages, max_tokens=3, logprobs=True, top_logprobs=2, **GREEDY),
                "custom_id": "r4"},
               {**openai_line(messages=messages, max_tokens=60, seed=1,
                              response_format={"type": "json_schema", "json_schema": {"schema": schema}}),
                "custom_id": "r3"}]
    path = write_jsonl(tmp_path / "openai.jsonl", records)
    out = tmp_path / "results.jsonl"
    engine = RayEngineClient(ray_service.coordinator, ray_service.info)
    check = ConstraintCheck(tok.path, ray_service.info.vocab_size, ray_service.info.eos_token_ids)
    summary = asyncio.run(run_batch_file(engine, tok, read_prompts(path), out, 3, path, check))
    got = read_jsonl(out)
    assert [r["custom_id"] for r in got] == ["r1", "r2", "r4", "r3"] and summary.num_failed == 0
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in got)
    chat = got[0]["response"]["body"]
    prompt_ids = tok.encode(tok.apply_chat_template(messages))
    expected = greedy_generate(tiny_model, prompt_ids, 6, Numerics.parse("reference"))
    assert (chat["object"], chat["model"]) == ("chat.completion", "tiny")
    assert chat["choices"] == [{"index": 0, "finish_reason": "length", "logprobs": None,
                                "message": {"role": "assistant", "content": tok.decode(expected)}}]
    assert chat["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 6,
                             "total_tokens": len(prompt_ids) + 6}
    text = got[1]["response"]["body"]
    assert text["object"] == "text_completion" and [c["index"] for c in text["choices"]] == [0, 1]
    assert text["usage"]["completion_tokens"] == 8 and text["model"] == ray_service.info.served_model_name
    for choice in text["choices"]:            # completions' logprobs: tokens, their logprobs, top 2, offsets
        lps = choice["logprobs"]
        assert "".join(lps["tokens"]) == choice["text"] and len(lps["token_logprobs"]) == 4
        assert all(len(top) <= 2 for top in lps["top_logprobs"]) and lps["text_offset"][0] == 0
    chat_lp = got[2]["response"]["body"]["choices"][0]
    content = chat_lp["logprobs"]["content"]              # greedy: the chosen token tops its own alternatives
    assert "".join(c["token"] for c in content) == chat_lp["message"]["content"] == tok.decode(expected[:3])
    assert all(c["top_logprobs"][0]["token"] == c["token"] and len(c["top_logprobs"]) == 2 for c in content)
    assert all(c["bytes"] == list(c["token"].encode()) and c["logprob"] <= 0 for c in content)
    answer = got[3]["response"]["body"]["choices"][0]
    assert answer["finish_reason"] == "stop" and json.loads(answer["message"]["content"]) in ({"ok": True},
                                                                                             {"ok": False})


# --- limits of the served model, and failures (stand-in engine: see api_fakes) -----------------------------------

@pytest.mark.parametrize("record, field", [
    ({"prompt_token_ids": [0, 1 << 20]}, "prompt_token_ids"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"prompt": "a", "max_tokens": 1 << 20}, "max_tokens"),
])
def test_a_line_outside_the_models_limits_stops_the_run_before_it_starts(tokenizer, tmp_path, record, field):  # noqa: F811
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine", "max_tokens": 2}, record])
    engine = FakeEngine(tokenizer)
    with pytest.raises(BatchInputError) as err:
        asyncio.run(run_batch_file(engine, tokenizer, read_prompts(path), tmp_path / "out.jsonl", 4, path))
    assert (err.value.line, err.value.field) == (2, field), err.value
    assert not engine.abort_calls and not list(tmp_path.glob("out.jsonl*"))   # nothing ran, nothing written


def test_dsv4_batch_rejects_a_bad_line_before_any_worker_starts(tiny_checkpoint, tmp_path):
    """The command checks every line against the checkpoint's vocabulary and context off its config.json: a token
    id outside the vocabulary stops it with FILE:LINE: FIELD, exit status 2, before a worker (or Ray) starts."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine", "max_tokens": 2},
                                              {"prompt_token_ids": [1, 1 << 20]}])
    out = tmp_path / "out.jsonl"
    done = subprocess.run([sys.executable, "-m", "dsv4.cluster.cli", "batch", "--input", str(path), "--output",
                           str(out), "--model", str(tiny_checkpoint), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{path}:2: prompt_token_ids" in done.stderr and "vocabulary" in done.stderr, done.stderr
    assert "starting" not in done.stderr and not list(tmp_path.glob("out.jsonl*")), done.stderr


class RejectsLongPrompts(FakeEngine):
    """Like an engine whose KV cache cannot hold a prompt: rejects it before its first output."""

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if len(request.prompt_token_ids) > 10:
            raise InvalidRequest("prompt", "does not fit any worker's KV cache")
        async for output in super().generate(request):
            yield output


def test_a_failed_request_is_an_error_line_and_the_others_complete(tokenizer):  # noqa: F811
    prompts = [parse_prompt(json.dumps(r), i + 1) for i, r in enumerate([
        {"prompt_token_ids": [5, 6], "max_tokens": 2, "ignore_eos": True},     # done before the failure point
        {"prompt_token_ids": [5, 7], "max_tokens": 9, "ignore_eos": True},     # the engine fails it mid-stream
        {"prompt_token_ids": [5] * 20, "max_tokens": 2},                      # rejected up front
    ])]
    engine = RejectsLongPrompts(tokenizer, fail_after_tokens=4)
    service = GenerationService(engine, tokenizer)
    requests = [service.build_request(f"r{p.line}", p.token_ids, p.max_tokens, **p.sampling) for p in prompts]
    out = io.StringIO()
    summary = asyncio.run(run_batch(service, prompts, requests, out, max_concurrency=3))
    ok, failed, rejected = [json.loads(line) for line in out.getvalue().splitlines()]
    assert (ok["finish_reason"], ok["num_output_tokens"]) == ("length", 2) and "error" not in ok
    assert failed["finish_reason"] == "error" and "fake engine failure" in failed["error"]
    assert rejected["finish_reason"] == "error" and "KV cache" in rejected["error"]
    assert (summary.num_requests, summary.num_failed) == (3, 2)

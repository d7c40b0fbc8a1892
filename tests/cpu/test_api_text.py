"""Tokenizer, incremental detokenizer and stop strings, without a server: token streams built by hand."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from api_fakes import make_tokenizer_dir

from dsv4.cluster.text_stream import StopStringMatcher, TextDelta, TextFinal, TextStream
from dsv4.cluster.tokenizer import REPLACEMENT_CHAR, ModelTokenizer
from dsv4.wire.request import FinishReason, GenerateRequest, RequestOutput, SamplingParams, TokenLogprobs

MULTIBYTE = "héllo wörld 你好 🙂!"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> ModelTokenizer:
    return ModelTokenizer.from_dir(make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_encode_prepends_one_bos(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("hello")
    assert ids[0] == tokenizer.bos_token_id == 0
    assert ids.count(0) == 1
    assert tokenizer.encode(tokenizer.bos_token + "hello") == ids  # a rendered chat template starts with BOS
    assert tokenizer.decode(ids) == "hello"


def test_special_tokens_are_parsed_and_skipped_in_text(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("<｜User｜>hi<｜Assistant｜>")
    assert ids[:2] == [0, 2] and ids[-1] == 3
    assert tokenizer.decode(ids) == "hi"
    assert tokenizer.decode([tokenizer.eos_token_id]) == ""


def _stream_text(tokenizer: ModelTokenizer, ids: list[int]) -> list[str]:
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add(token_id) for token_id in ids]
    return pieces + [detokenizer.flush()]


def test_detokenizer_never_splits_a_character(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode(MULTIBYTE)[1:]
    assert len(ids) > len(MULTIBYTE.encode()) // 2, "multi-byte characters must span several byte tokens"
    pieces = _stream_text(tokenizer, ids)
    assert "".join(pieces) == MULTIBYTE
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    emoji = "🙂".encode()
    emoji_ids = tokenizer.encode("🙂")[1:]
    assert len(emoji_ids) == len(emoji) == 4
    assert _stream_text(tokenizer, emoji_ids) == ["", "", "", "🙂", ""]


def test_detokenizer_flushes_an_unfinished_character_like_decode(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("ab你")[1:-1]  # cut the last byte of 你
    pieces = _stream_text(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == "ab" + REPLACEMENT_CHAR


def test_detokenizer_matches_decode_on_random_ids(tokenizer: ModelTokenizer) -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        assert "".join(_stream_text(tokenizer, ids)) == tokenizer.decode(ids)


def test_chat_template_matches_transformers(tokenizer: ModelTokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(tokenizer.path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Sum 2+2"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.apply_chat_template(messages) == expected
    assert tokenizer.encode(expected) == reference(expected, add_special_tokens=False)["input_ids"]


def test_stop_matcher_holds_back_a_possible_stop_prefix() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert not matcher.add("abcST")
    assert matcher.release() == "ab"  # "cST" could still start "STOP"
    assert matcher.add("OPxyz")
    assert matcher.release() == "c"
    assert matcher.text == "abc" and matcher.matched == "STOP"


def test_stop_matcher_takes_the_earliest_match() -> None:
    matcher = StopStringMatcher(["yz", "xy"])
    assert matcher.add("wxyz")
    assert matcher.matched == "xy" and matcher.text == "w"


def _run(tokenizer: ModelTokenizer, ids: list[int], sizes: list[int], **sampling) -> list[TextDelta | TextFinal]:
    """Feed `ids` to a TextStream in deltas of the given sizes, the last one finished with LENGTH."""
    request = GenerateRequest("r", (0, 5), SamplingParams(max_tokens=len(ids), **sampling))
    stream, events, start = TextStream(tokenizer, request), [], 0
    for size in sizes:
        chunk = tuple(ids[start:start + size])
        # with logprobs asked, output i's logprob is -i: which token each one belongs to stays visible
        logprobs = tuple(TokenLogprobs(-float(i)) for i in range(start, start + len(chunk)))
        start += size
        finished = start >= len(ids)
        events += stream.on_output(RequestOutput("r", chunk, 2, start, FinishReason.LENGTH if finished else None,
                                                 new_logprobs=logprobs if "logprobs" in sampling else ()))
        if events and isinstance(events[-1], TextFinal):
            break
    return events


@pytest.mark.parametrize("sizes", [[1] * 40, [3] * 14, [2, 5, 1, 7, 30]])
def test_stop_string_across_token_boundaries(tokenizer: ModelTokenizer, sizes: list[int]) -> None:
    text = "hello world, hello stop here"
    ids = tokenizer.encode(text)[1:]
    events = _run(tokenizer, ids, sizes, stop=("lo w", "stop"))
    final = events[-1]
    assert isinstance(final, TextFinal) and final.finish_reason == FinishReason.STOP
    assert final.matched_stop_str == "lo w" and final.text == "hel"
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert "".join(d.text for d in deltas) == "hel"
    streamed_ids = [t for d in deltas for t in d.token_ids]
    assert streamed_ids == list(final.output_ids)
    assert "lo w" in tokenizer.decode(final.output_ids)       # the token completing the match is the last one
    assert "lo w" not in tokenizer.decode(final.output_ids[:-1])


def test_min_tokens_delays_stop_strings(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("ab ab ab")[1:]
    events = _run(tokenizer, ids, [1] * len(ids), stop=("ab",), min_tokens=3)
    final = events[-1]
    assert final.finish_reason == FinishReason.STOP and len(final.output_ids) >= 3
    assert tokenizer.decode(final.output_ids[:3]).count("ab") >= 1 and final.text.startswith("ab")


def test_finished_stream_flushes_held_back_text(tokenizer: ModelTokenizer) -> None:
    ids = tokenizer.encode("the end is nigh")[1:]
    events = _run(tokenizer, ids, [4] * 10, stop=("never-matches",))
    final = events[-1]
    assert final.finish_reason == FinishReason.LENGTH and final.matched_stop_str is None
    assert final.text == "the end is nigh" == "".join(e.text for e in events if isinstance(e, TextDelta))


@pytest.mark.parametrize("sizes", [[1] * 40, [3] * 14, [2, 5, 1, 7, 30]])
def test_logprobs_follow_their_tokens_and_end_with_a_stop_string(tokenizer: ModelTokenizer,
                                                                 sizes: list[int]) -> None:
    ids = tokenizer.encode("hello world, hello stop here")[1:]
    events = _run(tokenizer, ids, sizes, stop=("lo w",), logprobs=0)
    deltas, final = [e for e in events if isinstance(e, TextDelta)], events[-1]
    assert isinstance(final, TextFinal) and final.matched_stop_str == "lo w"
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) for d in deltas)
    streamed = [lp for d in deltas for lp in d.logprobs]
    assert final.output_logprobs == tuple(streamed)     # cut where the output is cut: at the stop string
    assert [lp.logprob for lp in streamed] == [-float(i) for i in range(len(final.output_ids))]
    plain = _run(tokenizer, ids, sizes, stop=("lo w",))
    assert all(e.logprobs is None for e in plain if isinstance(e, TextDelta)) and plain[-1].output_logprobs is None


def test_missing_logprobs_are_an_engine_error(tokenizer: ModelTokenizer) -> None:
    stream = TextStream(tokenizer, GenerateRequest("r", (0, 5), SamplingParams(logprobs=2)))
    with pytest.raises(RuntimeError, match="0 log-probabilities for 2 tokens"):
        stream.on_output(RequestOutput("r", (7, 8), 2, 2))


def test_a_missing_or_corrupt_tokenizer_is_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ModelTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        ModelTokenizer.from_dir(tmp_path)


def test_serve_fails_at_once_on_a_model_without_a_tokenizer(tmp_path, tiny_checkpoint) -> None:
    """`dsv4 serve` checks the tokenizer before it starts a worker or loads a weight."""
    import shutil
    import subprocess
    import sys
    import time

    model = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, model)
    (model / "tokenizer.json").unlink()
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "dsv4.cluster.cli", "serve", "--model", str(model), "--device",
                          "cpu", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "tokenizer.json" in run.stderr, run.stderr[-2000:]
    assert "starting" not in run.stderr and time.perf_counter() - start < 60

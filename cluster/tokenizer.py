"""The server's tokenizer: `tokenizer.json` + `tokenizer_config.json` from a model directory.

The server owns text, so this is where text becomes token ids (with DeepSeek's BOS in front) and token ids become
text again, one token at a time, without ever emitting half of a multi-byte character: byte-level BPE tokens can
end in the middle of a UTF-8 sequence, and the replacement character a premature decode would produce can never be
taken back from a stream.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

REPLACEMENT_CHAR = "\ufffd"


def _token_content(entry: str | Mapping[str, Any] | None) -> str | None:
    # tokenizer_config.json spells special tokens either as a string or as an AddedToken dict.
    if entry is None or isinstance(entry, str):
        return entry
    return entry.get("content")


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


class ModelTokenizer:
    """Encode/decode for one model. Build with `ModelTokenizer.from_dir(model_dir)`."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any], path: Path):
        self._tokenizer = tokenizer
        self.path = path  # the directory holding tokenizer.json (served to gateways by GetTokenizer)
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        self.bos_token_id = self._id_of(self.bos_token)
        self.eos_token_id = self._id_of(self.eos_token)
        self.add_bos_token = bool(config.get("add_bos_token", True)) and self.bos_token_id is not None
        self.chat_template: str | None = config.get("chat_template")

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelTokenizer:
        """Raises FileNotFoundError / ValueError naming the file: the CLI loads this before any weight, so a
        missing or corrupt tokenizer fails in a second rather than after the whole model has loaded."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (the server tokenizes text prompts with it)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:       # the Rust library raises plain Exception on a malformed file
            raise ValueError(f"{path}: not a tokenizers file ({e})") from None
        config_path = model_dir / "tokenizer_config.json"
        try:
            config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON ({e})") from None
        return cls(tokenizer, config, model_dir)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_chars_per_token(self) -> int | None:
        """The most characters of text one token can stand for, where that is a bound: a byte-level BPE without a
        normalizer maps every byte to a byte of some token, and a character is at least one byte, so a text of
        more than this many characters per token of context cannot fit. None for other tokenizers (an unknown-word
        token or a normalizer can stand for any length)."""
        tok = self._tokenizer
        if type(tok.decoder).__name__ != "ByteLevel" or tok.normalizer is not None:
            return None
        return max(len(piece) for piece in tok.get_vocab(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, BOS first (DeepSeek prepends it; a text that already starts with it keeps one)."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens)

    def apply_chat_template(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's Jinja chat template (for OpenAI-style chat requests)."""
        if not self.chat_template:
            raise ValueError(f"{self.path / 'tokenizer_config.json'} has no chat_template")
        # Sandboxed like transformers: the template comes from a checkpoint, not from us.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals decoding all ids at once.

    Decodes a short window of recent ids (prefix_offset..end) and emits what it adds beyond the already emitted
    part (prefix_offset..read_offset). A decode that ends in U+FFFD is an incomplete UTF-8 sequence, held until a
    later token completes it (or `flush` gives up at the end of the stream).
    """

    def __init__(self, tokenizer: ModelTokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decode window: a clean character boundary
        self._read_offset = 0    # ids before this are emitted

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self._ids[start:end], self._skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token; return the text it settles (possibly empty)."""
        self._ids.append(token_id)
        emitted = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset)
        if len(window) <= len(emitted) or window.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return window[len(emitted):]

    def flush(self) -> str:
        """The text still held back at the end of the stream (an unfinished character decodes as U+FFFD)."""
        emitted = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset)
        self._prefix_offset = self._read_offset = len(self._ids)
        return window[len(emitted):]

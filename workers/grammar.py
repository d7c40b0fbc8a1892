"""Structured output: a request's JSON schema, regex, EBNF grammar or choice list compiled (xgrammar, the library
vLLM and SGLang use) against the served tokenizer, and one matcher per request that says which tokens may come
next.

The sampler takes each constrained row's allowed-token bitmask (int32 words, bit t % 32 of word t // 32 set where
token t may follow; `GrammarState.allowed`) and sets the other logits to -inf on the device before sampling, so a
constrained request's output always extends to a string the constraint accepts and its EOS comes only where one
is complete. The worker feeds every emitted token back (`accept`). JSON schemas allow whitespace between tokens,
at most MAX_WHITESPACE characters in a row (unbounded whitespace lets a model that has lost its way pad forever).
Known upstream quirk (xgrammar 0.2.9): strings with minLength / maxLength admit raw control characters, which
strict JSON parsers refuse; `pattern` has no such gap.

xgrammar (the `structured` extra) is imported on first use: a server that never sees a constraint never loads it.
The server compiles each constraint too (`ConstraintCheck`, handed to it by the composition root: `cluster` never
imports this package), to answer a bad schema with INVALID_ARGUMENT naming its field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from dsv4.wire.request import InvalidRequest, StructuredOutput

MAX_WHITESPACE = 16


def choice_grammar(choices: Sequence[str]) -> str:
    """EBNF whose strings are exactly `choices` (JSON string escapes are EBNF string escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """Compiles constraints for one tokenizer (cached by xgrammar per constraint) and starts matchers."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int]):
        try:
            import xgrammar
        except ImportError:
            raise InvalidRequest("sampling_params.structured_output",
                                 "structured output needs the xgrammar package (pip install 'dsv4[structured]')"
                                 ) from None
        import tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = tokenizers.Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json"))
        detected = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=backend),
                                                           vocab_size=vocab_size, stop_token_ids=list(stop_token_ids))
        # The special tokens (BOS, chat roles, ...) are not text: xgrammar reads an empty string as "never
        # allowed" (it would otherwise take their names for text and allow them inside JSON strings).
        special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        encoded = [""] * vocab_size
        for token, i in backend.get_vocab(with_added_tokens=True).items():
            if i < vocab_size and i not in special:
                encoded[i] = token
        info = xgrammar.TokenizerInfo(encoded, vocab_type=detected.vocab_type, vocab_size=vocab_size,
                                      stop_token_ids=list(stop_token_ids), add_prefix_space=detected.add_prefix_space)
        self._xgr = xgrammar
        self._compiler = xgrammar.GrammarCompiler(info)
        self.vocab_size = vocab_size

    def compile(self, structured: StructuredOutput):
        """The compiled constraint; InvalidRequest naming its field if it does not compile."""
        c = self._compiler
        try:
            if structured.kind in ("json_schema", "json_object"):     # json_object: any object (OpenAI's)
                schema = structured.spec if structured.kind == "json_schema" else '{"type": "object"}'
                return c.compile_json_schema(schema, any_whitespace=True, max_whitespace_cnt=MAX_WHITESPACE)
            if structured.kind == "regex":
                return c.compile_regex(structured.spec)
            if structured.kind == "grammar":
                return c.compile_grammar(structured.spec)
            return c.compile_grammar(choice_grammar(structured.choices))
        except (RuntimeError, ValueError, TypeError) as exc:
            detail = str(exc).strip().splitlines()
            raise InvalidRequest(structured.field, f"does not compile: {detail[0] if detail else exc}") from None

    def matcher(self, structured: StructuredOutput, outputs: Sequence[int] = ()) -> GrammarState:
        """A request's matcher, past the outputs it already has (a preempted request resumes)."""
        state = GrammarState(self._xgr.GrammarMatcher(self.compile(structured)), self.vocab_size, self._xgr)
        for token in outputs:
            state.accept(token)
        return state


class ConstraintCheck:
    """The server's check of a request's constraint (`RequestBuilder.check_constraint`): compiles it, raising
    InvalidRequest naming its field. Loads xgrammar and the tokenizer on the first constrained request."""

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int, stop_token_ids: Sequence[int]):
        self._args = (tokenizer_dir, vocab_size, tuple(stop_token_ids))
        self._grammars: Grammars | None = None

    def __call__(self, structured: StructuredOutput) -> None:
        if self._grammars is None:
            self._grammars = Grammars(*self._args)
        self._grammars.compile(structured)


class GrammarState:
    """One request's position in its constraint."""

    def __init__(self, matcher, vocab_size: int, xgr):
        self._matcher = matcher
        self._bits = xgr.allocate_token_bitmask(1, vocab_size)    # int32 [1, ceil(V / 32)], reused

    def allowed(self) -> torch.Tensor | None:
        """The bitmask of the tokens that may come next (int32 [ceil(V / 32)], a fresh copy), or None once the
        constraint is complete and its stop token taken (with ignore_eos the output goes on unconstrained)."""
        if self._matcher.is_terminated():
            return None
        self._matcher.fill_next_token_bitmask(self._bits, 0)
        return self._bits[0].clone()

    def accept(self, token: int) -> None:
        if not self._matcher.is_terminated():
            self._matcher.accept_token(token)


def unpack_bitmask(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, W] bitmask -> bool [R, vocab_size] (token t allowed where bit t % 32 of word t // 32 is set)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :vocab_size]

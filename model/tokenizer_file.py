"""A byte-level BPE tokenizer for synthetic checkpoints, written as `tokenizer.json` + `tokenizer_config.json`.

Real DeepSeek-V4 checkpoints ship their own 129,280-entry tokenizer. Synthetic checkpoints get this one: every
byte is a token (so any text round-trips), the special tokens sit at DeepSeek's ids (BOS 0, EOS 1), and the rest of
the vocabulary is filled with merges of printable character pairs, so every id the model can sample decodes to
visible text. Files load with `tokenizers.Tokenizer.from_file` and with `transformers.AutoTokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, USER_TOKEN, ASSISTANT_TOKEN)  # ids 0, 1, 2, 3

# A minimal DeepSeek-style chat template: system text first, then alternating user/assistant turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

_PAIR_ALPHABET = " etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ.,0123456789"


def _byte_of_symbol() -> dict[str, int]:
    # GPT-2's bytes_to_unicode table: printable bytes map to themselves, the rest to U+0100 onwards.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def build_byte_tokenizer(vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids (at least 4 special + 256 byte tokens)."""
    num_fixed = len(SPECIAL_TOKENS) + 256
    if vocab_size < num_fixed:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer (needs >= {num_fixed})")
    byte_of = _byte_of_symbol()
    symbol_of = {b: s for s, b in byte_of.items()}
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[symbol_of[b]] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a in _PAIR_ALPHABET:
        for b in _PAIR_ALPHABET:
            if len(vocab) >= vocab_size:
                break
            left, right = symbol_of[ord(a)], symbol_of[ord(b)]
            merges.append((left, right))
            vocab[left + right] = len(vocab)
    while len(vocab) < vocab_size:  # beyond the pair table: reserved ids that decode to nothing
        vocab[f"<｜reserved_{len(vocab)}｜>"] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS) + [t for t in vocab if t.startswith("<｜reserved_")])
    return tokenizer


def write_tokenizer_files(out_dir: str | Path, vocab_size: int, max_length: int) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (with a chat template) into `out_dir`."""
    out_dir = Path(out_dir)
    build_byte_tokenizer(vocab_size).save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

"""Our own CLIP-format BPE vocabulary, in which every caption word is one token.

The files (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``) load with
``CLIPTokenizer.from_pretrained``. The vocabulary holds the 256 byte symbols (alone and
word-final, as in CLIP), so any text tokenizes, plus merges learned by byte-pair
encoding over the caption words until each word is a single token.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from functools import cache
from pathlib import Path

from .shapes import ALL_SHAPES, BACKGROUNDS, COLORS, EXTRA_COLORS

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
#: Token sequence length of the text encoder (bos + words + eos, padded).
MODEL_MAX_LENGTH = 16
_END = "</w>"

#: Every word the captions use; the fine-tuning shape is included, so its token exists
#: (the base model simply never trains its embedding).
VOCAB_WORDS: tuple[str, ...] = tuple(sorted({"a", "on", "background", *COLORS, *BACKGROUNDS, *ALL_SHAPES}))


def vocabulary_words(extra_words: tuple[str, ...] = ()) -> tuple[str, ...]:
    """:data:`VOCAB_WORDS` and ``extra_words`` (a pretraining run's added colours), sorted."""
    return tuple(sorted({*VOCAB_WORDS, *extra_words}))


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def learn_merges(words: tuple[str, ...] = VOCAB_WORDS, end_of_word: str = _END) -> list[tuple[str, str]]:
    """Byte-pair merges (most frequent pair first, ties alphabetical) until each word is one symbol;
    ``end_of_word`` marks a word's last symbol (CLIP's ``</w>``; byte-level BPE has none)."""
    corpus = [(*word[:-1], word[-1] + end_of_word) for word in words]
    merges: list[tuple[str, str]] = []
    while any(len(symbols) > 1 for symbols in corpus):
        counts = Counter(pair for symbols in corpus for pair in zip(symbols, symbols[1:], strict=False))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = [_merge_pair(symbols, best) for symbols in corpus]
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP vocabulary order: byte symbols, word-final byte symbols, merges, special tokens."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + _END for s in symbols] + ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


@cache
def _vocab_with_added_colors(count: int) -> dict[str, int]:
    return build_vocab(learn_merges(vocabulary_words(tuple(EXTRA_COLORS)[:count])))


def added_colors_of(vocab: Mapping[str, int]) -> tuple[str, ...] | None:
    """The pretraining-only colours (the first N of :data:`~.shapes.EXTRA_COLORS`, N >= 0) whose
    vocabulary ``vocab`` (a tokenizer's ``get_vocab()``) is: ``()`` for the plain vocabulary,
    ``None`` when it is none of ours (another model's tokenizer, or ours with other words)."""
    for count in range(len(EXTRA_COLORS) + 1):
        if dict(vocab) == _vocab_with_added_colors(count):
            return tuple(EXTRA_COLORS)[:count]
    return None


def write_tokenizer(out_dir: str | Path, words: tuple[str, ...] = VOCAB_WORDS) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    (out / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False, indent=1))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


#: Mistral's control tokens (its chat format's markers, and the image tokens that
#: ``Flux2Pipeline`` strips from prompts by name), added to our vocabulary as special tokens
MISTRAL_CONTROL_TOKENS = (
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
)
#: Mistral Small 3.x's chat format: ``<bos>[SYSTEM_PROMPT]system[/SYSTEM_PROMPT][INST]user[/INST]``,
#: an assistant turn followed by ``<eos>``; a message's text is its ``text`` parts joined (the
#: content-list messages that ``Flux2Pipeline.encode_prompt`` sends)
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def add_mistral_chat_format(tokenizer):
    """``tokenizer`` (in place) with Mistral's control tokens and chat template, so that a
    pipeline that encodes prompts through ``tokenizer.apply_chat_template`` in Mistral's format
    (``Flux2Pipeline``) runs on our vocabulary. Returns it."""
    tokenizer.add_special_tokens({"additional_special_tokens": list(MISTRAL_CONTROL_TOKENS)})
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    return tokenizer

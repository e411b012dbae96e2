"""Our vocabulary as a Qwen2 tokenizer: byte-level BPE with Qwen's chat markers and a chat template.

Two pipelines need a tokenizer of Qwen's own class and layout rather than the CLIP-format one of
:mod:`.tokenizer`: ``QwenImagePipeline`` wraps every prompt in a fixed template and drops its
first ``prompt_template_encode_start_idx`` (34) tokens, the number of tokens Qwen's vocabulary
cuts that template prefix into; ``ZImagePipeline`` formats prompts with the tokenizer's chat
template. Here every caption word and every word of Qwen-Image's template is a single token,
alone and after a space (``Ġword``: byte-level BPE keeps the space in the word's first byte),
so the prefix is 34 tokens as with Qwen's tokenizer and the pipeline drops exactly the template;
any other text tokenizes byte by byte. The chat template writes the conversations these
pipelines send as Qwen's does: each turn ``<|im_start|>role\\ncontent<|im_end|>\\n``, then the
assistant's turn opened, with an empty thinking block only when ``enable_thinking=False``.
"""

from __future__ import annotations

from .tokenizer import VOCAB_WORDS, bytes_to_unicode, learn_merges

END_OF_TEXT = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: the words of ``QwenImagePipeline.prompt_template_encode`` (its system turn and the roles)
QWEN_IMAGE_TEMPLATE_WORDS = (
    "system",
    "Describe",
    "the",
    "image",
    "by",
    "detailing",
    "color",
    "shape",
    "size",
    "texture",
    "quantity",
    "text",
    "spatial",
    "relationships",
    "of",
    "objects",
    "and",
    "background",
    "user",
    "assistant",
)
#: a conversation as Qwen's chat template writes it for text-only turns
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    f"{IM_START}{{{{ message.role }}}}\n{{{{ message.content }}}}{IM_END}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    f"{IM_START}assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
#: Qwen2's tokenizers' length limit
MODEL_MAX_LENGTH = 32768


def qwen_vocabulary(words: tuple[str, ...]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of a byte-level BPE in which each word, alone and after a space, is one
    token: the 256 byte symbols, then the merged symbols in merge order."""
    table = bytes_to_unicode()
    forms = sorted({"".join(table[b] for b in (space + w).encode()) for w in words for space in ("", " ")})
    merges = learn_merges(tuple(forms), end_of_word="")
    tokens = dict.fromkeys([*table.values(), *("".join(pair) for pair in merges)])
    return {token: i for i, token in enumerate(tokens)}, merges


def qwen_tokenizer(words: tuple[str, ...] = (*VOCAB_WORDS, *QWEN_IMAGE_TEMPLATE_WORDS)):
    """A ``Qwen2Tokenizer`` of ``words`` (default: the captions' words and Qwen-Image's template)
    with ``<|endoftext|>`` (end, padding), ``<|im_start|>``, ``<|im_end|>`` and the chat template."""
    from transformers import Qwen2Tokenizer

    vocab, merges = qwen_vocabulary(words)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=MODEL_MAX_LENGTH,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer

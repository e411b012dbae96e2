"""What the embedded tiny base can draw, and which words of a prompt it has never seen.

The base was trained on captions "a <colour> <shape> on a <background> background" only, so
a word outside that grammar, a shape colour used as a background (or the reverse), or the
fine-tuning shape gives an image the base cannot know how to draw. The demo shows these
notes beside the images instead of leaving the user with an unexplained picture.
"""

from __future__ import annotations

import re

from .shapes import BACKGROUNDS, COLORS, FINETUNE_SHAPE, SHAPES
from .tokenizer import VOCAB_WORDS


def vocabulary_text() -> str:
    """One line listing the words the embedded base knows, by role (Markdown)."""
    return (
        f"colours **{', '.join(COLORS)}**; shapes **{', '.join(SHAPES)}** "
        f"(and **{FINETUNE_SHAPE}** once fine-tuned); backgrounds **{', '.join(BACKGROUNDS)}**. "
        "Prompts read *a red circle on a white background*."
    )


def unseen_words(prompt: str) -> list[tuple[str, str]]:
    """``(word, why)`` for every word of ``prompt`` the embedded base never saw in that role.

    A word outside the vocabulary, the fine-tuning shape, a shape colour right before
    "background" and a background colour right before a shape are reported, each word once.
    """
    words = re.findall(r"[^\W_]+", prompt.lower())  # words and numbers; punctuation is not scored
    notes: dict[str, str] = {}
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else None
        if word not in VOCAB_WORDS:
            notes.setdefault(word, "not in the vocabulary")
        elif word == FINETUNE_SHAPE:
            notes.setdefault(word, "the shape fine-tuning teaches; only a LoRA trained on it draws it")
        elif following == "background" and word in COLORS:
            notes.setdefault(word, f"never a background colour (backgrounds: {', '.join(BACKGROUNDS)})")
        elif following in (*SHAPES, FINETUNE_SHAPE) and word in BACKGROUNDS:
            notes.setdefault(word, f"never a shape colour (colours: {', '.join(COLORS)})")
    return list(notes.items())

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


def vocabulary_text(added_colors: tuple[str, ...] = ()) -> str:
    """One line listing the words the embedded base knows, by role (Markdown); ``added_colors``
    are a base's pretraining-only colours (:func:`~.tokenizer.added_colors_of`)."""
    added = (
        f" (and **{', '.join(added_colors)}** on a base pretrained with them, which the analyser does not read)"
        if added_colors
        else ""
    )
    return (
        f"colours **{', '.join(COLORS)}**{added}; shapes **{', '.join(SHAPES)}** "
        f"(and **{FINETUNE_SHAPE}** once fine-tuned); backgrounds **{', '.join(BACKGROUNDS)}**. "
        "Prompts read *a red circle on a white background*."
    )


def unseen_words(prompt: str, added_colors: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """``(word, why)`` for every word of ``prompt`` the embedded base never saw in that role.

    A word outside the vocabulary (with the base's ``added_colors``), the fine-tuning shape, a
    shape colour right before "background" and a background colour right before a shape are
    reported, each word once.
    """
    colors = (*COLORS, *added_colors)
    words = re.findall(r"[^\W_]+", prompt.lower())  # words and numbers; punctuation is not scored
    notes: dict[str, str] = {}
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else None
        if word not in VOCAB_WORDS and word not in added_colors:
            notes.setdefault(word, "not in the vocabulary")
        elif word == FINETUNE_SHAPE:
            notes.setdefault(word, "the shape fine-tuning teaches; only a LoRA trained on it draws it")
        elif following == "background" and word in colors:
            notes.setdefault(word, f"never a background colour (backgrounds: {', '.join(BACKGROUNDS)})")
        elif following in (*SHAPES, FINETUNE_SHAPE) and word in BACKGROUNDS:
            notes.setdefault(word, f"never a shape colour (colours: {', '.join(colors)})")
    return list(notes.items())

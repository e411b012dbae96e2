"""What the embedded base knows: the word list the demo shows and the notes on unseen words."""

from __future__ import annotations

from reslora_diffusers.data import BACKGROUNDS, COLORS, FINETUNE_SHAPE, SHAPES, unseen_words, vocabulary_text


def test_vocabulary_text_lists_every_word_by_role():
    text = vocabulary_text()
    for word in (*COLORS, *BACKGROUNDS, *SHAPES, FINETUNE_SHAPE):
        assert word in text


def test_base_prompts_have_no_unseen_words():
    assert unseen_words("a red circle on a white background") == []
    assert unseen_words("A Purple Triangle on a gray background.") == []


def test_unseen_words_names_each_problem_once():
    assert [w for w, _ in unseen_words("a red cross on a blue background")] == ["cross", "blue"]
    notes = unseen_words("a white circle and a white circle on a red background")
    assert notes == [
        ("white", "never a shape colour (colours: red, green, blue, yellow, purple)"),
        ("and", "not in the vocabulary"),
        ("red", "never a background colour (backgrounds: white, black, gray)"),
    ]

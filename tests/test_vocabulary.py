"""What the embedded base knows: the word list the demo shows and the notes on unseen words."""

from __future__ import annotations

from reslora_diffusers.data import (
    BACKGROUNDS,
    COLORS,
    EXTRA_COLORS,
    FINETUNE_SHAPE,
    SHAPES,
    added_colors_of,
    build_tokenizer,
    extra_colors,
    unseen_words,
    vocabulary_text,
)


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


def test_a_base_s_added_colours_are_words_it_knows_as_shape_colours():
    added = extra_colors(3)
    assert unseen_words("a orange circle on a white background") == [("orange", "not in the vocabulary")]
    assert unseen_words("a pink circle on a white background", added) == []
    notes = dict(unseen_words("a white cross on a cyan background", added))
    assert notes["cyan"].startswith("never a background colour")
    assert notes["white"] == f"never a shape colour (colours: {', '.join([*COLORS, *added])})"
    assert "**orange, cyan, pink**" in vocabulary_text(added) and "orange" not in vocabulary_text()


def test_added_colours_are_read_back_from_a_tokenizer_s_vocabulary(tmp_path):
    for count in range(len(EXTRA_COLORS) + 1):
        written = build_tokenizer(tmp_path / str(count), extra_colors(count))
        assert added_colors_of(written.get_vocab()) == extra_colors(count)
    # the vocabulary with colours that are not the first of EXTRA_COLORS, or with other words, is not ours
    assert added_colors_of(build_tokenizer(tmp_path / "skip", extra_colors(2)[1:]).get_vocab()) is None
    assert added_colors_of(build_tokenizer(tmp_path / "dog", ("dog",)).get_vocab()) is None

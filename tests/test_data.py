"""The procedural data sets, their imagefolder layout and our tokenizer."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image
from transformers import CLIPTokenizer

from reslora_diffusers.data import (
    BACKGROUNDS,
    COLORS,
    EXTRA_COLORS,
    FINETUNE_SHAPE,
    HELDOUT_COMBOS,
    RESOLUTION,
    SHAPES,
    VOCAB_WORDS,
    build_tokenizer,
    caption,
    default_finetune_data_dir,
    extra_colors,
    finetune_prompts,
    heldout_base_prompts,
    make_base_set,
    make_finetune_set,
    render,
    seen_base_prompts,
    write_tokenizer,
)
from reslora_diffusers.data.__main__ import main as data_cli


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_render_draws_the_shape_where_asked():
    image = render("square", "red", "white", size=0.5, center=(0.25, 0.75))
    pixels = np.asarray(image).astype(int)
    assert image.size == (RESOLUTION, RESOLUTION) and image.mode == "RGB"
    assert tuple(pixels[24, 8]) == COLORS["red"]
    assert tuple(pixels[8, 24]) == BACKGROUNDS["white"]
    assert tuple(pixels[0, 0]) == BACKGROUNDS["white"]


def test_render_rejects_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape"):
        render("hexagon", "red", "white")


def test_sets_are_deterministic(tmp_path):
    first = make_base_set(tmp_path / "a", num_images=12, seed=3)
    second = make_base_set(tmp_path / "b", num_images=12, seed=3)
    other = make_base_set(tmp_path / "c", num_images=12, seed=4)
    assert _files(first) == _files(second)
    assert _files(first) != _files(other)


def test_imagefolder_layout_loads_with_datasets(tmp_path):
    folder = make_base_set(tmp_path / "base", num_images=9, seed=0)
    records = _records(folder)
    assert len(records) == 9
    assert all((folder / r["file_name"]).is_file() for r in records)
    assert all(r["text"] == caption(r["color"], r["shape"], r["background"]) for r in records)
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert len(dataset) == 9
    assert set(dataset[0]["text"].split()) <= set(VOCAB_WORDS)
    assert dataset[0]["image"].size == (RESOLUTION, RESOLUTION)


def test_base_set_never_shows_heldout_pairs_and_is_balanced(tmp_path):
    num_pairs = len(COLORS) * len(SHAPES) - len(HELDOUT_COMBOS)
    num_triplets = num_pairs * len(BACKGROUNDS)
    records = _records(make_base_set(tmp_path, num_images=2 * num_triplets, seed=1))
    counts = Counter((r["color"], r["shape"], r["background"]) for r in records)
    assert len(counts) == num_triplets and set(counts.values()) == {2}
    assert not {(c, s) for c, s, _ in counts} & set(HELDOUT_COMBOS)
    assert not {r["text"] for r in records} & set(heldout_base_prompts())
    assert {r["text"] for r in records} == set(seen_base_prompts())


def test_extra_colours_are_drawn_on_every_shape_and_hold_nothing_out_they_should_not(tmp_path):
    """``num_extra_colors`` adds pretraining-only colours on every base shape, all pairs as often
    as the base pairs, still without the held-out pairs; without them the set is the default's."""
    added = extra_colors(2)
    assert added == tuple(EXTRA_COLORS)[:2] and not set(added) & (set(COLORS) | set(BACKGROUNDS))
    num_pairs = len(COLORS) * len(SHAPES) - len(HELDOUT_COMBOS) + len(added) * len(SHAPES)
    num_triplets = num_pairs * len(BACKGROUNDS)
    folder = make_base_set(tmp_path / "extra", num_images=num_triplets, seed=1, num_extra_colors=2)
    records = _records(folder)
    counts = Counter((r["color"], r["shape"], r["background"]) for r in records)
    assert len(counts) == num_triplets and set(counts.values()) == {1}
    assert {(c, s) for c, s, _ in counts if c in added} == {(c, s) for c in added for s in SHAPES}
    assert not {(c, s) for c, s, _ in counts} & set(HELDOUT_COMBOS)
    # an added colour's pixels are its palette value within the jitter, not a base colour's
    orange = next(r for r in records if r["color"] == added[0])
    pixels = np.asarray(Image.open(folder / orange["file_name"])).reshape(-1, 3).astype(int)
    assert (np.abs(pixels - EXTRA_COLORS[added[0]]).max(axis=1) <= 10).sum() > 50
    plain, zero = (
        make_base_set(tmp_path / "a", 40, seed=3),
        make_base_set(tmp_path / "b", 40, 3, num_extra_colors=0),
    )
    assert _files(plain) == _files(zero)
    with pytest.raises(ValueError, match=r"extra colours 5: choose 0 to 4 \(orange, cyan, pink, brown\)"):
        extra_colors(len(EXTRA_COLORS) + 1)


def test_extra_words_are_single_tokens_beside_the_vocabulary(tmp_path):
    tokenizer = build_tokenizer(tmp_path / "extra", extra_colors(3))
    for word in (*VOCAB_WORDS, *extra_colors(3)):
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    # our vocabulary alone spells them in pieces: the words are the tokenizer's, not the bytes'
    assert len(build_tokenizer(tmp_path / "plain").tokenize("orange")) > 1


def test_finetune_set_shows_only_the_new_concept(tmp_path):
    records = _records(make_finetune_set(tmp_path, num_images=30, seed=0))
    assert {r["shape"] for r in records} == {FINETUNE_SHAPE}
    assert FINETUNE_SHAPE not in SHAPES
    assert {r["text"] for r in records} == set(finetune_prompts())


def test_committed_finetune_set_matches_the_generator(tmp_path):
    committed = default_finetune_data_dir()
    assert 100 <= len(_records(committed)) <= 200
    assert _files(make_finetune_set(tmp_path)) == _files(committed)


def test_cli_writes_a_set(tmp_path, capsys):
    data_cli(["finetune", str(tmp_path), "--num-images", "4", "--seed", "7"])
    assert len(_records(tmp_path)) == 4
    assert "wrote 4 images" in capsys.readouterr().out


def test_tokenizer_keeps_every_caption_word_whole(tmp_path):
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path))
    for word in VOCAB_WORDS:
        assert tokenizer.tokenize(word) == [f"{word}</w>"]
    ids = tokenizer(caption("red", FINETUNE_SHAPE, "white"), padding="max_length").input_ids
    assert len(ids) == tokenizer.model_max_length
    assert ids[0] == tokenizer.bos_token_id and ids[8] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[:8]

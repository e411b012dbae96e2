"""The committed tiny base pipeline: what it is made of, that it loads, and what it draws."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from reslora_diffusers.data import (
    BASE_ACCURACY_BAR,
    BASE_GUIDANCE_SCALE,
    BASE_NUM_INFERENCE_STEPS,
    BASE_RESOLUTION,
    MODEL_MAX_LENGTH,
    added_colors_of,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    default_base_model_path,
    extra_colors,
    finetune_prompts,
    heldout_base_prompts,
    vocabulary_words,
    write_tokenizer,
)
from reslora_diffusers.eval import evaluate_pipeline
from tests.bases import fresh_reading_in_card, public_config, transformers_config

# sampling this small a model is fastest on one thread (and several stall on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(default_base_model_path())


#: the shipped base was pretrained with ``--extra-colors 3`` (its card: "with orange and cyan and pink")
SHIPPED_ADDED = extra_colors(3)
STATE = Path(__file__).resolve().parent.parent / "scripts" / "pretrain_state"


def test_committed_configs_match_the_builders(pipe, tmp_path):
    assert public_config(pipe.unet.config) == public_config(build_unet().config)
    assert public_config(pipe.vae.config) == public_config(build_vae(pipe.vae.config.scaling_factor).config)
    assert pipe.vae.config.scaling_factor != 1.0
    assert public_config(pipe.scheduler.config) == public_config(build_scheduler().config)
    assert transformers_config(pipe.text_encoder) == transformers_config(
        build_text_encoder(build_tokenizer(tmp_path, SHIPPED_ADDED))
    )


def test_committed_tokenizer_is_our_vocabulary_with_the_added_colours(pipe, tmp_path):
    written = write_tokenizer(tmp_path, vocabulary_words(SHIPPED_ADDED))
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (default_base_model_path() / "tokenizer" / name).read_bytes() == (written / name).read_bytes()
    assert added_colors_of(pipe.tokenizer.get_vocab()) == SHIPPED_ADDED
    assert (
        "(with orange and cyan and pink shapes too" in (default_base_model_path() / "README.md").read_text()
    )
    assert pipe.tokenizer.model_max_length == MODEL_MAX_LENGTH
    assert pipe.text_encoder.config.max_position_embeddings == MODEL_MAX_LENGTH


def test_committed_folder_is_small_safetensors():
    files = [path for path in default_base_model_path().rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 30 * 2**20
    assert len([path for path in files if path.suffix == ".safetensors"]) == 3
    assert not [path for path in files if path.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_model_card_documents_the_settings_and_the_fresh_reading():
    card = (default_base_model_path() / "README.md").read_text()
    assert f"{BASE_RESOLUTION} x {BASE_RESOLUTION} px" in card
    assert f"{BASE_NUM_INFERENCE_STEPS} steps, guidance scale {BASE_GUIDANCE_SCALE}" in card
    # the open-set reading first, then the nearest template's; the fresh reading that meets the bar
    assert card.index("| accuracy | its 95 % interval | accuracy (nearest template) |") > 0
    reading = fresh_reading_in_card(default_base_model_path())
    assert reading["heldout"]["images"] == 360 and reading["seen"]["images"] == 720
    assert reading["heldout"]["accuracy"] >= BASE_ACCURACY_BAR["heldout"]
    assert reading["seen"]["accuracy"] >= BASE_ACCURACY_BAR["seen"]


def test_generates_an_image_of_the_documented_size(pipe):
    image = pipe("a red circle on a white background", num_inference_steps=2, generator=torch.manual_seed(0))
    assert image.images[0].size == (BASE_RESOLUTION, BASE_RESOLUTION)


@pytest.mark.slow
def test_base_draws_heldout_pairs_but_not_the_new_concept(pipe):
    heldout = evaluate_pipeline(pipe, heldout_base_prompts(), seeds=[0, 1])
    concept = evaluate_pipeline(pipe, finetune_prompts()[::3], seeds=[0])
    # the open-set call rejects a quarter of the base's own drawings (mostly triangles whose
    # corners its VAE rounds: the model card), so it gets a lower bar here than the nearest template
    assert heldout["accuracy_lenient"] >= 0.7 and heldout["accuracy"] >= 0.5
    assert concept["shape_accuracy"] <= 0.2


def test_kept_candidate_base_is_a_complete_pipeline_whose_vae_continues_the_denoiser_stage():
    """``scripts/pretrain_state/``: the candidate base on the longer-trained VAE (kept between
    machines) loads as the shipped base's architecture, and its ``vae/`` is a VAE stage's output."""
    folder = STATE / "tiny-sd-vae6000-unet4500"
    candidate = StableDiffusionPipeline.from_pretrained(folder)
    assert public_config(candidate.unet.config) == public_config(build_unet().config)
    vae = build_vae(candidate.vae.config.scaling_factor)
    # what the denoiser stage does with a work dir's vae/
    vae.load_state_dict(type(vae).from_pretrained(folder / "vae").state_dict())
    assert json.loads((folder / "vae" / "numbers.json").read_text())["vae_minutes"] > 60
    card = (folder / "README.md").read_text()
    assert "VAE 6000 steps" in card and "extended from 3000 steps" in card
    image = candidate(
        "a red circle on a white background", num_inference_steps=2, generator=torch.manual_seed(0)
    )
    assert image.images[0].size == (BASE_RESOLUTION, BASE_RESOLUTION)


def test_kept_extra_colours_base_reads_its_added_colours_as_the_vocabulary_it_was_trained_with(tmp_path):
    """``tiny-sd-xc3-vae6000-unet6000``: a base trained with ``--extra-colors 3`` keeps the run's
    vocabulary (each added colour one token, the tokenizer the builder writes for those words), and
    its ``vae/`` holds the VAE stage's record of that run."""
    folder = STATE / "tiny-sd-xc3-vae6000-unet6000"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    added = extra_colors(3)
    assert [pipe.tokenizer.tokenize(color) for color in added] == [[f"{color}</w>"] for color in added]
    rebuilt = build_tokenizer(tmp_path, added)
    assert pipe.tokenizer.get_vocab() == rebuilt.get_vocab()
    assert public_config(pipe.unet.config) == public_config(build_unet().config)
    assert json.loads((folder / "vae" / "numbers.json").read_text())["vae_steps"] == 6000
    assert "(with orange and cyan and pink shapes too" in (folder / "README.md").read_text()


def test_previous_base_is_kept_with_the_plain_vocabulary():
    """``tiny-sd-vae1200-unet3000``: the base shipped until 2026-12-07, which the README's earlier
    figures and the shipped DiT base's VAE and text encoder come from."""
    folder = STATE / "tiny-sd-vae1200-unet3000"
    previous = StableDiffusionPipeline.from_pretrained(folder)
    assert added_colors_of(previous.tokenizer.get_vocab()) == ()
    assert public_config(previous.unet.config) == public_config(build_unet().config)
    assert "VAE 1200 steps, then UNet + text encoder 3000 steps" in (folder / "README.md").read_text()

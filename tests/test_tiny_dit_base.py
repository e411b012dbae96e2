"""The shipped tiny DiT base (``reslora_diffusers/assets/tiny-sd3``): what it is made of, that it
loads, what it draws, and that the training script's default run fine-tunes it.

``tests/test_tiny_sd3.py`` runs the script that made it at a toy size; this module checks the
folder that the full run wrote.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline

from reslora_diffusers.data import (
    BASE_ACCURACY_BAR,
    BASE_GUIDANCE_SCALE,
    BASE_NUM_INFERENCE_STEPS,
    BASE_RESOLUTION,
    SD3_WIDTH,
    added_colors_of,
    build_clip_encoder,
    build_flow_scheduler,
    build_sd3_transformer,
    build_silent_t5_encoder,
    build_tokenizer,
    default_base_model_path,
    default_dit_base_path,
    extra_colors,
    finetune_prompts,
    heldout_base_prompts,
    vocabulary_words,
    write_tokenizer,
)
from reslora_diffusers.eval import evaluate_pipeline
from reslora_diffusers.frontends import gives_zero_t5_states
from tests.bases import (
    assert_export_loads_and_changes_the_image,
    fresh_reading_in_card,
    public_config,
    transformers_config,
)
from tests.runs import run, subset

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

#: the shipped run's --transformer-width, and the colours of --init-from (the shipped UNet base)
SHIPPED_WIDTH = 2 * SD3_WIDTH
SHIPPED_COLORS = extra_colors(3)


@pytest.fixture(scope="module")
def pipe() -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline.from_pretrained(default_dit_base_path())


def test_shipped_configs_match_the_builders(pipe, tmp_path):
    # --transformer-width 128 --no-t5 (README): 4 heads, and a silent T5 in the T5's place
    shipped = build_sd3_transformer(width=SHIPPED_WIDTH)
    assert public_config(pipe.transformer.config) == public_config(shipped.config)
    assert public_config(pipe.scheduler.config) == public_config(build_flow_scheduler().config)
    tok = build_tokenizer(tmp_path / "tok", SHIPPED_COLORS)
    for name, build in [
        ("text_encoder", build_clip_encoder),
        ("text_encoder_2", build_clip_encoder),
        ("text_encoder_3", build_silent_t5_encoder),
    ]:
        assert transformers_config(getattr(pipe, name)) == transformers_config(build(tok)), name
    assert not any(parameter.any() for parameter in pipe.text_encoder_3.parameters())
    assert gives_zero_t5_states(pipe.text_encoder_3)
    written = write_tokenizer(tmp_path / "ours", vocabulary_words(SHIPPED_COLORS))
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        for file in ("vocab.json", "merges.txt"):
            assert (default_dit_base_path() / folder / file).read_bytes() == (written / file).read_bytes()


def test_vae_is_the_unet_bases_with_sd3s_latent_normalisation(pipe):
    # made from the shipped UNet base (--init-from's default), with its added colours
    assert added_colors_of(pipe.tokenizer.get_vocab()) == SHIPPED_COLORS
    ours = AutoencoderKL.from_pretrained(default_base_model_path(), subfolder="vae")
    for key, value in ours.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[key], value), key
    assert pipe.vae.config.shift_factor not in (None, 0.0) and pipe.vae.config.scaling_factor != 1.0


def test_shipped_folder_is_small_safetensors():
    files = [path for path in default_dit_base_path().rglob("*") if path.is_file()]
    # the width-128 transformer is 18.7 MB in float32; DESIGN allows tens of MB for a base
    assert sum(path.stat().st_size for path in files) <= 25_000_000
    assert len([path for path in files if path.suffix == ".safetensors"]) == 5
    assert not [path for path in files if path.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]


def test_model_card_documents_the_settings_and_both_readings():
    card = (default_dit_base_path() / "README.md").read_text()
    assert f"{BASE_RESOLUTION} x {BASE_RESOLUTION} px" in card
    assert f"{BASE_NUM_INFERENCE_STEPS} steps, guidance scale {BASE_GUIDANCE_SCALE}" in card
    assert "| accuracy | its 95 % interval | accuracy (nearest template) |" in card
    # the fresh reading (scripts/read_base.py --card): both sets at their bars, as the README says
    reading = fresh_reading_in_card(default_dit_base_path())
    assert reading["heldout"]["images"] == 360 and reading["seen"]["images"] == 720
    for name in ("heldout", "seen"):
        assert reading[name]["interval"][0] >= BASE_ACCURACY_BAR[name], name
    assert "| training time |" in card
    assert "8 joint blocks of width 128" in card and "and no T5: trained without one" in card


@pytest.mark.slow
def test_base_draws_heldout_pairs_but_not_the_new_concept(pipe):
    """A few images through the analyser (the card holds the full evaluation)."""
    heldout = evaluate_pipeline(pipe, heldout_base_prompts(), seeds=[0])
    concept = evaluate_pipeline(pipe, finetune_prompts()[::3], seeds=[0])
    assert heldout["color_accuracy"] >= 0.8 and heldout["background_accuracy"] >= 0.8
    assert heldout["accuracy_lenient"] >= 0.7
    assert concept["shape_accuracy"] == 0.0


def test_training_scripts_default_run_fine_tunes_it_and_the_pipeline_loads_the_export(tmp_path):
    data = subset(tmp_path / "set", 4)
    run(default_dit_base_path(), data, tmp_path / "run", "--max_train_steps", "2", "--train_batch_size", "2")
    assert_export_loads_and_changes_the_image(default_dit_base_path(), tmp_path / "run")

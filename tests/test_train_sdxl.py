"""SDXL from the training script (both text encoders, pooled text, each image's time ids), and
SD 2.x's v-prediction, on tiny random pipelines: the conditioning against the pipeline's own
``encode_prompt``, the export against the trained model through diffusers' own loaders (the
diffusers file and the kohya file), exact resume, and the demo drawing the LoRA."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from reslora_diffusers import load_reslora_checkpoint
from reslora_diffusers.data import default_finetune_data_dir
from reslora_diffusers.frontends import SD_PIPELINES, SDXL_PIPELINES, frontend_for
from reslora_diffusers.training.data import TextImageDataset, collate, load_image_captions
from reslora_diffusers.training.pipeline import load_objective
from tests.runs import PROMPT, run, script
from tests.tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdxl")
    tiny_sdxl_pipeline(root / "tok").save_pretrained(root / "base")
    return root / "base"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Five images of the embedded set and a landscape one (48 x 30 px), whose time ids differ."""
    out = tmp_path_factory.mktemp("data") / "set"
    out.mkdir()
    lines = (default_finetune_data_dir() / "metadata.jsonl").read_text().splitlines()[:5]
    for line in lines:
        shutil.copy(default_finetune_data_dir() / json.loads(line)["file_name"], out)
    Image.new("RGB", (48, 30), (200, 30, 30)).save(out / "wide.png")
    lines.append(json.dumps({"file_name": "wide.png", "text": "a red square on a white background"}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _args(base: Path, *extra: str) -> argparse.Namespace:
    args = script.parse_args(["--pretrained_model_name_or_path", str(base), "--output_dir", "unused", *extra])
    script.check_args(args)
    return args


def test_sdxl_gets_its_objective_and_the_pipelines_own_text_conditioning(sdxl_base):
    """Both CLIP encoders' penultimate states side by side and the second one's pooled
    projection: what ``StableDiffusionXLPipeline.encode_prompt`` gives."""
    objective = load_objective(_args(sdxl_base), vars(script.parse_args([])))
    assert type(objective) is SDXL_PIPELINES.objective and objective.tokenizer is None
    captions = [PROMPT, "a blue circle on a black background"]
    with torch.no_grad():
        text = objective.encode_text(objective.models, captions)
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
        embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
    torch.testing.assert_close(text["encoder_hidden_states"], embeds)
    torch.testing.assert_close(text["text_embeds"], pooled)
    assert objective.default_resolution() == 8 * 2  # sample_size x the VAE's factor (1024 for SDXL)


def test_time_ids_are_each_images_own_size_crop_and_target(sdxl_base, data):
    """``[original h, original w, crop top, crop left, target h, target w]`` per image: the
    48 x 30 image, resized to cover 16 x 16 (26 x 16) and centre-cropped, starts at left 5."""
    objective = load_objective(_args(sdxl_base), vars(script.parse_args([])))
    images = load_image_captions(None, data, "image", "text")
    dataset = TextImageDataset(images, None, [(16, 16)])
    wide = next(i for i, s in enumerate(images.sources) if str(s).endswith("wide.png"))
    square = (wide + 1) % len(images.sources)
    batch = collate([dataset[(wide, 0)], dataset[(square, 0)]])
    text = {"encoder_hidden_states": torch.zeros(2, 77, 64), "text_embeds": torch.zeros(2, 32)}
    cond = objective.unet_conditioning(text, batch)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[30, 48, 0, 5, 16, 16], [32, 32, 0, 0, 16, 16]]
    assert cond["encoder_hidden_states"] is text["encoder_hidden_states"]


def _trained_outputs(base: Path, out: Path, components: list[str]) -> dict[str, torch.Tensor]:
    trained = {name: getattr(DiffusionPipeline.from_pretrained(base), name) for name in components}
    load_reslora_checkpoint(trained, out / "reslora_checkpoint.safetensors")
    return trained


def _component_inputs(pipe, name: str) -> dict:
    if name == "unet":
        return frontend_for(pipe.unet).synthetic_inputs(pipe.unet, num=1)[0]
    return {"input_ids": pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids}


@pytest.mark.slow
@pytest.mark.parametrize("res_type", ["none", "bs", "ms"])
@pytest.mark.parametrize("text_encoder", [False, True], ids=["unet", "unet+text"])
def test_script_trains_sdxl_and_its_files_load_into_the_trained_model(
    sdxl_base, data, tmp_path, res_type, text_encoder
):
    """Two steps; ``StableDiffusionXLPipeline.load_lora_weights`` of the diffusers file and of the
    kohya file (SGM names: input_blocks / middle_block / output_blocks, lora_te1 / lora_te2) give
    the trained model's outputs (every type here exports exactly: ``ms`` ends its cosine
    schedule at scale 0)."""
    out = tmp_path / "run"
    extra = ["--max_train_steps", "2", "--res_type", res_type, "--learning_rate", "1e-2"]
    extra += ["--calibration_batches", "1"] + (["--train_text_encoder"] if text_encoder else [])
    summary = run(sdxl_base, data, out, *extra)
    components = ["unet", "text_encoder", "text_encoder_2"] if text_encoder else ["unet"]
    assert set(summary["merge_error"]) == set(components) and max(summary["merge_error"].values()) < 1e-5
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == set(components)
    kohya = load_file(out / "lora_kohya.safetensors")
    prefixes = {k.split("_")[1] for k in kohya}
    assert prefixes == ({"unet", "te1", "te2"} if text_encoder else {"unet"})
    assert any(k.startswith("lora_unet_output_blocks_") for k in kohya)

    trained = _trained_outputs(sdxl_base, out, components)
    plain = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    for lora_file in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
        pipe.load_lora_weights(out, weight_name=lora_file)
        for name, model in trained.items():
            batch = _component_inputs(pipe, name)
            with torch.no_grad():
                loaded, untouched, want = (
                    m(**batch)[0] for m in (getattr(pipe, name), getattr(plain, name), model)
                )
            assert (loaded - untouched).abs().max() > 0, (lora_file, name)
            assert float((loaded - want).norm() / want.norm()) < 1e-4, (lora_file, name)


@pytest.mark.slow
def test_sdxl_resume_is_bit_identical(sdxl_base, data, tmp_path):
    extra = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--res_type", "is", "--random_flip"]
    extra += ["--train_text_encoder", "--calibration_batches", "1"]
    run(sdxl_base, data, tmp_path / "full", *extra)
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    run(sdxl_base, data, tmp_path / "resumed", *extra, "--resume_from_checkpoint", "latest")
    want, got = (load_file(tmp_path / d / "reslora_checkpoint.safetensors") for d in ("full", "resumed"))
    assert want.keys() == got.keys() and any(k.startswith("text_encoder_2.") for k in want)
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.slow
def test_the_demo_draws_an_sdxl_lora_on_an_sdxl_base(sdxl_base, data, tmp_path):
    import app.app as demo

    out = tmp_path / "run"
    run(
        sdxl_base, data, out, "--max_train_steps", "1", "--learning_rate", "0.1", "--calibration_batches", "1"
    )
    gallery, status, rows = demo.render(PROMPT, "", 0, 2, 4.0, 1.0, 1, str(sdxl_base), str(out))
    assert status.startswith("Rendered 2 models") and len(gallery) == 2
    base_image, lora_image = (image for image, _ in gallery)
    assert base_image.size == lora_image.size and list(base_image.getdata()) != list(lora_image.getdata())


# -- SD 2.x: v-prediction ------------------------------------------------------------------
@pytest.fixture(scope="module")
def v_base(tmp_path_factory) -> Path:
    """SD 2.x's training difference: a scheduler predicting ``v``."""
    root = tmp_path_factory.mktemp("sd2")
    pipe = tiny_sd_pipeline(root / "tok")
    pipe.scheduler = EulerDiscreteScheduler(steps_offset=1, prediction_type="v_prediction")
    pipe.save_pretrained(root / "base")
    return root / "base"


def test_v_prediction_loss_is_the_written_out_formula(v_base, data):
    """``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0``, read from the pipeline's scheduler, with
    the script's default min-SNR weights for ``v``: ``min(snr, 5) / (snr + 1)``."""
    objective = load_objective(_args(v_base), vars(script.parse_args([])))
    assert (
        type(objective) is SD_PIPELINES.objective
        and objective.scheduler.config.prediction_type == "v_prediction"
    )
    models = objective.models
    latents = torch.randn(2, 4, 8, 8)
    text = {"encoder_hidden_states": torch.randn(2, 77, 32)}
    torch.manual_seed(3)
    with torch.no_grad():
        loss = objective.latent_loss(models, latents, text, {})
    torch.manual_seed(3)
    noise = torch.randn_like(latents)
    t = torch.randint(0, objective.scheduler.config.num_train_timesteps, (2,))
    abar = objective.scheduler.alphas_cumprod[t].view(2, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    with torch.no_grad():
        pred = models["unet"](noisy, t, encoder_hidden_states=text["encoder_hidden_states"]).sample
    snr = (abar / (1 - abar)).flatten()
    weights = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1)
    torch.testing.assert_close(loss, (weights * ((pred - v) ** 2).mean(dim=(1, 2, 3))).mean())


@pytest.mark.slow
def test_v_prediction_run_exports_a_lora_that_loads_into_the_trained_model(v_base, data, tmp_path):
    out = tmp_path / "run"
    run(v_base, data, out, "--max_train_steps", "2", "--res_type", "bs", "--learning_rate", "1e-2")
    trained = _trained_outputs(v_base, out, ["unet"])
    pipe, plain = DiffusionPipeline.from_pretrained(v_base), DiffusionPipeline.from_pretrained(v_base)
    pipe.load_lora_weights(out)
    batch = _component_inputs(pipe, "unet")
    with torch.no_grad():
        loaded, untouched, want = (m(**batch)[0] for m in (pipe.unet, plain.unet, trained["unet"]))
    assert (loaded - untouched).abs().max() > 0
    assert float((loaded - want).norm() / want.norm()) < 1e-4


def test_text_encoder_lr_sets_the_encoders_own_learning_rate(sdxl_base, data, tmp_path):
    """``--text_encoder_lr 0``: both encoders' factors stay at their start (B = 0) while the
    UNet's train; without ``--train_text_encoder`` the flag is refused."""
    out = tmp_path / "run"
    run(sdxl_base, data, out, "--max_train_steps", "2", "--train_text_encoder", "--text_encoder_lr", "0")
    weights = load_file(out / "reslora_checkpoint.safetensors")
    b = {k: v for k, v in weights.items() if k.endswith("lora_B")}
    assert any(k.startswith("text_encoder_2.") for k in b)
    assert all(torch.count_nonzero(v) == 0 for k, v in b.items() if k.startswith("text_encoder"))
    assert all(torch.count_nonzero(v) > 0 for k, v in b.items() if k.startswith("unet."))
    with pytest.raises(ValueError, match="--text_encoder_lr applies with --train_text_encoder"):
        _args(sdxl_base, "--text_encoder_lr", "1e-4")

"""``scripts/make_random_pipeline.py --preset flux2|wan``: the released architectures at full size
(parameter counts), scaled folders that load as their pipelines, draw, and train."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLFlux2,
    AutoencoderKLWan,
    DiffusionPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import Mistral3Config, Mistral3ForConditionalGeneration, UMT5Config, UMT5EncoderModel

from reslora_diffusers.data import random_pipelines as rp
from tests.runs import script, subset
from tests.scripts import load_script
from tests.tiny_wan import clip_folder

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_random_pipeline.py"
PRESETS = {"flux2": Flux2Pipeline, "wan": WanPipeline}


def _params(make) -> int:
    with torch.device("meta"):  # full size without allocating it
        return sum(p.numel() for p in make().parameters())


def test_full_size_configs_have_the_released_parameter_counts():
    """FLUX.2 [dev]: transformer 32.2 B, Mistral Small 3.2 24 B (24.0 B with its untied output
    embedding and vision tower), VAE 84.0 M; Wan 2.1 T2V 14B: transformer 14.3 B, UMT5-XXL's
    encoder 5.68 B, VAE 127 M (the released models' sizes, written out exactly here)."""
    assert _params(lambda: Flux2Transformer2DModel(**rp.flux2_transformer_config())) == 32_223_281_152
    mistral = Mistral3Config(**rp.mistral3_config())
    assert _params(lambda: Mistral3ForConditionalGeneration(mistral)) == 24_011_361_280
    assert _params(lambda: AutoencoderKLFlux2(**rp.flux2_vae_config())) == 84_046_115
    assert _params(lambda: WanTransformer3DModel(**rp.wan_transformer_config())) == 14_288_491_584
    assert _params(lambda: UMT5EncoderModel(UMT5Config(**rp.umt5_config()))) == 5_680_910_336
    assert _params(lambda: AutoencoderKLWan(**rp.wan_vae_config())) == 126_892_531
    # the transformer reads Mistral's hidden states 10, 20 and 30 side by side
    assert rp.flux2_transformer_config()["joint_attention_dim"] == 3 * 5120
    assert rp.mistral3_text_config(0.05)["num_hidden_layers"] == 30


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random")
    cli = load_script(SCRIPT)
    for preset in PRESETS:
        cli.main(["--preset", preset, str(root / preset), "--scale", "0.05"])
    return {preset: root / preset for preset in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
def test_scaled_folders_load_as_their_pipeline_and_draw(folders, preset):
    pipe = DiffusionPipeline.from_pretrained(folders[preset])
    assert type(pipe) is PRESETS[preset]
    assert dict(pipe.transformer.config) | rp.denoiser_config(preset, 0.05) == dict(pipe.transformer.config)
    pipe.set_progress_bar_config(disable=True)
    args = {"prompt": "a red circle", "num_inference_steps": 1, "height": 32, "width": 32}
    with torch.no_grad():
        if preset == "wan":
            frames = pipe(**args, num_frames=5, output_type="pt").frames
            assert frames.shape == (1, 5, 3, 32, 32) and torch.isfinite(frames).all()
        else:
            image = pipe(**args, output_type="pt").images
            assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_the_training_script_runs_on_the_scaled_folder(folders, preset, tmp_path):
    if preset == "wan":
        data, extra = clip_folder(tmp_path / "clips"), ["--num_frames", "5", "--caption_extension", ".txt"]
    else:
        data, extra = subset(tmp_path / "data", 2), []
    argv = ["--pretrained_model_name_or_path", str(folders[preset]), "--train_data_dir", str(data)]
    argv += ["--output_dir", str(tmp_path / "run"), "--resolution", "32", "--train_batch_size", "2"]
    argv += [
        "--max_train_steps",
        "1",
        "--report_to",
        "none",
        "--no_chain_report",
        "--calibration_batches",
        "1",
    ]
    argv += ["--res_type", "bs", *extra]
    summary = script.train(script.parse_args(argv), argv)
    assert summary["steps"] == 1 and summary["merge_error"]["transformer"] < 1e-5
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        assert (tmp_path / "run" / name).exists()

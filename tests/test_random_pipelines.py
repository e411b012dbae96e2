"""scripts/make_random_pipeline.py: the published architectures at full size, loadable folders when scaled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3Config,
    Qwen3Model,
)

from reslora_diffusers.data import random_pipelines as rp
from tests.runs import script, subset
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_random_pipeline.py"
PIPELINES = {
    "sd15": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "qwen-image": QwenImagePipeline,
    "z-image": ZImagePipeline,
}


def _params(cls, **config) -> int:
    with torch.device("meta"):  # full size without allocating it
        return sum(p.numel() for p in cls(**config).parameters())


def test_full_size_configs_have_the_published_parameter_counts():
    """The parameter counts of the released checkpoints (SD 1.5 UNet 859.5 M, SDXL UNet 2.57 B,
    SD3 medium transformer 2.03 B, Flux dev transformer 11.9 B, the SD VAE 83.7 M, CLIP-L's
    text tower 123.1 M and bigG's 694.7 M with their 49408-token vocabulary)."""
    assert _params(UNet2DConditionModel, **rp.sd15_unet_config()) == 859_520_964
    assert _params(UNet2DConditionModel, **rp.sdxl_unet_config()) == 2_567_463_684
    assert _params(SD3Transformer2DModel, **rp.sd3_transformer_config()) == 2_028_328_000
    assert _params(FluxTransformer2DModel, **rp.flux_transformer_config()) == 11_901_408_320
    assert _params(AutoencoderKL, **rp.vae_config("sd15")) == 83_653_863

    def clip(config, cls):
        return _params(cls, config=CLIPTextConfig(**config, vocab_size=49408))

    assert clip(rp.clip_l_config(), CLIPTextModel) == 123_060_480
    assert clip(rp.clip_g_config(), CLIPTextModelWithProjection) == 694_659_840


def test_qwen_image_and_z_image_configs_have_the_published_parameter_counts():
    """Qwen-Image's transformer 20.43 B (the "20B MMDiT"), Qwen2.5-VL-7B-Instruct 8.29 B with its
    152064-token vocabulary, Qwen-Image's video VAE 126.9 M (Wan 2.1's, "127M"); Z-Image's
    transformer 6.15 B, Qwen3-4B 4.02 B with its 151936-token vocabulary (tied), Flux's VAE 83.8 M."""
    assert _params(QwenImageTransformer2DModel, **rp.qwen_image_transformer_config()) == 20_430_401_088
    assert _params(ZImageTransformer2DModel, **rp.z_image_transformer_config()) == 6_154_908_736
    assert _params(AutoencoderKLQwenImage, **rp.qwen_image_vae_config()) == 126_892_531
    assert _params(AutoencoderKL, **rp.z_image_vae_config()) == 83_819_683
    vl = rp.qwen2_5_vl_config()
    vl["text_config"]["vocab_size"] = 152064
    assert _params(Qwen2_5_VLForConditionalGeneration, config=Qwen2_5_VLConfig(**vl)) == 8_292_166_656
    qwen3 = Qwen3Config(**rp.qwen3_config(), vocab_size=151936)
    assert _params(Qwen3Model, config=qwen3) == 4_022_468_096


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("random")
    cli = load_script(SCRIPT)
    for preset in PIPELINES:
        cli.main(["--preset", preset, str(root / preset), "--scale", "0.05"])
    return {preset: root / preset for preset in PIPELINES}


# the FLUX.2 and Wan presets: tests/test_random_flux2_wan.py
@pytest.mark.parametrize("preset", PIPELINES)
def test_scaled_folders_load_as_their_pipeline_and_denoise(folders, preset):
    pipe = DiffusionPipeline.from_pretrained(folders[preset])
    assert type(pipe) is PIPELINES[preset]
    denoiser = pipe.unet if preset in ("sd15", "sdxl") else pipe.transformer
    assert dict(denoiser.config) | rp.denoiser_config(preset, 0.05) == dict(denoiser.config)
    vae = pipe.vae.config
    assert vae.get("latent_channels", vae.get("z_dim")) == (4 if preset in ("sd15", "sdxl") else 16)
    pipe.set_progress_bar_config(disable=True)
    size = 64 if preset in ("sd15", "sdxl") else 32
    with torch.no_grad():  # 2 steps: Qwen-Image's schedule, stretched to shift_terminal, needs 2
        image = pipe("a red circle", num_inference_steps=2, height=size, width=size, output_type="pt").images
    assert image.shape == (1, 3, size, size) and torch.isfinite(image).all()


def test_the_training_script_runs_on_the_sd15_folder(folders, tmp_path):
    data = subset(tmp_path / "data", 2)
    argv = ["--pretrained_model_name_or_path", str(folders["sd15"]), "--train_data_dir", str(data)]
    argv += ["--output_dir", str(tmp_path / "run"), "--resolution", "64", "--train_batch_size", "2"]
    argv += [
        "--max_train_steps",
        "1",
        "--report_to",
        "none",
        "--no_chain_report",
        "--calibration_batches",
        "1",
    ]
    summary = script.train(script.parse_args(argv), argv)
    assert summary["steps"] == 1 and summary["merge_error"]["unet"] < 1e-5
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.parametrize("preset", ["qwen-image", "z-image"])
def test_the_training_script_runs_on_the_qwen_text_folders(folders, tmp_path, preset, fresh_accelerate_state):
    """Our vocabulary as a Qwen2 tokenizer: Qwen-Image's template drops exactly its own tokens
    and Z-Image's chat template applies; a step of the script trains the scaled pipeline."""
    pipe = DiffusionPipeline.from_pretrained(folders[preset])
    if preset == "qwen-image":
        prefix = pipe.prompt_template_encode.split("{}")[0]
        assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
    data = subset(tmp_path / "data", 2)
    argv = ["--pretrained_model_name_or_path", str(folders[preset]), "--train_data_dir", str(data)]
    argv += ["--output_dir", str(tmp_path / "run"), "--resolution", "32", "--train_batch_size", "2"]
    argv += ["--max_train_steps", "1", "--report_to", "none", "--calibration_batches", "1"]
    summary = script.train(script.parse_args(argv), argv)
    assert summary["steps"] == 1 and summary["merge_error"]["transformer"] < 1e-5


def test_an_existing_output_or_a_bad_scale_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exists"):
        rp.save_random_pipeline("sd15", tmp_path, 0.05)
    with pytest.raises(ValueError, match=r"scale 2.0 must be in \(0, 1\]"):
        rp.sd15_unet_config(2.0)

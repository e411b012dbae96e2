"""Tiny Stable Diffusion 1.x and SDXL pipelines built from configs (random weights), assembled
as ``reslora_diffusers.data.random_pipelines`` assembles its presets (``sd15``, ``sdxl``) at
sizes no preset scale reaches: two resolution levels, 8 x 8 latents, 32-wide text."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from reslora_diffusers import ResLoRAConfig, add_reslora, save_reslora_checkpoint
from reslora_diffusers.data.random_pipelines import assemble_pipeline
from reslora_diffusers.data.tokenizer import write_tokenizer
from tests.toys import randomize_lora

TEXT_DIM = 32


def tiny_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD 1.x layout: cross-attention at two resolution levels and in the mid block."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: no attention at the first level, 2 transformer layers at the second,
    linear projections, text_time added conditioning."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_DIM,
        norm_num_groups=8,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
    )


def tiny_clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=16,
        projection_dim=TEXT_DIM,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def tiny_tokenizer(tmp: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(write_tokenizer(tmp / "tokenizer")))


def tiny_sd_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(tiny_clip_config(len(tok)))
    unet, vae = tiny_sd_unet(seed), tiny_vae(seed)
    return assemble_pipeline("sd15", tok, unet, vae, [text_encoder], EulerDiscreteScheduler(steps_offset=1))


def tiny_sdxl_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionXLPipeline:
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    te1 = CLIPTextModel(tiny_clip_config(len(tok)))
    te2 = CLIPTextModelWithProjection(tiny_clip_config(len(tok)))
    unet, vae = tiny_sdxl_unet(seed), tiny_vae(seed)
    return assemble_pipeline("sdxl", tok, unet, vae, [te1, te2], EulerDiscreteScheduler(steps_offset=1))


def unet_inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 0) -> dict:
    """One UNet call's keyword arguments (SDXL's added conditioning where needed)."""
    gen = torch.Generator().manual_seed(seed)
    kwargs = {
        "sample": torch.randn(batch, 4, 8, 8, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen),
    }
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, TEXT_DIM, generator=gen),
            "time_ids": torch.rand(batch, 6, generator=gen) * 64,
        }
    return kwargs


def call(module, kwargs):
    """A UNet's (or any component's) output for keyword inputs, without gradients."""
    with torch.no_grad():
        out = module(**kwargs)
    return out.sample if hasattr(out, "sample") else out[0]


def train_forwards(module, batches, steps=3):
    """Training-mode passes: trace chains and fill the norm windows."""
    module.train()
    for i in range(steps):
        with torch.no_grad():
            module(**batches[i % len(batches)])
    module.eval()


def text_batches(n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 40, (3, 16), generator=gen)} for _ in range(n)]


def exported_lora(out, component, module):
    """The exported plain LoRA of one component, keyed by the module's own paths."""
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), framework="pt") as f:
        lora = {k[len(component) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(component + ".")}
    if component != "unet" and not hasattr(module, "text_model"):  # files say text_model.encoder...
        lora = {k.removeprefix("text_model."): v for k, v in lora.items()}
    return lora


def saved_base_and_checkpoint(tmp_path, res_type="bs"):
    """A tiny SD pipeline saved as a base folder, and a ResLoRA checkpoint of its UNet and text
    encoder (random factors, traced); returns (folder, checkpoint, the pipeline with ResLoRA)."""
    base_dir = tmp_path / "base"
    tiny_sd_pipeline(tmp_path).save_pretrained(str(base_dir))
    pipe = DiffusionPipeline.from_pretrained(str(base_dir))
    add_reslora(pipe, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2), train_text_encoder=True)
    randomize_lora(pipe.unet, scale=0.1)
    randomize_lora(pipe.text_encoder, scale=0.1)
    train_forwards(pipe.unet, [unet_inputs(pipe.unet)])
    train_forwards(pipe.text_encoder, text_batches(1))
    ckpt = save_reslora_checkpoint(
        {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, tmp_path / "r.safetensors"
    )
    return base_dir, ckpt, pipe

"""Tiny SD3 and Flux transformers and pipelines built from configs (random weights), assembled
as ``reslora_diffusers.data.random_pipelines`` assembles its presets (``sd3``, ``flux``) at sizes
no preset scale reaches (the tiny VAE of ``tiny_pipes.py``, 32-wide text)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from reslora_diffusers.data.random_pipelines import assemble_pipeline
from tests.tiny_pipes import TEXT_DIM, tiny_clip_config, tiny_tokenizer, tiny_vae

#: the pooled text state: CLIP-L and CLIP-G's projections side by side for SD3, CLIP-L's for Flux
SD3_POOLED = 2 * TEXT_DIM


def tiny_sd3_transformer(seed: int = 0, num_layers: int = 3) -> SD3Transformer2DModel:
    """Three joint blocks (the last one text-pre-only), the first with SD3.5's dual attention."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        caption_projection_dim=16,
        pooled_projection_dim=SD3_POOLED,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def tiny_flux_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """Two double-stream and two single-stream blocks, guidance embedding (Flux dev)."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    )


def tiny_t5(seed: int = 0, vocab_size: int = 64) -> T5EncoderModel:
    """Gated-GELU T5 (v1.1, as SD3 and Flux use), two layers."""
    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=TEXT_DIM,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
        )
    )


#: SD3's and Flux's VAE latent constants (Flux's values), so that the shift is exercised: the
#: tiny VAE has none, and SD3/Flux pipelines subtract ``shift_factor`` from every latent
DIT_VAE_SHIFT, DIT_VAE_SCALE = 0.1159, 0.3611


def dit_vae(seed: int = 0):
    """The tiny VAE with SD3/Flux's ``(z - shift_factor) * scaling_factor`` constants."""
    vae = tiny_vae(seed)
    vae.register_to_config(shift_factor=DIT_VAE_SHIFT, scaling_factor=DIT_VAE_SCALE)
    return vae


def tiny_sd3_pipeline(tmp: Path, seed: int = 0) -> StableDiffusion3Pipeline:
    """The transformer, VAE, two CLIP encoders and a tiny T5 (a T5 tokenizer needs a
    sentencepiece vocabulary, so the CLIP tokenizer stands in for it, with T5's vocabulary
    sized to it so that the pipeline encodes prompts)."""
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    te1 = CLIPTextModelWithProjection(tiny_clip_config(len(tok)))
    te2 = CLIPTextModelWithProjection(tiny_clip_config(len(tok)))
    transformer, vae = tiny_sd3_transformer(seed), dit_vae(seed)
    encoders = [te1, te2, tiny_t5(seed, vocab_size=len(tok))]
    return assemble_pipeline("sd3", tok, transformer, vae, encoders, FlowMatchEulerDiscreteScheduler())


def tiny_flux_pipeline(tmp: Path, seed: int = 0) -> FluxPipeline:
    """The transformer, VAE, CLIP encoder and a tiny T5 (the CLIP tokenizer stands in for T5's)."""
    tok = tiny_tokenizer(tmp)
    torch.manual_seed(seed)
    vae, clip = dit_vae(seed), CLIPTextModel(tiny_clip_config(len(tok)))
    encoders = [clip, tiny_t5(seed, vocab_size=len(tok))]
    return assemble_pipeline(
        "flux", tok, tiny_flux_transformer(seed), vae, encoders, FlowMatchEulerDiscreteScheduler()
    )

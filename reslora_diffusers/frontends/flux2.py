"""FLUX.2: ``Flux2Transformer2DModel``, ``Flux2Pipeline`` and their rectified-flow training
(:class:`Flux2FlowMatching`).

The transformer runs 8 double-stream blocks (``transformer_blocks``: joint attention with
separate image and text projections ``to_q/to_k/to_v/to_out.0`` and ``add_q_proj/add_k_proj/
add_v_proj/to_add_out``, then SwiGLU feed-forward layers ``ff``/``ff_context``), then 48
single-stream blocks (``single_transformer_blocks``), whose attention is fused with their
feed-forward layer: ``attn.to_qkv_mlp_proj`` projects the joint text + image tokens to q, k, v and
the MLP's input at once, ``attn.to_out`` maps the attention output and the MLP's hidden state
back. The default targets are the attention projections of every block, both kinds
(:data:`FLUX2_ATTENTION_TARGETS`); each role is one chain through its blocks, unbroken (every
block of a kind has the same shapes). Prompts go through Mistral Small 3.x (``text_encoder``),
whose hidden states 10, 20 and 30 side by side are the text states; no pooled state, no CLIP.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn as nn

from ..objectives import FlowMatchingObjective
from .base import register_frontend, to_model
from .dit import DIT_ATTENTION_TARGETS, DiTFrontEnd
from .pipelines import PipelineFamily, register_pipeline_family

#: the single-stream blocks' fused projections: q, k, v and the MLP input; attention and MLP output
FLUX2_SINGLE_BLOCK_TARGETS = ("to_qkv_mlp_proj", "attn.to_out")
#: the attention projections of every block: the double blocks' of both streams and the single
#: blocks' fused ones
FLUX2_ATTENTION_TARGETS = (*DIT_ATTENTION_TARGETS, *FLUX2_SINGLE_BLOCK_TARGETS)
#: the double blocks' SwiGLU feed-forward layers of both streams (the single blocks' MLP is in
#: their fused projections already)
FLUX2_FEEDFORWARD_TARGETS = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
#: Mistral Small 3.x, whose hidden states are the prompt's states (``Flux2LoraLoaderMixin`` loads
#: LoRA weights for the transformer alone, so it is never trained)
FLUX2_TEXT_ENCODER = "text_encoder"


def patchify(latents: torch.Tensor) -> torch.Tensor:
    """VAE latents ``(B, C, H, W)`` -> ``(B, 4 C, H/2, W/2)``: each 2 x 2 patch's values on the
    channel axis, channel-major (``c, dy, dx``)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX.2 packs 2 x 2 latent patches: latent size {h} x {w} must be even")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return patches.reshape(b, c * 4, h // 2, w // 2)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """Patchified latents ``(B, C, h, w)`` -> tokens ``(B, h w, C)``, row-major."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)


def image_ids(rows: int, cols: int) -> torch.Tensor:
    """``(rows * cols, 4)`` position ids ``(t, row, col, l) = (0, row, col, 0)`` of the tokens, row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    zeros = torch.zeros_like(r)
    return torch.stack([zeros, r, c, zeros], dim=-1).reshape(-1, 4)


def text_ids(tokens: int) -> torch.Tensor:
    """``(tokens, 4)`` position ids ``(0, 0, 0, l)`` of the text tokens."""
    ids = torch.zeros(tokens, 4, dtype=torch.long)
    ids[:, 3] = torch.arange(tokens)
    return ids


class Flux2Transformer(DiTFrontEnd):
    name = "flux2_transformer"
    model_class = "Flux2Transformer2DModel"

    def default_targets(self, model: nn.Module) -> list[str]:
        return list(FLUX2_ATTENTION_TARGETS)

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=16, grid=(4, 4)):
        """N(0, 1) tokens on a ``grid`` of patches with their ids ``(0, row, col, 0)``, N(0, 1)
        text states with ids ``(0, 0, 0, l)``, timesteps uniform in [0, 1) (``sigma``; the model
        scales by 1000) and guidance uniform in [1, 5) where the model embeds it."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            kwargs = {
                "hidden_states": torch.randn(batch, grid[0] * grid[1], cfg.in_channels, generator=gen),
                "encoder_hidden_states": torch.randn(
                    batch, text_tokens, cfg.joint_attention_dim, generator=gen
                ),
                "timestep": torch.rand(batch, generator=gen),
                "img_ids": image_ids(*grid),
                "txt_ids": text_ids(text_tokens),
            }
            if cfg.guidance_embeds:
                kwargs["guidance"] = 1 + 4 * torch.rand(batch, generator=gen)
            out.append(to_model(kwargs, model))
        return out


class Flux2FlowMatching(FlowMatchingObjective):
    """FLUX.2 as diffusers' ``train_dreambooth_lora_flux2.py`` trains it and ``Flux2Pipeline``
    encodes: the prompt in Mistral's chat format with the pipeline's system message, tokenized by
    ``apply_chat_template`` to ``max_sequence_length`` (512), Mistral's hidden states
    ``text_encoder_out_layers`` (10, 20, 30) side by side per token, text ids ``(0, 0, 0, l)``;
    latents: the VAE posterior's mode in 2 x 2 patches, normalised by the VAE's batch-norm
    statistics ``(z - mean) / sqrt(var + eps)``, as tokens with ids ``(0, row, col, 0)``;
    timesteps ``sigma``; the guidance embedding gets ``--guidance_scale`` where the model has one.
    The sigmas are the scheduler's unshifted ones (its config shifts by resolution at inference,
    ``use_dynamic_shifting``), as in that script."""

    target_modules = FLUX2_ATTENTION_TARGETS
    #: no text-encoder LoRA (the pipeline's loader loads the transformer's alone)
    unused_flags = (*FlowMatchingObjective.unused_flags, "train_text_encoder")

    def __init__(self, pipe, args, family) -> None:
        super().__init__(pipe, args, family)
        encode = inspect.signature(pipe.encode_prompt).parameters
        #: Mistral's hidden states whose concatenation is the text state
        self.text_layers = tuple(encode["text_encoder_out_layers"].default)
        self.system_message = pipe.system_message
        vae = self.models["vae"]
        self.latent_mean = vae.bn.running_mean.detach().clone().view(1, -1, 1, 1)
        self.latent_std = torch.sqrt(
            vae.bn.running_var.detach().view(1, -1, 1, 1) + vae.config.batch_norm_eps
        )

    def latent_multiple(self) -> int:
        """2: latents are packed in 2 x 2 patches."""
        return 2

    def side_reason(self) -> str:
        return f"latents of {self.vae_scale}x smaller size are packed in 2 x 2 patches"

    def clean_latents(self, parameters, generator=None):
        """The posterior's mode (diffusers' FLUX.2 script and the pipeline's image encoding take
        it, drawing nothing), :meth:`normalize_latents`."""
        return self.normalize_latents(parameters.chunk(2, dim=1)[0]).contiguous()

    def normalize_latents(self, z):
        """``z`` in 2 x 2 patches, ``(patches - mean) / std`` by the VAE's batch-norm statistics."""
        mean, std = (t.to(z) for t in (self.latent_mean, self.latent_std))
        return (patchify(z) - mean) / std

    def encode_text(self, models, captions, input_ids=None):
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input

        device = self.device(models)
        messages = format_input(prompts=list(captions), system_message=self.system_message)
        tokens = self.tokenizers[FLUX2_TEXT_ENCODER].apply_chat_template(
            messages,
            add_generation_prompt=False,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length,
        )
        out = models[FLUX2_TEXT_ENCODER](
            input_ids=tokens["input_ids"].to(device),
            attention_mask=tokens["attention_mask"].to(device),
            output_hidden_states=True,
            use_cache=False,
        )
        states = torch.stack([out.hidden_states[k] for k in self.text_layers], dim=2)  # (B, L, n, D)
        return {"encoder_hidden_states": states.flatten(2)}

    def transformer_inputs(self, noisy, timesteps, text):
        b, _, h, w = noisy.shape
        states = text["encoder_hidden_states"]
        inputs = {
            "hidden_states": pack(noisy),
            "encoder_hidden_states": states,
            "timestep": timesteps / 1000,
            "img_ids": image_ids(h, w).to(noisy.device),
            "txt_ids": text_ids(states.shape[1]).to(noisy.device),
        }
        if self.denoiser_config.guidance_embeds:
            inputs["guidance"] = torch.full((b,), self.args.guidance_scale, device=noisy.device)
        return inputs

    def layout(self, latents):
        return pack(latents)


class Flux2Pipelines(PipelineFamily):
    """``Flux2Pipeline`` and the other pipelines around a ``Flux2Transformer2DModel``.

    ComfyUI (checked at v0.8.0) maps only the diffusers-format keys FLUX.2 shares with Flux.1
    (the attention targets, the embedders, the output layers), not the double blocks'
    feed-forward layers, the single blocks' fused projections or the modulations, so the family
    writes the ComfyUI layout as well (:mod:`reslora_diffusers.export.comfyui`).
    """

    name = "flux2"
    title = "FLUX.2"
    pipeline_class = "Flux2Pipeline"
    denoiser = "transformer"
    denoiser_family = Flux2Transformer.name
    text_encoders = ()
    prompt_encoders = (FLUX2_TEXT_ENCODER,)
    lora_scale_kwarg = "attention_kwargs"
    formats = ("diffusers", "comfyui")
    objective = Flux2FlowMatching


FLUX2_TRANSFORMER = register_frontend(Flux2Transformer())
FLUX2_PIPELINES = register_pipeline_family(Flux2Pipelines())

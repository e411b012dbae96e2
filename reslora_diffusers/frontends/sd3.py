"""Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` (MMDiT), ``StableDiffusion3Pipeline``
and their rectified-flow training (:class:`SD3FlowMatching`).

Every joint block has the same shapes, so each projection role forms one unbroken chain
through all blocks (24 in SD3 medium); SD3.5's dual-attention layers (``attn2``) form chains
of their own. The last block has no ``to_add_out`` (its text stream ends there).

A pipeline without T5 (or with a silent one) pads every prompt with 256 zero states; training
folds them into one token that attention weighs as all of them (:class:`FoldedPaddingAttnProcessor`,
:func:`fold_t5_padding`): the same function on a fraction of the tokens.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..objectives import FlowMatchingObjective, t5_sequence_length
from .base import register_frontend, to_model
from .dit import DIT_ATTENTION_TARGETS, DiTFrontEnd, text_conditioning
from .pipelines import PipelineFamily, register_pipeline_family

#: the diffusers ``train_dreambooth_lora_sd3.py`` components: the two CLIP encoders load LoRA
#: weights; the T5 encoder ``text_encoder_3`` does not (``SD3LoraLoaderMixin``)
SD3_TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
#: the T5 encoder, whose states follow the CLIP states in the prompt's encoding
SD3_T5_ENCODER = "text_encoder_3"


class SD3Transformer(DiTFrontEnd):
    name = "sd3_transformer"
    model_class = "SD3Transformer2DModel"

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=16):
        """N(0, 1) latents at ``sample_size`` (the noisy-latent distribution at large t),
        timesteps uniform in [0, 1000) (``sigma * 1000``), N(0, 1) text states."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(num):
            kwargs = {
                "hidden_states": torch.randn(
                    batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen
                ),
                "timestep": torch.rand(batch, generator=gen) * 1000,
                **text_conditioning(model, batch, text_tokens, gen),
            }
            out.append(to_model(kwargs, model))
        return out


class SD3FlowMatching(FlowMatchingObjective):
    """SD3 / SD3.5: CLIP-L and CLIP-G penultimate states side by side, zero-padded to T5's width
    and followed by the T5 states; the pooled state is both CLIPs' projections side by side;
    the transformer takes timesteps ``1000 sigma``."""

    target_modules = DIT_ATTENTION_TARGETS
    unused_flags = (*FlowMatchingObjective.unused_flags, "guidance_scale")
    default_weighting = "logit_normal"
    clip_encoders = SD3_TEXT_ENCODERS
    t5_encoder = SD3_T5_ENCODER

    def __init__(self, pipe, args, family) -> None:
        super().__init__(pipe, args, family)
        #: the pipeline's T5 states are zero for every prompt: training folds them into one token
        #: (:func:`fold_t5_padding`), the transformer's attention weighting it as all of them
        self.folds_t5 = gives_zero_t5_states(self.models.get(self.t5_encoder))
        if self.folds_t5:
            self.models[self.denoiser].set_attn_processor(FoldedPaddingAttnProcessor())

    def latent_multiple(self) -> int:
        """The transformer's patch size."""
        return self.denoiser_config.patch_size

    def side_reason(self) -> str:
        return f"the VAE's factor {self.vae_scale} x the transformer's patch size {self.latent_multiple()}"

    def max_side(self) -> int:
        """``pos_embed_max_size`` patches (SD3 crops its position embedding to the image)."""
        return self.denoiser_config.pos_embed_max_size * self.side_step

    def encode_text(self, models, captions, input_ids=None):
        device = self.device(models)
        states, pooled = [], []
        for name in self.clip_encoders:
            out = models[name](self.token_ids(name, captions).to(device), output_hidden_states=True)
            pooled.append(out[0])
            states.append(out.hidden_states[-2])
        clip = torch.cat(states, dim=-1)
        t5 = self.t5_states(models, captions)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat(pooled, dim=-1),
        }

    def transformer_inputs(self, noisy, timesteps, text):
        inputs = {"hidden_states": noisy, "timestep": timesteps, **text}
        if self.folds_t5:  # the same function on 16 + 1 text tokens instead of 16 + 256
            states, kwargs = fold_t5_padding(text["encoder_hidden_states"], self.max_sequence_length)
            inputs.update(encoder_hidden_states=states, joint_attention_kwargs=kwargs)
        return inputs


class SD3Pipelines(PipelineFamily):
    """``StableDiffusion3Pipeline`` and the other pipelines around an ``SD3Transformer2DModel``.

    ComfyUI maps diffusers-format ``transformer.<path>`` keys onto its MMDiT for SD3
    (``comfy/lora.py``), so the diffusers file is the one file written.
    """

    name = "stable_diffusion_3"
    title = "SD3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser = "transformer"
    denoiser_family = SD3Transformer.name
    text_encoders = SD3_TEXT_ENCODERS
    prompt_encoders = (*SD3_TEXT_ENCODERS, SD3_T5_ENCODER)
    shifts_latents = True
    lora_scale_kwarg = "joint_attention_kwargs"
    objective = SD3FlowMatching

    #: the prompt arguments :meth:`cheaper_call` encodes itself (the pipeline call's names)
    prompt_kwargs = tuple(f"{neg}prompt{n}" for neg in ("", "negative_") for n in ("", "_2", "_3"))

    @contextlib.contextmanager
    def cheaper_call(self, pipe, call_kwargs: dict) -> Iterator[dict]:
        """Where the pipeline's T5 states are zero (no T5, or a silent one), the prompt encoded
        here with its T5 padding folded into one token (:func:`fold_t5_padding`), and the
        transformer's processors :class:`FoldedPaddingAttnProcessor` for the call: the same
        images with 16 + 1 text tokens instead of 16 + 256 in every joint block. Calls that pass
        their own embeddings, several images per prompt, or a transformer with processors other
        than diffusers' joint attention run as they are."""
        transformer = pipe.transformer
        if not self.folds_call(pipe, call_kwargs):
            yield call_kwargs
            return
        kwargs = {k: v for k, v in call_kwargs.items() if k not in self.prompt_kwargs}
        t5_tokens = call_kwargs.get("max_sequence_length") or t5_sequence_length(pipe)
        joint = dict(call_kwargs.get("joint_attention_kwargs") or {})
        guidance = call_kwargs.get(
            "guidance_scale", inspect.signature(pipe.__call__).parameters["guidance_scale"].default
        )
        embeds = pipe.encode_prompt(
            **{k: call_kwargs.get(k) for k in self.prompt_kwargs},
            do_classifier_free_guidance=guidance > 1,
            clip_skip=call_kwargs.get("clip_skip"),
            max_sequence_length=t5_tokens,
            lora_scale=joint.get("scale"),
        )
        names = (
            "prompt_embeds",
            "negative_prompt_embeds",
            "pooled_prompt_embeds",
            "negative_pooled_prompt_embeds",
        )
        for name, value in zip(names, embeds, strict=True):
            if value is not None:
                kwargs[name] = value if "pooled" in name else fold_t5_padding(value, t5_tokens)[0]
        kwargs["joint_attention_kwargs"] = {**joint, "padding_copies": t5_tokens}
        saved = transformer.attn_processors
        transformer.set_attn_processor(FoldedPaddingAttnProcessor())
        try:
            yield kwargs
        finally:
            transformer.set_attn_processor(saved)

    @staticmethod
    def folds_call(pipe, call_kwargs: dict) -> bool:
        """Whether :meth:`cheaper_call` folds this call (its docstring says when)."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        plain = (JointAttnProcessor2_0, FoldedPaddingAttnProcessor)
        return (
            call_kwargs.get("prompt") is not None
            and not any(k.endswith("_embeds") for k in call_kwargs)
            and call_kwargs.get("num_images_per_prompt", 1) == 1
            and gives_zero_t5_states(getattr(pipe, SD3_T5_ENCODER, None))
            and all(isinstance(p, plain) for p in pipe.transformer.attn_processors.values())
        )


SD3_TRANSFORMER = register_frontend(SD3Transformer())
SD3_PIPELINES = register_pipeline_family(SD3Pipelines())


class FoldedPaddingAttnProcessor:
    """SD3's joint attention (diffusers' ``JointAttnProcessor2_0``), where the text stream's last
    token may stand for ``padding_copies`` identical tokens.

    A pipeline without T5 pads every prompt with ``max_sequence_length`` (256) zero states; they
    enter each block identical and leave it identical, so attending to ``n`` of them equals
    attending to one whose logits carry ``log n``:

        sum_j exp(q.k_j) v_j = exp(q.k + log n) v   (over the n copies; the normaliser alike).

    Training a T5-less base on the folded sequence (:func:`fold_t5_padding`) computes the function
    the standard pipeline runs at inference on a fraction of the tokens. Without ``padding_copies``
    (the pipeline's calls) it is diffusers' joint attention.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, padding_copies=1
    ):
        batch, image_tokens = hidden_states.shape[:2]
        streams = [(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)]
        if encoder_hidden_states is not None:
            streams.append(
                (
                    encoder_hidden_states,
                    attn.add_q_proj,
                    attn.add_k_proj,
                    attn.add_v_proj,
                    attn.norm_added_q,
                    attn.norm_added_k,
                )
            )
        query, key, value = [], [], []
        for states, to_q, to_k, to_v, norm_q, norm_k in streams:
            q, k, v = (
                proj(states).unflatten(-1, (attn.heads, -1)).transpose(1, 2) for proj in (to_q, to_k, to_v)
            )
            query.append(norm_q(q) if norm_q is not None else q)
            key.append(norm_k(k) if norm_k is not None else k)
            value.append(v)
        query, key, value = torch.cat(query, dim=2), torch.cat(key, dim=2), torch.cat(value, dim=2)
        bias = None  # (1, keys): log n on the last key, which stands for n
        # SD3.5's second attention (attn2) gets the same keyword arguments, but no text stream
        if padding_copies != 1 and encoder_hidden_states is not None:
            bias = F.pad(query.new_zeros(1, key.shape[2] - 1), (0, 1), value=math.log(padding_copies))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.transpose(1, 2).reshape(batch, -1, query.shape[1] * query.shape[-1]).to(query.dtype)
        if encoder_hidden_states is None:
            return attn.to_out[1](attn.to_out[0](out))
        # the text stream's output projection first: diffusers' order, which hooks on the layers see
        text = out[:, image_tokens:]
        text = text if attn.context_pre_only else attn.to_add_out(text)
        return attn.to_out[1](attn.to_out[0](out[:, :image_tokens])), text


def gives_zero_t5_states(t5) -> bool:
    """Whether an SD3 pipeline's T5 part of the prompt is zero for every prompt: it has no T5, or
    its T5's final RMS norm scales by zero (a T5 of zero weights, which a base trained without T5
    saves so that the folder loads)."""
    return t5 is None or not t5.encoder.final_layer_norm.weight.any()


def fold_t5_padding(states: torch.Tensor, t5_tokens: int) -> tuple[torch.Tensor, dict]:
    """The prompt states ``(B, clip + t5_tokens, D)`` of a pipeline without T5 with the zero T5
    part folded into one token, and the ``joint_attention_kwargs`` that make an SD3 transformer
    whose processors are :class:`FoldedPaddingAttnProcessor` compute what it computes unfolded."""
    if states[:, -t5_tokens:].any():
        raise ValueError(f"the last {t5_tokens} prompt states are not the zeros of a pipeline without T5")
    return states[:, : states.shape[1] - t5_tokens + 1], {"padding_copies": t5_tokens}

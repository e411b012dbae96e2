"""Qwen-Image: ``QwenImageTransformer2DModel``, ``QwenImagePipeline`` and their rectified-flow
training (:class:`QwenImageFlowMatching`).

The transformer is a chain of 60 identical dual-stream blocks (Qwen-Image: width 3072, 24 heads
x 128): image tokens go through ``to_q/to_k/to_v/to_out.0`` and ``img_mlp``, text tokens through
``add_q_proj/add_k_proj/add_v_proj/to_add_out`` and ``txt_mlp``, and every block has the same
shapes, so each projection role is one unbroken chain through all blocks for every shortcut
type. The prompt goes through Qwen2.5-VL (``text_encoder``) in a fixed template whose first
tokens are dropped again; the latents are a video VAE's (one frame), normalised per channel;
sigmas shift with the image size (the scheduler's dynamic shifting).
"""

from __future__ import annotations

import torch

from ..objectives import FlowMatchingObjective, shifted_scheduler
from .base import register_frontend, to_model
from .dit import DIT_ATTENTION_TARGETS, DiTFrontEnd
from .flux import pack_latents
from .pipelines import PipelineFamily, register_pipeline_family

#: the feed-forward layers of both streams of a block (with the attention targets: all of a
#: block's linear layers but its modulation)
QWEN_IMAGE_FEEDFORWARD_TARGETS = (
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)


def image_shapes(batch: int, rows: int, cols: int) -> list[list[tuple[int, int, int]]]:
    """The transformer's ``img_shapes``: one frame of ``rows x cols`` packed tokens per image."""
    return [[(1, rows, cols)]] * batch


class QwenImageTransformer(DiTFrontEnd):
    name = "qwen_image_transformer"
    model_class = "QwenImageTransformer2DModel"

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=16, grid=(8, 8)):
        """Packed N(0, 1) latents on a ``grid`` of image tokens, timesteps uniform in [0, 1)
        (``sigma``), N(0, 1) text states with a mask in which every prompt after the first has a
        quarter of padding (as the pipeline pads a batch of prompts to the longest)."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        mask[1:, text_tokens - text_tokens // 4 :] = 0
        out = []
        for _ in range(num):
            kwargs = {
                "hidden_states": torch.randn(batch, grid[0] * grid[1], cfg.in_channels, generator=gen),
                "timestep": torch.rand(batch, generator=gen),
                "encoder_hidden_states": torch.randn(
                    batch, text_tokens, cfg.joint_attention_dim, generator=gen
                ),
                "encoder_hidden_states_mask": mask,
            }
            out.append({**to_model(kwargs, model), "img_shapes": image_shapes(batch, *grid)})
        return out


class QwenImageFlowMatching(FlowMatchingObjective):
    """Qwen-Image as ``QwenImagePipeline`` runs it:

    * text: each prompt in the pipeline's ``prompt_template_encode``, tokenized (up to
      ``tokenizer_max_length`` tokens after the template, batches padded to the longest), the
      text encoder's last hidden states with the padding and the template's first
      ``prompt_template_encode_start_idx`` tokens removed, the rest zero-padded and masked (the
      mask dropped when no prompt of the batch is padded), as ``encode_prompt`` returns them;
    * latents: the VAE's one-frame latents, ``(z - latents_mean) / latents_std`` per channel,
      packed in 2 x 2 patches with ``img_shapes`` (one frame), timesteps ``sigma``;
    * sigmas: the scheduler's dynamic shifting at the image's token count ``h w / 4``
      (``mu`` from ``base_shift`` .. ``max_shift``, exponential time shift, stretched to
      ``shift_terminal``), as the pipeline sets its schedule for that image size.

    The released models have no guidance embedding (``guidance_embeds`` false), so
    ``--guidance_scale`` is refused; the pipeline's classifier-free guidance is ``true_cfg_scale``.
    """

    target_modules = DIT_ATTENTION_TARGETS
    #: no guidance embedding; no text-encoder LoRA (the pipeline's loader loads the transformer's alone)
    unused_flags = (*FlowMatchingObjective.unused_flags, "guidance_scale", "train_text_encoder")

    def __init__(self, pipe, args, family) -> None:
        super().__init__(pipe, args, family)
        #: the pipeline's prompt template, the template tokens it drops, tokens it reads
        self.template = pipe.prompt_template_encode
        self.template_tokens = pipe.prompt_template_encode_start_idx
        self.max_tokens = pipe.tokenizer_max_length + self.template_tokens
        vae = self.models["vae"]
        self.latents_mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        self.latents_std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        self._schedules: dict[int, object] = {}

    # -- latents -----------------------------------------------------------------------------
    @staticmethod
    def vae_downsampling(vae) -> int:
        """``2 ** len(temperal_downsample)`` (8), as the pipeline computes it."""
        return 2 ** len(vae.config.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return self.models["vae"].config.z_dim

    def latent_distribution(self, vae, pixel_values):
        """The video VAE's posterior of the images as one-frame videos, the frame axis dropped:
        ``(B, 2 C, H / 8, W / 8)``."""
        frames = pixel_values.to(vae.device, vae.dtype).unsqueeze(2)
        return vae.encode(frames).latent_dist.parameters.squeeze(2)

    def normalize_latents(self, z):
        """``(z - latents_mean) / latents_std``, per channel."""
        return (z - self.latents_mean.to(z)) / self.latents_std.to(z)

    def latent_multiple(self) -> int:
        """2: latents are packed in 2 x 2 patches."""
        return 2

    def side_reason(self) -> str:
        return f"latents of {self.vae_scale}x smaller size are packed in 2 x 2 patches"

    def training_scheduler(self, latents):
        """The pipeline's schedule at this image size (:func:`shifted_scheduler` at ``h w / 4``
        tokens), made once per size."""
        h, w = latents.shape[-2:]
        tokens = (h // 2) * (w // 2)
        if tokens not in self._schedules:
            self._schedules[tokens] = shifted_scheduler(self.scheduler, tokens)
        return self._schedules[tokens]

    # -- text --------------------------------------------------------------------------------
    def prompt_tokens(self, captions: list[str], padding: bool | str = True):
        """The templated prompts tokenized as the pipeline does (``padding="max_length"``: to a
        fixed length, for the cache's keys)."""
        return self.tokenizers["text_encoder"](
            [self.template.format(c) for c in captions],
            max_length=self.max_tokens,
            padding=padding,
            truncation=True,
            return_tensors="pt",
        )

    def token_ids(self, name, captions):
        return self.prompt_tokens(captions, padding="max_length").input_ids

    def encode_text(self, models, captions, input_ids=None):
        """``encoder_hidden_states`` ``(B, max_sequence_length, D)`` and their mask, zero past
        each prompt's end (:meth:`transformer_inputs` trims them to the batch's longest prompt)."""
        encoder = models["text_encoder"]
        tokens = self.prompt_tokens(captions).to(self.device(models))
        hidden = encoder(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]
        keep = tokens.attention_mask.bool()
        states = hidden.new_zeros(len(captions), self.max_sequence_length, hidden.shape[-1])
        mask = torch.zeros(len(captions), self.max_sequence_length, dtype=torch.long, device=hidden.device)
        for i, row in enumerate(hidden):
            prompt = row[keep[i]][self.template_tokens :][: self.max_sequence_length]
            states[i, : len(prompt)] = prompt
            mask[i, : len(prompt)] = 1
        return {"encoder_hidden_states": states, "encoder_hidden_states_mask": mask}

    def transformer_inputs(self, noisy, timesteps, text):
        b, _, h, w = noisy.shape
        mask = text["encoder_hidden_states_mask"]
        length = int(mask.sum(dim=1).max())
        mask = mask[:, :length]
        return {
            "hidden_states": pack_latents(noisy),
            "timestep": timesteps / 1000,
            "encoder_hidden_states": text["encoder_hidden_states"][:, :length],
            "encoder_hidden_states_mask": None if bool(mask.all()) else mask,
            "img_shapes": image_shapes(b, h // 2, w // 2),
        }

    def layout(self, latents):
        return pack_latents(latents)


class QwenImagePipelines(PipelineFamily):
    """``QwenImagePipeline`` and the other pipelines around a ``QwenImageTransformer2DModel``.

    ``QwenImageLoraLoaderMixin`` loads LoRA weights for the transformer alone (no text encoder),
    and ComfyUI maps diffusers-format ``transformer.<path>`` keys directly onto its Qwen-Image
    model (``comfy/lora.py``), so the diffusers file is the one file written.
    """

    name = "qwen_image"
    title = "Qwen-Image"
    pipeline_class = "QwenImagePipeline"
    denoiser = "transformer"
    denoiser_family = QwenImageTransformer.name
    prompt_encoders = ("text_encoder",)
    lora_scale_kwarg = "attention_kwargs"
    objective = QwenImageFlowMatching


QWEN_IMAGE_TRANSFORMER = register_frontend(QwenImageTransformer())
QWEN_IMAGE_PIPELINES = register_pipeline_family(QwenImagePipelines())

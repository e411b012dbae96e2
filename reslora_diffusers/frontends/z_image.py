"""Z-Image: ``ZImageTransformer2DModel``, ``ZImagePipeline`` and their rectified-flow training
(:class:`ZImageFlowMatching`).

The transformer is a single-stream DiT: two ``noise_refiner`` blocks on the image tokens, two
``context_refiner`` blocks on the caption tokens, then 30 ``layers`` on both together (Z-Image:
width 3840, 30 heads x 128), every block an ``attention`` (``to_q/to_k/to_v/to_out.0``) and a
SwiGLU ``feed_forward`` (``w1/w2/w3``). A chain is a role in execution order, so the
``attention.to_q`` of all 34 blocks is one chain: ``bs`` links on equal weight shapes and runs
unbroken through all of them; ``is`` and ``ms`` link on equal input shapes, and the three groups
read different token sequences, so their chains are three segments, the 30 ``layers`` unbroken.
The image and caption refiners' sequences (each padded to a multiple of 32 tokens) can have the
same length, which would link an image block to a caption block; the family therefore traces the
chains when ResLoRA is attached, on inputs where they differ
(:meth:`ZImageTransformer.attach`), so the structure never depends on the first batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core import ResLoRAConfig
from ..objectives import FlowMatchingObjective, flow_matching_loss
from .base import register_frontend, to_model
from .dit import DiTFrontEnd
from .pipelines import PipelineFamily, register_pipeline_family

#: the attention projections of every block (diffusers' Z-Image LoRA targets)
Z_IMAGE_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
#: the SwiGLU feed-forward layers of every block
Z_IMAGE_FEEDFORWARD_TARGETS = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class ZImageTransformer(DiTFrontEnd):
    name = "z_image_transformer"
    model_class = "ZImageTransformer2DModel"

    def default_targets(self, model: nn.Module) -> list[str]:
        return list(Z_IMAGE_ATTENTION_TARGETS)

    def attach(self, model: nn.Module, config: ResLoRAConfig) -> nn.Module:
        """ResLoRA on the targets, its chains traced at once on :meth:`synthetic_inputs` (whose
        image and caption sequences differ in length after padding), without gradients."""
        model = super().attach(model, config)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(**self.synthetic_inputs(model, num=1)[0])
        model.train(was_training)
        return model

    def synthetic_inputs(self, model, num=2, seed=0, batch=2, text_tokens=40, grid=(4, 4)):
        """Per image: N(0, 1) latents of one frame, ``2 grid`` latents a side (``grid`` patch
        tokens), N(0, 1) caption states of ``text_tokens`` (``3/4`` of that from the second
        caption on, as a batch of prompts varies); timesteps ``1 - sigma`` uniform in [0, 1)."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        lengths = [text_tokens] + [text_tokens - text_tokens // 4] * (batch - 1)
        shape = (cfg.in_channels, 1, 2 * grid[0], 2 * grid[1])
        out = []
        for _ in range(num):
            kwargs = {
                "x": [to_model(torch.randn(shape, generator=gen), model) for _ in range(batch)],
                "t": to_model(torch.rand(batch, generator=gen), model),
                "cap_feats": [
                    to_model(torch.randn(n, cfg.cap_feat_dim, generator=gen), model) for n in lengths
                ],
            }
            out.append(kwargs)
        return out


class ZImageFlowMatching(FlowMatchingObjective):
    """Z-Image as ``ZImagePipeline`` runs it:

    * text: each prompt in the tokenizer's chat template (a user turn, the assistant's opened,
      ``enable_thinking=True``), padded to ``max_sequence_length`` (512) tokens, the text
      encoder's second-to-last hidden states without the padding: one ``(L_i, D)`` tensor per
      prompt, as ``encode_prompt`` returns them;
    * latents: ``(z - shift_factor) * scaling_factor`` of the (Flux) VAE, one ``(C, 1, H, W)``
      frame per image; timesteps ``t = (1000 - 1000 sigma) / 1000``, the time from noise;
    * prediction: the transformer predicts ``x0 - eps``, the pipeline negates it into the
      velocity ``eps - x0`` that its scheduler steps with, and the loss compares that.

    Sigmas come from the scheduler's static ``shift`` (3 for Z-Image). The model has no guidance
    embedding (the pipeline's ``guidance_scale`` is classifier-free guidance), so
    ``--guidance_scale`` is refused.
    """

    target_modules = Z_IMAGE_ATTENTION_TARGETS
    #: no guidance embedding; no text-encoder LoRA (the pipeline's loader loads the transformer's alone)
    unused_flags = (*FlowMatchingObjective.unused_flags, "guidance_scale", "train_text_encoder")

    def latent_multiple(self) -> int:
        """The transformer's patch size (2)."""
        return self.denoiser_config.all_patch_size[0]

    def side_reason(self) -> str:
        return f"the VAE's factor {self.vae_scale} x the transformer's patch size {self.latent_multiple()}"

    def max_side(self) -> int:
        """The rotary position table's patch rows and columns (``axes_lens``) x the side step."""
        return min(self.denoiser_config.axes_lens[1:]) * self.side_step

    def prompt_tokens(self, captions: list[str]):
        """The prompts in the chat template, tokenized and padded as the pipeline does."""
        tokenizer = self.tokenizers["text_encoder"]
        chats = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": c}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=True,
            )
            for c in captions
        ]
        return tokenizer(
            chats,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        )

    def token_ids(self, name, captions):
        return self.prompt_tokens(captions).input_ids

    def encode_text(self, models, captions, input_ids=None):
        """``cap_feats`` ``(B, max_sequence_length, D)`` and ``cap_mask`` (the prompt's tokens):
        :meth:`transformer_inputs` keeps each prompt's own tokens."""
        tokens = self.prompt_tokens(captions).to(self.device(models))
        mask = tokens.attention_mask.bool()
        states = models["text_encoder"](
            input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states[-2]
        return {"cap_feats": states, "cap_mask": mask}

    def transformer_inputs(self, noisy, timesteps, text):
        return {
            "x": list(noisy.unsqueeze(2).unbind(0)),
            "t": (1000 - timesteps) / 1000,
            "cap_feats": [s[m] for s, m in zip(text["cap_feats"], text["cap_mask"].bool(), strict=True)],
        }

    def latent_loss(self, models, latents, text, batch):
        """``mean_b(w(sigma_b) mean((-f(x_sigma) - (eps - x0))^2))``: ``f``, the transformer,
        predicts ``x0 - eps`` (one ``(C, 1, H, W)`` tensor per image)."""
        step = self.flow_inputs(latents, text)
        out = models[self.denoiser](**step.inputs, return_dict=False)[0]
        pred = -torch.stack(out).squeeze(2)
        return flow_matching_loss(pred, step.latents, step.noise, step.sigmas, self.weighting)


class ZImagePipelines(PipelineFamily):
    """``ZImagePipeline`` and the other pipelines around a ``ZImageTransformer2DModel``.

    ``ZImageLoraLoaderMixin`` loads LoRA weights for the transformer alone (no text encoder), and
    ComfyUI maps diffusers-format ``transformer.<path>`` keys onto its Z-Image model
    (``comfy/lora.py``, ``comfy.utils.z_image_to_diffusers``), so the diffusers file is the one
    file written.
    """

    name = "z_image"
    title = "Z-Image"
    pipeline_class = "ZImagePipeline"
    denoiser = "transformer"
    denoiser_family = ZImageTransformer.name
    prompt_encoders = ("text_encoder",)
    shifts_latents = True
    lora_scale_kwarg = "joint_attention_kwargs"
    objective = ZImageFlowMatching


Z_IMAGE_TRANSFORMER = register_frontend(ZImageTransformer())
Z_IMAGE_PIPELINES = register_pipeline_family(ZImagePipelines())

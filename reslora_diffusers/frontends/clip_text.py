"""CLIP text encoders (``CLIPTextModel``, SDXL's ``CLIPTextModelWithProjection``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from .base import FrontEnd, is_instance, register_frontend

#: the attention projections of every CLIP encoder layer
CLIP_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_MODEL_TYPES = ("clip_text_model", "clip_text_model_with_projection")


class ClipText(FrontEnd):
    """ResLoRA on the attention projections of a CLIP text encoder."""

    name = "clip_text"
    priority = 20
    targets = CLIP_TEXT_TARGETS

    def matches(self, model):
        return is_instance(model, "transformers", ("CLIPTextModel", "CLIPTextModelWithProjection"))

    def default_targets(self, model):
        return list(self.targets)

    def synthetic_inputs(self, model: nn.Module, num: int = 2, seed: int = 0, batch: int = 4) -> list[dict]:
        """Random token ids over the whole sequence length."""
        cfg = model.config
        gen = torch.Generator().manual_seed(seed)
        shape = (batch, cfg.max_position_embeddings)
        return [
            {"input_ids": torch.randint(0, cfg.vocab_size, shape, generator=gen).to(model.device)}
            for _ in range(num)
        ]

    def file_path(self, model, path):
        """``text_model.encoder...`` as LoRA files always have it: transformers 5 drops the
        ``text_model`` level of ``CLIPTextModel``; diffusers loads both spellings, older stacks
        and kohya tools only the classic one."""
        if hasattr(model, "text_model") or path.startswith("text_model."):
            return path
        return f"text_model.{path}"


CLIP_TEXT = register_frontend(ClipText())

"""The public entry points, dispatching to the front end that knows the model.

* diffusers pipelines and UNets -> :mod:`reslora_diffusers.diffusion`
  (attention processor, text encoders, standard LoRA export)
* transformers models -> :mod:`reslora_diffusers.adapters` (target presets by model type)
* anything else -> :mod:`reslora_diffusers.core` (``target_modules`` required)
"""

from __future__ import annotations

import sys

import torch.nn as nn

from .core import ResLoRAConfig
from .core import model as core


def _is_instance(obj, module: str, names: tuple[str, ...]) -> bool:
    """isinstance against classes of an optional package, without importing it."""
    if module not in sys.modules:
        return False
    pkg = sys.modules[module]
    classes = tuple(getattr(pkg, n) for n in names if hasattr(pkg, n))
    return bool(classes) and isinstance(obj, classes)


def is_pipeline(obj) -> bool:
    return _is_instance(obj, "diffusers", ("DiffusionPipeline",))


def is_unet(obj) -> bool:
    return _is_instance(obj, "diffusers", ("UNet2DConditionModel",))


def is_clip_text_encoder(obj) -> bool:
    return _is_instance(obj, "transformers", ("CLIPTextModel", "CLIPTextModelWithProjection"))


def is_transformers_model(obj) -> bool:
    return _is_instance(obj, "transformers", ("PreTrainedModel",))


def add_reslora(model, config: ResLoRAConfig, *, train_text_encoder: bool = False):
    """Apply ResLoRA to ``model`` in place and return it.

    ``model`` may be a diffusers pipeline (UNet, plus the text encoders when
    ``train_text_encoder``), a ``UNet2DConditionModel``, a transformers model, or any
    ``nn.Module`` (then ``config.target_modules`` must name its linear layers).
    """
    if is_pipeline(model):
        from .diffusion import add_reslora_to_pipeline

        return add_reslora_to_pipeline(model, config, train_text_encoder=train_text_encoder)
    if is_unet(model):
        from .diffusion import add_reslora_to_unet

        return add_reslora_to_unet(model, config)
    if is_clip_text_encoder(model):
        from .diffusion import add_reslora_to_text_encoder

        return add_reslora_to_text_encoder(model, config)
    if is_transformers_model(model):
        from .adapters import add_reslora_transformers

        return add_reslora_transformers(model, config)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"add_reslora expects an nn.Module or a diffusers pipeline, got {type(model).__name__}"
        )
    return core.add_reslora(model, config)


def remove_reslora(model):
    """Undo :func:`add_reslora`: original modules (and attention processors) are put back."""
    if is_pipeline(model):
        from .diffusion import remove_reslora_from_pipeline

        return remove_reslora_from_pipeline(model)
    if is_unet(model):
        from .diffusion import remove_reslora_from_unet

        return remove_reslora_from_unet(model)
    return core.remove_reslora(model)

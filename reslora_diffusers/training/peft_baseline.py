"""diffusers' own PEFT LoRA, the ecosystem baseline a ResLoRA run is compared with
(``train_text_to_image.py --use_peft``): put on, checkpointed and exported as diffusers'
scripts do, so that its files are what a user of ``add_adapter`` gets.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..core import find_targets, layer_class_for, matches_target
from ..frontends import CLIP_TEXT
from ..utils.io import atomic_dir
from ..utils.safety import check_finite, load_safetensors, save_safetensors
from .run_folder import RunFolder


def peft_target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """``targets`` as PEFT's ``target_modules`` for ``model``: unchanged, unless a target also
    names a module PEFT cannot adapt (FLUX.2's ``attn.to_out`` is a single block's linear and a
    double block's ``ModuleList``), then the paths of the layers ResLoRA adapts for them."""
    named = [m for path, m in model.named_modules() if matches_target(path, targets)]
    if all(layer_class_for(m) is not None for m in named):
        return list(targets)
    return [path for path, _ in find_targets(model, targets)]


def add_peft_lora(
    models: dict[str, nn.Module], denoiser: str, rank: int, alpha: float, dropout: float, targets: list[str]
) -> dict[str, list[nn.Parameter]]:
    """PEFT LoRA on ``models`` (the denoiser at ``targets``, text encoders at CLIP's attention
    projections); returns each model's trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    for name, model in models.items():
        lora = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            lora_dropout=dropout,
            target_modules=peft_target_modules(model, targets)
            if name == denoiser
            else list(CLIP_TEXT.targets),
        )
        # diffusers' add_adapter on the UNet/transformer; transformers' own add_adapter wants
        # a newer PEFT than diffusers does, so text encoders get PEFT's injection directly
        if name == denoiser:
            model.add_adapter(lora)
        else:
            inject_adapter_in_model(lora, model)
    return {name: [p for p in model.parameters() if p.requires_grad] for name, model in models.items()}


def save_peft_layers(components: dict[str, nn.Module], path: Path) -> None:
    """The PEFT LoRA weights of every component, ``<component>.<PEFT key>`` (a training checkpoint)."""
    from peft.utils import get_peft_model_state_dict

    tensors = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, model in components.items()
        for key, value in get_peft_model_state_dict(model).items()
    }
    save_safetensors(tensors, path)


def load_peft_layers(components: dict[str, nn.Module], path: Path) -> None:
    """Inverse of :func:`save_peft_layers`; every model's LoRA layers must all be in the file."""
    from peft.utils import set_peft_model_state_dict

    tensors = load_safetensors(path)
    for name, model in components.items():
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(model, own)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if result.unexpected_keys or missing:
            key = (result.unexpected_keys or missing)[0]
            raise ValueError(f"{path}: {name} LoRA key {key!r} does not match the model")


def export_peft_lora(folder: RunFolder, components: dict[str, nn.Module], pipeline_class) -> None:
    """``pipeline_class.save_lora_weights`` into the run folder: PEFT keys (lora_A/lora_B) as the
    ResLoRA export writes them, with each adapter's config as metadata so that
    ``load_lora_weights`` applies the same alpha / rank. NaN weights are refused, naming the
    file and component; nothing is written unless the whole file is."""
    from peft.utils import get_peft_model_state_dict

    layers = {}
    for name, model in components.items():
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        layers[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        check_finite(layers[f"{name}_lora_layers"], f"{folder.lora_file} ({name})")
    with atomic_dir(folder.path) as tmp:  # no half-written file on failure
        pipeline_class.save_lora_weights(str(tmp), **layers, safe_serialization=True)

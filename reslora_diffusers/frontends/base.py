"""What a model family tells ResLoRA, and the registry that finds the family of a model.

A model family (a class in this package's family files) says: how to recognise its models, its
default targets, how ResLoRA goes on and comes off (when it changes more than the targets),
synthetic inputs for merge reports when no data is given, and the module paths its LoRA files
use. The pipeline families built on them are :mod:`.pipelines`.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch
import torch.nn as nn

from ..core import ResLoRAConfig, attach_reslora, detach_reslora


def is_instance(obj, module: str, names: tuple[str, ...]) -> bool:
    """isinstance against classes of an optional package, without importing it."""
    if module not in sys.modules:
        return False
    pkg = sys.modules[module]
    classes = tuple(getattr(pkg, n) for n in names if hasattr(pkg, n))
    return bool(classes) and isinstance(obj, classes)


def to_model(obj, model: nn.Module):
    """Tensors in ``obj`` (nested dicts) on ``model``'s device; floating ones in its dtype too."""
    if isinstance(obj, dict):
        return {k: to_model(v, model) for k, v in obj.items()}
    if torch.is_tensor(obj):
        return obj.to(model.device, model.dtype) if obj.is_floating_point() else obj.to(model.device)
    return obj


class FrontEnd:
    """A model family. The base behaviour is the generic one: explicit targets, nothing else changed."""

    name = "generic"
    #: families are tried from the highest priority down: a family that is a special case of
    #: another (CLIP text encoders are transformers models) has the higher number
    priority = 0

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, nn.Module)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """Targets used when ``config.target_modules`` is None (None: the user must name them)."""
        return None

    def resolve(self, model: nn.Module, config: ResLoRAConfig) -> ResLoRAConfig:
        """``config`` with the family's default targets filled in where it names none."""
        if config.target_modules is not None:
            return config
        targets = self.default_targets(model)
        return config if targets is None else replace(config, target_modules=list(targets))

    def attach(self, model: nn.Module, config: ResLoRAConfig) -> nn.Module:
        return attach_reslora(model, self.resolve(model, config))

    def detach(self, model: nn.Module) -> nn.Module:
        return detach_reslora(model)

    def synthetic_inputs(self, model: nn.Module, num: int = 2, seed: int = 0) -> list:
        """Inputs for a merge report when no data is given."""
        raise ValueError(
            f"{type(model).__name__} ({self.name} family) has no synthetic inputs; pass calibration "
            "and eval_inputs batches"
        )

    def file_path(self, model: nn.Module, path: str) -> str:
        """The module path as LoRA files of this family spell it."""
        return path


_FAMILIES: list[FrontEnd] = []


def register_frontend(frontend: FrontEnd) -> FrontEnd:
    """Add a family; :func:`frontend_for` tries families by ``priority``, highest first."""
    _FAMILIES.append(frontend)
    _FAMILIES.sort(key=lambda f: -f.priority)
    return frontend


def frontend_for(model: nn.Module) -> FrontEnd:
    """The family of ``model`` (the generic one when no other matches)."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"add_reslora expects an nn.Module or a diffusers pipeline, got {type(model).__name__}"
        )
    return next(f for f in _FAMILIES if f.matches(model))


GENERIC = register_frontend(FrontEnd())

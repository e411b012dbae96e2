"""Deprecated: the diffusers front end moved to :mod:`reslora_diffusers.frontends` (model
families) and :mod:`reslora_diffusers.export` (files). These names stay for one release."""

import warnings

from ..export.diffusers import export_lora, fuse_lora
from ..frontends import (
    add_reslora_to_pipeline,
    pipeline_components,
    remove_reslora_from_pipeline,
    reslora_components,
)

warnings.warn(
    "reslora_diffusers.diffusion is deprecated; use reslora_diffusers.frontends and reslora_diffusers.export",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str):
    from .. import REMOVED

    if name in REMOVED:
        raise ImportError(f"reslora_diffusers.diffusion.{name} was removed: {REMOVED[name]}", name=name)
    raise AttributeError(f"module 'reslora_diffusers.diffusion' has no attribute {name!r}")


__all__ = [
    "add_reslora_to_pipeline",
    "export_lora",
    "fuse_lora",
    "pipeline_components",
    "remove_reslora_from_pipeline",
    "reslora_components",
]

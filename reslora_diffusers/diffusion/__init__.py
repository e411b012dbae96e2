"""The diffusers front end: attention processor, pipelines, standard LoRA export."""

from .export import export_lora, fuse_lora
from .model import (
    add_reslora_to_pipeline,
    add_reslora_to_text_encoder,
    add_reslora_to_unet,
    pipeline_components,
    remove_reslora_from_pipeline,
    remove_reslora_from_unet,
    reslora_components,
)
from .processor import ResLoRAAttnProcessor

__all__ = [
    "ResLoRAAttnProcessor",
    "add_reslora_to_pipeline",
    "export_lora",
    "fuse_lora",
    "add_reslora_to_text_encoder",
    "add_reslora_to_unet",
    "pipeline_components",
    "remove_reslora_from_pipeline",
    "remove_reslora_from_unet",
    "reslora_components",
]

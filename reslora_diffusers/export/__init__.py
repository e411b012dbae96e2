"""Standard LoRA files out: one file per format, PEFT adapter folders, loading with checks.

* :mod:`.formats`: the :class:`LoRAFormat` contract and the registry (:func:`register_format`);
* :mod:`.diffusers`, :mod:`.kohya`, :mod:`.comfyui`: the formats (kohya-ss and ComfyUI key tables
  keyed by pipeline family);
* :mod:`.pipeline`: :func:`export_lora`, merging a pipeline's components and writing every format
  and the merge report; :func:`fuse_lora`;
* :mod:`.peft`: PEFT adapter folders for transformers models;
* :mod:`.loading`: a LoRA file checked against a pipeline by its format, and loaded.

LoRA key names are :mod:`reslora_diffusers.core.keys`.
"""

from .comfyui import COMFYUI, COMFYUI_FILE
from .diffusers import DIFFUSERS, DIFFUSERS_FILE
from .formats import REPORT_FILE, LoRAFormat, get_format, lora_formats, register_format, unregister_format
from .kohya import KOHYA, KOHYA_FILE
from .peft import export_peft_adapter
from .pipeline import export_lora, fuse_lora

__all__ = [
    "COMFYUI",
    "COMFYUI_FILE",
    "DIFFUSERS",
    "DIFFUSERS_FILE",
    "KOHYA",
    "KOHYA_FILE",
    "REPORT_FILE",
    "LoRAFormat",
    "export_lora",
    "export_peft_adapter",
    "fuse_lora",
    "get_format",
    "lora_formats",
    "register_format",
    "unregister_format",
]

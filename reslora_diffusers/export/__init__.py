"""Standard LoRA files out: diffusers/PEFT keys, kohya-ss keys, PEFT adapter folders.

:mod:`.diffusers` writes pipeline LoRA files and the merge report; :mod:`.kohya` the kohya-ss
file (names from the model families); :mod:`.peft` adapter folders for transformers models;
:mod:`.loading` checks a file against a pipeline. LoRA key names are
:mod:`reslora_diffusers.core.keys`.
"""

from .diffusers import DIFFUSERS_FILE, REPORT_FILE, export_lora, fuse_lora
from .kohya import KOHYA_FILE
from .peft import export_peft_adapter

__all__ = ["DIFFUSERS_FILE", "KOHYA_FILE", "REPORT_FILE", "export_lora", "export_peft_adapter", "fuse_lora"]

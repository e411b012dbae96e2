"""Model families: one file each, registered on import (see :func:`.base.frontend_for`).

* :mod:`.base`: the :class:`FrontEnd` contract, the registry and the generic family
  (any ``nn.Module``, targets named by the user);
* :mod:`.transformers_lm`: transformers language models, targets by ``model_type``;
* :mod:`.clip_text`: CLIP text encoders;
* :mod:`.sd_unet`: Stable Diffusion UNets (attention processor, SGM names for SDXL);
* :mod:`.sd_pipeline`: Stable Diffusion pipelines and their components.
"""

from .base import GENERIC, FrontEnd, frontend_for, register_frontend
from .clip_text import CLIP_TEXT
from .sd_pipeline import (
    add_reslora_to_pipeline,
    is_pipeline,
    pipeline_components,
    remove_reslora_from_pipeline,
    reslora_components,
)
from .sd_unet import SD_UNET, UNET_CONV_TARGETS, UNET_FEEDFORWARD_TARGETS, UNET_TARGETS
from .sd_unet_processor import ResLoRAAttnProcessor
from .transformers_lm import PRESETS, TRANSFORMERS_LM, preset_targets

__all__ = [
    "CLIP_TEXT",
    "GENERIC",
    "PRESETS",
    "SD_UNET",
    "TRANSFORMERS_LM",
    "UNET_CONV_TARGETS",
    "UNET_FEEDFORWARD_TARGETS",
    "UNET_TARGETS",
    "FrontEnd",
    "ResLoRAAttnProcessor",
    "add_reslora_to_pipeline",
    "frontend_for",
    "is_pipeline",
    "pipeline_components",
    "preset_targets",
    "register_frontend",
    "remove_reslora_from_pipeline",
    "reslora_components",
]

"""Model families: one file each, registered on import (see :func:`.base.frontend_for`).

* :mod:`.base`: the :class:`FrontEnd` contract, the registry and the generic family
  (any ``nn.Module``, targets named by the user);
* :mod:`.transformers_lm`: transformers language models, targets by ``model_type``;
* :mod:`.clip_text`: CLIP text encoders; :mod:`.t5_text`: T5 encoders;
* :mod:`.sd_unet`: Stable Diffusion UNets (synthetic inputs, SGM names for SDXL);
* :mod:`.dit`, :mod:`.sd3`, :mod:`.flux`: SD3's and Flux's diffusion transformers;
* :mod:`.pipelines`: diffusers pipelines (the pipeline families and their components), with
  the families in :mod:`.sd_pipeline`, :mod:`.sd3` and :mod:`.flux`.
"""

from .base import GENERIC, FrontEnd, frontend_for, register_frontend
from .clip_text import CLIP_TEXT
from .dit import DIT_ATTENTION_TARGETS, DIT_FEEDFORWARD_TARGETS, DIT_IMAGE_FEEDFORWARD_TARGETS
from .flux import FLUX_FEEDFORWARD_TARGETS, FLUX_PIPELINES, FLUX_TRANSFORMER
from .pipelines import (
    PipelineFamily,
    add_reslora_to_pipeline,
    components_family,
    is_pipeline,
    pipeline_components,
    pipeline_family,
    register_pipeline_family,
    remove_reslora_from_pipeline,
    reslora_components,
)
from .sd3 import SD3_PIPELINES, SD3_TRANSFORMER
from .sd_pipeline import SD_PIPELINES
from .sd_unet import SD_UNET, UNET_CONV_TARGETS, UNET_FEEDFORWARD_TARGETS, UNET_TARGETS
from .t5_text import T5_TEXT
from .transformers_lm import PRESETS, TRANSFORMERS_LM, preset_targets

__all__ = [
    "CLIP_TEXT",
    "DIT_ATTENTION_TARGETS",
    "DIT_FEEDFORWARD_TARGETS",
    "DIT_IMAGE_FEEDFORWARD_TARGETS",
    "FLUX_FEEDFORWARD_TARGETS",
    "FLUX_PIPELINES",
    "FLUX_TRANSFORMER",
    "GENERIC",
    "PRESETS",
    "SD3_PIPELINES",
    "SD3_TRANSFORMER",
    "SD_PIPELINES",
    "SD_UNET",
    "T5_TEXT",
    "TRANSFORMERS_LM",
    "UNET_CONV_TARGETS",
    "UNET_FEEDFORWARD_TARGETS",
    "UNET_TARGETS",
    "FrontEnd",
    "PipelineFamily",
    "add_reslora_to_pipeline",
    "components_family",
    "frontend_for",
    "is_pipeline",
    "pipeline_components",
    "pipeline_family",
    "preset_targets",
    "register_frontend",
    "register_pipeline_family",
    "remove_reslora_from_pipeline",
    "reslora_components",
]

"""Model and pipeline families: one file each, registered on import.

* :mod:`.base`: the :class:`FrontEnd` contract of a model family, its registry
  (:func:`frontend_for`) and the generic family (any ``nn.Module``, targets named by the user);
* :mod:`.pipelines`: the :class:`PipelineFamily` contract of a diffusers pipeline family (its
  components, text encoders, objective, LoRA-scale keyword, file formats), its registry and
  ResLoRA on pipelines;
* :mod:`.transformers_lm`: transformers language models, targets by ``model_type``;
* :mod:`.clip_text`: CLIP text encoders; :mod:`.t5_text`: T5 encoders;
* the diffusion families, each its model family, pipeline family and training objective:
  :mod:`.sd` (SD 1.x/2.x), :mod:`.sdxl`, :mod:`.sd3` and :mod:`.flux` (sharing :mod:`.dit`);
  :mod:`.qwen_image` (Qwen-Image), :mod:`.z_image` (Z-Image), :mod:`.flux2` (FLUX.2) and
  :mod:`.wan` (Wan 2.x text-to-video).

A new diffusion family is one more file of this kind, imported below.
"""

from .base import GENERIC, FrontEnd, frontend_for, register_frontend
from .clip_text import CLIP_TEXT
from .dit import DIT_ATTENTION_TARGETS, DIT_FEEDFORWARD_TARGETS, DIT_IMAGE_FEEDFORWARD_TARGETS
from .flux import FLUX_FEEDFORWARD_TARGETS, FLUX_PIPELINES, FLUX_TRANSFORMER
from .flux2 import FLUX2_ATTENTION_TARGETS, FLUX2_FEEDFORWARD_TARGETS, FLUX2_PIPELINES, FLUX2_TRANSFORMER
from .pipelines import (
    PipelineFamily,
    add_reslora_to_pipeline,
    cheaper_call,
    components_family,
    is_pipeline,
    pipeline_components,
    pipeline_families,
    pipeline_family,
    register_pipeline_family,
    remove_reslora_from_pipeline,
    reslora_components,
)
from .qwen_image import QWEN_IMAGE_FEEDFORWARD_TARGETS, QWEN_IMAGE_PIPELINES, QWEN_IMAGE_TRANSFORMER
from .sd import (
    DEFAULT_UNET_TARGETS,
    SD_PIPELINES,
    SD_UNET,
    UNET_CONV_TARGETS,
    UNET_FEEDFORWARD_TARGETS,
    UNET_TARGETS,
)
from .sd3 import (
    SD3_PIPELINES,
    SD3_TRANSFORMER,
    FoldedPaddingAttnProcessor,
    fold_t5_padding,
    gives_zero_t5_states,
)
from .sdxl import SDXL_PIPELINES, SDXL_UNET
from .t5_text import T5_TEXT
from .transformers_lm import PRESETS, TRANSFORMERS_LM, preset_targets
from .wan import WAN_ATTENTION_TARGETS, WAN_FEEDFORWARD_TARGETS, WAN_PIPELINES, WAN_TRANSFORMER
from .z_image import (
    Z_IMAGE_ATTENTION_TARGETS,
    Z_IMAGE_FEEDFORWARD_TARGETS,
    Z_IMAGE_PIPELINES,
    Z_IMAGE_TRANSFORMER,
)

__all__ = [
    "CLIP_TEXT",
    "DEFAULT_UNET_TARGETS",
    "DIT_ATTENTION_TARGETS",
    "DIT_FEEDFORWARD_TARGETS",
    "DIT_IMAGE_FEEDFORWARD_TARGETS",
    "FLUX2_ATTENTION_TARGETS",
    "FLUX2_FEEDFORWARD_TARGETS",
    "FLUX2_PIPELINES",
    "FLUX2_TRANSFORMER",
    "FLUX_FEEDFORWARD_TARGETS",
    "FLUX_PIPELINES",
    "FLUX_TRANSFORMER",
    "GENERIC",
    "PRESETS",
    "QWEN_IMAGE_FEEDFORWARD_TARGETS",
    "QWEN_IMAGE_PIPELINES",
    "QWEN_IMAGE_TRANSFORMER",
    "SD3_PIPELINES",
    "SD3_TRANSFORMER",
    "SDXL_PIPELINES",
    "SDXL_UNET",
    "SD_PIPELINES",
    "SD_UNET",
    "T5_TEXT",
    "TRANSFORMERS_LM",
    "UNET_CONV_TARGETS",
    "UNET_FEEDFORWARD_TARGETS",
    "UNET_TARGETS",
    "WAN_ATTENTION_TARGETS",
    "WAN_FEEDFORWARD_TARGETS",
    "WAN_PIPELINES",
    "WAN_TRANSFORMER",
    "Z_IMAGE_ATTENTION_TARGETS",
    "Z_IMAGE_FEEDFORWARD_TARGETS",
    "Z_IMAGE_PIPELINES",
    "Z_IMAGE_TRANSFORMER",
    "FoldedPaddingAttnProcessor",
    "FrontEnd",
    "PipelineFamily",
    "add_reslora_to_pipeline",
    "cheaper_call",
    "components_family",
    "fold_t5_padding",
    "gives_zero_t5_states",
    "frontend_for",
    "is_pipeline",
    "pipeline_components",
    "pipeline_families",
    "pipeline_family",
    "preset_targets",
    "register_frontend",
    "register_pipeline_family",
    "remove_reslora_from_pipeline",
    "reslora_components",
]

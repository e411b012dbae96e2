"""Embedded data: procedural coloured-shape sets, our tokenizer and the tiny base pipeline.

Everything here is made locally (no hub): the base set and the fine-tuning set are
written in the ``imagefolder`` layout, and the committed tiny ``StableDiffusionPipeline``
was pretrained on the base set by ``scripts/pretrain_tiny_base.py``; :mod:`.tiny_sd3` builds
its diffusion-transformer sibling (``--family sd3`` of that script).
"""

from .sets import (
    FINETUNE_NUM_IMAGES,
    FINETUNE_SEED,
    HELDOUT_COMBOS,
    base_combos,
    default_base_model_path,
    default_dit_base_path,
    default_finetune_data_dir,
    finetune_prompts,
    heldout_base_prompts,
    make_base_set,
    make_finetune_set,
    seen_base_prompts,
    write_imagefolder,
)
from .shapes import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLORS,
    FINETUNE_SHAPE,
    RESOLUTION,
    SHAPES,
    ShapeSample,
    caption,
    random_sample,
    render,
)
from .tiny_base import (
    BASE_GUIDANCE_SCALE,
    BASE_NUM_INFERENCE_STEPS,
    BASE_RESOLUTION,
    LATENT_CHANNELS,
    build_pipeline,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
)
from .tiny_sd3 import (
    SD3_NUM_LAYERS,
    SD3_WIDTH,
    build_clip_encoder,
    build_flow_scheduler,
    build_sd3_pipeline,
    build_sd3_transformer,
    build_sd3_vae,
    build_t5_encoder,
)
from .tokenizer import MODEL_MAX_LENGTH, VOCAB_WORDS, write_tokenizer
from .vocabulary import unseen_words, vocabulary_text

__all__ = [
    "ALL_SHAPES",
    "BACKGROUNDS",
    "BASE_GUIDANCE_SCALE",
    "BASE_NUM_INFERENCE_STEPS",
    "BASE_RESOLUTION",
    "COLORS",
    "FINETUNE_NUM_IMAGES",
    "FINETUNE_SEED",
    "FINETUNE_SHAPE",
    "HELDOUT_COMBOS",
    "LATENT_CHANNELS",
    "MODEL_MAX_LENGTH",
    "RESOLUTION",
    "SD3_NUM_LAYERS",
    "SD3_WIDTH",
    "SHAPES",
    "VOCAB_WORDS",
    "ShapeSample",
    "base_combos",
    "build_clip_encoder",
    "build_flow_scheduler",
    "build_pipeline",
    "build_scheduler",
    "build_sd3_pipeline",
    "build_sd3_transformer",
    "build_sd3_vae",
    "build_t5_encoder",
    "build_text_encoder",
    "build_tokenizer",
    "build_unet",
    "build_vae",
    "caption",
    "default_base_model_path",
    "default_dit_base_path",
    "default_finetune_data_dir",
    "finetune_prompts",
    "heldout_base_prompts",
    "make_base_set",
    "make_finetune_set",
    "random_sample",
    "render",
    "seen_base_prompts",
    "unseen_words",
    "vocabulary_text",
    "write_imagefolder",
    "write_tokenizer",
]

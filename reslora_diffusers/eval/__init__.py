"""Deterministic image metrics: read colour and shape off an image, score prompts, evaluate pipelines."""

from ..data.tiny_base import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS, BASE_RESOLUTION
from .analysis import (
    ATTRIBUTES,
    MIN_SHAPE_IOU,
    MIN_SHAPE_MARGIN,
    UNKNOWN_SHAPE,
    analyse_image,
    attribute_matches,
    open_set_shape,
    parse_prompt,
    prompt_accuracies,
    prompt_accuracy,
)
from .intervals import Z_95, wilson_interval
from .pipeline import evaluate_pipeline, generate, register_call_rewriter

#: Seeds of the documented evaluations.
EVAL_SEEDS: tuple[int, ...] = tuple(range(8))

__all__ = [
    "ATTRIBUTES",
    "BASE_GUIDANCE_SCALE",
    "BASE_NUM_INFERENCE_STEPS",
    "BASE_RESOLUTION",
    "EVAL_SEEDS",
    "MIN_SHAPE_IOU",
    "MIN_SHAPE_MARGIN",
    "UNKNOWN_SHAPE",
    "Z_95",
    "analyse_image",
    "attribute_matches",
    "evaluate_pipeline",
    "register_call_rewriter",
    "generate",
    "open_set_shape",
    "parse_prompt",
    "prompt_accuracies",
    "prompt_accuracy",
    "wilson_interval",
]

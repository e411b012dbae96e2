"""Deterministic image metrics: read colour and shape off an image, score prompts, evaluate pipelines."""

from ..data.tiny_base import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS, BASE_RESOLUTION
from .analysis import ATTRIBUTES, analyse_image, attribute_matches, parse_prompt, prompt_accuracy
from .pipeline import evaluate_pipeline, generate

#: Seeds of the documented evaluations.
EVAL_SEEDS: tuple[int, ...] = tuple(range(8))

__all__ = [
    "ATTRIBUTES",
    "BASE_GUIDANCE_SCALE",
    "BASE_NUM_INFERENCE_STEPS",
    "BASE_RESOLUTION",
    "EVAL_SEEDS",
    "analyse_image",
    "attribute_matches",
    "evaluate_pipeline",
    "generate",
    "parse_prompt",
    "prompt_accuracy",
]

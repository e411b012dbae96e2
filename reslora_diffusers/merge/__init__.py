"""From a trained ResLoRA model to a plain LoRA: merge factors and report, calibration,
low-rank truncation, and the output-error measurement."""

from .calibration import calibrate, calibrate_sequential
from .distill import DEFAULT_DISTILL_LR, DEFAULT_DISTILL_STEPS, distill
from .error import Batch, eval_mode, merged_view, output_tensor, reference_outputs, relative_error, run_batch
from .factors import MergedLoRA, MergeReport, compare_merges, has_norm_windows, merge_to_lora
from .lowrank import truncate

__all__ = [
    "DEFAULT_DISTILL_LR",
    "DEFAULT_DISTILL_STEPS",
    "Batch",
    "MergeReport",
    "MergedLoRA",
    "calibrate",
    "calibrate_sequential",
    "compare_merges",
    "distill",
    "eval_mode",
    "has_norm_windows",
    "merge_to_lora",
    "merged_view",
    "output_tensor",
    "reference_outputs",
    "relative_error",
    "run_batch",
    "truncate",
]

"""The base pipeline of a training run: loaded with its family's objective, and the real inputs
of the trained components for the merge report.

The objective is the one the pipeline's family declares (``PipelineFamily.objective``, one
family file of :mod:`reslora_diffusers.frontends` each); nothing here names a family.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from ..frontends import pipeline_families, pipeline_family
from ..objectives import Objective
from ..utils.errors import one_line
from .data import BucketBatchSampler, collate


def pipeline_kwargs(path: str, revision: str | None) -> dict:
    """``safety_checker=None`` for pipelines that have one (others would warn about the argument)."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(path, revision=revision)
    return {"safety_checker": None} if "safety_checker" in config else {}


def objective_for(pipe, args: argparse.Namespace) -> Objective:
    """The objective of ``pipe``'s family over its components (``ValueError`` for a family
    the script does not train, naming those it does)."""
    family = pipeline_family(pipe)
    if family.objective is None:
        trained = ", ".join(sorted(f.name for f in pipeline_families() if f.objective is not None))
        raise ValueError(f"no training objective for {family.name} pipelines (trained: {trained})")
    return family.objective(pipe, args, family)


def load_objective(args: argparse.Namespace, defaults: dict) -> Objective:
    """Load the base pipeline of ``--pretrained_model_name_or_path`` and the objective of its
    family; fill ``--target_modules`` and ``--weighting_scheme`` where not given; refuse flags of
    other objectives (``defaults``: the parser's). Errors are ``ValueError`` naming the problem."""
    from diffusers import DiffusionPipeline

    path = args.pretrained_model_name_or_path
    try:
        pipe = DiffusionPipeline.from_pretrained(
            path, revision=args.revision, variant=args.variant, **pipeline_kwargs(path, args.revision)
        )
        objective = objective_for(pipe, args)
    except (OSError, ValueError) as err:
        raise ValueError(f"--pretrained_model_name_or_path: cannot load {path}: {one_line(err)}") from err
    objective.check_flags(args, defaults)
    objective.fill_defaults(args)
    return objective


def real_inputs(
    objective: Objective, models: dict[str, nn.Module], dataset, batch_size: int, seed: int, num: int
) -> dict[str, list[dict]]:
    """``{component: num batches of keyword inputs}`` from the training data (up to 8 images of
    one bucket a batch, in the order of a :class:`~.data.BucketBatchSampler` seeded with ``seed``),
    for calibrating and measuring the merge."""
    gen = torch.Generator().manual_seed(seed)
    sampler = BucketBatchSampler(dataset.bucket_of, min(batch_size, 8), seed)
    keys: list[list[tuple[int, int]]] = []
    while len(keys) < num:
        sampler.start_epoch(len(keys))
        keys += list(sampler)
    out: dict[str, list[dict]] = {}
    with torch.no_grad():
        for batch_keys in keys[:num]:
            batch = collate([dataset[key] for key in batch_keys])
            for name, inputs in objective.model_inputs(models, batch, gen).items():
                out.setdefault(name, []).append(inputs)
    return out

#!/usr/bin/env python
"""Fine-tune a text-to-image model with ResLoRA (or plain LoRA), diffusers-style.

The flags are those of diffusers' ``examples/text_to_image/train_text_to_image_lora.py``
plus the ResLoRA ones. With no arguments the script fine-tunes the embedded tiny base on
the embedded "cross" concept and prints the prompt accuracy before and after:

    python train_text_to_image.py
    accelerate launch --multi_gpu --num_processes 2 train_text_to_image.py           # 2 GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_text_to_image.py  # 2 CPU processes

(``accelerate launch --cpu --num_processes 2`` starts one process in accelerate 1.x: its CPU
launcher needs mpirun; the line above runs torchrun with the gloo backend instead.)

At the end ``output_dir`` holds ``pytorch_lora_weights.safetensors`` (loads with
``pipe.load_lora_weights``), ``lora_kohya.safetensors``, ``merge_report.json``,
``reslora_checkpoint.safetensors``, ``train_log.jsonl``, validation grids and a ``README.md``.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from PIL import Image
from tqdm.auto import tqdm

from reslora_diffusers import (
    add_reslora,
    load_reslora_checkpoint,
    save_reslora_checkpoint,
    set_shortcut_scale,
)
from reslora_diffusers.core import (
    get_shortcut,
    layer_class_for,
    matches_target,
    trainable_parameters,
)
from reslora_diffusers.core.schedule import SCHEDULES, check_schedule, shortcut_scale_at
from reslora_diffusers.data import default_base_model_path, default_finetune_data_dir, finetune_prompts
from reslora_diffusers.eval import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS, generate, prompt_accuracies
from reslora_diffusers.eval.analysis import parse_prompt
from reslora_diffusers.frontends import UNET_CONV_TARGETS, pipeline_families, pipeline_family
from reslora_diffusers.merge import DEFAULT_DISTILL_STEPS
from reslora_diffusers.objectives import WEIGHTING_SCHEMES, Objective
from reslora_diffusers.training.cache import build_caches, default_cache_dir
from reslora_diffusers.training.card import write_model_card
from reslora_diffusers.training.checkpoints import (
    check_checkpoint_files,
    check_resume_step,
    list_checkpoints,
    resolve_resume,
    save_checkpoint,
)
from reslora_diffusers.training.cpu_threads import (
    CPU_THREADS_HELP,
    FreeCpuThreads,
    cpu_threads_for_run,
    parse_cpu_threads,
)
from reslora_diffusers.training.data import (
    BucketBatchSampler,
    TextImageDataset,
    auto_buckets,
    collate,
    load_image_captions,
    parse_buckets,
)
from reslora_diffusers.training.data import describe as describe_buckets
from reslora_diffusers.training.flags import (
    add_reslora_arguments,
    import_shortcut_modules,
    reslora_config,
    type_texts,
)
from reslora_diffusers.training.grid import labelled_grid
from reslora_diffusers.training.peft_baseline import (
    add_peft_lora,
    export_peft_lora,
    load_peft_layers,
    save_peft_layers,
)
from reslora_diffusers.training.pipeline import load_objective, pipeline_kwargs, real_inputs
from reslora_diffusers.training.run_folder import (
    RunFolder,
    TrainLog,
    check_output_dir,
    check_resume_identity,
    hold_output_dir,
    run_identity,
)
from reslora_diffusers.training.speed import (
    COMPILE_MODES,
    adamw_8bit_class,
    allow_tf32,
    compile_model,
    make_adamw,
    trace_chains,
)
from reslora_diffusers.training.video import (
    TextVideoDataset,
    check_num_frames,
    describe_clips,
    load_video_captions,
)
from reslora_diffusers.utils.errors import one_line
from reslora_diffusers.utils.io import DiskFullError, atomic_path
from reslora_diffusers.utils.quiet import loading_pipeline

logger = get_logger("train_text_to_image")

#: the shortcut schedule of a ResLoRA run that names none
DEFAULT_SCHEDULE = "cosine"


# ----------------------------------------------------------------------------- arguments


def _family_defaults(attribute: str, shown=str) -> str:
    """The objectives' default ``attribute`` by pipeline family, for help texts: ``Stable
    Diffusion, SDXL: to_q ...; SD3, Flux: ...`` (families whose objective has none left out)."""
    titles: dict[str, list[str]] = {}
    for family in pipeline_families():
        value = getattr(family.objective, attribute, None)
        if value:
            titles.setdefault(shown(value), []).append(family.title)
    return "; ".join(f"{', '.join(names)}: {value}" for value, names in titles.items())


def build_parser() -> argparse.ArgumentParser:
    """The command line (diffusers' LoRA script flags plus ResLoRA's)."""
    p = argparse.ArgumentParser(description="Fine-tune a text-to-image model with ResLoRA.")
    # model and data
    p.add_argument(
        "--pretrained_model_name_or_path",
        default=str(default_base_model_path()),
        help="diffusers pipeline folder or hub name (default: the embedded tiny base)",
    )
    p.add_argument("--revision", default=None)
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    p.add_argument("--dataset_name", default=None, help="hub dataset name or local dataset folder")
    p.add_argument(
        "--train_data_dir",
        default=None,
        help="imagefolder with metadata.jsonl, or images with caption files beside them "
        "(--caption_extension); default: the embedded fine-tuning set",
    )
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument(
        "--caption_extension",
        default=None,
        help="read each image's caption from the file beside it with this extension, e.g. .txt "
        "(kohya-ss layout) instead of metadata.jsonl",
    )
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument(
        "--num_frames",
        type=int,
        default=None,
        help="video families: frames per clip, 1 + a multiple of the VAE's temporal factor (default: "
        f"{_family_defaults('default_frames')}); a shorter clip trains on the most it has, a still image on one",
    )
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="default: the base denoiser's sample size x the VAE factor",
    )
    p.add_argument(
        "--aspect_ratio_buckets",
        default=None,
        help="'h1,w1;h2,w2;...' in pixels, or 'auto' (about --resolution^2 pixels, sides multiples of "
        "64 px or the family's step): each image trains in the bucket nearest its aspect ratio "
        "(default: one square bucket of --resolution)",
    )
    p.add_argument("--center_crop", action="store_true", help="centred crops (the default)")
    p.add_argument("--random_crop", action="store_true", help="random crops instead of centred ones")
    p.add_argument("--random_flip", action="store_true")
    p.add_argument(
        "--caption_dropout_rate",
        type=float,
        default=0.0,
        help="train on the empty prompt with this probability (for classifier-free guidance)",
    )
    p.add_argument(
        "--cache_latents",
        action="store_true",
        help="encode every image (crop, and its mirror with --random_flip) once and keep the VAE "
        "posterior in --cache_dir; a new sample of it is drawn every step",
    )
    p.add_argument(
        "--cache_text_embeddings",
        action="store_true",
        help="encode every caption once and keep the text states in --cache_dir (frozen text encoders only)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="where the caches live (default: .reslora_cache beside --output_dir); entries are "
        "keyed by their inputs and reused by later runs",
    )
    # training
    p.add_argument("--train_batch_size", type=int, default=16)
    p.add_argument("--num_train_epochs", type=int, default=100)
    p.add_argument("--max_train_steps", type=int, default=800, help="overrides --num_train_epochs")
    p.add_argument("--gradient_accumulation_steps", type=int, default=1)
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--learning_rate", type=float, default=4e-3)
    p.add_argument(
        "--text_encoder_lr",
        type=float,
        default=None,
        help="learning rate of the text encoders' adapters with --train_text_encoder (default: --learning_rate)",
    )
    p.add_argument(
        "--scale_lr",
        action="store_true",
        help="multiply the learning rate by processes x batch size x accumulation steps",
    )
    p.add_argument(
        "--lr_scheduler",
        default="constant",
        help="linear | cosine | cosine_with_restarts | polynomial | constant | constant_with_warmup",
    )
    p.add_argument("--lr_warmup_steps", type=int, default=20)
    p.add_argument(
        "--snr_gamma", type=float, default=5.0, help="min-SNR loss weighting; 0 turns it off (UNet)"
    )
    p.add_argument("--noise_offset", type=float, default=0.0, help="(UNet)")
    p.add_argument(
        "--prediction_type",
        default=None,
        choices=["epsilon", "v_prediction"],
        help="default: the base scheduler's (UNet)",
    )
    # flow matching (SD3, Flux), as diffusers' train_dreambooth_lora_sd3.py / _flux.py
    p.add_argument(
        "--weighting_scheme",
        default=None,
        choices=WEIGHTING_SCHEMES,
        help=f"sigma sampling and loss weights (default: {_family_defaults('default_weighting')})",
    )
    p.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal: mean of the logit")
    p.add_argument("--logit_std", type=float, default=1.0, help="logit_normal: its standard deviation")
    p.add_argument("--mode_scale", type=float, default=1.29, help="mode: the scale of the mode density")
    p.add_argument("--guidance_scale", type=float, default=3.5, help="Flux: the guidance embedding's input")
    p.add_argument("--adam_beta1", type=float, default=0.9)
    p.add_argument("--adam_beta2", type=float, default=0.999)
    p.add_argument("--adam_weight_decay", type=float, default=1e-2)
    p.add_argument("--adam_epsilon", type=float, default=1e-8)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    p.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA")
    p.add_argument(
        "--use_fused_adam",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch's fused AdamW kernel (default: on CUDA only)",
    )
    p.add_argument(
        "--use_8bit_adam",
        action="store_true",
        help="bitsandbytes' 8-bit AdamW (optimizer state in 8 bits; pip install bitsandbytes)",
    )
    p.add_argument("--torch_compile", action="store_true", help="train the denoiser through torch.compile")
    p.add_argument("--compile_mode", default="default", choices=COMPILE_MODES)
    # the tests compile with dynamo's "eager" backend (graph capture without code generation)
    p.add_argument("--compile_backend", default="inductor", help=argparse.SUPPRESS)
    p.add_argument("--cpu_threads", type=parse_cpu_threads, default="auto", help=CPU_THREADS_HELP)
    p.add_argument("--dataloader_num_workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    # LoRA / ResLoRA: one flag per ResLoRAConfig field (training/flags.py). ms with the cosine
    # schedule: the best exported accuracy of the 5-seed comparisons (benchmarks/README.md), and
    # an exact export since its shortcuts end at 0
    add_reslora_arguments(
        p,
        defaults={"rank": 8, "res_type": "ms"},
        helps={
            "target_modules": f"denoiser module-name suffixes (default: "
            f"{_family_defaults('target_modules', ' '.join)}; the UNet's resnet and sampler "
            f"convolutions, LoCon-style: {' '.join(UNET_CONV_TARGETS)})"
        },
    )
    p.add_argument(
        "--distill_steps",
        type=int,
        default=DEFAULT_DISTILL_STEPS,
        help="--merge distill: Adam steps fitting the merged LoRA to the trained model's outputs",
    )
    p.add_argument(
        "--shortcut_schedule",
        default=None,
        choices=SCHEDULES,
        help="shortcut scale over training: constant 1, or 1 until --shortcut_decay_start and then "
        "down to exactly 0 at the last step (the trained model is then a plain LoRA: exact export); "
        f"default {DEFAULT_SCHEDULE} for a type with shortcuts, constant for --res_type none and --use_peft",
    )
    p.add_argument(
        "--shortcut_decay_start",
        type=float,
        default=None,
        help="fraction of --max_train_steps where a linear/cosine schedule starts (default 0.5)",
    )
    p.add_argument(
        "--calibration_batches",
        type=int,
        default=8,
        help=f"training batches (up to 8 images) that fit the calibrated "
        f"{type_texts()['approximate_types']} merge",
    )
    p.add_argument("--train_text_encoder", action="store_true")
    p.add_argument(
        "--no_chain_report",
        action="store_true",
        help="merge_report.json: each merge method's total error only, not every chain's "
        "(faster on large UNets)",
    )
    p.add_argument(
        "--use_peft",
        action="store_true",
        help="train diffusers' own PEFT LoRA instead of ResLoRA (the ecosystem baseline)",
    )
    # output and monitoring
    p.add_argument("--output_dir", default="runs/reslora", help="the demo app (app/app.py) lists runs/*")
    p.add_argument("--logging_dir", default="logs", help="TensorBoard folder, relative to --output_dir")
    p.add_argument(
        "--report_to",
        default="tensorboard",
        choices=["tensorboard", "none"],
        help="tensorboard: logs in --logging_dir (pip install 'reslora-diffusers[tensorboard]'; without it, "
        "a run that does not name this flag logs to train_log.jsonl alone)",
    )
    p.add_argument(
        "--validation_prompt",
        action="append",
        default=None,
        help="repeat for several (default with the embedded data: its 15 concept prompts)",
    )
    p.add_argument("--num_validation_images", type=int, default=2, help="images (seeds) per prompt")
    p.add_argument("--validation_steps", type=int, default=400)
    p.add_argument("--checkpointing_steps", type=int, default=400)
    p.add_argument("--checkpoints_total_limit", type=int, default=None)
    p.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' or a checkpoint-<step> folder (a bare name, as diffusers' scripts take it, is "
        "looked up in --output_dir first)",
    )
    p.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="remove a previous run's outputs from --output_dir first (other files are kept)",
    )
    p.add_argument(
        "--allow_partial_resume",
        action="store_true",
        help="resume even if the checkpoint's random states cannot be restored (the run will not "
        "repeat an uninterrupted one)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed (:func:`build_parser`), once its ``--shortcut_module`` plugins are
    imported (their types are ``--res_type`` choices)."""
    import_shortcut_modules(argv)
    return build_parser().parse_args(argv)


def given_flags(argv: list[str]) -> set[str]:
    """The flags (their ``args`` names) that ``argv`` names, whatever their values: a flag set
    to its default value is given all the same."""
    unset: list = []  # a list: an append flag extends a copy, so given flags never hold this object
    start = argparse.Namespace(**dict.fromkeys(vars(parse_args([])), unset))
    return {
        flag for flag, value in vars(build_parser().parse_args(argv, start)).items() if value is not unset
    }


def check_args(args: argparse.Namespace) -> None:
    """Fill defaults that depend on other flags and refuse bad values (``ValueError``)."""
    if args.dataset_name is None and args.train_data_dir is None:
        args.train_data_dir = str(default_finetune_data_dir())
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        raise ValueError(f"--resolution {args.resolution} must be a positive multiple of 8")
    check_data_args(args)
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise ValueError("--text_encoder_lr applies with --train_text_encoder (no text encoder trains)")
    positive = ("train_batch_size", "gradient_accumulation_steps", "num_validation_images", "rank")
    for flag in (*positive, "calibration_batches"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} {getattr(args, flag)} must be > 0")
    for flag in ("validation_steps", "checkpointing_steps", "checkpoints_total_limit", "max_train_steps"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag} {value} must be > 0")
    if args.use_peft and args.shortcut_schedule not in (None, "constant"):
        raise ValueError("--shortcut_schedule applies to ResLoRA; PEFT LoRA (--use_peft) has no shortcuts")
    if args.distill_steps < 0:
        raise ValueError(f"--distill_steps {args.distill_steps} must be >= 0")
    if args.use_8bit_adam:  # before the model loads: a missing package is named at once
        if args.use_fused_adam:
            raise ValueError("--use_8bit_adam and --use_fused_adam are two optimizers; choose one")
        adamw_8bit_class()
    if args.use_peft:
        args.res_type = "none"
    shortcut = get_shortcut(args.res_type, max(args.pre_num, 0))
    if args.shortcut_schedule is None:
        args.shortcut_schedule = DEFAULT_SCHEDULE if shortcut.max_preds else "constant"
    args.shortcut_decay_start = check_schedule(args.shortcut_schedule, args.shortcut_decay_start)
    warn_decay_on_decay(args)
    if shortcut.uses_pre_num and args.pre_num < 1:
        raise ValueError(
            f"--pre_num {args.pre_num} must be >= 1 for --res_type {args.res_type} (--res_type none is plain LoRA)"
        )
    if args.validation_prompt is None and _embedded_data(args):
        args.validation_prompt = finetune_prompts()


#: --lr_scheduler choices that do not lower the rate
CONSTANT_RATES = ("constant", "constant_with_warmup")


def warn_decay_on_decay(args: argparse.Namespace) -> None:
    """Warn when the shortcuts fade (``--shortcut_schedule`` other than constant) while the learning
    rate falls too: the adapters then have little rate left to take over what the shortcuts carried
    (on the shipped UNet base, ``ms``-cosine's file read 15 points below LoRA's with a cosine rate,
    while ``bs`` with constant shortcuts was level; README, When to choose)."""
    if args.shortcut_schedule == "constant" or args.lr_scheduler in CONSTANT_RATES:
        return
    logging.getLogger(logger.name).warning(
        "--shortcut_schedule %s fades the shortcuts while --lr_scheduler %s lowers the rate, so the "
        "adapters have little rate left to take over: on the embedded UNet task this cost 15 points "
        "against LoRA; --res_type bs --shortcut_schedule constant was level with it",
        args.shortcut_schedule,
        args.lr_scheduler,
    )


def check_report_to(args: argparse.Namespace, given: set[str]) -> None:
    """TensorBoard is an extra: ``--report_to tensorboard`` given without it is refused; the
    default falls back to ``none`` with a warning (``train_log.jsonl`` has the loss either way)."""
    if args.report_to != "tensorboard" or importlib.util.find_spec("tensorboard") is not None:
        return
    hint = "pip install 'reslora-diffusers[tensorboard]'"
    if "report_to" in given:
        raise ValueError(
            f"--report_to tensorboard: the tensorboard package is not installed ({hint}); or --report_to none"
        )
    logging.getLogger(logger.name).warning("tensorboard is not installed: no TensorBoard logs (%s)", hint)
    args.report_to = "none"


def check_data_args(args: argparse.Namespace) -> None:
    """Refuse data and cache flags that cannot work together (``ValueError`` naming them)."""
    if args.max_train_samples is not None and args.max_train_samples <= 0:
        raise ValueError(f"--max_train_samples {args.max_train_samples} must be > 0")
    if not 0 <= args.caption_dropout_rate < 1:
        raise ValueError(f"--caption_dropout_rate {args.caption_dropout_rate} must be in [0, 1)")
    if args.center_crop and args.random_crop:
        raise ValueError("--center_crop and --random_crop exclude each other")
    if args.cache_latents and args.random_crop:
        raise ValueError(
            "--cache_latents keeps one crop per image, --random_crop draws a new one every epoch; drop one"
        )
    if args.cache_text_embeddings and args.train_text_encoder:
        raise ValueError(
            "--cache_text_embeddings needs frozen text encoders; --train_text_encoder changes their outputs"
        )
    if args.caption_extension is not None and args.dataset_name is not None:
        raise ValueError("--caption_extension reads caption files beside the images of --train_data_dir")


def _embedded_data(args: argparse.Namespace) -> bool:
    return args.dataset_name is None and Path(args.train_data_dir).resolve() == default_finetune_data_dir()


def _metric_applies(prompts: list[str] | None) -> bool:
    """Prompt accuracy is defined for coloured-shape captions (colour, shape, background)."""
    return bool(prompts) and all(all(parse_prompt(p).values()) for p in prompts)


# ----------------------------------------------------------------------------- models


def load_training_data(args: argparse.Namespace, objective: Objective, resolution: int):
    """``(data, dataset)``: the image-caption rows the flags name and the training dataset over
    them, in its buckets (clips and their frames for a video objective)."""
    if objective.frame_step:
        return load_training_clips(args, objective, resolution)
    data = load_image_captions(
        args.dataset_name,
        args.train_data_dir,
        args.image_column,
        args.caption_column,
        args.max_train_samples,
        args.seed,
        args.revision,
        args.caption_extension,
    )
    dataset = TextImageDataset(
        data,
        objective.tokenizer,
        training_buckets(args, objective, resolution),
        random_crop=args.random_crop,
        random_flip=args.random_flip,
        caption_dropout_rate=args.caption_dropout_rate,
    )
    return data, dataset


def check_frame_args(args: argparse.Namespace, objective: Objective) -> None:
    """``--num_frames`` for video objectives (their default filled in), and the flags clips
    cannot take: ``--dataset_name`` and ``--cache_latents`` (``ValueError`` naming the flag)."""
    if not objective.frame_step:
        if args.num_frames is not None:
            raise ValueError(
                f"--num_frames applies to video pipelines; {objective.family.name} pipelines draw images"
            )
        return
    if args.num_frames is None:
        args.num_frames = objective.default_frames
    check_num_frames(args.num_frames, objective.frame_step)
    if args.dataset_name is not None:
        raise ValueError("--dataset_name: video clips are read from --train_data_dir (README, Wan)")
    if args.cache_latents:
        raise ValueError("--cache_latents keeps image latents; video clips are encoded every step")


def load_training_clips(args: argparse.Namespace, objective: Objective, resolution: int):
    """``(clips, dataset)`` of a video objective: the clips of ``--train_data_dir``, their captions
    and frames (``training/video.py``)."""
    data = load_video_captions(
        args.train_data_dir,
        args.caption_column,
        args.num_frames,
        objective.frame_step,
        args.max_train_samples,
        args.seed,
        args.caption_extension,
    )
    dataset = TextVideoDataset(
        data,
        objective.tokenizer,
        training_buckets(args, objective, resolution),
        args.num_frames,
        objective.frame_step,
        random_crop=args.random_crop,
        random_flip=args.random_flip,
        caption_dropout_rate=args.caption_dropout_rate,
    )
    return data, dataset


def training_buckets(
    args: argparse.Namespace, objective: Objective, resolution: int
) -> list[tuple[int, int]]:
    """``--aspect_ratio_buckets``: given, ``auto``, or one square of ``resolution``."""
    if args.aspect_ratio_buckets is None:
        return [(resolution, resolution)]
    if args.aspect_ratio_buckets.strip() == "auto":
        return auto_buckets(resolution, objective.bucket_step(resolution))
    buckets = parse_buckets(args.aspect_ratio_buckets)
    objective.check_buckets(buckets)
    return buckets


def cache_training_inputs(args: argparse.Namespace, objective: Objective, dataset) -> None:
    """``--cache_latents`` / ``--cache_text_embeddings``: build or reuse the caches (frozen models)."""
    if not (args.cache_latents or args.cache_text_embeddings):
        return
    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir(args.output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--cache_dir {root}: cannot create it ({one_line(err)})") from err
    build_caches(
        dataset,
        objective,
        objective.models,
        root,
        latents=args.cache_latents,
        text=args.cache_text_embeddings,
        batch_size=args.train_batch_size,
    )


#: stands for the default of a flag the command line gave: no value equals it
_GIVEN = object()


def load_models(args: argparse.Namespace, given: set[str] | None = None) -> Objective:
    """The base pipeline's components, all frozen, in the objective of its family (a UNet's DDPM
    denoising, SD3's or Flux's flow matching). ``given`` (:func:`given_flags`): the flags the
    command line named; a flag of another family is refused when given, even at its default
    value (without ``given``: when it differs from its default)."""
    path = Path(args.pretrained_model_name_or_path)
    if path.is_file():
        raise ValueError(
            f"--pretrained_model_name_or_path: {path} is a file; give the diffusers pipeline folder "
            "(the one holding model_index.json) or a hub name"
        )
    if (args.pretrained_model_name_or_path.startswith((".", "/")) or path.exists()) and not path.is_dir():
        raise ValueError(f"--pretrained_model_name_or_path: {path} does not exist")
    defaults = vars(parse_args([]))
    if given is not None:
        defaults = {flag: _GIVEN if flag in given else value for flag, value in defaults.items()}
    return load_objective(args, defaults)


def check_target_modules(denoiser, targets: list[str] | None, title: str) -> None:
    """Every target must name at least one linear or convolution layer of the denoiser."""
    layers = [n for n, m in denoiser.named_modules() if layer_class_for(m) is not None]
    for target in targets or []:
        if not any(matches_target(n, [target]) for n in layers):
            raise ValueError(
                f"--target_modules: {target!r} names no linear or convolution layer of the {title} "
                f"(e.g. {layers[0]})"
            )


def add_adapters(
    args: argparse.Namespace, trained: dict, objective: Objective
) -> dict[str, list[torch.nn.Parameter]]:
    """ResLoRA (or PEFT LoRA) on the denoiser and, with ``--train_text_encoder``, the text
    encoder(s) (``trained``, denoiser first); returns each model's trainable parameters (float32)."""
    denoiser = trained[objective.denoiser]
    check_target_modules(denoiser, args.target_modules, objective.denoiser_title)
    if args.use_peft:
        params = add_peft_lora(
            trained,
            objective.denoiser,
            args.rank,
            args.lora_alpha or args.rank,
            args.lora_dropout,
            args.target_modules,
        )
    else:
        config = reslora_config(args)
        for model in trained.values():
            add_reslora(model, config if model is denoiser else replace(config, target_modules=None))
        params = {name: trainable_parameters(model) for name, model in trained.items()}
    for param in (p for group in params.values() for p in group):
        param.data = param.data.float()
    return params


def param_groups(args: argparse.Namespace, params: dict[str, list], denoiser: str) -> list[dict]:
    """The optimizer's parameter groups: the denoiser's adapters at ``--learning_rate``, the text
    encoders' at ``--text_encoder_lr`` (when given; one group otherwise)."""
    text = [p for name, group in params.items() if name != denoiser for p in group]
    if args.text_encoder_lr is None or not text:
        return [{"params": [p for group in params.values() for p in group]}]
    return [{"params": params[denoiser]}, {"params": text, "lr": args.text_encoder_lr}]


def register_checkpoint_hooks(accelerator: Accelerator, components: dict, use_peft: bool) -> None:
    """Checkpoints hold the adapter weights instead of whole models (accelerate keeps the
    optimizer, scheduler and RNG states): the ResLoRA checkpoint, or with ``--use_peft`` the
    PEFT LoRA layers (``RunFolder.PEFT_CHECKPOINT``)."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            unwrapped = _unwrapped(accelerator, components)
            if use_peft:
                save_peft_layers(unwrapped, Path(output_dir) / RunFolder.PEFT_CHECKPOINT)
            else:
                save_reslora_checkpoint(unwrapped, Path(output_dir) / RunFolder.CHECKPOINT)
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()
        unwrapped = _unwrapped(accelerator, components)
        if use_peft:
            load_peft_layers(unwrapped, Path(input_dir) / RunFolder.PEFT_CHECKPOINT)
        else:
            load_reslora_checkpoint(unwrapped, Path(input_dir) / RunFolder.CHECKPOINT)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _uncompiled(run: Run, name: str) -> torch.nn.Module:
    """The model itself: without accelerate's wrappers and without torch.compile's."""
    return run.accelerator.unwrap_model(run.models[name], keep_torch_compile=False)


def _unwrapped(accelerator: Accelerator, components: dict) -> dict:
    return {name: accelerator.unwrap_model(model) for name, model in components.items()}


# ----------------------------------------------------------------------------- training step


@dataclass
class Run:
    """What the loop, validation and export of one training run share."""

    args: argparse.Namespace
    accelerator: Accelerator
    #: the pipeline's models ("unet" or "transformer", text encoders, "vae"); the trained ones as
    #: ``accelerator.prepare`` returned them
    models: dict
    #: the family's loss, prompt encoding and merge-report inputs
    objective: Objective
    weight_dtype: torch.dtype
    resolution: int
    #: ``train_log.jsonl``, on the main process only
    log: TrainLog | None
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: object
    sampler: BucketBatchSampler
    #: follows the CPUs other processes leave free (``--cpu_threads auto`` on CPU), else None
    cpu_threads: FreeCpuThreads | None = None

    def trained(self) -> list[torch.nn.Module]:
        return [self.models[name] for name in self.objective.trained_names(self.args.train_text_encoder)]


def training_loss(run: Run, batch: dict) -> torch.Tensor:
    """The loss of one batch: the UNet's denoising loss (min-SNR weighted when ``--snr_gamma`` > 0)
    or the transformer's flow-matching loss (weighted by ``--weighting_scheme``)."""
    return run.objective.loss(run.models, batch, run.weight_dtype)


# ----------------------------------------------------------------------------- validation


def build_pipeline(args, weight_dtype, **components):
    """The base pipeline with the given (trained) components swapped in."""
    from diffusers import DiffusionPipeline

    # float32 is the default: naming it anyway makes diffusers warn that torch_dtype is deprecated
    dtype = {} if weight_dtype == torch.float32 else {"torch_dtype": weight_dtype}
    with loading_pipeline():
        pipe = DiffusionPipeline.from_pretrained(
            args.pretrained_model_name_or_path,
            revision=args.revision,
            variant=args.variant,
            **pipeline_kwargs(args.pretrained_model_name_or_path, args.revision),
            **dtype,
            **components,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_validation(args, pipe, step: int, name: str, resolution: int) -> dict:
    """Generate ``--num_validation_images`` seeds x the prompts, save the grid, score it."""
    prompts = args.validation_prompt
    seeds = list(range(args.num_validation_images))
    # a video family's frame count: its videos show as their first, middle and last frame
    extra = pipeline_family(pipe).generation_kwargs()
    # minutes on a loaded CPU: a bar over the denoising steps shows it is moving
    bar = tqdm(
        total=len(seeds) * BASE_NUM_INFERENCE_STEPS, desc=f"validation {name}", unit="step", leave=False
    )
    with torch.random.fork_rng(), torch.no_grad(), bar:
        images = []
        for seed in seeds:
            images += generate(
                pipe,
                prompts,
                [seed] * len(prompts),
                BASE_NUM_INFERENCE_STEPS,
                BASE_GUIDANCE_SCALE,
                resolution,
                resolution,
                progress=bar,
                **extra,
            )
    grid_path = RunFolder(args.output_dir).grid(name)
    with atomic_path(grid_path) as tmp:  # a full disk is one line naming the grid
        labelled_grid(images, [f"seed {seed}" for seed in seeds], prompts).save(tmp, format="PNG")
    record = {"step": step, "validation_grid": grid_path.relative_to(args.output_dir).as_posix()}
    if _metric_applies(prompts) and not extra:  # the metric reads images, not frame strips
        # the open-set shape call, and the nearest-template reading for comparison
        record.update(prompt_accuracies(images, prompts * len(seeds)))
    record["images"] = images
    return record


def validate_during_training(run: Run, step: int) -> dict:
    """Validation with the ResLoRA model as it trains (main process; eval mode meanwhile)."""
    parts = {name: _uncompiled(run, name) for name in run.models}
    for model in run.trained():
        model.eval()
    pipe = build_pipeline(run.args, run.weight_dtype, **parts)
    record = run_validation(run.args, pipe, step, f"step-{step:06d}", run.resolution)
    for model in run.trained():
        model.train()
    images = record.pop("images")
    _log_validation(run.accelerator, record, images, step, run.log)
    return record


def _log_validation(accelerator, record: dict, images: list[Image.Image], step: int, log: TrainLog) -> None:
    if "prompt_accuracy" in record:
        accuracies = {k: record[k] for k in ("prompt_accuracy", "prompt_accuracy_lenient")}
        accelerator.log({f"validation/{k}": v for k, v in accuracies.items()}, step=step)
        logger.info(
            "step %d: prompt accuracy %.1f%% (nearest-template reading: %.1f%%)",
            step,
            100 * accuracies["prompt_accuracy"],
            100 * accuracies["prompt_accuracy_lenient"],
        )
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(
                "validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC"
            )
    log.write({"kind": "validation", **record})


# ----------------------------------------------------------------------------- export


def export(args, components: dict, inputs: dict, pipeline_class) -> dict | None:
    """Write the LoRA files of the trained ``{component: model}``; ResLoRA: its checkpoint, the
    merged export and the merge report. ``--use_peft``: ``pipeline_class.save_lora_weights``."""
    folder = RunFolder(args.output_dir)
    if args.use_peft:
        export_peft_lora(folder, components, pipeline_class)
        return None
    from reslora_diffusers.export import export_lora

    save_reslora_checkpoint(components, folder.checkpoint_file)
    return export_lora(
        folder.path,
        **components,
        merge=args.merge,
        calibration={k: v for k, v in inputs["calibration"].items() if k in components},
        eval_inputs={k: v for k, v in inputs["held_out"].items() if k in components},
        metadata={"reslora_base_model": str(args.pretrained_model_name_or_path)},
        chain_report=not args.no_chain_report,
        distill_steps=args.distill_steps,
    )


def final_evaluation(args, weight_dtype, resolution: int, log: TrainLog, step: int) -> dict:
    """The base pipeline with the exported LoRA loaded by ``load_lora_weights``: the final grid
    and metric are what a user of the files gets."""
    from reslora_diffusers.export.loading import load_lora_file

    pipe = build_pipeline(args, weight_dtype)
    load_lora_file(pipe, args.output_dir)
    record = run_validation(args, pipe, step, "final", resolution)
    record.pop("images")
    log.write({"kind": "final", **record})
    return record


# ----------------------------------------------------------------------------- main loop


def train(args: argparse.Namespace, argv: list[str]) -> dict:
    """Train, checkpoint, validate and export; returns the summary printed at the end."""
    check_args(args)
    check_report_to(args, given_flags(argv))
    check_output_dir(args)  # before anything slow is loaded
    accelerator = make_accelerator(args)
    # one run per folder: a second run started into it is refused while this one writes there
    with hold_output_dir(args, accelerator.is_main_process):
        return train_in_output_dir(args, argv, accelerator)


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """accelerate's state for the run (its processes, device and mixed precision) and the logging."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None:
        raise ValueError(
            f"--mixed_precision fp16 needs loss scaling, which accelerate offers on CUDA, not on "
            f"{accelerator.device.type}; use --mixed_precision bf16"
        )
    configure_logging()
    logger.info(
        "process %d of %d on %s, mixed precision %s",
        accelerator.process_index,
        accelerator.num_processes,
        accelerator.device,
        accelerator.mixed_precision,
        main_process_only=False,
    )
    return accelerator


def train_in_output_dir(args: argparse.Namespace, argv: list[str], accelerator: Accelerator) -> dict:
    """:func:`train` once the main process holds ``--output_dir`` (prepared for the run)."""
    output_dir = Path(args.output_dir)
    if args.allow_tf32:
        allow_tf32()
    set_seed(args.seed)  # the same adapter initialisation on every process

    with loading_pipeline():
        objective = load_models(args, given_flags(argv))
    resolution = args.resolution or objective.default_resolution()
    objective.check_resolution(resolution)
    check_frame_args(args, objective)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    # no dtype for float32, the dtype they load in: diffusers warns at every .to(dtype=...)
    cast = {} if weight_dtype == torch.float32 else {"dtype": weight_dtype}
    for model in objective.models.values():
        model.to(accelerator.device, **cast)
    trained = {name: objective.models[name] for name in objective.trained_names(args.train_text_encoder)}
    params_by_model = add_adapters(args, trained, objective)
    params = [p for group in params_by_model.values() for p in group]
    if args.gradient_checkpointing:
        for name, model in trained.items():
            if name == objective.denoiser:
                model.enable_gradient_checkpointing()
            else:  # transformers 5 renamed it (the old name warns)
                getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()

    with accelerator.main_process_first():
        data, dataset = load_training_data(args, objective, resolution)
        describe = describe_clips if objective.frame_step else describe_buckets
        for line in describe(dataset):  # one line per bucket, one for the skipped images
            logger.info(line)
        cache_training_inputs(args, objective, dataset)
    sampler = BucketBatchSampler(dataset.bucket_of, args.train_batch_size, args.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=args.dataloader_num_workers,
        generator=torch.Generator().manual_seed(args.seed),
    )

    if args.scale_lr:
        scale = args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        args.learning_rate *= scale
        if args.text_encoder_lr is not None:
            args.text_encoder_lr *= scale
    optimizer = make_adamw(
        param_groups(args, params_by_model, objective.denoiser),
        args.use_fused_adam,
        accelerator.device,
        use_8bit=args.use_8bit_adam,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    steps_per_epoch = math.ceil(
        math.ceil(len(dataloader) / accelerator.num_processes) / args.gradient_accumulation_steps
    )
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    lr_scheduler = make_lr_scheduler(args, optimizer, accelerator.num_processes)

    register_checkpoint_hooks(accelerator, trained, args.use_peft)
    prepared = accelerator.prepare(*trained.values(), optimizer, dataloader, lr_scheduler)
    trained = dict(zip(trained, prepared[: len(trained)]))
    if args.gradient_checkpointing:
        # a checkpointed tracing pass would keep is's inputs for its step: trace without gradients
        for model in trained.values():
            trace_chains(accelerator.unwrap_model(model))
    if args.torch_compile:  # validation, checkpoints and the export use the uncompiled module
        denoiser = objective.denoiser
        trace_chains(accelerator.unwrap_model(trained[denoiser]))
        trained[denoiser] = compile_model(trained[denoiser], args.compile_mode, args.compile_backend)
    optimizer, dataloader, lr_scheduler = prepared[len(trained) :]
    models = {**objective.models, **trained}

    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-reslora", config=_hparams(args))
    global_step = resume(args, accelerator, objective.denoiser)
    if global_step == 0:
        set_seed(args.seed, device_specific=True)  # noise differs per process; a resume restores RNG states
    log = RunFolder(output_dir).open_log(global_step) if accelerator.is_main_process else None
    validating = accelerator.is_main_process and bool(args.validation_prompt)
    run = Run(
        args,
        accelerator,
        models,
        objective,
        weight_dtype,
        resolution,
        log,
        params,
        optimizer,
        lr_scheduler,
        dataloader,
        sampler,
        cpu_threads_for_run(args.cpu_threads, accelerator.device),
    )

    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running training *****")
    logger.info(
        "  examples = %d (%d corrupt skipped), epochs = %d, total batch = %d, steps = %d",
        len(dataset),
        data.skipped,
        args.num_train_epochs,
        total_batch,
        args.max_train_steps,
    )
    if validating and global_step == 0:
        validate_during_training(run, 0)

    if global_step < args.max_train_steps:  # a checkpoint of the last step is exported as it is
        run_training(run, global_step, steps_per_epoch)

    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        summary = finish(run, argv, dataset, data, validating)
    accelerator.end_training()
    return summary


def configure_logging() -> None:
    """The console shows progress, results and problems: INFO of this script and the package,
    accelerate's from WARNING up (it logs every file of every checkpoint at INFO; the script
    logs the checkpoint once)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def make_lr_scheduler(args, optimizer, num_processes: int):
    """diffusers' schedules; accelerate steps a prepared scheduler once per process."""
    from diffusers.optimization import get_scheduler

    try:
        return get_scheduler(
            args.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=args.lr_warmup_steps * num_processes,
            num_training_steps=args.max_train_steps * num_processes,
        )
    except ValueError as err:
        raise ValueError(f"--lr_scheduler: {one_line(err)}") from err


def _hparams(args: argparse.Namespace) -> dict:
    """TensorBoard takes scalars and strings only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}


def resume(args, accelerator: Accelerator, denoiser: str) -> int:
    """Load ``--resume_from_checkpoint`` if given; the global step to continue from (refused
    past ``--max_train_steps``)."""
    path = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if path is None:
        return 0
    weights = RunFolder.PEFT_CHECKPOINT if args.use_peft else RunFolder.CHECKPOINT
    check_resume_identity(path, run_identity(args), None if args.use_peft else path / weights, denoiser)
    step = check_resume_step(path, args.max_train_steps)
    check_checkpoint_files(path, weights, accelerator.process_index, args.allow_partial_resume)
    logger.info("resuming from %s", path)
    accelerator.load_state(str(path))
    return step


def run_training(run: Run, global_step: int, steps_per_epoch: int) -> None:
    """The loop: accumulate, clip, step; log, checkpoint and validate on the way."""
    args, accelerator, log = run.args, run.accelerator, run.log
    optimizer, lr_scheduler = run.optimizer, run.lr_scheduler
    trained = run.trained()
    first_epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="Steps",
        disable=not accelerator.is_local_main_process,
    )
    start = time.time() - (max((r.get("time", 0.0) for r in log.records), default=0.0) if log else 0.0)
    for model in trained:
        model.train()
    for epoch in range(first_epoch, args.num_train_epochs):
        run.sampler.start_epoch(epoch)
        loader = run.dataloader
        if epoch == first_epoch and skip_batches:
            loader = accelerator.skip_first_batches(run.dataloader, skip_batches)
        train_loss = 0.0
        for batch in loader:
            apply_shortcut_schedule(run, global_step + 1)
            with accelerator.accumulate(*trained):
                loss = training_loss(run, batch)
                avg = accelerator.gather(loss.detach().repeat(args.train_batch_size)).mean()
                train_loss += avg.item() / args.gradient_accumulation_steps
                if not math.isfinite(train_loss):  # every process sees the gathered loss
                    raise ValueError(_diverged(args, global_step + 1, f"the training loss is {train_loss}"))
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(run.params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            if run.cpu_threads is not None:
                run.cpu_threads.update()
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"train_loss": train_loss, "lr": lr}, step=global_step)
            if log:
                log.write(
                    {"step": global_step, "loss": train_loss, "lr": lr, "time": round(time.time() - start, 3)}
                )
            train_loss = 0.0
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                if not all(bool(torch.isfinite(p).all()) for p in run.params):  # never checkpoint NaN
                    raise ValueError(_diverged(args, global_step, "the trained weights are not finite"))
                save_checkpoint(
                    accelerator,
                    args.output_dir,
                    global_step,
                    args.checkpoints_total_limit,
                    run_identity(args),
                    checkpoint_bytes(run.params),
                )
            if (
                log
                and args.validation_prompt
                and args.validation_steps
                and global_step % args.validation_steps == 0
                and global_step < args.max_train_steps
            ):
                validate_during_training(run, global_step)
            if global_step >= args.max_train_steps:
                break
        if global_step >= args.max_train_steps:
            break
    progress.close()


def checkpoint_bytes(params: list[torch.nn.Parameter]) -> int:
    """A little more than a checkpoint folder takes: the adapter weights (with their norm
    windows, measured at 1.2x the weights) and AdamW's two moments (2x), all float32, and
    256 KiB for the scheduler, the RNG states and the file headers."""
    return 4 * sum(p.numel() * p.element_size() for p in params) + (1 << 18)


def apply_shortcut_schedule(run: Run, step: int) -> None:
    """Set the trained models' shortcut scale for training step ``step`` (1-based), from
    ``--shortcut_schedule`` (:func:`~reslora_diffusers.core.schedule.shortcut_scale_at`)."""
    args = run.args
    if args.use_peft or args.shortcut_schedule == "constant":
        return
    scale = shortcut_scale_at(step, args.max_train_steps, args.shortcut_schedule, args.shortcut_decay_start)
    for model in run.trained():
        set_shortcut_scale(run.accelerator.unwrap_model(model, keep_torch_compile=False), scale)


def _diverged(args, step: int, what: str) -> str:
    """The error of a run that stops at NaN or infinite values, with the checkpoint to go back to."""
    saved = list_checkpoints(args.output_dir)
    last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was saved"
    return f"step {step}: {what}; training stopped ({last}); try a lower --learning_rate or --max_grad_norm 1"


def finish(run: Run, argv: list[str], dataset, data, validating: bool) -> dict:
    """Export the LoRA files, evaluate them as a user would load them, write the model card."""
    args, log, objective = run.args, run.log, run.objective
    models = {name: _uncompiled(run, name) for name in run.models}
    trained = {name: models[name] for name in objective.trained_names(args.train_text_encoder)}
    for model in models.values():
        model.eval()
    inputs = {}
    if not args.use_peft:
        # real inputs of the trained components: noisy latents and captions of the training data
        size = args.train_batch_size
        inputs = {
            "calibration": real_inputs(
                objective, models, dataset, size, args.seed + 1, args.calibration_batches
            ),
            "held_out": real_inputs(objective, models, dataset, size, args.seed + 2, num=1),
        }
    report = export(args, trained, inputs, objective.pipeline_class)
    step = args.max_train_steps
    summary = {
        "output_dir": str(args.output_dir),
        "steps": step,
        "final_loss": next((r["loss"] for r in reversed(log.records) if "loss" in r), None),
    }
    if report:
        summary["merge_error"] = {k: v["output_error"] for k, v in report["components"].items()}
    grid, before, after, images = None, None, None, 0
    if validating:
        final = final_evaluation(args, run.weight_dtype, run.resolution, log, step)
        grid = Path(args.output_dir) / final["validation_grid"]
        before, after = log.accuracy_at(0), final.get("prompt_accuracy")
        images = len(args.validation_prompt) * args.num_validation_images
    summary.update(prompt_accuracy_before=before, prompt_accuracy_after=after)
    origin = "the embedded fine-tuning set" if _embedded_data(args) else data.origin
    data_text = f"{origin}, {len(dataset)} images" + (
        f" ({data.skipped} corrupt skipped)" if data.skipped else ""
    )
    write_model_card(
        Path(args.output_dir),
        args,
        argv,
        data_text,
        run.accelerator.num_processes,
        report,
        (before, after, images),
        grid,
        denoiser=objective.denoiser_title,
        formats=objective.family.formats,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        summary = train(args, argv)
    except (ValueError, FileNotFoundError, DiskFullError) as err:
        sys.exit(f"train_text_to_image.py: error: {one_line(err)}")
    except OSError as err:  # a full disk in a write that has no check of its own (a few bytes)
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        sys.exit(f"train_text_to_image.py: error: {err.filename or args.output_dir}: {err.strerror}")
    if summary:
        if summary.get("prompt_accuracy_after") is not None:
            before = summary["prompt_accuracy_before"]
            print(
                f"prompt accuracy before: {'n/a' if before is None else f'{before:.1%}'}"
                f"  after: {summary['prompt_accuracy_after']:.1%}"
            )
        print(json.dumps(summary))


if __name__ == "__main__":
    main()

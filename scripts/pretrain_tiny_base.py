"""Pretrain the embedded tiny text-to-image base on the procedural coloured-shape set.

Stages, all from one seed: write the base set (imagefolder) and load it with
``datasets``; train the VAE; encode the set once; train the UNet and the text encoder
jointly (v-prediction, min-SNR weighting, 10 % caption dropout for classifier-free
guidance, colour/background phrases dropped now and then, EMA weights); save a ``StableDiffusionPipeline`` folder (safetensors) with our
tokenizer files; evaluate it with the prompt metric and write the model card.

    nice -n 10 .venv/bin/python scripts/pretrain_tiny_base.py --threads 1

The default output is the committed folder ``reslora_diffusers/assets/tiny-sd``; the defaults
alone make the base shipped until 2026-12-07, the README gives the four commands of the shipped
one (``--vae-steps 6000 --extra-colors 3``, extended twice with ``--extend``). All
randomness of a training step is drawn from (seed, step), so the UNet stage resumes
exactly from its last checkpoint: with ``--max-minutes`` it stops early and the same
command continues it. ``--stage vae`` / ``--stage unet`` run one stage at a time.

``--family sd3`` makes the diffusion-transformer sibling (``reslora_diffusers.data.tiny_sd3``,
default output ``reslora_diffusers/assets/tiny-sd3``) through the same stages: the VAE stage
takes the tiny base's trained VAE (``--init-from``) instead of training one, the latents get
SD3's ``(z - shift_factor) * scaling_factor`` normalisation, and the denoiser stage trains the
``SD3Transformer2DModel`` with its two CLIP encoders (the first starts from the tiny base's
text encoder; all three read its vocabulary, with the colours it was pretrained with) and its
T5 encoder by rectified flow, the objective of
``reslora_diffusers.objectives.flow_matching`` (logit-normal sigmas, SD3's default), with the
same caption dropout, EMA, checkpoints and resume. ``--patch-size``, ``--transformer-width`` and
``--transformer-depth`` shape its transformer; ``--no-t5`` trains it without T5, on the pipeline's 256 zero states
folded into one token (exact, and about a quarter of the step), and saves a T5 of zero weights
in its place so that the folder loads as any SD3 folder. ``--device cuda`` trains on a GPU; the
random draws stay on the CPU, so a run may continue on another device. ``--compile`` runs the
training steps through ``torch.compile`` (about 1.4x faster on CPU); it is not a resume key.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from reslora_diffusers.data import (
    BASE_ACCURACY_BAR,
    BASE_GUIDANCE_SCALE,
    BASE_NUM_INFERENCE_STEPS,
    BASE_RESOLUTION,
    COLORS,
    EXTRA_COLORS,
    FINETUNE_SHAPE,
    HELDOUT_COMBOS,
    LATENT_CHANNELS,
    SD3_NUM_LAYERS,
    SD3_PATCH_SIZE,
    SD3_WIDTH,
    UNET_CHANNELS,
    UNET_NORM_GROUPS,
    VAE_SCALE_FACTOR,
    VOCAB_WORDS,
    added_colors_of,
    build_pipeline,
    build_sd3_pipeline,
    build_silent_t5_encoder,
    default_base_model_path,
    default_dit_base_path,
    extra_colors,
    finetune_prompts,
    heldout_base_prompts,
    make_base_set,
    make_finetune_set,
    seen_base_prompts,
    vocabulary_words,
    write_tokenizer,
)
from reslora_diffusers.eval import (
    EVAL_SEEDS,
    evaluate_pipeline,
    parse_prompt,
    prompt_accuracy,
    wilson_interval,
)
from reslora_diffusers.frontends import (
    SD3_PIPELINES,
    SD_PIPELINES,
    FoldedPaddingAttnProcessor,
    PipelineFamily,
    fold_t5_padding,
    gives_zero_t5_states,
)
from reslora_diffusers.objectives import (
    denoising_loss,
    denoising_target,
    flow_matching_loss,
    noisy_latents,
    sample_sigmas,
    sample_u,
    t5_sequence_length,
)
from reslora_diffusers.utils.errors import one_line
from reslora_diffusers.utils.io import TEMP_SUFFIX

logger = logging.getLogger("pretrain_tiny_base")
#: Arguments a resumed denoiser run of either family must share with the run that wrote the checkpoint.
_COMMON_RESUME_KEYS = (
    "seed",
    "num_images",
    "batch_size",
    "caption_dropout",
    "attribute_dropout",
    "ema_decay",
)
#: SD3's default density of the flow-matching sigmas (``train_text_to_image.py`` trains SD3 with it too).
SD3_WEIGHTING = SD3_PIPELINES.objective.default_weighting


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family",
        choices=("unet", "sd3"),
        default="unet",
        help="unet: the StableDiffusionPipeline base; sd3: the StableDiffusion3Pipeline (DiT) base",
    )
    parser.add_argument(
        "--output-dir", type=Path, help="default: reslora_diffusers/assets/tiny-sd (sd3: tiny-sd3)"
    )
    parser.add_argument(
        "--work-dir", type=Path, help="default: outputs/pretrain_tiny_base (sd3: outputs/pretrain_tiny_sd3)"
    )
    parser.add_argument(
        "--stage",
        choices=("all", "vae", "denoiser", "unet"),
        default="all",
        help="one stage only; unet: the UNet family's name of the denoiser stage",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument(
        "--latent-channels",
        type=int,
        help=f"channels of the VAE's latents and of the denoiser's input and output (default: "
        f"{LATENT_CHANNELS}; the sd3 family: those of --init-from's VAE, which it takes)",
    )
    parser.add_argument(
        "--unet-channels",
        type=int,
        nargs=2,
        default=list(UNET_CHANNELS),
        metavar=("LEVEL1", "LEVEL2"),
        help=f"the UNet's widths at its two levels, multiples of {UNET_NORM_GROUPS} (default: "
        f"{UNET_CHANNELS[0]} {UNET_CHANNELS[1]})",
    )
    parser.add_argument(
        "--vae-scale-factor",
        type=int,
        choices=(1, 2),
        default=VAE_SCALE_FACTOR,
        help=f"how much the VAE downsamples (default {VAE_SCALE_FACTOR}: 16 x 16 latents); 1 trains a "
        "one-level VAE with 32 x 32 latents and a UNet with a full-resolution level (UNet family only)",
    )
    parser.add_argument(
        "--patch-size",
        type=int,
        choices=(1, 2),
        default=SD3_PATCH_SIZE,
        help=f"sd3: the side of the transformer's patches in latent pixels (default {SD3_PATCH_SIZE}: "
        "64 image tokens; 1: 256, each token a 2 x 2 pixel area of the image)",
    )
    parser.add_argument(
        "--transformer-width",
        type=int,
        choices=(SD3_WIDTH, 2 * SD3_WIDTH),
        default=SD3_WIDTH,
        help=f"sd3: the transformer's width, in heads of 32 (default {SD3_WIDTH}; {2 * SD3_WIDTH} has about "
        "4x the parameters)",
    )
    parser.add_argument(
        "--transformer-depth",
        type=int,
        default=SD3_NUM_LAYERS,
        help=f"sd3: the transformer's joint blocks (default {SD3_NUM_LAYERS}); the chain ResLoRA's "
        "shortcuts run along is this long",
    )
    parser.add_argument(
        "--no-t5",
        action="store_true",
        help="sd3: a base without the T5 encoder (text_encoder_3), as SD3 can run: the pipeline pads "
        "the CLIP states with 256 zero states, which training folds into one token (exactly: "
        "reslora_diffusers.frontends.sd3.FoldedPaddingAttnProcessor), so a step costs about a quarter",
    )
    parser.add_argument(
        "--extra-colors",
        type=int,
        choices=range(len(EXTRA_COLORS) + 1),
        metavar="N",
        help=f"add the first N of the pretraining-only shape colours ({', '.join(EXTRA_COLORS)}) on "
        "every shape to the base set and the vocabulary, so that each colour word is learnt apart "
        "from the shapes it is drawn as; the evaluation reads the base colours only (default: 0; "
        "the sd3 family: the colours --init-from's tokenizer knows, which it must)",
    )
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--unet-lr", type=float, default=1e-3)
    parser.add_argument("--snr-gamma", type=float, default=5.0)
    parser.add_argument(
        "--caption-dropout", type=float, default=0.1, help="empty-caption rate (for guidance)"
    )
    parser.add_argument(
        "--attribute-dropout",
        type=float,
        default=0.15,
        help="rate at which the colour word, and separately the background phrase, is left out of a caption",
    )
    parser.add_argument(
        "--transformer-steps",
        type=int,
        default=10000,
        help="sd3: transformer training steps (the shipped base's run)",
    )
    parser.add_argument("--transformer-lr", type=float, default=5e-4)
    parser.add_argument(
        "--init-from",
        type=Path,
        default=default_base_model_path(),
        help="sd3: the StableDiffusionPipeline folder whose VAE and text encoder it starts from",
    )
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument(
        "--checkpoint-every", type=int, default=250, help="denoiser steps between checkpoints"
    )
    parser.add_argument(
        "--max-minutes", type=float, help="stop the denoiser stage (checkpointed) after this long"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="every this many denoiser steps, read the EMA model's held-out prompts (one seed) into "
        "<work-dir>/eval_log.jsonl: does the run still learn? (0: off)",
    )
    parser.add_argument(
        "--extend",
        action="store_true",
        help="continue a finished (or stopped) denoiser checkpoint of the same settings to more "
        "--unet-steps/--transformer-steps; the cosine schedule is recomputed over the new total from "
        "the step reached (a warm restart), and the model card says so",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the denoiser (and the sd3 family's T5 encoder) for the training steps "
        "(an sd3 step on 2 CPU threads: 0.86 s eager, 0.60 s compiled, after about 75 s of compiling)",
    )
    parser.add_argument(
        "--device", default="cpu", help="where the denoiser stage trains (cpu, cuda, cuda:1...)"
    )
    # a short evaluation, for smoke tests of the whole script
    parser.add_argument("--eval-seeds", type=int, default=len(EVAL_SEEDS), help=argparse.SUPPRESS)
    parser.add_argument("--eval-steps", type=int, default=BASE_NUM_INFERENCE_STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(width <= 0 or width % UNET_NORM_GROUPS for width in args.unet_channels):
        parser.error(
            f"--unet-channels {args.unet_channels}: each width must be a positive multiple of {UNET_NORM_GROUPS}"
        )
    # the sd3 family takes --init-from's VAE and builds its own DiT: these would do nothing there
    unet_flags = {
        "--unet-channels": args.unet_channels != list(UNET_CHANNELS),
        "--vae-scale-factor": args.vae_scale_factor != VAE_SCALE_FACTOR,
    }
    if args.family == "sd3" and (given := [flag for flag, changed in unet_flags.items() if changed]):
        parser.error(f"{', '.join(given)}: the UNet family's only (--family sd3 takes --init-from's VAE)")
    sd3_flags = {
        "--patch-size": args.patch_size != SD3_PATCH_SIZE,
        "--transformer-width": args.transformer_width != SD3_WIDTH,
        "--transformer-depth": args.transformer_depth != SD3_NUM_LAYERS,
        "--no-t5": args.no_t5,
    }
    if args.family == "unet" and (given := [flag for flag, changed in sd3_flags.items() if changed]):
        parser.error(f"{', '.join(given)}: the sd3 family's only (the UNet base has no transformer)")
    if args.transformer_depth < 1:
        parser.error(f"--transformer-depth {args.transformer_depth}: a transformer needs at least one block")
    if args.extra_colors is None:
        args.extra_colors = len(init_from_added_colors(args.init_from)) if args.family == "sd3" else 0
    # the added colours' names, which the set, the vocabulary, the captions and the card share
    args.added_colors = extra_colors(args.extra_colors)
    base = BASES[args.family]
    args.output_dir = args.output_dir or base.default_output
    args.work_dir = args.work_dir or base.default_work_dir
    return args


def load_images(data_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """An imagefolder set as a (N, 3, H, W) tensor in [-1, 1] and its captions."""
    dataset = load_dataset("imagefolder", data_dir=str(data_dir), split="train")
    pixels = np.stack([np.asarray(image.convert("RGB")) for image in dataset["image"]])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return images, list(dataset["text"])


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10 % (a LambdaLR factor)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random source of one training step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def batch_indices(num_items: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Items of batch ``step`` when every epoch visits all items in a fresh (seed, epoch) order."""
    epoch, offset = divmod(step * batch_size, num_items)
    parts, missing = [], batch_size
    while missing:
        order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        parts.append(order[offset : offset + missing])
        missing -= len(parts[-1])
        epoch, offset = epoch + 1, 0
    return torch.cat(parts)


def train_vae(vae, images: torch.Tensor, args: argparse.Namespace) -> dict:
    """Reconstruction (MSE) + ``kl_weight`` * KL training; returns the final losses."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_lr(s, args.vae_steps))
    vae.train()
    progress = tqdm(range(args.vae_steps), desc="vae")
    for step in progress:
        batch = images[batch_indices(len(images), args.batch_size, args.seed, step)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=step_generator(args.seed, step))).sample
        mse = F.mse_loss(reconstruction, batch)
        kl = posterior.kl().mean()
        (mse + args.kl_weight * kl).backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(mse=f"{mse.item():.5f}", kl=f"{kl.item():.0f}")
    vae.eval()
    return {"vae_mse": mse.item(), "vae_kl": kl.item()}


@torch.no_grad()
def encode(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of all images."""
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        posterior = vae.encode(images[start : start + batch_size]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_accuracy(vae, data_dir: Path, limit: int | None = None) -> float:
    """Prompt accuracy of VAE reconstructions of (the first ``limit`` images of) a set: can the VAE draw it?"""
    images, captions = load_images(data_dir)
    # the analyser names the base colours only: images of --extra-colors are left out
    kept = [i for i, text in enumerate(captions) if parse_prompt(text)["color"] is not None][:limit]
    images, captions = images[kept], [captions[i] for i in kept]
    decoded = vae.decode(vae.encode(images.to(vae.device)).latent_dist.mean).sample
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return prompt_accuracy([Image.fromarray(p) for p in pixels], captions)


class EMA:
    """Exponential moving average of parameters, with the usual (1 + n) / (10 + n) warm-up."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        self.parameters = parameters
        self.shadow = [p.detach().clone() for p in parameters]
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, param in zip(self.shadow, self.parameters, strict=True):
            shadow.lerp_(param, 1.0 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for shadow, param in zip(self.shadow, self.parameters, strict=True):
            param.copy_(shadow)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the ``with`` block, the trained ones after it."""
        trained = [p.detach().clone() for p in self.parameters]
        self.copy_to_model()
        try:
            yield
        finally:
            with torch.no_grad():
                for param, saved in zip(self.parameters, trained, strict=True):
                    param.copy_(saved)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.updates = state["shadow"], state["updates"]


class DenoiserTrainer(ABC):
    """Joint denoiser + text-encoder training on pre-encoded latents, checkpointed and resumable.

    Subclasses name the trained components and write the loss of a step; every random draw of
    step ``n`` comes from (seed, n) on the CPU, so a resumed run repeats an uninterrupted one.
    """

    #: the pipeline family: its denoiser component (also the checkpoint's and the progress bar's
    #: name) trains with every text encoder its prompts go through
    family: PipelineFamily
    #: the flags of the step count and learning rate
    steps_flag = lr_flag = ""
    #: further flags that define the run (checked on resume)
    resume_flags: tuple[str, ...] = ()
    #: the text encoders ``--compile`` compiles too. Not the CLIP encoders: transformers' CLIP
    #: breaks the graph at its output-capturing hooks and ran slower compiled (sd3 step on 2
    #: threads: 0.60 s with the transformer and T5 compiled, 0.76 s with the CLIPs as well)
    compiled_text_encoders: tuple[str, ...] = ()

    def __init__(self, pipe, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], args):
        self.pipe, self.captions, self.args = pipe, captions, args
        self.colors = (*COLORS, *args.added_colors)
        self.device = torch.device(args.device)
        pipe.to(self.device)
        self.means, self.stds = latents
        self.total_steps = getattr(args, self.steps_flag)
        self.denoiser = self.family.denoiser
        self.models = {
            name: getattr(pipe, name)
            for name in (self.denoiser, *self.family.prompt_encoders)
            if getattr(pipe, name) is not None  # an sd3 base without T5
        }
        self.parameters = [p for model in self.models.values() for p in model.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=getattr(args, self.lr_flag), weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, self.total_steps)
        )
        self.ema = EMA(self.parameters, args.ema_decay)
        self.step, self.minutes, self.running_loss = 0, 0.0, None
        #: the devices that trained it, in order (a run may continue on another machine)
        self.hardware: list[str] = []
        #: the step totals of the runs this one extended (``--extend``), in order
        self.extended: list[int] = []
        self.checkpoint_path = args.work_dir / f"{self.denoiser}_checkpoint.pt"
        self.resume_keys = (*_COMMON_RESUME_KEYS, self.steps_flag, self.lr_flag, *self.resume_flags)

    @abstractmethod
    def loss(self, step: int) -> torch.Tensor:
        """The training loss of batch ``step``."""

    def batch(self, step: int) -> tuple[list[str], torch.Tensor, torch.Generator]:
        """Augmented captions and latent samples (unscaled) of batch ``step``, and the step's
        generator for the further draws (in this order, as the UNet stage has always drawn them)."""
        index = batch_indices(len(self.means), self.args.batch_size, self.args.seed, step)
        generator = step_generator(self.args.seed + 1, step)
        texts = [self._augment(self.captions[i], torch.rand(3, generator=generator)) for i in index.tolist()]
        posterior_noise = torch.randn(self.means[index].shape, generator=generator)
        return texts, self.means[index] + self.stds[index] * posterior_noise, generator

    def _augment(self, text: str, draws: torch.Tensor) -> str:
        """Caption dropout, then attribute dropout, so that each word is learnt on its own too."""
        if draws[0] < self.args.caption_dropout:
            return ""
        parsed = parse_prompt(text, colors=self.colors)
        color = "" if draws[1] < self.args.attribute_dropout else f"{parsed['color']} "
        background = (
            "" if draws[2] < self.args.attribute_dropout else f" on a {parsed['background']} background"
        )
        return f"a {color}{parsed['shape']}{background}"

    def train(self) -> bool:
        """Train until done (True) or until ``--max-minutes`` (False, checkpointed)."""
        self._resume()
        if not self.hardware or self.hardware[-1] != describe_device(self.device):
            self.hardware.append(describe_device(self.device))
        for name, model in self.models.items():
            model.train()
            if self.args.compile and name in (self.denoiser, *self.compiled_text_encoders):
                model.compile()  # in place: the state dict keeps its keys, the pipeline calls it as before
        start, started_at = time.time(), self.minutes
        steps = range(self.step, self.total_steps)
        progress = tqdm(steps, initial=self.step, total=self.total_steps, desc=self.denoiser)
        for step in progress:
            loss = self.loss(step)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update()
            previous = loss.item() if self.running_loss is None else self.running_loss
            self.running_loss = 0.98 * previous + 0.02 * loss.item()
            progress.set_postfix(loss=f"{self.running_loss:.4f}")
            self.step, self.minutes = step + 1, started_at + (time.time() - start) / 60
            out_of_time = (
                self.args.max_minutes is not None and self.minutes - started_at > self.args.max_minutes
            )
            if self.args.eval_every and self.step % self.args.eval_every == 0:
                self._probe()
            if self.step % self.args.checkpoint_every == 0 or out_of_time:
                self._save()
            if out_of_time and self.step < self.total_steps:
                return False
        self.ema.copy_to_model()
        for model in self.models.values():
            model.eval()
        return True

    def _probe(self) -> None:
        """Held-out prompt accuracy of the EMA model (seed 0) into ``eval_log.jsonl``."""
        for model in self.models.values():
            model.eval()
        with self.ema.applied():
            result = evaluate_pipeline(
                self.pipe, heldout_base_prompts(), [EVAL_SEEDS[0]], num_inference_steps=self.args.eval_steps
            )
        for model in self.models.values():
            model.train()
        record = {"step": self.step, "loss": round(self.running_loss, 4)}
        record.update(accuracies(result))
        with open(self.args.work_dir / "eval_log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        logger.info("step %d: held-out %s", self.step, record)

    def _save(self) -> None:
        state = {
            "step": self.step,
            "minutes": self.minutes,
            "running_loss": self.running_loss,
            "hardware": self.hardware,
            "extended": self.extended,
            "args": {key: getattr(self.args, key) for key in self.resume_keys},
            **{name: model.state_dict() for name, model in self.models.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "ema": self.ema.state_dict(),
        }
        partial = self.checkpoint_path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(self.checkpoint_path)

    def _resume(self) -> None:
        if not self.checkpoint_path.exists():
            return
        state = torch.load(self.checkpoint_path, weights_only=True, map_location=self.device)
        wanted = {key: getattr(self.args, key) for key in self.resume_keys}
        self.extended = state.get("extended", [])
        if self.args.extend and state["args"] != wanted:
            self._check_extension(state["args"], wanted)
            self.extended = [*self.extended, state["args"][self.steps_flag]]
        elif state["args"] != wanted:
            raise SystemExit(
                f"{self.checkpoint_path} was written with {state['args']}, not {wanted}; delete it "
                "(or pass --extend to continue it to more steps)"
            )
        for name, model in self.models.items():
            model.load_state_dict(state[name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.ema.load_state_dict(state["ema"])
        self.step, self.minutes, self.running_loss = state["step"], state["minutes"], state["running_loss"]
        self.hardware = state.get("hardware", [])
        logger.info("resumed the %s stage at step %d", self.denoiser, self.step)

    def _check_extension(self, stored: dict, wanted: dict) -> None:
        """``--extend``: only the step total may differ, and it must grow."""
        others = [k for k in wanted if k != self.steps_flag and stored.get(k) != wanted[k]]
        if others or wanted[self.steps_flag] <= stored[self.steps_flag]:
            raise SystemExit(
                f"--extend continues {self.checkpoint_path} to more --{self.steps_flag.replace('_', '-')} "
                f"with every other setting equal; it was written with {stored}, not {wanted}"
            )
        logger.info(
            "extending the %s stage from %d to %d steps (cosine schedule restarted over the new total)",
            self.denoiser,
            stored[self.steps_flag],
            wanted[self.steps_flag],
        )


class UNetTrainer(DenoiserTrainer):
    """The UNet and its text encoder; the loss is the library's DDPM loss
    (:func:`reslora_diffusers.objectives.denoising_loss`), min-SNR weighted (Hang et al. 2023)
    for the scheduler's prediction type."""

    family = SD_PIPELINES
    steps_flag, lr_flag, resume_flags = (
        "unet_steps",
        "unet_lr",
        ("snr_gamma", "unet_channels", "vae_scale_factor", "extra_colors"),
    )

    def __init__(self, pipe, latents, captions, args):
        super().__init__(pipe, latents, captions, args)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def loss(self, step: int) -> torch.Tensor:
        args, pipe, scheduler, device = self.args, self.pipe, self.noise_scheduler, self.device
        texts, sampled, generator = self.batch(step)
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids.to(device))[0]
        clean = sampled * pipe.vae.config.scaling_factor
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(texts),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = pipe.unet(noisy.to(device), timesteps.to(device), context).sample
        target = denoising_target(scheduler, clean, noise, timesteps).to(device)
        return denoising_loss(prediction, target, scheduler, timesteps.to(device), args.snr_gamma)


class SD3Trainer(DenoiserTrainer):
    """The SD3 transformer and its three text encoders, by rectified flow: ``x_sigma = (1 - sigma)
    x0 + sigma eps``, target ``eps - x0``, ``sigma`` logit-normal through the scheduler's sigmas,
    ``x0 = (z - shift_factor) * scaling_factor``, prompts through the pipeline's ``encode_prompt``
    (exactly the states inference uses; the empty caption is the unconditional one)."""

    family = SD3_PIPELINES
    steps_flag, lr_flag = "transformer_steps", "transformer_lr"
    resume_flags = ("extra_colors", "patch_size", "transformer_width", "transformer_depth", "no_t5")
    compiled_text_encoders = ("text_encoder_3",)

    def __init__(self, pipe, latents, captions, args):
        super().__init__(pipe, latents, captions, args)
        self.noise_scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        #: without T5 the prompt ends in this many zero states, folded into one for training
        self.t5_padding = 0
        if gives_zero_t5_states(pipe.text_encoder_3):
            self.t5_padding = t5_sequence_length(pipe)
            pipe.transformer.set_attn_processor(FoldedPaddingAttnProcessor())

    def loss(self, step: int) -> torch.Tensor:
        pipe, device, vae = self.pipe, self.device, self.pipe.vae
        texts, sampled, generator = self.batch(step)
        clean = (sampled - vae.config.shift_factor) * vae.config.scaling_factor
        noise = torch.randn(clean.shape, generator=generator)
        u = sample_u(SD3_WEIGHTING, len(texts), generator=generator)
        timesteps, sigmas = sample_sigmas(self.noise_scheduler, u)
        states, _, pooled, _ = pipe.encode_prompt(
            texts, None, None, device=device, do_classifier_free_guidance=False
        )
        folded = {}
        if self.t5_padding:
            states, folded = fold_t5_padding(states, self.t5_padding)
        clean, noise, sigmas = clean.to(device), noise.to(device), sigmas.to(device)
        prediction = pipe.transformer(
            hidden_states=noisy_latents(clean, noise, sigmas),
            timestep=timesteps.to(device),
            encoder_hidden_states=states,
            pooled_projections=pooled,
            joint_attention_kwargs=folded,
        ).sample
        return flow_matching_loss(prediction, clean, noise, sigmas, SD3_WEIGHTING)

    def train(self) -> bool:
        """Train; a base trained without T5 then gets a silent one (zero states, as without T5),
        since diffusers' SD3 pipeline loads a folder only with a ``text_encoder_3``."""
        done = super().train()
        if done and self.t5_padding:
            tokenizer = self.pipe.tokenizer
            self.pipe.register_modules(
                text_encoder_3=build_silent_t5_encoder(tokenizer), tokenizer_3=tokenizer
            )
        return done


def describe_device(device: torch.device) -> str:
    """``cpu (N threads)`` or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def save_pipeline(pipe, output_dir: Path, words: tuple[str, ...] = VOCAB_WORDS) -> None:
    """Safetensors pipeline folder; every tokenizer folder holds our CLIP-format vocab/merges files
    of ``words``.

    Written beside ``output_dir`` under a temporary name and renamed when complete, so an
    interrupted save leaves the previous folder (or none), never a part of one.
    """
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=TEMP_SUFFIX, dir=output_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in pipe.components:
            if name.startswith("tokenizer") and (tmp / name).is_dir():
                shutil.rmtree(tmp / name)
                write_tokenizer(tmp / name, words)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would keep other users out of the asset folder
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images, ``columns`` per row (one row per seed)."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def eval_sets(args: argparse.Namespace) -> list[tuple[str, list[str], tuple[int, ...]]]:
    """(name, prompts, seeds) of the evaluation: held-out pairs with ``--eval-seeds`` seeds (all of
    :data:`EVAL_SEEDS`), seen pairs and the fine-tuning concept with the first four of them."""
    seeds = EVAL_SEEDS[: args.eval_seeds]
    return [
        ("heldout", heldout_base_prompts(), seeds),
        ("seen", seen_base_prompts(), seeds[:4]),
        ("finetune_concept", finetune_prompts(), seeds[:4]),
    ]


def accuracies(result: dict) -> dict[str, float]:
    """The accuracy figures of an ``evaluate_pipeline`` result (open-set and nearest-template
    shape readings), rounded for logs and the card."""
    return {k: round(v, 4) for k, v in result.items() if "accuracy" in k}


def evaluate(pipe, args: argparse.Namespace) -> dict:
    """Prompt accuracy on held-out, seen and fine-tuning-concept prompts at the documented settings."""
    numbers = {}
    for name, prompts, seeds in eval_sets(args):
        result = evaluate_pipeline(pipe, prompts, seeds, num_inference_steps=args.eval_steps)
        numbers[name] = accuracies(result)
        numbers[name]["images"] = len(result["images"])
        grid_path = args.work_dir / f"samples_{name}.png"
        make_grid(result["images"], columns=len(prompts)).save(grid_path)
        logger.info("%s: %s (grid: %s)", name, numbers[name], grid_path)
    return numbers


#: the evaluation sets' names in the model card
SET_TITLES = {"heldout": "held-out pairs", "seen": "seen pairs", "finetune_concept": FINETUNE_SHAPE}

#: The accuracy part of both model cards (``{rows}``: one row per prompt set, ``{bar}``: the
#: verdict on :data:`BASE_ACCURACY_BAR`, both from ``write_model_card``).
ACCURACY_SECTION = (
    """Prompt accuracy (colour, shape and background all read correctly by
`reslora_diffusers.eval.analyse_image`), at the settings above. The shape is read by the
open-set call (the best template needs IoU >= 0.80 and a 0.05 lead, else "unknown"), the
reading the base's bar (held-out >= %(heldout).0f %%, seen >= %(seen).0f %%) is set on; the nearest
template, which names any blob after some shape, stands beside it:
"""
    % {name: 100 * bar for name, bar in BASE_ACCURACY_BAR.items()}
    + """
| prompts | images | accuracy | its 95 % interval | accuracy (nearest template) | colour | shape | shape (nearest template) | background |
|---|---|---|---|---|---|---|---|---|
{rows}

The interval is the Wilson score interval of the open-set accuracy. `python scripts/read_base.py`
reads a base on 360 fresh held-out and 720 fresh seen images (five times these), with intervals less than half as wide.

{bar}
"""
)

MODEL_CARD = (
    """# {name}: {role} coloured-shapes base of reslora-diffusers

A tiny `StableDiffusionPipeline` trained from scratch by `scripts/pretrain_tiny_base.py`
on procedurally generated images "a <colour> <shape> on a <background> background"
(`reslora_diffusers.data`). It exists so that training, demo and benchmarks run with no
model hub. It is not a general text-to-image model.

| | |
|---|---|
| resolution | {resolution} x {resolution} px (latents {channels} x {latent} x {latent}) |
| inference | DPM-Solver++ (`scheduler/`), {steps} steps, guidance scale {guidance} |
| prediction type | {prediction_type} (fine-tuning scripts must read `scheduler.config.prediction_type`) |
| vocabulary | {vocab} ({concept!r} is in the vocabulary but never trained) |
| parameters | UNet {unet:.2f} M, VAE {vae:.2f} M, text encoder {text_encoder:.2f} M |
| held-out colour x shape pairs | {heldout_pairs} |
| training | {num_images} images{extra_colors}, seed {seed}; VAE {vae_steps} steps (KL weight {kl_weight:g}), then UNet + text encoder {unet_steps} steps{extension}, batch {batch} |
| training time | {minutes:.0f} min on {threads} CPU thread(s) |

"""
    + ACCURACY_SECTION
    + """
VAE reconstructions of the fine-tuning set ({concept}es) score {vae_finetune:.1%}, of the base set
{vae_base:.1%}: the VAE can draw the new concept; the UNet must learn it. Load with
`StableDiffusionPipeline.from_pretrained({load})`.
"""
)

MODEL_CARD_SD3 = (
    """# {name}: {role} diffusion-transformer base of reslora-diffusers

A tiny `StableDiffusion3Pipeline` trained by `scripts/pretrain_tiny_base.py --family sd3` on
the procedurally generated images "a <colour> <shape> on a <background> background" that the
UNet base `tiny-sd` learnt (`reslora_diffusers.data`; builders in `reslora_diffusers.data.tiny_sd3`).
Its transformer is a chain of identical joint blocks, where ResLoRA's shortcuts never break.
It is not a general text-to-image model.

| | |
|---|---|
| resolution | {resolution} x {resolution} px (latents {channels} x {latent} x {latent}, {patch} x {patch} patches) |
| inference | flow-matching Euler (`scheduler/`, shift {shift}), {steps} steps, guidance scale {guidance} |
| objective | rectified flow: target `eps - x0`, logit-normal sigmas (`reslora_diffusers.objectives.flow_matching`) |
| vocabulary | {vocab} ({concept!r} is in the vocabulary but never trained) |
| transformer | {layers} joint blocks of width {width}, {transformer:.2f} M parameters |
| text encoders | two CLIP encoders, {text_encoder:.2f} M + {text_encoder_2:.2f} M (the first started from {source}'s), {t5} |
| VAE | {source}'s trained VAE ({vae:.2f} M, not retrained); latents `(z - shift_factor) * scaling_factor`, shift_factor {shift_factor}, scaling_factor {scaling_factor} |
| held-out colour x shape pairs | {heldout_pairs} |
| training | {num_images} images{extra_colors}, seed {seed}; transformer + text encoders {transformer_steps} steps{extension}, batch {batch}, lr {transformer_lr} |
| training time | {minutes:.0f} min on {hardware} |

"""
    + ACCURACY_SECTION
    + """
VAE reconstructions of the fine-tuning set ({concept}es) score {vae_finetune:.1%}, of the base set
{vae_base:.1%}. Load with
`StableDiffusion3Pipeline.from_pretrained({load})`.
"""
)


def extension_note(extended_from: list[int]) -> str:
    """`` (extended from 4000 steps: ...)`` for a run continued with ``--extend``, else empty."""
    if not extended_from:
        return ""
    totals = ", then ".join(map(str, extended_from))
    return f" (extended from {totals} steps: the cosine schedule restarted over the new total there)"


def interval_text(numbers: dict) -> str:
    """``[79.6, 94.2] %``: the Wilson 95 % interval of a set's open-set accuracy (the card's sets are
    small: 72 held-out images leave about 4 points of standard error at 87 %)."""
    correct = round(numbers["accuracy"] * numbers["images"])
    low, high = wilson_interval(correct, numbers["images"])
    return f"[{100 * low:.1f}, {100 * high:.1f}] %"


def bar_verdict(accuracy: dict[str, dict]) -> str:
    """One sentence: does the open-set prompt accuracy of each set reach :data:`BASE_ACCURACY_BAR`?"""
    misses = [
        f"{SET_TITLES[name]} {accuracy[name]['accuracy']:.1%} (bar {bar:.0%})"
        for name, bar in BASE_ACCURACY_BAR.items()
        if accuracy[name]["accuracy"] < bar
    ]
    if not misses:
        return "The base meets its bar on the open-set reading."
    return f"**Below its bar on the open-set reading**: {', '.join(misses)}."


def extra_colors_note(added: tuple[str, ...]) -> str:
    """`` (with orange and cyan shapes too, ...)`` for a run with ``--extra-colors``, else empty."""
    if not added:
        return ""
    return f" (with {' and '.join(added)} shapes too, in the set and the vocabulary only)"


def t5_text(millions: float | None) -> str:
    """The sd3 card's words on the T5 encoder of ``millions`` parameters (None: the pipeline has none)."""
    if millions is None:
        return (
            "and no T5: trained without one (the pipeline pads the CLIP states with 256 zero states, "
            "which training folds into one token), its `text_encoder_3` a T5 of zero weights whose "
            "states are zero, since diffusers' SD3 pipeline loads a folder only with one"
        )
    return (
        f"and a one-layer T5, {millions:.2f} M; all three read our vocabulary, the T5 `<bos> words <eos>` "
        "padded with `<eos>` to 256 tokens"
    )


def init_source(args: argparse.Namespace) -> str:
    """The sd3 card's name for ``--init-from``: `tiny-sd` for the shipped UNet base, else the folder."""
    return "`tiny-sd`" if args.init_from == default_base_model_path() else f"`{args.init_from}`"


def card_identity(base: Base, output_dir: Path) -> dict[str, str]:
    """The card's name, role and load argument: the embedded base's folder calls itself the embedded
    base and loads through the library's accessor; any other folder (a kept checkpoint, a control)
    names itself and loads from its own path, so that it never claims to be what the library ships."""
    if output_dir.resolve() == base.default_output.resolve():
        load = f"reslora_diffusers.data.{base.default_output_of.__name__}()"
        return {"name": output_dir.name, "role": "the embedded", "load": load}
    return {"name": output_dir.name, "role": "a", "load": repr(output_dir.as_posix())}


def write_model_card(pipe, numbers: dict, args: argparse.Namespace, output_dir: Path) -> None:
    base = BASES[args.family]
    labels = {name: f"{SET_TITLES[name]} (seeds 0-{len(seeds) - 1})" for name, _, seeds in eval_sets(args)}
    rows = "\n".join(
        f"| {labels[name]} | {n['images']} | {n['accuracy']:.1%} | {interval_text(n)} | {n['accuracy_lenient']:.1%} "
        f"| {n['color_accuracy']:.1%} | {n['shape_accuracy']:.1%} | {n['shape_accuracy_lenient']:.1%} "
        f"| {n['background_accuracy']:.1%} |"
        for name, n in numbers["accuracy"].items()
    )
    millions = {
        name: sum(p.numel() for p in model.parameters()) / 1e6
        for name, model in pipe.components.items()
        if isinstance(model, torch.nn.Module)
    }
    card = base.card.format(
        **card_identity(base, output_dir),
        resolution=BASE_RESOLUTION,
        latent=BASE_RESOLUTION // pipe.vae_scale_factor,
        channels=pipe.vae.config.latent_channels,
        steps=args.eval_steps,
        guidance=BASE_GUIDANCE_SCALE,
        prediction_type=pipe.scheduler.config.get("prediction_type"),
        shift=pipe.scheduler.config.get("shift"),
        source=init_source(args),
        vocab=", ".join(vocabulary_words(args.added_colors)),
        concept=FINETUNE_SHAPE,
        **millions,
        layers=args.transformer_depth,
        width=args.transformer_width,
        patch=args.patch_size,  # sd3 only; the UNet card has no patches
        t5=t5_text(None if args.no_t5 else millions.get("text_encoder_3")),
        shift_factor=pipe.vae.config.shift_factor,
        scaling_factor=pipe.vae.config.scaling_factor,
        heldout_pairs=", ".join(f"{c} {s}" for c, s in HELDOUT_COMBOS),
        num_images=args.num_images,
        extra_colors=extra_colors_note(args.added_colors),
        seed=args.seed,
        # the VAE stage's own record (older work dirs lack it: the flags of this run then)
        vae_steps=numbers.get("vae_steps", args.vae_steps),
        kl_weight=numbers.get("kl_weight", args.kl_weight),
        unet_steps=args.unet_steps,
        transformer_steps=args.transformer_steps,
        transformer_lr=args.transformer_lr,
        batch=args.batch_size,
        minutes=numbers["vae_minutes"] + numbers[f"{base.family.denoiser}_minutes"],
        threads=torch.get_num_threads(),
        hardware=", then ".join(numbers["hardware"]),
        extension=extension_note(numbers.get("extended_from", [])),
        rows=rows,
        bar=bar_verdict(numbers["accuracy"]),
        vae_finetune=numbers["vae_reconstruction_accuracy"]["finetune_set"],
        vae_base=numbers["vae_reconstruction_accuracy"]["base_set"],
    )
    (output_dir / "README.md").write_text(card)


def vae_stage(pipe, images: torch.Tensor, args: argparse.Namespace) -> None:
    """Train the VAE and keep it (and its numbers) in the work dir for the denoiser stage."""
    start = time.time()
    numbers = train_vae(pipe.vae, images, args)
    numbers.update(
        vae_minutes=(time.time() - start) / 60,
        vae_steps=args.vae_steps,
        kl_weight=args.kl_weight,
        vae_scale_factor=args.vae_scale_factor,
    )
    pipe.vae.save_pretrained(args.work_dir / "vae")
    (args.work_dir / "vae" / "numbers.json").write_text(json.dumps(numbers, indent=2))


def reused_vae_stage(pipe, images: torch.Tensor, args: argparse.Namespace) -> None:
    """The VAE stage of the sd3 family: keep ``--init-from``'s trained VAE in the work dir."""
    trained = type(pipe.vae).from_pretrained(args.init_from, subfolder="vae")
    _load_weights(pipe.vae, trained.state_dict(), f"--init-from {args.init_from}: its VAE")
    pipe.vae.save_pretrained(args.work_dir / "vae")
    numbers = {"vae_minutes": 0.0, "vae_from": str(args.init_from)}
    (args.work_dir / "vae" / "numbers.json").write_text(json.dumps(numbers, indent=2))


def _load_weights(model: torch.nn.Module, state: dict, what: str) -> None:
    """Load ``state`` into ``model``; one line naming ``what`` when it does not fit."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:  # keys or shapes that differ
        raise SystemExit(f"{what} does not fit: {one_line(err)[:300]}") from err


def build_unet_base(args: argparse.Namespace) -> StableDiffusionPipeline:
    """The untrained UNet base."""
    return build_pipeline(
        args.work_dir / "tokenizer",
        latent_channels=args.latent_channels or LATENT_CHANNELS,
        unet_channels=tuple(args.unet_channels),
        vae_scale_factor=args.vae_scale_factor,
        extra_words=args.added_colors,
    )


def init_from_latent_channels(args: argparse.Namespace) -> int:
    """The latent channels of ``--init-from``'s VAE (the sd3 base takes that VAE); a different
    ``--latent-channels`` stops here with one line, before anything is built."""
    channels = AutoencoderKL.load_config(args.init_from, subfolder="vae")["latent_channels"]
    if args.latent_channels not in (None, channels):
        raise SystemExit(
            f"--latent-channels {args.latent_channels}: --init-from {args.init_from}'s VAE has "
            f"{channels} latent channels, and the sd3 base takes that VAE"
        )
    return channels


def init_from_added_colors(folder: Path) -> tuple[str, ...]:
    """The pretraining-only colours the tokenizer of the UNet folder ``folder`` knows (none when it
    has no tokenizer yet); stops with one line when it is not this project's vocabulary."""
    if not (folder / "tokenizer").is_dir():
        return ()
    added = added_colors_of(CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer").get_vocab())
    if added is None:
        raise SystemExit(f"--init-from {folder}: its tokenizer is not the embedded base's vocabulary")
    return added


def check_init_from_vocabulary(args: argparse.Namespace) -> None:
    """Stop with one line when ``--init-from``'s tokenizer is not the run's: its text encoder learnt
    the ids of its own words, so the run must add the same colours (``--extra-colors``)."""
    known = init_from_added_colors(args.init_from)
    if known != args.added_colors:
        raise SystemExit(
            f"--init-from {args.init_from}'s tokenizer knows the added colours {', '.join(known) or 'none'}, "
            f"this run adds {', '.join(args.added_colors) or 'none'}: give --extra-colors {len(known)}"
        )


def build_sd3_base(args: argparse.Namespace) -> StableDiffusion3Pipeline:
    """The untrained SD3 base, its first CLIP encoder holding ``--init-from``'s text encoder
    (its text tower; the projection, which a ``CLIPTextModel`` lacks, stays new)."""
    check_init_from_vocabulary(args)
    pipe = build_sd3_pipeline(
        args.work_dir / "tokenizer",
        latent_channels=init_from_latent_channels(args),
        extra_words=args.added_colors,
        patch_size=args.patch_size,
        t5=not args.no_t5,
        width=args.transformer_width,
        depth=args.transformer_depth,
    )
    base = CLIPTextModel.from_pretrained(args.init_from, subfolder="text_encoder").state_dict()
    tower = {key.removeprefix("text_model."): value for key, value in base.items()}  # transformers 4 keys
    _load_weights(pipe.text_encoder.text_model, tower, f"--init-from {args.init_from}: its text encoder")
    return pipe


def vae_layout(config) -> tuple[int, int]:
    """(latent channels, downsampling) of a VAE config: one level per entry of its widths, each
    after the first halving the side."""
    return config["latent_channels"], 2 ** (len(config["block_out_channels"]) - 1)


def check_vae_layout(vae, trained_dir: Path, remedy: str) -> None:
    """Stop with one line, ending in ``remedy``, when the VAE stage's VAE in ``trained_dir`` has
    other latent channels or another downsampling than the run builds."""
    trained, built = vae_layout(AutoencoderKL.load_config(trained_dir)), vae_layout(vae.config)
    if trained != built:
        raise SystemExit(
            f"the VAE in {trained_dir} has {trained[0]} latent channels and downsamples by {trained[1]}, "
            f"this run builds {built[0]} and {built[1]}: {remedy}"
        )


def denoiser_stage(pipe, images: torch.Tensor, captions: list[str], args: argparse.Namespace) -> dict | None:
    """Normalise the latents, train the denoiser with the text encoders and save the pipeline.

    The latent scaling factor is ``1 / std`` of VAE samples of the set; the sd3 family also sets
    ``shift_factor`` to their mean (SD3 trains on ``(z - shift) * scaling``). Returns the training
    numbers, or None when ``--max-minutes`` stopped the training.
    """
    base = BASES[args.family]
    numbers = json.loads((args.work_dir / "vae" / "numbers.json").read_text())
    check_vae_layout(pipe.vae, args.work_dir / "vae", base.vae_remedy)
    trained = type(pipe.vae).from_pretrained(args.work_dir / "vae")
    _load_weights(pipe.vae, trained.state_dict(), f"the VAE in {args.work_dir / 'vae'}")
    means, stds = encode(pipe.vae, images)
    sampled = means + stds * torch.randn(means.shape, generator=step_generator(args.seed, -1))
    pipe.vae.register_to_config(scaling_factor=round(1.0 / sampled.std().item(), 5))
    if base.family.shifts_latents:
        pipe.vae.register_to_config(shift_factor=round(sampled.mean().item(), 5))
    logger.info(
        "latent scaling factor %.5f, shift %s", pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor
    )
    trainer = base.trainer(pipe, (means, stds), captions, args)
    if not trainer.train():
        logger.info(
            "stopped at step %d of %d; run the same command to continue", trainer.step, trainer.total_steps
        )
        return None
    numbers[f"{trainer.denoiser}_loss"] = trainer.running_loss
    numbers[f"{trainer.denoiser}_minutes"] = trainer.minutes
    numbers["hardware"] = trainer.hardware
    numbers["extended_from"] = trainer.extended
    save_pipeline(pipe.to("cpu"), args.output_dir, vocabulary_words(args.added_colors))
    return numbers


@dataclass(frozen=True)
class Base:
    """One embedded base: how it is built and carded; its pipeline family (the library's
    declaration: pipeline class, components, latent shift) is its trainer's."""

    build: Callable[[argparse.Namespace], object]
    vae_stage: Callable[[object, torch.Tensor, argparse.Namespace], None]
    trainer: type[DenoiserTrainer]
    card: str
    #: the library's accessor of the embedded base's folder (its card names the call)
    default_output_of: Callable[[], Path]
    default_work_dir: Path
    #: what to do when the work dir's VAE has another layout than the run builds
    vae_remedy: str

    @property
    def default_output(self) -> Path:
        return self.default_output_of()

    @property
    def family(self) -> PipelineFamily:
        return self.trainer.family

    @property
    def pipeline_class(self) -> type:
        return getattr(diffusers, self.family.pipeline_class)


BASES = {
    "unet": Base(
        build_unet_base,
        vae_stage,
        UNetTrainer,
        MODEL_CARD,
        default_base_model_path,
        Path("outputs/pretrain_tiny_base"),
        "give the VAE stage's --latent-channels and --vae-scale-factor, or retrain it with --stage vae",
    ),
    "sd3": Base(
        build_sd3_base,
        reused_vae_stage,
        SD3Trainer,
        MODEL_CARD_SD3,
        default_dit_base_path,
        Path("outputs/pretrain_tiny_sd3"),
        "run --stage vae (or all) to take --init-from's VAE into the work dir",
    ),
}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    base = BASES[args.family]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = make_base_set(
        args.work_dir / "base-set",
        num_images=args.num_images,
        seed=args.seed,
        num_extra_colors=args.extra_colors,
    )
    images, captions = load_images(data_dir)
    logger.info("base set: %d images in %s", len(images), data_dir)
    torch.manual_seed(args.seed)
    pipe = base.build(args)
    if args.stage in ("all", "vae"):
        base.vae_stage(pipe, images, args)
    if args.stage == "vae":
        return
    numbers = denoiser_stage(pipe, images, captions, args)
    if numbers is None:
        return

    pipe = base.pipeline_class.from_pretrained(args.output_dir).to(args.device)
    finetune_dir = make_finetune_set(args.work_dir / "finetune-set")
    numbers["vae_reconstruction_accuracy"] = {
        "base_set": reconstruction_accuracy(pipe.vae, data_dir, limit=1000),
        "finetune_set": reconstruction_accuracy(pipe.vae, finetune_dir),
    }
    numbers["accuracy"] = evaluate(pipe, args)
    write_model_card(pipe, numbers, args, args.output_dir)
    (args.work_dir / "numbers.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()

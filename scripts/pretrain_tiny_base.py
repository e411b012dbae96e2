"""Pretrain the embedded tiny text-to-image base on the procedural coloured-shape set.

Stages, all from one seed: write the base set (imagefolder) and load it with
``datasets``; train the VAE; encode the set once; train the UNet and the text encoder
jointly (v-prediction, min-SNR weighting, 10 % caption dropout for classifier-free
guidance, colour/background phrases dropped now and then, EMA weights); save a ``StableDiffusionPipeline`` folder (safetensors) with our
tokenizer files; evaluate it with the prompt metric and write the model card.

    nice -n 10 .venv/bin/python scripts/pretrain_tiny_base.py --threads 1

The default output is the committed folder ``reslora_diffusers/assets/tiny-sd``. All
randomness of a training step is drawn from (seed, step), so the UNet stage resumes
exactly from its last checkpoint: with ``--max-minutes`` it stops early and the same
command continues it. ``--stage vae`` / ``--stage unet`` run one stage at a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import load_dataset
from diffusers import DDPMScheduler, StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from reslora_diffusers.data import (
    BASE_GUIDANCE_SCALE,
    BASE_NUM_INFERENCE_STEPS,
    BASE_RESOLUTION,
    FINETUNE_SHAPE,
    HELDOUT_COMBOS,
    VOCAB_WORDS,
    build_pipeline,
    default_base_model_path,
    finetune_prompts,
    heldout_base_prompts,
    make_base_set,
    make_finetune_set,
    seen_base_prompts,
    write_tokenizer,
)
from reslora_diffusers.eval import EVAL_SEEDS, evaluate_pipeline, parse_prompt, prompt_accuracy

logger = logging.getLogger("pretrain_tiny_base")
_CHECKPOINT = "unet_checkpoint.pt"
#: Arguments a resumed UNet run must share with the run that wrote the checkpoint.
_RESUME_KEYS = (
    "seed",
    "num_images",
    "batch_size",
    "unet_steps",
    "unet_lr",
    "snr_gamma",
    "caption_dropout",
    "attribute_dropout",
    "ema_decay",
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", type=Path, default=default_base_model_path())
    parser.add_argument("--work-dir", type=Path, default=Path("outputs/pretrain_tiny_base"))
    parser.add_argument("--stage", choices=("all", "vae", "unet"), default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
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
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--checkpoint-every", type=int, default=250, help="UNet steps between checkpoints")
    parser.add_argument(
        "--max-minutes", type=float, help="stop the UNet stage (checkpointed) after this long"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser.parse_args()


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
    images, captions = images[:limit], captions[:limit]
    decoded = vae.decode(vae.encode(images).latent_dist.mean).sample
    pixels = ((decoded.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
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

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.updates = state["shadow"], state["updates"]


class UNetTrainer:
    """Joint UNet + text-encoder denoising training on pre-encoded latents, checkpointed and resumable.

    The loss is min-SNR weighted (Hang et al. 2023) for the scheduler's prediction type.
    """

    def __init__(self, pipe, latents: tuple[torch.Tensor, torch.Tensor], captions: list[str], args):
        self.pipe, self.captions, self.args = pipe, captions, args
        self.means, self.stds = latents
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.parameters = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
        self.optimizer = torch.optim.AdamW(self.parameters, lr=args.unet_lr, weight_decay=0.0)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_lr(s, args.unet_steps)
        )
        self.ema = EMA(self.parameters, args.ema_decay)
        self.step, self.minutes, self.running_loss = 0, 0.0, None
        self.checkpoint_path = args.work_dir / _CHECKPOINT

    def loss(self, step: int) -> torch.Tensor:
        args, pipe, scheduler = self.args, self.pipe, self.noise_scheduler
        index = batch_indices(len(self.means), args.batch_size, args.seed, step)
        generator = step_generator(args.seed + 1, step)
        texts = [self._augment(self.captions[i], torch.rand(3, generator=generator)) for i in index.tolist()]
        ids = pipe.tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        context = pipe.text_encoder(ids)[0]
        posterior_noise = torch.randn(self.means[index].shape, generator=generator)
        clean = (self.means[index] + self.stds[index] * posterior_noise) * pipe.vae.config.scaling_factor
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        prediction = pipe.unet(scheduler.add_noise(clean, noise, timesteps), timesteps, context).sample
        snr = scheduler.alphas_cumprod[timesteps] / (1 - scheduler.alphas_cumprod[timesteps])
        if scheduler.config.prediction_type == "v_prediction":
            target, weight = (
                scheduler.get_velocity(clean, noise, timesteps),
                snr.clamp(max=args.snr_gamma) / (snr + 1),
            )
        else:
            target, weight = noise, snr.clamp(max=args.snr_gamma) / snr
        return (weight * F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))).mean()

    def _augment(self, text: str, draws: torch.Tensor) -> str:
        """Caption dropout, then attribute dropout, so that each word is learnt on its own too."""
        if draws[0] < self.args.caption_dropout:
            return ""
        parsed = parse_prompt(text)
        color = "" if draws[1] < self.args.attribute_dropout else f"{parsed['color']} "
        background = (
            "" if draws[2] < self.args.attribute_dropout else f" on a {parsed['background']} background"
        )
        return f"a {color}{parsed['shape']}{background}"

    def train(self) -> bool:
        """Train until done (True) or until ``--max-minutes`` (False, checkpointed)."""
        self._resume()
        self.pipe.unet.train()
        self.pipe.text_encoder.train()
        start, started_at = time.time(), self.minutes
        steps = range(self.step, self.args.unet_steps)
        progress = tqdm(steps, initial=self.step, total=self.args.unet_steps, desc="unet")
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
            if self.step % self.args.checkpoint_every == 0 or out_of_time:
                self._save()
            if out_of_time and self.step < self.args.unet_steps:
                return False
        self.ema.copy_to_model()
        self.pipe.unet.eval()
        self.pipe.text_encoder.eval()
        return True

    def _save(self) -> None:
        state = {
            "step": self.step,
            "minutes": self.minutes,
            "running_loss": self.running_loss,
            "args": {key: getattr(self.args, key) for key in _RESUME_KEYS},
            "unet": self.pipe.unet.state_dict(),
            "text_encoder": self.pipe.text_encoder.state_dict(),
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
        state = torch.load(self.checkpoint_path, weights_only=True)
        wanted = {key: getattr(self.args, key) for key in _RESUME_KEYS}
        if state["args"] != wanted:
            raise SystemExit(
                f"{self.checkpoint_path} was written with {state['args']}, not {wanted}; delete it"
            )
        self.pipe.unet.load_state_dict(state["unet"])
        self.pipe.text_encoder.load_state_dict(state["text_encoder"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.ema.load_state_dict(state["ema"])
        self.step, self.minutes, self.running_loss = state["step"], state["minutes"], state["running_loss"]
        logger.info("resumed the UNet stage at step %d", self.step)


def save_pipeline(pipe: StableDiffusionPipeline, output_dir: Path) -> None:
    """Safetensors pipeline folder; the tokenizer folder holds our CLIP-format vocab/merges files."""
    if output_dir.exists():
        shutil.rmtree(output_dir)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    shutil.rmtree(output_dir / "tokenizer")
    write_tokenizer(output_dir / "tokenizer")


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Tile equally sized images, ``columns`` per row (one row per seed)."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def evaluate(pipe, work_dir: Path) -> dict:
    """Prompt accuracy on held-out, seen and fine-tuning-concept prompts at the documented settings."""
    numbers = {}
    for name, prompts, seeds in [
        ("heldout", heldout_base_prompts(), EVAL_SEEDS),
        ("seen", seen_base_prompts(), EVAL_SEEDS[:4]),
        ("finetune_concept", finetune_prompts(), EVAL_SEEDS[:4]),
    ]:
        result = evaluate_pipeline(pipe, prompts, seeds)
        numbers[name] = {k: round(v, 4) for k, v in result.items() if k.endswith("accuracy")}
        numbers[name]["images"] = len(result["images"])
        grid_path = work_dir / f"samples_{name}.png"
        make_grid(result["images"], columns=len(prompts)).save(grid_path)
        logger.info("%s: %s (grid: %s)", name, numbers[name], grid_path)
    return numbers


MODEL_CARD = """# tiny-sd: the embedded coloured-shapes base of reslora-diffusers

A tiny `StableDiffusionPipeline` trained from scratch by `scripts/pretrain_tiny_base.py`
on procedurally generated images "a <colour> <shape> on a <background> background"
(`reslora_diffusers.data`). It exists so that training, demo and benchmarks run with no
model hub. It is not a general text-to-image model.

| | |
|---|---|
| resolution | {resolution} x {resolution} px (latents 4 x {latent} x {latent}) |
| inference | DPM-Solver++ (`scheduler/`), {steps} steps, guidance scale {guidance} |
| prediction type | {prediction_type} (fine-tuning scripts must read `scheduler.config.prediction_type`) |
| vocabulary | {vocab} ({concept!r} is in the vocabulary but never trained) |
| parameters | UNet {unet:.2f} M, VAE {vae:.2f} M, text encoder {text_encoder:.2f} M |
| held-out colour x shape pairs | {heldout_pairs} |
| training | {num_images} images, seed {seed}; VAE {vae_steps} steps, then UNet + text encoder {unet_steps} steps, batch {batch} |
| training time | {minutes:.0f} min on {threads} CPU thread(s) |

Prompt accuracy (colour, shape and background all read correctly by
`reslora_diffusers.eval.analyse_image`), at the settings above:

| prompts | images | accuracy | colour | shape | background |
|---|---|---|---|---|---|
{rows}

VAE reconstructions of the fine-tuning set ({concept}es) score {vae_finetune:.1%}, of the base set
{vae_base:.1%}: the VAE can draw the new concept; the UNet must learn it. Load with
`StableDiffusionPipeline.from_pretrained(reslora_diffusers.data.default_base_model_path())`.
"""


def write_model_card(pipe, numbers: dict, args: argparse.Namespace, output_dir: Path) -> None:
    labels = {
        "heldout": f"held-out pairs (seeds 0-{len(EVAL_SEEDS) - 1})",
        "seen": "seen pairs (seeds 0-3)",
        "finetune_concept": f"{FINETUNE_SHAPE} (seeds 0-3)",
    }
    rows = "\n".join(
        f"| {labels[name]} | {n['images']} | {n['accuracy']:.1%} | {n['color_accuracy']:.1%} "
        f"| {n['shape_accuracy']:.1%} | {n['background_accuracy']:.1%} |"
        for name, n in numbers["accuracy"].items()
    )
    millions = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters()) / 1e6
        for name in ("unet", "vae", "text_encoder")
    }
    card = MODEL_CARD.format(
        resolution=BASE_RESOLUTION,
        latent=BASE_RESOLUTION // 2,
        steps=BASE_NUM_INFERENCE_STEPS,
        guidance=BASE_GUIDANCE_SCALE,
        prediction_type=pipe.scheduler.config.prediction_type,
        vocab=", ".join(VOCAB_WORDS),
        concept=FINETUNE_SHAPE,
        **millions,
        heldout_pairs=", ".join(f"{c} {s}" for c, s in HELDOUT_COMBOS),
        num_images=args.num_images,
        seed=args.seed,
        vae_steps=args.vae_steps,
        unet_steps=args.unet_steps,
        batch=args.batch_size,
        minutes=numbers["vae_minutes"] + numbers["unet_minutes"],
        threads=torch.get_num_threads(),
        rows=rows,
        vae_finetune=numbers["vae_reconstruction_accuracy"]["finetune_set"],
        vae_base=numbers["vae_reconstruction_accuracy"]["base_set"],
    )
    (output_dir / "README.md").write_text(card)


def vae_stage(pipe, images: torch.Tensor, args: argparse.Namespace) -> None:
    """Train the VAE and keep it (and its numbers) in the work dir for the UNet stage."""
    start = time.time()
    numbers = train_vae(pipe.vae, images, args)
    numbers["vae_minutes"] = (time.time() - start) / 60
    pipe.vae.save_pretrained(args.work_dir / "vae")
    (args.work_dir / "vae" / "numbers.json").write_text(json.dumps(numbers, indent=2))


def unet_stage(pipe, images: torch.Tensor, captions: list[str], args: argparse.Namespace) -> dict | None:
    """Set the latent scaling factor, train UNet + text encoder and save the pipeline.

    Returns the training numbers, or None when ``--max-minutes`` stopped the training.
    """
    numbers = json.loads((args.work_dir / "vae" / "numbers.json").read_text())
    pipe.vae.load_state_dict(type(pipe.vae).from_pretrained(args.work_dir / "vae").state_dict())
    means, stds = encode(pipe.vae, images)
    sampled = means + stds * torch.randn(means.shape, generator=step_generator(args.seed, -1))
    pipe.vae.register_to_config(scaling_factor=round(1.0 / sampled.std().item(), 5))
    logger.info("latent scaling factor %.5f", pipe.vae.config.scaling_factor)
    trainer = UNetTrainer(pipe, (means, stds), captions, args)
    if not trainer.train():
        logger.info(
            "stopped at step %d of %d; run the same command to continue", trainer.step, args.unet_steps
        )
        return None
    numbers.update(unet_loss=trainer.running_loss, unet_minutes=trainer.minutes)
    save_pipeline(pipe, args.output_dir)
    return numbers


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = make_base_set(args.work_dir / "base-set", num_images=args.num_images, seed=args.seed)
    images, captions = load_images(data_dir)
    logger.info("base set: %d images in %s", len(images), data_dir)
    torch.manual_seed(args.seed)
    pipe = build_pipeline(args.work_dir / "tokenizer")
    if args.stage in ("all", "vae"):
        vae_stage(pipe, images, args)
    if args.stage == "vae":
        return
    numbers = unet_stage(pipe, images, captions, args)
    if numbers is None:
        return

    pipe = StableDiffusionPipeline.from_pretrained(args.output_dir)
    finetune_dir = make_finetune_set(args.work_dir / "finetune-set")
    numbers["vae_reconstruction_accuracy"] = {
        "base_set": reconstruction_accuracy(pipe.vae, data_dir, limit=1000),
        "finetune_set": reconstruction_accuracy(pipe.vae, finetune_dir),
    }
    numbers["accuracy"] = evaluate(pipe, args.work_dir)
    write_model_card(pipe, numbers, args, args.output_dir)
    (args.work_dir / "numbers.json").write_text(json.dumps(numbers, indent=2))
    print(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()

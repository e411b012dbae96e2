"""Peak memory and step time of a training step at the published models' full size, with and
without gradient checkpointing: the frozen floor, PEFT LoRA and ResLoRA, each variant in a
fresh process (random weights in the published architectures, no download).

    python benchmarks/bench_memory.py --configs sd15-512-1 sdxl-1024-1 sd3-512-1
    python benchmarks/bench_memory.py --configs flux-512-1 --scale 0.5     # Flux: the scale that fits
    python benchmarks/bench_memory.py --configs sd15-512-1 --device cuda  # the same on a GPU
    python benchmarks/bench_memory.py --scale 0.05 --configs sd15-128-1    # toy size (the test)

Configs are ``PRESET-PIXELS-BATCH`` for the presets of ``scripts/make_random_pipeline.py``
(``sd15``, ``sdxl``, ``sd3``, ``flux``, ``qwen-image``, ``z-image``, ``flux2``, ``wan``; a
preset's own hyphen stays in it: ``qwen-image-512-1``); ``--scale`` shrinks the denoiser by that script's rule
(the image stays at the pixels given). The denoiser alone is built (the text encoders and the
VAE run before it and are freed, or are cached, in a real run), directly in the base dtype
(``--dtype``, default bf16; no float32 copy ever exists), frozen; the adapters and AdamW's
state are float32; the forward runs under bf16 autocast, as ``train_text_to_image.py
--mixed_precision bf16`` trains. The inputs are what the training script feeds the denoiser:
noisy latents at ``pixels / 8``, a timestep, 77 CLIP text states (SD3: 77 + 256 T5 tokens,
Flux: 512 T5 tokens; SDXL's pooled text and time ids; Flux's ids and guidance; Qwen-Image and
Z-Image: the states of a 128-token caption, as their pipelines drop the padding; FLUX.2: 512
Mistral tokens, its ids and guidance; Wan: a clip of ``WAN_FRAMES`` frames, the training
script's default, and 512 UMT5 tokens, as its pipeline pads them).

Variants: ``floor`` (the frozen model, gradients for its input only: what no adapter goes
under), ``peft`` (diffusers' ``add_adapter``, PEFT LoRA) and ResLoRA ``none``, ``is``, ``bs``
and ``ms`` at ``pre_num`` 1 and 5, on the targets the training script adapts by default (UNets:
attention and feed-forward; transformers: both streams' attention), rank 8. Modes: ``plain``
and ``checkpointed`` (the model's own ``enable_gradient_checkpointing()``). Each (variant, mode)
runs in a new Python process: ``--warmup`` steps, then ``--steps`` timed steps (forward, loss,
backward, AdamW). Its peak is the process's resident high-water mark (``VmHWM``, so the
weights and everything torch holds count), and on CUDA also ``torch.cuda.max_memory_allocated``.
A watchdog ends a process whose resident memory passes ``--memory_limit_gib`` (default: what
the machine has, less 1 GiB), so a configuration that does not fit is reported as such
instead of taking the machine down.

Every finished measurement is written to ``--results_dir`` (one JSON file each, default
``outputs/bench_memory``) and a later run with the same settings skips it, so a long table can
be made in parts. The table gives each variant's peak and median step time with their ratios
to PEFT LoRA's in the same mode, and checkpointing's effect (checkpointed / plain) per variant.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

FLOOR, PEFT = "floor", "peft"
RESLORA = ("none", "is", "bs:1", "bs:5", "ms:1", "ms:5")
VARIANTS = (FLOOR, PEFT, *RESLORA)
MODES = ("plain", "checkpointed")
#: each preset's denoiser class in diffusers
DENOISER_CLASSES = {
    "sd15": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
    "qwen-image": "QwenImageTransformer2DModel",
    "z-image": "ZImageTransformer2DModel",
    "flux2": "Flux2Transformer2DModel",
    "wan": "WanTransformer3DModel",
}
#: T5 tokens the pipelines encode prompts to by default, beside 77 CLIP tokens
T5_TOKENS = {"sd3": 256, "flux": 512}
#: caption tokens of Qwen-Image and Z-Image, whose pipelines keep each prompt's own tokens
CAPTION_TOKENS = {"qwen-image": 128, "z-image": 128}
#: FLUX.2's and Wan's text tokens (Mistral's and UMT5's, their pipelines' defaults), Wan's frames
#: per clip (the training script's default ``--num_frames``: 9 latent frames)
LM_TOKENS = {"flux2": 512, "wan": 512}
WAN_FRAMES = 33


def parse_config(name: str) -> tuple[str, int, int]:
    """``(preset, pixels, batch)`` of ``PRESET-PIXELS-BATCH``."""
    try:
        preset, pixels, batch = name.rsplit("-", 2)
        side, size = int(pixels), int(batch)
    except ValueError as err:
        raise ValueError(f"config {name!r}: expected PRESET-PIXELS-BATCH such as sdxl-1024-1") from err
    if preset not in DENOISER_CLASSES:
        raise ValueError(f"config {name!r}: preset {preset!r}, allowed {' | '.join(DENOISER_CLASSES)}")
    if side % 16:
        raise ValueError(f"config {name!r}: pixels must be a multiple of 16")
    return preset, side, size


def variant_label(variant: str) -> str:
    from reslora_diffusers.core import get_shortcut

    if variant in (FLOOR, PEFT):
        return {"floor": "floor (frozen)", "peft": "PEFT LoRA"}[variant]
    res_type, _, pre_num = variant.partition(":")
    return get_shortcut(res_type, int(pre_num or 0)).title


# ---------------------------------------------------------------- one measurement (worker)


def peak_rss_gib() -> float:
    """The process's resident high-water mark (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError("no VmHWM in /proc/self/status")


def _watchdog(limit_gib: float) -> None:
    """End the process (exit code 3) as soon as its resident memory passes ``limit_gib``."""
    page = os.sysconf("SC_PAGE_SIZE")

    def watch():
        while True:
            resident = int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**30
            if resident > limit_gib:
                print(json.dumps({"over_limit_gib": limit_gib}), flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def build_denoiser(preset: str, scale: float, dtype):
    import diffusers
    import torch

    from reslora_diffusers.data.random_pipelines import denoiser_config

    cls = getattr(diffusers, DENOISER_CLASSES[preset])
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the base dtype: no float32 copy at any time
    try:
        model = cls(**denoiser_config(preset, scale))
    finally:
        torch.set_default_dtype(saved)
    return model.requires_grad_(False)


def make_inputs(model, preset: str, side: int, batch: int) -> dict:
    """The denoiser's keyword arguments for ``batch`` images of ``side`` pixels (module doc)."""
    import torch

    from reslora_diffusers.frontends import frontend_for

    latent = side // 8
    frontend = frontend_for(model)
    if preset in CAPTION_TOKENS:  # Qwen-Image's 2 x 2 packed tokens, Z-Image's 2 x 2 patches
        grid = (latent // 2, latent // 2)
        tokens = CAPTION_TOKENS[preset]
        return frontend.synthetic_inputs(model, num=1, batch=batch, text_tokens=tokens, grid=grid)[0]
    if preset == "flux2":  # 2 x 2 patches of the latents as tokens
        grid = (latent // 2, latent // 2)
        return frontend.synthetic_inputs(model, num=1, batch=batch, text_tokens=LM_TOKENS[preset], grid=grid)[
            0
        ]
    if preset == "wan":  # 1 + (frames - 1) / 4 latent frames
        frames = 1 + (WAN_FRAMES - 1) // 4
        return frontend.synthetic_inputs(
            model, num=1, batch=batch, text_tokens=LM_TOKENS[preset], frames=frames, grid=(latent, latent)
        )[0]
    if preset == "flux":
        grid = (latent // 2, latent // 2)
        return frontend.synthetic_inputs(model, num=1, batch=batch, text_tokens=T5_TOKENS["flux"], grid=grid)[
            0
        ]
    if preset == "sd3":
        inputs = frontend.synthetic_inputs(model, num=1, batch=batch, text_tokens=77 + T5_TOKENS["sd3"])[0]
        key = "hidden_states"
    else:
        inputs = frontend.synthetic_inputs(model, num=1, batch=batch)[0]
        inputs["encoder_hidden_states"] = torch.randn(batch, 77, model.config.cross_attention_dim).to(
            inputs["encoder_hidden_states"]
        )
        if "added_cond_kwargs" in inputs:  # original size, crop (0, 0), target size
            time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32)
            inputs["added_cond_kwargs"]["time_ids"] = time_ids.repeat(batch, 1).to(inputs["sample"])
        key = "sample"
    inputs[key] = torch.randn(batch, model.config.in_channels, latent, latent).to(inputs[key])
    return inputs


def default_targets(preset: str) -> list[str]:
    """What ``train_text_to_image.py`` adapts by default for the family."""
    from reslora_diffusers.frontends import (
        DEFAULT_UNET_TARGETS,
        DIT_ATTENTION_TARGETS,
        FLUX2_ATTENTION_TARGETS,
        WAN_ATTENTION_TARGETS,
        Z_IMAGE_ATTENTION_TARGETS,
    )

    own = {
        "flux2": FLUX2_ATTENTION_TARGETS,
        "wan": WAN_ATTENTION_TARGETS,
        "z-image": Z_IMAGE_ATTENTION_TARGETS,
    }
    if preset in own:
        return list(own[preset])
    return list(DEFAULT_UNET_TARGETS if preset in ("sd15", "sdxl") else DIT_ATTENTION_TARGETS)


def add_variant(model, variant: str, rank: int, targets: list[str]) -> list:
    """Adapt ``model`` as ``variant``; returns the trained parameters (float32)."""
    from peft import LoraConfig

    from reslora_diffusers import ResLoRAConfig, add_reslora, trainable_parameters

    if variant == FLOOR:
        return []
    if variant == PEFT:
        from reslora_diffusers.training.peft_baseline import peft_target_modules

        targets = peft_target_modules(model, targets)  # FLUX.2's attn.to_out: its linears alone
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        res_type, _, pre_num = variant.partition(":")
        config = ResLoRAConfig(
            rank=rank, res_type=res_type, pre_num=int(pre_num or 1), target_modules=targets
        )
        params = trainable_parameters(add_reslora(model, config))
    for p in params:
        p.data = p.data.float()
    return params


def measure(args) -> dict:
    """One (config, variant, mode) in this process: the row of the table, as a dict."""
    import torch
    import torch.nn.functional as F

    from reslora_diffusers.merge.error import output_tensor
    from reslora_diffusers.training.speed import make_adamw, trace_chains

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    preset, side, batch = parse_config(args.config)
    model = build_denoiser(preset, args.scale, dtype).to(device)
    weights_gib = peak_rss_gib()
    inputs = make_inputs(model, preset, side, batch)
    params = add_variant(model, args.variant, args.rank, args.targets or default_targets(preset))
    trace_chains(model, inputs)  # no_grad, as the training script traces before training
    if args.mode == "checkpointed":
        model.enable_gradient_checkpointing()
    model.train()
    first = next(iter(inputs))
    if not params:  # the floor: gradients for the latents alone (Z-Image: one tensor per image)
        latents = inputs[first]
        inputs[first] = (
            [x.detach().requires_grad_(True) for x in latents]
            if isinstance(latents, list)
            else latents.detach().requires_grad_(True)
        )
    opt = make_adamw(params, None, device, lr=1e-4) if params else None
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            if step == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype != torch.float32):
            out = output_tensor(model(**inputs))
        loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            for leaf in inputs[first] if isinstance(inputs[first], list) else [inputs[first]]:
                leaf.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "config": args.config,
        "variant": args.variant,
        "mode": args.mode,
        "scale": args.scale,
        "seconds": times,
        "peak_rss_gib": peak_rss_gib(),
        "weights_rss_gib": weights_gib,
        "cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "trained_parameters": sum(p.numel() for p in params),
        "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------- the driver


def result_path(args, config: str, variant: str, mode: str) -> Path:
    tag = f"{config}-s{args.scale:g}-r{args.rank}-{args.dtype}-{args.device}-w{args.warmup}-n{args.steps}"
    return Path(args.results_dir) / tag / f"{variant.replace(':', 'm')}-{mode}.json"


def run_one(args, config: str, variant: str, mode: str) -> dict:
    """The measurement in a fresh process (its peak is its own), or the stored one."""
    path = result_path(args, config, variant, mode)
    if path.is_file():
        return json.loads(path.read_text())
    cmd = [sys.executable, __file__, "--worker", "--config", config, "--variant", variant, "--mode", mode]
    cmd += ["--scale", str(args.scale), "--rank", str(args.rank), "--dtype", args.dtype]
    cmd += ["--device", args.device, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    cmd += ["--memory_limit_gib", str(args.memory_limit_gib)]
    if args.targets:
        cmd += ["--targets", *args.targets]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 3 and lines:
        row = {"config": config, "variant": variant, "mode": mode, **json.loads(lines[-1])}
    elif proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} {mode} on {config} failed:\n{proc.stderr[-3000:]}")
    else:
        row = json.loads(lines[-1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    tmp.replace(path)
    return row


def _ratio(value: float | None, reference: float | None) -> str:
    return "-" if value is None or not reference else f"{value / reference:.3f}"


def table(config: str, rows: dict[tuple[str, str], dict]) -> str:
    """One markdown table per config: peak, step time, ratios to PEFT and to the plain mode."""

    def peak(row):
        if row is None or "over_limit_gib" in row:
            return None
        return row["cuda_peak_gib"] if row.get("cuda_peak_gib") is not None else row["peak_rss_gib"]

    def secs(row):
        return None if row is None or "seconds" not in row else statistics.median(row["seconds"])

    cuda = any(r.get("cuda_peak_gib") is not None for r in rows.values())
    out = [
        f"\n### {config}\n",
        f"| variant | mode | peak GiB ({'CUDA allocator' if cuda else 'process RSS'}) | peak / PEFT "
        "| s per step | time / PEFT | checkpointed / plain: peak, time |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        for variant in VARIANTS:
            row = rows.get((variant, mode))
            if row is None:
                continue
            ref = rows.get((PEFT, mode))
            plain = rows.get((variant, "plain"))
            if "over_limit_gib" in row:
                out.append(
                    f"| {variant_label(variant)} | {mode} | over {row['over_limit_gib']:.1f} | - | - | - | - |"
                )
                continue
            cut = "-"
            if mode == "checkpointed" and peak(plain) is not None:
                cut = f"{_ratio(peak(row), peak(plain))}, {_ratio(secs(row), secs(plain))}"
            out.append(
                f"| {variant_label(variant)} | {mode} | {peak(row):.2f} | {_ratio(peak(row), peak(ref))} "
                f"| {secs(row):.2f} | {_ratio(secs(row), secs(ref))} | {cut} |"
            )
    weights = {round(r["weights_rss_gib"], 2) for r in rows.values() if "weights_rss_gib" in r}
    out.append(f"\nProcess RSS after building the frozen model: {', '.join(map(str, sorted(weights)))} GiB.")
    return "\n".join(out)


def _machine_memory_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 16.0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", default=["sd15-512-1", "sdxl-1024-1", "sd3-512-1"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", nargs="+", default=None, help="default: the training script's for the family")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="the frozen base's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--memory_limit_gib", type=float, default=_machine_memory_gib() - 1)
    p.add_argument("--results_dir", default="outputs/bench_memory")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _watchdog(args.memory_limit_gib)
        print(json.dumps(measure(args)), flush=True)
        return
    for config in args.configs:
        parse_config(config)
    print(
        f"bench_memory {datetime.date.today()}, {args.device}, scale {args.scale:g}, rank {args.rank}, "
        f"base {args.dtype}\ncommand: python benchmarks/bench_memory.py "
        f"{shlex.join(argv if argv is not None else sys.argv[1:])}",
        flush=True,
    )
    for config in args.configs:
        rows = {}
        for mode in args.modes:
            for variant in args.variants:
                rows[(variant, mode)] = run_one(args, config, variant, mode)
                print(f"  {config} {variant} {mode}: done", file=sys.stderr, flush=True)
        print(table(config, rows), flush=True)


if __name__ == "__main__":
    main()

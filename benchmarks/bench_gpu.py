"""Training-step time and peak memory of ResLoRA against PEFT LoRA and the frozen-UNet floor,
eager and compiled, on SD 1.5- and SDXL-sized UNets (random weights, no download).

    python benchmarks/bench_gpu.py                                   # a CUDA GPU, full size
    python benchmarks/bench_gpu.py --device cpu --scale 0.1          # toy size, any machine

Variants (rank 8 on the attention projections, the same frozen base weights shared by all):
``floor`` (the frozen UNet, gradients for its input only: the cost no adapter can go under),
``PEFT LoRA`` (diffusers' ``unet.add_adapter``) and ResLoRA ``none``, ``is``, ``bs`` and ``ms``
at ``pre_num`` 1 and 5. Each variant is built and compiled once, warmed up, and then the
variants (and modes) alternate one step at a time, so drifts of the machine hit them alike,
in an order that rotates every round (:func:`rotated`), so no variant keeps one slot.
A step is forward, loss, backward and a (fused on CUDA) AdamW step, under bf16 autocast on
CUDA with the base in bf16 and the adapters in float32, as the training script runs.

Configs ``MODEL-PIXELS-BATCH``: ``sd15-512-1``, ``sd15-512-8``, ``sdxl-1024-1`` by default.
``--scale`` shrinks the UNet (``make_random_pipeline.py``'s rule) and the image side alike
(to a multiple of 64 px, at least 64). The table gives the median step time, its ratio to
PEFT LoRA's and to the floor's in the same mode, the first compiled step's seconds (compile
time, with inductor's on-disk caches off so that no variant loads kernels an earlier run
compiled), and the peak CUDA memory of a step (``torch.cuda.max_memory_allocated``; N/A on CPU).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import shlex
import statistics
import sys
import time

import torch
import torch._inductor.config as inductor_config
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from reslora_diffusers import ResLoRAConfig, add_reslora, trainable_parameters
from reslora_diffusers.core import get_shortcut
from reslora_diffusers.data.random_pipelines import clip_g_config, denoiser_config
from reslora_diffusers.frontends import UNET_TARGETS
from reslora_diffusers.merge.error import output_tensor
from reslora_diffusers.training.speed import compile_model, make_adamw

CONFIGS = ("sd15-512-1", "sd15-512-8", "sdxl-1024-1")
RESLORA = (("none", 1), ("is", 1), ("bs", 1), ("bs", 5), ("ms", 1), ("ms", 5))
FLOOR, PEFT = "floor", "PEFT LoRA"


def parse_config(name: str, scale: float) -> tuple[str, int, int]:
    """``(preset, image side in pixels, batch)``; the side shrinks with ``scale``."""
    try:
        preset, pixels, batch = name.split("-")
        side = max(64, round(int(pixels) * scale / 64) * 64)
        return preset, side, int(batch)
    except ValueError as err:
        raise ValueError(f"config {name!r}: expected MODEL-PIXELS-BATCH such as sd15-512-8") from err


def make_inputs(unet: UNet2DConditionModel, side: int, batch: int, device, dtype, scale: float) -> dict:
    """Noisy latents at ``side / 8``, timesteps, 77 text tokens; SDXL's pooled text and time ids."""
    gen = torch.Generator().manual_seed(0)
    cfg = unet.config
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, side // 8, side // 8, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 77, cfg.cross_attention_dim, generator=gen),
    }
    if cfg.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, clip_g_config(scale)["projection_dim"], generator=gen),
            "time_ids": torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32).repeat(batch, 1),
        }
    return _to(inputs, device, dtype)


def _to(obj, device, dtype):
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj.to(device, dtype) if obj.is_floating_point() else obj.to(device)


def shared_copy(base: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``base`` whose parameters and buffers are ``base``'s own tensors (one set of
    frozen weights in memory for every variant)."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def fresh_compile_cache(models: int) -> None:
    """Start one size's compiled models afresh: drop the graphs of the size before and let
    dynamo keep ``models`` graphs. Dynamo caches graphs per code object, which every model of
    one class shares (``UNet2DConditionModel.forward``); past ``recompile_limit`` (8 by default)
    a further model would run eagerly, with a warning and no error."""
    torch._dynamo.reset()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, models)


def rotated(items: list, round_index: int) -> list:
    """``items`` in the order of round ``round_index``: started at position ``round_index mod n``,
    so that over ``n`` rounds every variant runs once in every slot of the order. Measured on a
    2-core CPU (torch.compile, small UNet): two identical copies of one variant differed by
    1-2 % depending on where they ran in a fixed order, the size of the effects measured."""
    start = round_index % len(items)
    return items[start:] + items[:start]


class Variant:
    """One variant's model, optimizer and step; ``compiled`` is its torch.compile wrapper."""

    def __init__(self, label: str, model, params: list, inputs: dict, device) -> None:
        self.label, self.model, self.inputs, self.params = label, model.train(), inputs, params
        for p in params:  # adapters train in float32 over a half-precision base
            p.data = p.data.float()
        self.opt = make_adamw(params, None, device, lr=1e-4) if params else None
        self.compiled = None
        self.compile_seconds = float("nan")

    def compile(self, backend: str, mode: str) -> None:
        self.compiled = compile_model(self.model, mode, backend, inputs=self.inputs)

    def step(self, compiled: bool) -> None:
        model = self.compiled if compiled else self.model
        device = self.inputs["sample"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = output_tensor(model(**self.inputs))
        loss = F.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        else:
            self.inputs["sample"].grad = None


def build_variants(base, inputs: dict, rank: int, device, only: list[str] | None) -> list[Variant]:
    variants = []
    floor_inputs = {**inputs, "sample": inputs["sample"].detach().clone().requires_grad_(True)}

    def wanted(label: str) -> bool:
        return only is None or label in only

    if wanted(FLOOR):
        variants.append(Variant(FLOOR, shared_copy(base), [], floor_inputs, device))
    if wanted(PEFT):
        peft = shared_copy(base)
        peft.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS)))
        variants.append(
            Variant(PEFT, peft, [p for p in peft.parameters() if p.requires_grad], inputs, device)
        )
    for res_type, pre_num in RESLORA:
        label = get_shortcut(res_type, pre_num).title
        if wanted(label):
            config = ResLoRAConfig(
                rank=rank, res_type=res_type, pre_num=pre_num, target_modules=list(UNET_TARGETS)
            )
            model = add_reslora(shared_copy(base), config)
            variants.append(Variant(label, model, trainable_parameters(model), inputs, device))
    return variants


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(variant: Variant, compiled: bool, device) -> tuple[float, float | None]:
    """(seconds, peak GiB or None on CPU) of one step."""
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    variant.step(compiled)
    _sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def bench_config(name: str, args, device, dtype) -> str:
    preset, side, batch = parse_config(name, args.scale)
    torch.manual_seed(0)
    # no dtype for float32, the dtype it is built in: diffusers warns at every .to(dtype=...)
    cast = {} if dtype == torch.float32 else {"dtype": dtype}
    base = UNet2DConditionModel(**denoiser_config(preset, args.scale)).to(device, **cast)
    base.requires_grad_(False)
    inputs = make_inputs(base, side, batch, device, dtype, args.scale)
    variants = build_variants(base, inputs, args.rank, device, args.variants)
    runs = [(v, mode == "compiled") for mode in args.modes for v in variants]
    for variant in variants:  # eager warm-up first: it is also ResLoRA's tracing pass
        for _ in range(args.warmup):
            variant.step(False)
    if "compiled" in args.modes:
        inductor_config.force_disable_caches = True
        fresh_compile_cache(len(variants))
        for variant in variants:
            variant.compile(args.compile_backend, args.compile_mode)
            variant.compile_seconds = timed(variant, True, device)[0]
            for _ in range(args.warmup - 1):
                variant.step(True)
    samples: dict[tuple[str, bool], list[tuple[float, float | None]]] = {(v.label, c): [] for v, c in runs}
    for i in range(args.rounds):
        for variant, compiled in rotated(runs, i):
            samples[(variant.label, compiled)].append(timed(variant, compiled, device))
    return table(name, preset, side, batch, args, samples, {v.label: v.compile_seconds for v in variants})


def table(name, preset, side, batch, args, samples, compile_seconds) -> str:
    median = {key: statistics.median(s for s, _ in values) for key, values in samples.items()}
    lines = [
        f"\n### {name}: {preset} UNet (scale {args.scale:g}), {side} px, batch {batch}, rank {args.rank}\n",
        "| variant | mode | median ms | ratio to PEFT | ratio to floor | compile s | peak GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for (label, compiled), ms in median.items():
        mode = "compiled" if compiled else "eager"
        peft, floor = median.get((PEFT, compiled)), median.get((FLOOR, compiled))
        peaks = [p for _, p in samples[(label, compiled)] if p is not None]
        compile_s = f"{compile_seconds[label]:.1f}" if compiled else "-"
        peak = f"{max(peaks):.2f}" if peaks else "N/A"
        lines.append(
            f"| {label} | {mode} | {ms * 1e3:.1f} | {_ratio(ms, peft)} | {_ratio(ms, floor)} | {compile_s} | {peak} |"
        )
    return "\n".join(lines)


def _ratio(value: float, reference: float | None) -> str:
    return "n/a" if reference is None else f"{value / reference:.3f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--scale", type=float, default=1.0, help="shrink the UNet and the image side, in (0, 1]")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS))
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    p.add_argument("--variants", nargs="+", default=None, help="labels to run (default: all)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument(
        "--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"]
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{name}, torch {torch.__version__}, {datetime.date.today()}, threads {torch.get_num_threads()}\n"
        f"command: python benchmarks/bench_gpu.py {shlex.join(argv if argv is not None else sys.argv[1:])}"
    )
    for config in args.configs:
        print(bench_config(config, args, device, dtype), flush=True)


if __name__ == "__main__":
    main()

"""Training-step time of ResLoRA against diffusers' PEFT LoRA on a UNet, an SD3, Flux, Qwen-Image,
Z-Image, FLUX.2 or Wan transformer, measured side by side.

Every variant trains the same model config (random weights, no download) on the same inputs:
forward + backward + AdamW step, rank and targets equal. Variants run interleaved, one step
each per round in an order that rotates every round (``bench_gpu.rotated``), and the table
reports medians over rounds (wall time, and the process's CPU time, which other jobs on a
shared machine disturb less), the ratios to PEFT, the FLOP ratio to PEFT and the bytes the
step saves for backward (activation memory; CPU has no peak-memory counter). The FLOPs are
the matrix products, convolutions and attention of one forward + backward as torch's FLOP
counter counts them (elementwise work is not counted): work no implementation avoids, so a
variant above 1.0 there cannot reach PEFT's step where the step is bound by that work (``bs``
at ``pre_num`` m applies m + 1 adapters' products where PEFT applies one). The paired
ratio is the median over rounds of ``variant step / PEFT step of the same round`` with its 95 %
bootstrap interval: a slow stretch of the machine slows both steps of a round alike, so the
pairing removes most of the drift that the ratio of two medians carries. It also
times an inference forward of the base UNet against the UNet with the merged LoRA fused in.

    python benchmarks/bench_step.py [--model unet|sd3|flux|qwen-image|z-image|flux2|wan]
                                    [--sizes small mid wide] [--rounds 7]
                                    [--targets attention|attention+ff] [--variants none:1 bs:5 ...]
                                    [--compile] [--no_inference] [--gradient_checkpointing on|both]

``--compile`` puts every variant (PEFT LoRA too) through ``torch.compile`` (inductor) first;
the first step's time, which holds the compilation, is the table's "compile s" column. Inductor's
on-disk caches are switched off, so that every variant compiles from scratch (a variant compiled
by an earlier run would otherwise load its kernels in seconds).

For SD3 and Flux the targets are the joint-attention projections of both streams, and
``attention+ff`` adds the feed-forward layers of both streams (Flux: and the single blocks'
``proj_mlp``; not their ``proj_out``, which PEFT cannot name without the output layer).
Their ``wide`` size (width 512, few blocks) puts rank 8 at 1.6 % of the width, near a real
model's share (SD3 medium: width 1536, Flux: 3072, LoRA ranks 16-64), where the toy widths
of ``small``/``mid`` (64, 128) give the adapters' products 6-12 % of each projection's work;
``full-width`` has the released models' widths themselves, with two or three blocks (not in the
default sizes: a Flux step there takes seconds).

FLUX.2 and Wan train their families' default targets (the attention projections of every
block: FLUX.2's double blocks' of both streams and its single blocks' fused ``to_qkv_mlp_proj``/
``attn.to_out``; Wan's self- and cross-attention), ``attention+ff`` adding their feed-forward
layers. Their ``full-width`` sizes have the released widths and two blocks, so that every
chain has a link: Wan 2.1 14B's 5120 on a clip of 2 latent frames, and FLUX.2 [dev]'s 6144 with
two single-stream blocks (48 of its 56 blocks; their fused ``to_qkv_mlp_proj``/``attn.to_out``
are FLUX.2's own targets, while its double blocks' are Flux's, measured at Flux's width above).
That FLUX.2 is 1.7 B parameters, 6.3 GiB in float32, most of it the modulation layers every
size has; each double block adds 2.0 GiB. ``--no_inference`` skips the inference forward, which
copies the model twice more.

Qwen-Image (``attention+ff``: and both streams' MLPs) and Z-Image (its ``to_q/to_k/to_v/to_out.0``;
``attention+ff``: and its SwiGLU ``w1/w2/w3``) have ``small`` (width 64) and ``full-width`` (the
released widths, Qwen-Image 3072 and Z-Image 3840): two dual-stream blocks for Qwen-Image, one
noise and one context refiner and two main blocks for Z-Image, so that every chain has a link.

``--gradient_checkpointing on`` turns on every variant's gradient checkpointing (the model's own
``enable_gradient_checkpointing()``; PEFT LoRA too), ``both`` runs every variant plain and
checkpointed in the same rotation and adds a table of what checkpointing costs each variant:
per round, ``checkpointed step / plain step`` of the variant over the same ratio of PEFT LoRA,
median and 95 % interval. Above 1, checkpointing costs that variant more time than it costs PEFT
LoRA (a ResLoRA block that runs again in backward reads its kept shortcut values, and ``is``
computes one more rank-r product per block).

All variants share one copy of the frozen weights (``bench_gpu.shared_copy``), so the
full-width models fit in memory once.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config as inductor_config
from diffusers import (
    Flux2Transformer2DModel,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from peft import LoraConfig
from torch.utils.flop_counter import FlopCounterMode

from reslora_diffusers import ResLoRAConfig, add_reslora, merge_to_lora, remove_reslora, trainable_parameters
from reslora_diffusers.core import get_shortcut
from reslora_diffusers.export import fuse_lora
from reslora_diffusers.frontends import (
    DIT_ATTENTION_TARGETS,
    DIT_FEEDFORWARD_TARGETS,
    FLUX2_ATTENTION_TARGETS,
    FLUX2_FEEDFORWARD_TARGETS,
    QWEN_IMAGE_FEEDFORWARD_TARGETS,
    UNET_FEEDFORWARD_TARGETS,
    UNET_TARGETS,
    WAN_ATTENTION_TARGETS,
    WAN_FEEDFORWARD_TARGETS,
    Z_IMAGE_ATTENTION_TARGETS,
    Z_IMAGE_FEEDFORWARD_TARGETS,
    frontend_for,
)
from reslora_diffusers.merge.error import output_tensor
from reslora_diffusers.training.peft_baseline import peft_target_modules
from reslora_diffusers.training.speed import compile_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import fresh_compile_cache, rotated, shared_copy  # noqa: E402
from compare_methods import bootstrap_interval  # noqa: E402

#: per model: diffusers' attention projections, or with the feed-forward layers
TARGET_SETS = {
    "unet": {"attention": UNET_TARGETS, "attention+ff": [*UNET_TARGETS, *UNET_FEEDFORWARD_TARGETS]},
    "sd3": {
        "attention": list(DIT_ATTENTION_TARGETS),
        "attention+ff": [*DIT_ATTENTION_TARGETS, *DIT_FEEDFORWARD_TARGETS],
    },
    "flux": {
        "attention": list(DIT_ATTENTION_TARGETS),
        "attention+ff": [*DIT_ATTENTION_TARGETS, *DIT_FEEDFORWARD_TARGETS, "proj_mlp"],
    },
    "qwen-image": {
        "attention": list(DIT_ATTENTION_TARGETS),
        "attention+ff": [*DIT_ATTENTION_TARGETS, *QWEN_IMAGE_FEEDFORWARD_TARGETS],
    },
    "z-image": {
        "attention": list(Z_IMAGE_ATTENTION_TARGETS),
        "attention+ff": [*Z_IMAGE_ATTENTION_TARGETS, *Z_IMAGE_FEEDFORWARD_TARGETS],
    },
    "flux2": {
        "attention": list(FLUX2_ATTENTION_TARGETS),
        "attention+ff": [*FLUX2_ATTENTION_TARGETS, *FLUX2_FEEDFORWARD_TARGETS],
    },
    "wan": {
        "attention": list(WAN_ATTENTION_TARGETS),
        "attention+ff": [*WAN_ATTENTION_TARGETS, *WAN_FEEDFORWARD_TARGETS],
    },
}
SIZES = {
    # UNet: (block_out_channels, latent side, batch); SD3/Flux: (blocks, width, latent side, batch)
    "unet": {"small": ((32, 64), 16, 4), "mid": ((64, 128, 256), 32, 2)},
    # full-width: the released models' widths (SD3 medium 1536, Flux 3072) with 2 joint blocks
    # (SD3) or 1 double and 2 single blocks (Flux), to keep a step within a CPU's seconds
    "sd3": {
        "small": (4, 64, 16, 2),
        "mid": (8, 128, 32, 2),
        "wide": (6, 512, 16, 2),
        "full-width": (2, 1536, 16, 2),
    },
    "flux": {
        "small": (2, 64, 16, 2),
        "mid": (4, 128, 32, 2),
        "wide": (2, 512, 16, 2),
        "full-width": (1, 3072, 16, 1),
    },
    # Qwen-Image: (dual-stream blocks, width, latent side, batch); Z-Image: (main blocks, width,
    # latent side, batch) with one noise and one context refiner
    "qwen-image": {"small": (2, 64, 16, 2), "full-width": (2, 3072, 16, 1)},
    "z-image": {"small": (2, 64, 16, 2), "full-width": (2, 3840, 16, 1)},
    # FLUX.2: ((double, single) blocks, width, latent side, batch); Wan: `blocks` blocks, 2 latent frames
    "flux2": {"small": ((2, 4), 64, 16, 2), "full-width": ((0, 2), 6144, 16, 1)},
    "wan": {"small": (2, 64, 16, 2), "full-width": (2, 5120, 16, 1)},
}
#: the attention head size of the FLUX.2 and Wan sizes: the released 128, 32 on the toy widths
HEAD = {"small": 32, "full-width": 128}
RESLORA = [("none", 1), ("is", 1), ("bs", 1), ("bs", 3), ("bs", 5), ("ms", 1), ("ms", 3), ("ms", 5)]
#: the label suffix of a checkpointed variant, and the modes of each --gradient_checkpointing
CHECKPOINTED = " (checkpointed)"
CHECKPOINTING_MODES = {"off": (False,), "on": (True,), "both": (False, True)}


def parse_variant(text: str) -> tuple[str, int]:
    """``res_type:pre_num`` (``bs:5``) or ``res_type`` (pre_num 1)."""
    res_type, _, pre_num = text.partition(":")
    return res_type, int(pre_num or 1)


def make_unet(channels: tuple[int, ...]) -> UNet2DConditionModel:
    torch.manual_seed(0)
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=16,
        block_out_channels=channels,
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32 if channels[0] >= 32 else 8,
    )


def make_sd3(blocks: int, width: int, side: int) -> SD3Transformer2DModel:
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=side,
        patch_size=2,
        num_layers=blocks,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        joint_attention_dim=64,
        caption_projection_dim=width,
        pooled_projection_dim=64,
        pos_embed_max_size=side,
    )


def make_flux(blocks: int, width: int) -> FluxTransformer2DModel:
    """``blocks`` double-stream blocks and twice as many single-stream ones (Flux has 19 and 38)."""
    torch.manual_seed(0)
    return FluxTransformer2DModel(
        in_channels=16,
        num_layers=blocks,
        num_single_layers=2 * blocks,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    )


def make_flux2(blocks: tuple[int, int], width: int, head: int) -> Flux2Transformer2DModel:
    """``blocks`` = (double-stream, single-stream) blocks of FLUX.2 [dev]'s layout (8 and 48
    there; MLP ratio 3, 128 input channels, guidance embedding), heads of ``head``."""
    torch.manual_seed(0)
    double, single = blocks
    return Flux2Transformer2DModel(
        in_channels=128,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=head,
        num_attention_heads=width // head,
        joint_attention_dim=64,
        axes_dims_rope=(head // 4,) * 4,
        guidance_embeds=True,
    )


def make_wan(blocks: int, width: int, head: int) -> WanTransformer3DModel:
    """``blocks`` blocks of Wan 2.1's layout (feed-forward 2.7 x the width, as 13824 / 5120)."""
    torch.manual_seed(0)
    return WanTransformer3DModel(
        num_attention_heads=width // head,
        attention_head_dim=head,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        ffn_dim=round(width * 2.7),
        num_layers=blocks,
    )


def make_qwen_image(blocks: int, width: int) -> QwenImageTransformer2DModel:
    """``blocks`` dual-stream blocks of ``width`` (heads of 32), text states of 64 features."""
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(
        num_layers=blocks,
        attention_head_dim=32,
        num_attention_heads=width // 32,
        joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12),
    )


def make_z_image(blocks: int, width: int) -> ZImageTransformer2DModel:
    """One noise and one context refiner and ``blocks`` main blocks of ``width`` (heads of 32),
    captions of 64 features."""
    torch.manual_seed(0)
    return ZImageTransformer2DModel(
        dim=width,
        n_layers=blocks,
        n_refiner_layers=1,
        n_heads=width // 32,
        n_kv_heads=width // 32,
        cap_feat_dim=64,
        axes_dims=[8, 12, 12],
    )


def make_qwen_text_dit(model: str, size: tuple):
    """A Qwen-Image or Z-Image transformer and its synthetic batch: ``side / 2`` x ``side / 2``
    patch tokens and 16 text tokens (Qwen-Image) or 40 caption tokens (Z-Image)."""
    blocks, width, side, batch = size
    net = make_qwen_image(blocks, width) if model == "qwen-image" else make_z_image(blocks, width)
    grid = (side // 2, side // 2)
    return net, frontend_for(net).synthetic_inputs(net, num=1, batch=batch, grid=grid)[0]


def make_model(model: str, size: tuple, name: str = "small"):
    """The model and one training batch (the family's synthetic inputs for the transformers;
    Flux and FLUX.2 pack 2 x 2 latent patches, so their token grid is ``side / 2``; Wan's clip
    has 2 latent frames of ``side`` latents, patched 2 x 2 by the model)."""
    if model == "unet":
        channels, side, batch = size
        return make_unet(channels), make_inputs(side, batch)
    if model in ("qwen-image", "z-image"):
        return make_qwen_text_dit(model, size)
    blocks, width, side, batch = size
    if model in ("flux2", "wan"):
        net = (make_flux2 if model == "flux2" else make_wan)(blocks, width, HEAD[name])
        grid = (side // 2, side // 2) if model == "flux2" else (side, side)
        return net, frontend_for(net).synthetic_inputs(net, num=1, batch=batch, grid=grid)[0]
    net = make_sd3(blocks, width, side) if model == "sd3" else make_flux(blocks, width)
    kwargs = {"batch": batch} if model == "sd3" else {"batch": batch, "grid": (side // 2, side // 2)}
    return net, frontend_for(net).synthetic_inputs(net, num=1, **kwargs)[0]


def make_inputs(side: int, batch: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "sample": torch.randn(batch, 4, side, side, generator=gen),
        "timestep": torch.randint(0, 1000, (batch,), generator=gen),
        "encoder_hidden_states": torch.randn(batch, 16, 64, generator=gen),
    }


def peft_variant(base, rank: int, targets: list[str]):
    unet = shared_copy(base)
    unet.requires_grad_(False)
    targets = peft_target_modules(unet, targets)  # FLUX.2's attn.to_out: its linears alone
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets)
    )
    return unet, [p for p in unet.parameters() if p.requires_grad]


def reslora_variant(base, rank: int, res_type: str, pre_num: int, targets: list[str]):
    config = ResLoRAConfig(rank=rank, res_type=res_type, pre_num=pre_num, target_modules=targets)
    unet = add_reslora(shared_copy(base), config)
    return unet, trainable_parameters(unet)


class Step:
    """One training step of a variant, with its optimizer (``compiled``: through ``torch.compile``;
    the first call compiles)."""

    def __init__(self, unet, params, inputs, compiled: bool = False, checkpointed: bool = False) -> None:
        self.unet, self.inputs = unet.train(), inputs
        if checkpointed:
            unet.enable_gradient_checkpointing()
        self.opt = torch.optim.AdamW(params, lr=1e-4)
        with torch.no_grad():
            self.target = torch.randn_like(output_tensor(unet(**inputs)))  # also ResLoRA's traced pass
        self.forward = compile_model(unet) if compiled else unet

    def __call__(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one step."""
        start, cpu = time.perf_counter(), time.process_time()
        loss = torch.nn.functional.mse_loss(output_tensor(self.forward(**self.inputs)), self.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - cpu

    def flops(self) -> int:
        """FLOPs of one eager forward + backward: matrix products, convolutions, attention
        (torch's FLOP counter; the gradients it leaves are cleared)."""
        with FlopCounterMode(display=False) as counter:
            output_tensor(self.unet(**self.inputs)).square().mean().backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def saved_mib(self) -> float:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = output_tensor(self.unet(**self.inputs)).square().mean()
        del loss
        return sum(seen.values()) / 2**20


def paired_ratio(times: list[float], reference: list[float]) -> str:
    """``median [low, high]`` of the per-round ratios ``times[i] / reference[i]`` (95 %
    percentile bootstrap of the median over rounds)."""
    ratios = [t / r for t, r in zip(times, reference, strict=True)]
    median, low, high = bootstrap_interval(ratios, statistic=np.median)
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"


def checkpointing_cost(times: dict, variant: str, clock: int = 0) -> str:
    """``median [low, high]`` over rounds of ``(ck / plain of variant) / (ck / plain of PEFT LoRA)``
    (``clock`` 0: wall, 1: CPU time of ``times[label] = [(wall, cpu), ...]``; the four steps of one
    round together):
    what checkpointing costs ``variant`` relative to what it costs PEFT LoRA."""

    def clocked(label: str) -> list[float]:
        return [t[clock] for t in times[label]]

    plain, ck = clocked(variant), clocked(variant + CHECKPOINTED)
    peft, peft_ck = clocked("PEFT LoRA"), clocked("PEFT LoRA" + CHECKPOINTED)
    costs = [(c / p) / (pc / pp) for p, c, pp, pc in zip(plain, ck, peft, peft_ck, strict=True)]
    median, low, high = bootstrap_interval(costs, statistic=np.median)
    return f"{median:.3f} [{low:.3f}, {high:.3f}]"


def forward_time(unet, inputs, rounds: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            unet(**inputs)
            times.append(time.perf_counter() - start)
    return times


def bench_size(
    model: str,
    name: str,
    rounds: int,
    rank: int,
    targets: list[str],
    variants: list[tuple[str, int]] = RESLORA,
    compiled: bool = False,
    inference: bool = True,
    checkpointing: str = "off",
) -> None:
    base, inputs = make_model(model, SIZES[model][name], name)
    modes = CHECKPOINTING_MODES[checkpointing]
    if compiled:
        fresh_compile_cache(len(modes) * (len(variants) + 1))
    steps = {}
    for checkpointed in modes:
        suffix = CHECKPOINTED if checkpointed else ""
        steps["PEFT LoRA" + suffix] = Step(*peft_variant(base, rank, targets), inputs, compiled, checkpointed)
        for res_type, pre_num in variants:
            label = get_shortcut(res_type, pre_num).title + suffix
            made = reslora_variant(base, rank, res_type, pre_num, targets)
            steps[label] = Step(*made, inputs, compiled, checkpointed)
    first = {label: step()[0] for label, step in steps.items()}  # warm-up (compiles when compiled)
    for step in steps.values():
        step()
    times = {k: [] for k in steps}
    for i in range(rounds):
        for label in rotated(list(steps), i):
            times[label].append(steps[label]())
    flops = {label: step.flops() for label, step in steps.items()}
    print(
        f"\n### {model} {name}: {SIZES[model][name]} (UNet: channels, latent side, batch; transformers: "
        f"blocks, width, latent side, batch), rank {rank}, targets {' '.join(targets)}"
        f"{', torch.compile (inductor)' if compiled else ''}"
        f"{', gradient checkpointing ' + checkpointing if checkpointing != 'off' else ''}"
    )
    for checkpointed in modes:
        suffix = CHECKPOINTED if checkpointed else ""
        labels = [label for label in steps if label.endswith(CHECKPOINTED) == checkpointed]
        print_table({k: times[k] for k in labels}, steps, flops, first, "PEFT LoRA" + suffix, compiled)
    if len(modes) == 2:
        print("\nWhat checkpointing costs each variant, over what it costs PEFT LoRA (paired by round):\n")
        print("| variant | wall: checkpointed / plain over PEFT LoRA's [95 % CI] | CPU time: the same |")
        print("|---|---|---|")
        for label in (k for k in times if not k.endswith(CHECKPOINTED) and k != "PEFT LoRA"):
            print(f"| {label} | {checkpointing_cost(times, label)} | {checkpointing_cost(times, label, 1)} |")
    if compiled or not inference:
        return

    # inference: the base model vs the model with a merged (bs, m=5) ResLoRA fused into its weights
    trained = steps["ResLoRA bs m=5"].unet
    lora = merge_to_lora(trained)
    fused = fuse_lora(remove_reslora(copy.deepcopy(trained)), lora).eval()
    # a fresh copy of the base, like the fused model, and alternating order: the untouched
    # base object measured slower by up to 30 % (memory it shares with the step benchmark)
    plain = copy.deepcopy(base).eval()
    fwd = {"base": [], "fused": []}
    for i in range(rounds):
        for key, model in rotated([("base", plain), ("fused", fused)], i):
            fwd[key] += forward_time(model, inputs, 1)
    b, f = statistics.median(fwd["base"]), statistics.median(fwd["fused"])
    print(f"\nInference forward: base {b * 1e3:.1f} ms, fused ResLoRA {f * 1e3:.1f} ms, ratio {f / b:.3f}")


def print_table(times: dict, steps: dict, flops: dict, first: dict, peft: str, compiled: bool) -> None:
    """One markdown table of ``times``' variants, each against ``peft``'s steps of the same rounds."""
    peft_wall = statistics.median(t[0] for t in times[peft])
    peft_cpu = statistics.median(t[1] for t in times[peft])
    peft_rounds = [t[0] for t in times[peft]]
    print()
    print(
        "| variant | median wall ms | ratio to PEFT | paired ratio [95 % CI] | median CPU ms | CPU ratio to PEFT "
        "| FLOP ratio to PEFT | saved for backward MiB"
        + (" | compile s | compile ratio to PEFT |" if compiled else " |")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if compiled else ""))
    for label, ts in times.items():
        wall = statistics.median(t[0] for t in ts)
        cpu = statistics.median(t[1] for t in ts)
        saved = "n/a" if compiled else f"{steps[label].saved_mib():.1f}"  # hooks do not reach compiled graphs
        paired = paired_ratio([t[0] for t in ts], peft_rounds)
        row = (
            f"| {label} | {wall * 1e3:.1f} | {wall / peft_wall:.3f} | {paired} | {cpu * 1e3:.1f} "
            f"| {cpu / peft_cpu:.3f} | {flops[label] / flops[peft]:.3f} | {saved} |"
        )
        if compiled:
            row += f" {first[label]:.1f} | {first[label] / first[peft]:.2f} |"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(SIZES), default="unet")
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=sorted({size for sizes in SIZES.values() for size in sizes}),
        help="model sizes (default: every size of --model but full-width; wide: SD3 and Flux only; "
        "full-width: the transformers only)",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", choices=["attention", "attention+ff"], default="attention")
    parser.add_argument(
        "--variants",
        nargs="+",
        type=parse_variant,
        default=RESLORA,
        help="ResLoRA variants as res_type:pre_num (default: all types, pre_num 1, 3, 5)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="every variant through torch.compile (inductor)"
    )
    parser.add_argument(
        "--no_inference",
        action="store_true",
        help="skip the inference forward of the base against the fused model, which holds two more "
        "copies of the model (FLUX.2 full-width: 8.8 GB each in float32)",
    )
    parser.add_argument(
        "--gradient_checkpointing",
        choices=sorted(CHECKPOINTING_MODES),
        default="off",
        help="every variant checkpointed (on), or plain and checkpointed side by side (both)",
    )
    args = parser.parse_args()
    if ("bs", 5) not in args.variants and not (args.compile or args.no_inference):
        parser.error(
            "the inference forward fuses the bs:5 variant: add bs:5 to --variants or pass --no_inference"
        )
    if args.compile:
        inductor_config.force_disable_caches = True
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    sizes = args.sizes or [name for name in SIZES[args.model] if name != "full-width"]
    unknown = [name for name in sizes if name not in SIZES[args.model]]
    if unknown:
        parser.error(
            f"--model {args.model} has no size {unknown} (its sizes: {', '.join(SIZES[args.model])})"
        )
    for name in sizes:
        targets = TARGET_SETS[args.model][args.targets]
        bench_size(
            args.model,
            name,
            args.rounds,
            args.rank,
            targets,
            args.variants,
            args.compile,
            not args.no_inference,
            args.gradient_checkpointing,
        )


if __name__ == "__main__":
    main()

"""Profile one training step (forward, backward, AdamW) of a ResLoRA UNet, eager and compiled,
with ``torch.profiler``, and print the top operators of each.

    python benchmarks/profile_step.py [--res_type ms] [--pre_num 5] [--scale 0.05] [--side 64]
                                      [--batch 2] [--backend inductor] [--rows 15]

The UNet is SD 1.5's architecture shrunk by ``--scale`` (``make_random_pipeline.py``'s rule),
rank 8 on the attention projections. Both modes are warmed up (the compiled one compiles
then) before the profiled steps, so the tables show steady-state steps only.
"""

from __future__ import annotations

import argparse

import torch
from diffusers import UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

from reslora_diffusers import ResLoRAConfig, add_reslora, trainable_parameters
from reslora_diffusers.data.random_pipelines import denoiser_config
from reslora_diffusers.frontends import UNET_TARGETS
from reslora_diffusers.merge.error import output_tensor
from reslora_diffusers.training.speed import compile_model, make_adamw


def make_step(model, forward, inputs: dict):
    opt = make_adamw(trainable_parameters(model), None, inputs["sample"].device, lr=1e-4)

    def step() -> None:
        out = output_tensor(forward(**inputs))
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def profile_table(step, steps: int, rows: int, device: torch.device) -> str:
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--res_type", default="ms")
    p.add_argument("--pre_num", type=int, default=5)
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--side", type=int, default=64, help="image side in pixels (latents: side / 8)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--steps", type=int, default=3, help="profiled steps per mode")
    p.add_argument("--rows", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**denoiser_config("sd15", args.scale)).to(device)
    config = ResLoRAConfig(
        rank=8, res_type=args.res_type, pre_num=args.pre_num, target_modules=list(UNET_TARGETS)
    )
    add_reslora(unet, config).train()
    gen = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(args.batch, 4, args.side // 8, args.side // 8, generator=gen),
        "timestep": torch.randint(0, 1000, (args.batch,), generator=gen),
        "encoder_hidden_states": torch.randn(args.batch, 77, unet.config.cross_attention_dim, generator=gen),
    }
    inputs = {k: v.to(device) for k, v in inputs.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {vars(args)}")
    for mode in args.modes:
        forward = unet if mode == "eager" else compile_model(unet, backend=args.backend, inputs=inputs)
        step = make_step(unet, forward, inputs)
        for _ in range(2):  # warm-up (and compilation)
            step()
        print(f"\n### {mode} step, top {args.rows} operators\n")
        print(profile_table(step, args.steps, args.rows, device))


if __name__ == "__main__":
    main()

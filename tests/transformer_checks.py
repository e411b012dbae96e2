"""What the diffusion-transformer families' tests share: one forward pass as a tensor, the
front end's synthetic batches, and the contract every family keeps: ResLoRA starts at the base
model and comes off exactly."""

from __future__ import annotations

import torch
import torch.nn as nn

from reslora_diffusers import ResLoRAConfig, add_reslora, remove_reslora
from reslora_diffusers.frontends import frontend_for
from reslora_diffusers.merge.error import output_tensor
from tests.toys import randomize_lora


def forward(module: nn.Module, batch: dict) -> torch.Tensor:
    """The output the merge report measures (``.sample``, Z-Image's per-image list stacked...)."""
    return output_tensor(module(**batch))


def inputs(model: nn.Module, num: int = 1, seed: int = 0) -> list[dict]:
    """``num`` synthetic batches the model's front end makes for it."""
    return frontend_for(model).synthetic_inputs(model, num=num, seed=seed)


def processors(model: nn.Module) -> dict[str, type]:
    """The attention processor class of every module that has one."""
    return {name: type(m.processor) for name, m in model.named_modules() if hasattr(m, "processor")}


def assert_starts_at_base_and_comes_off_exactly(model: nn.Module, res_type: str) -> None:
    """With B = 0 the branches add exact zeros, diffusers' own processors stay (they call the
    wrapped projections), random factors change the output, and removal restores it bit for bit."""
    batch = inputs(model)[0]
    before_processors = processors(model)
    with torch.no_grad():
        before = forward(model, batch)
        add_reslora(model, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2))
        assert torch.equal(forward(model, batch), before)
        assert processors(model) == before_processors
        randomize_lora(model, scale=0.2)
        assert (forward(model, batch) - before).abs().max() > 1e-3
        remove_reslora(model)
        assert torch.equal(forward(model, batch), before)

"""The diffusion families: what each family file declares, checked against diffusers' own
pipelines, and the SD / SDXL split (SDXL is its own family file)."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch
from peft import LoraConfig

from reslora_diffusers.frontends import (
    SD_PIPELINES,
    SD_UNET,
    SDXL_PIPELINES,
    SDXL_UNET,
    components_family,
    frontend_for,
    pipeline_families,
    pipeline_family,
)
from reslora_diffusers.objectives import Objective
from tests.tiny_pipes import tiny_sd_pipeline, tiny_sdxl_pipeline

FAMILIES = {f.name: f for f in pipeline_families()}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_family_declares_what_its_diffusers_pipeline_takes(name):
    """Its components are those diffusers' LoRA loader loads (``_lora_loadable_modules``), every
    text encoder its prompts go through is a component of the pipeline class, the LoRA-scale
    keyword is a parameter of the pipeline call, and its objective is an Objective."""
    family = FAMILIES[name]
    pipeline_class = getattr(diffusers, family.pipeline_class)
    assert set(family.components) == set(pipeline_class._lora_loadable_modules)
    init = inspect.signature(pipeline_class.__init__).parameters
    assert {family.denoiser, *family.prompt_encoders} <= set(init)
    assert set(family.text_encoders) <= set(family.prompt_encoders)
    assert family.lora_scale_kwarg in inspect.signature(pipeline_class.__call__).parameters
    assert issubclass(family.objective, Objective)
    assert family.title and family.denoiser_family


def test_sd_and_sdxl_pipelines_and_unets_belong_to_their_own_families(tmp_path):
    sd, sdxl = tiny_sd_pipeline(tmp_path / "sd"), tiny_sdxl_pipeline(tmp_path / "sdxl")
    assert pipeline_family(sd) is SD_PIPELINES and pipeline_family(sdxl) is SDXL_PIPELINES
    assert frontend_for(sd.unet) is SD_UNET and frontend_for(sdxl.unet) is SDXL_UNET
    # text encoders alone: the oldest family that has them all (SD's CLIP, SDXL's pair)
    assert components_family({"text_encoder": sd.text_encoder}) is SD_PIPELINES
    pair = {"text_encoder": sdxl.text_encoder, "text_encoder_2": sdxl.text_encoder_2}
    assert components_family(pair) is SDXL_PIPELINES
    # each UNet family's synthetic inputs are what its UNet takes: SDXL's added conditioning
    for unet in (sd.unet, sdxl.unet):
        (inputs,) = frontend_for(unet).synthetic_inputs(unet, num=1)
        assert ("added_cond_kwargs" in inputs) == (unet is sdxl.unet)
        with torch.no_grad():
            assert unet(**inputs).sample.shape == inputs["sample"].shape


def test_the_familys_lora_scale_keyword_scales_a_loaded_lora(tmp_path):
    """Scale 0 through the family's keyword draws the base's image, scale 1 another one."""
    pipe = tiny_sd_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    family = pipeline_family(pipe)

    def draw(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            "a red cross", num_inference_steps=2, generator=generator, output_type="pt", **kwargs
        ).images

    base = draw()
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"], init_lora_weights=False)
    )
    torch.testing.assert_close(draw(**family.lora_scale_kwargs(0.0)), base)
    assert (draw(**family.lora_scale_kwargs(1.0)) - base).abs().max() > 1e-3

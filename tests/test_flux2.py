"""FLUX.2: ResLoRA on ``Flux2Transformer2DModel``, its chains, the training script's objective
against diffusers' own FLUX.2 script and ``encode_prompt``, a run whose exports
``Flux2Pipeline.load_lora_weights`` loads to the trained model, exact resume, and
``reslora-merge --fuse``. The base is a tiny random pipeline (``tests/tiny_flux2.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, Flux2Pipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    load_reslora_checkpoint,
    save_reslora_checkpoint,
)
from reslora_diffusers.cli import merge_main
from reslora_diffusers.frontends import (
    FLUX2_FEEDFORWARD_TARGETS,
    FLUX2_PIPELINES,
    FLUX2_TRANSFORMER,
    frontend_for,
    pipeline_family,
)
from tests.runs import PROMPT, assert_same_weights, from_checkpoint, run_dit, script, subset
from tests.tiny_flux2 import tiny_flux2_pipeline, tiny_flux2_transformer
from tests.toys import randomize_lora
from tests.transformer_checks import assert_starts_at_base_and_comes_off_exactly, forward, inputs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

TYPES = ["none", "is", "bs", "ms"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("flux2")
    tiny_flux2_pipeline(root).save_pretrained(root / "tiny-flux2")
    return root / "tiny-flux2"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return subset(tmp_path_factory.mktemp("flux2-data") / "set", 4)


def test_the_family_and_its_model_are_recognised(base):
    pipe = DiffusionPipeline.from_pretrained(base)
    assert type(pipe) is Flux2Pipeline and pipeline_family(pipe) is FLUX2_PIPELINES
    assert frontend_for(pipe.transformer) is FLUX2_TRANSFORMER
    assert FLUX2_PIPELINES.formats == ("diffusers", "comfyui") and FLUX2_PIPELINES.components == (
        "transformer",
    )


@pytest.mark.parametrize("res_type", TYPES)
def test_every_type_starts_at_the_base_model_and_comes_off_exactly(res_type):
    assert_starts_at_base_and_comes_off_exactly(tiny_flux2_transformer(), res_type)


@pytest.mark.parametrize("res_type", ["is", "bs", "ms"])
def test_every_role_is_one_chain_through_its_blocks(res_type):
    """The default targets: the double blocks' projections of both streams (3 blocks) and the
    single blocks' fused ones (4 blocks), each role one unbroken chain; with the feed-forward
    targets, their chains too."""
    model = tiny_flux2_transformer(double=3, single=4)
    targets = (
        None if res_type != "bs" else [*FLUX2_PIPELINES.objective.target_modules, *FLUX2_FEEDFORWARD_TARGETS]
    )
    add_reslora(model, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2, target_modules=targets))
    forward(model.train(), inputs(model)[0])
    chains = chain_structure(model)
    double = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    expected = {f"attn.{role}": 3 for role in double}
    expected |= {"attn.to_qkv_mlp_proj": 4, "attn.to_out": 4}
    if targets:
        expected |= {role: 3 for role in FLUX2_FEEDFORWARD_TARGETS}
    assert {name: [len(s) for s in chain["segments"]] for name, chain in chains.items()} == {
        name: [n] for name, n in expected.items()
    }
    assert chains["attn.to_out"]["modules"][0] == "single_transformer_blocks.0.attn.to_out"


def _objective(base: Path, *flags: str):
    args = script.parse_args(["--pretrained_model_name_or_path", str(base), *flags])
    return script.load_models(args)


def test_the_step_is_diffusers_flux2_script_and_the_text_its_encode_prompt(base):
    """``x0`` = the VAE mode in 2 x 2 patches normalised by the batch-norm statistics, sigma from
    the density and the scheduler's sigmas, packed tokens and ids as the pipeline makes them,
    timestep sigma, the guidance scale, and the text states of ``encode_prompt``."""
    objective = _objective(base, "--guidance_scale", "2.5", "--weighting_scheme", "logit_normal")
    models = objective.models
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = [PROMPT, "a blue circle on a black background"]
    batch = {"pixel_values": pixels, "captions": captions}
    with torch.no_grad():
        torch.manual_seed(0)
        loss = objective.loss(models, batch, torch.float32)
        torch.manual_seed(0)
        step = objective.flow_batch(models, batch, torch.float32)

        torch.manual_seed(0)  # the same draws in the same order, as diffusers' script makes them
        vae = models["vae"]
        x0 = Flux2Pipeline._patchify_latents(vae.encode(pixels).latent_dist.mode())
        mean = vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
        x0 = (x0 - mean) / std
        eps = torch.randn(x0.shape)
        u = compute_density_for_timestep_sampling("logit_normal", 2, logit_mean=0.0, logit_std=1.0)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
        sigma = scheduler.sigmas[(u * 1000).long()]
        s = sigma.reshape(2, 1, 1, 1)
        x_t, target = (1 - s) * x0 + s * eps, eps - x0
        ids = Flux2Pipeline._prepare_latent_ids(x0)
        torch.testing.assert_close(step.inputs["hidden_states"], Flux2Pipeline._pack_latents(x_t))
        torch.testing.assert_close(step.inputs["img_ids"], ids[0])
        torch.testing.assert_close(step.inputs["timestep"], sigma)
        torch.testing.assert_close(step.inputs["guidance"], torch.full((2,), 2.5))

        pipe = DiffusionPipeline.from_pretrained(base)
        embeds, text_ids = pipe.encode_prompt(captions)
        torch.testing.assert_close(step.inputs["encoder_hidden_states"], embeds)
        torch.testing.assert_close(step.inputs["txt_ids"], text_ids[0])

        pred = models["transformer"](**step.inputs, return_dict=False)[0]
        pred = Flux2Pipeline._unpack_latents_with_ids(pred, ids)
        want = ((pred - target) ** 2).reshape(2, -1).mean(dim=1).mean()
    torch.testing.assert_close(loss, want)


def test_the_default_resolution_and_its_side_step(base):
    objective = _objective(base)
    assert objective.default_resolution() == 128 * objective.vae_scale  # the pipeline's default
    with pytest.raises(ValueError, match="must be a multiple of 4 for flux2 pipelines"):
        objective.check_resolution(18)


def _losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r
    ]


def test_a_run_exports_files_the_pipeline_loads_to_the_trained_model(base, data, tmp_path):
    out = tmp_path / "run"
    extra = ["--max_train_steps", "2", "--res_type", "bs", "--pre_num", "2", "--learning_rate", "1e-2"]
    summary = run_dit(base, data, out, *extra, "--checkpointing_steps", "1")
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors", "merge_report.json"):
        assert (out / name).is_file(), name
    assert (out / "checkpoint-1" / "reslora_checkpoint.safetensors").is_file()
    assert len(_losses(out)) == 2 and all(math.isfinite(x) for x in _losses(out))
    assert set(summary["merge_error"]) == {"transformer"} and summary["merge_error"]["transformer"] < 1e-5
    assert "lora_comfyui.safetensors" in (out / "README.md").read_text()

    trained = DiffusionPipeline.from_pretrained(base).transformer
    load_reslora_checkpoint({"transformer": trained}, out / "reslora_checkpoint.safetensors")
    plain = DiffusionPipeline.from_pretrained(base)
    batch = inputs(trained)[0]
    want, untouched = forward(trained, batch), forward(plain.transformer, batch)
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(out, weight_name=weight_name)
        got = forward(pipe.transformer, batch)
        assert (got - untouched).abs().max() > 0, weight_name
        assert (got - want).norm() / want.norm() < 1e-5, weight_name  # bs merges exactly


def test_caches_train_as_the_uncached_run(base, data, tmp_path):
    """--cache_latents (the posterior's parameters; the VAE's batch norm holds a 0-d buffer, which
    its fingerprint reads too) and --cache_text_embeddings (Mistral's states at 512 tokens): the
    same losses as without the caches."""
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--checkpointing_steps", "2"]
    run_dit(base, data, tmp_path / "plain", *extra)
    cached = ["--cache_latents", "--cache_text_embeddings", "--cache_dir", str(tmp_path / "cache")]
    run_dit(base, data, tmp_path / "cached", *extra, *cached)
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 4
    np.testing.assert_allclose(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-5)


def test_text_encoder_training_is_refused(base):
    """``Flux2LoraLoaderMixin`` loads the transformer's weights alone."""
    with pytest.raises(ValueError, match="--train_text_encoder does not apply to flux2 pipelines"):
        _objective(base, "--train_text_encoder")


def test_resume_matches_the_uninterrupted_run(base, data, tmp_path):
    # 4 images in batches of 2: the step-2 checkpoint ends an epoch; flips, dropout, sigmas and
    # is's norm windows draw from the restored states
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--res_type", "is", "--random_flip"]
    extra += ["--lora_dropout", "0.1", "--weighting_scheme", "logit_normal", "--learning_rate", "1e-2"]
    run_dit(base, data, tmp_path / "full", *extra)
    resumed = from_checkpoint(tmp_path / "full", 2, tmp_path / "resumed")
    run_dit(base, data, resumed, *extra, "--resume_from_checkpoint", "latest")
    full = assert_same_weights(tmp_path / "full", resumed)
    assert any(v.abs().sum() > 0 for k, v in full.items() if k.endswith("lora_B"))
    assert _losses(resumed) == _losses(tmp_path / "full")[2:]


def test_merge_cli_writes_both_files_and_fuses(base, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(base)
    targets = [*FLUX2_PIPELINES.objective.target_modules, *FLUX2_FEEDFORWARD_TARGETS]
    add_reslora(pipe.transformer, ResLoRAConfig(rank=2, res_type="bs", pre_num=2, target_modules=targets))
    randomize_lora(pipe.transformer, scale=0.1)
    batch = inputs(pipe.transformer)[0]
    forward(pipe.transformer.train(), batch)
    pipe.transformer.eval()
    ckpt = save_reslora_checkpoint({"transformer": pipe.transformer}, tmp_path / "r.safetensors")
    out = tmp_path / "merged"
    assert merge_main([str(ckpt), "--base", str(base), "--output", str(out), "--fuse"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "lora_comfyui.safetensors",
        "merge_report.json",
        "fused_pipeline",
    }
    fused = DiffusionPipeline.from_pretrained(out / "fused_pipeline")
    plain = DiffusionPipeline.from_pretrained(base)
    assert sum(p.numel() for p in fused.transformer.parameters()) == sum(
        p.numel() for p in plain.transformer.parameters()
    )
    want = forward(pipe.transformer, batch)  # bs merges exactly: the ResLoRA model itself
    torch.testing.assert_close(forward(fused.transformer, batch), want, rtol=1e-4, atol=1e-5)
    # kohya-ss names exist for UNet pipelines only
    assert (
        merge_main([str(ckpt), "--base", str(base), "--output", str(tmp_path / "k"), "--format", "kohya"])
        == 2
    )


def test_the_peft_baseline_adapts_the_default_targets(base, data, tmp_path):
    """``--use_peft``: the single blocks' ``attn.to_out`` linears by their paths (a double block's
    ``attn.to_out`` is a ModuleList PEFT cannot adapt), saved by ``Flux2Pipeline.save_lora_weights``."""
    out = tmp_path / "peft"
    summary = run_dit(base, data, out, "--use_peft", "--max_train_steps", "1", "--learning_rate", "1e-2")
    assert "merge_error" not in summary
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(out)
    adapted = {
        p.removesuffix(".base_layer") for p, m in pipe.transformer.named_modules() if hasattr(m, "lora_A")
    }
    assert "single_transformer_blocks.1.attn.to_out" in adapted
    assert (
        "transformer_blocks.0.attn.to_out.0" in adapted and "transformer_blocks.0.ff.linear_in" not in adapted
    )
    assert len(adapted) == 2 * 8 + 2 * 2  # the default targets of 2 double and 2 single blocks


def test_the_key_layout_is_the_pipelines_own_and_its_scale_keyword_scales_it(base, data, tmp_path):
    """The file's keys are those ``Flux2Pipeline.save_lora_weights`` writes for a PEFT LoRA of the
    same targets (the script's ``--use_peft`` run), ``load_lora_weights`` loads every one of them
    with our shapes, and the family's keyword (``attention_kwargs``) scales the loaded LoRA:
    scale 0 draws the base's image, scale 1 another."""
    flags = ["--max_train_steps", "1", "--learning_rate", "1e-1"]
    run_dit(base, data, tmp_path / "reslora", *flags, "--res_type", "bs")
    run_dit(base, data, tmp_path / "peft", *flags, "--use_peft")
    ours = load_file(tmp_path / "reslora" / "pytorch_lora_weights.safetensors")
    theirs = load_file(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    assert set(ours) == set(theirs) and all(k.startswith("transformer.") for k in ours)

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    scales = pipeline_family(pipe).lora_scale_kwargs

    def draw(**kwargs):
        generator = torch.Generator().manual_seed(0)
        args = {"num_inference_steps": 2, "height": 16, "width": 16, "output_type": "pt"}
        return pipe(prompt=PROMPT, generator=generator, **args, **kwargs).images

    plain = draw()
    pipe.load_lora_weights(tmp_path / "reslora", adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}": tuple(v.shape) for k, v in loaded.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    assert scales(0.5) == {"attention_kwargs": {"scale": 0.5}}
    torch.testing.assert_close(draw(**scales(0.0)), plain)
    assert (draw(**scales(1.0)) - plain).abs().max() > 1e-4

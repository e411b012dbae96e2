"""Qwen-Image and Z-Image: ResLoRA on their transformers and chains, their prompt encoding and
flow-matching step against their pipelines, and ``train_text_to_image.py`` on tiny random
pipelines of both (2 steps, exact resume, the exported file as the pipeline's own loader loads
it, ``reslora-merge`` and ``--fuse``, the demo).

ComfyUI's key map is not read here (no ComfyUI in the test environment): the key layout is
checked against diffusers' own loader and writer, and the ComfyUI check is the manual one the
README cites.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    load_reslora_checkpoint,
)
from reslora_diffusers.cli import merge_main
from reslora_diffusers.core import get_state
from reslora_diffusers.frontends import (
    QWEN_IMAGE_FEEDFORWARD_TARGETS,
    QWEN_IMAGE_PIPELINES,
    Z_IMAGE_FEEDFORWARD_TARGETS,
    Z_IMAGE_PIPELINES,
    frontend_for,
    pipeline_family,
)
from tests.reference import reference_hooks
from tests.runs import PROMPT, assert_same_weights, from_checkpoint, run_dit, script, subset
from tests.scripts import load_benchmark
from tests.tiny_dits import DIT_VAE_SCALE, DIT_VAE_SHIFT
from tests.tiny_qwen_dits import (
    QWEN_LATENTS_MEAN,
    QWEN_LATENTS_STD,
    tiny_qwen_image_pipeline,
    tiny_qwen_image_transformer,
    tiny_z_image_pipeline,
    tiny_z_image_transformer,
)
from tests.toys import randomize_lora
from tests.transformer_checks import assert_starts_at_base_and_comes_off_exactly, forward, inputs

pytestmark = pytest.mark.usefixtures("one_thread")

TYPES = ["none", "is", "bs", "ms"]
PIPES = {"qwen-image": tiny_qwen_image_pipeline, "z-image": tiny_z_image_pipeline}
MAKERS = {"qwen-image": tiny_qwen_image_transformer, "z-image": tiny_z_image_transformer}
CAPTIONS = [PROMPT, "a blue circle on a black background", "a green square"]


def _segments(model) -> dict[str, list[int]]:
    return {k: [len(s) for s in v["segments"]] for k, v in chain_structure(model).items()}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qwen-bases")
    for family, make in PIPES.items():
        make().save_pretrained(root / family)
    return {family: root / family for family in PIPES}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return subset(tmp_path_factory.mktemp("qwen-data") / "set", 6)


def _objective(base: Path, *flags: str):
    return script.load_models(script.parse_args(["--pretrained_model_name_or_path", str(base), *flags]))


# ----------------------------------------------------------------------------- the families


def test_each_family_is_declared_with_its_pipeline_and_transformer():
    for family, pipes in (("qwen-image", QWEN_IMAGE_PIPELINES), ("z-image", Z_IMAGE_PIPELINES)):
        pipe = PIPES[family]()
        assert pipeline_family(pipe) is pipes
        assert frontend_for(pipe.transformer).name == pipes.denoiser_family
        assert pipes.components == ("transformer",)  # their LoRA loaders load no text encoder


@pytest.mark.parametrize("family", MAKERS)
@pytest.mark.parametrize("res_type", TYPES)
def test_init_is_bit_identical_and_removal_exact(family, res_type):
    assert_starts_at_base_and_comes_off_exactly(MAKERS[family](), res_type)


@pytest.mark.parametrize("family", MAKERS)
@pytest.mark.parametrize("res_type", TYPES)
def test_outputs_and_gradients_follow_the_written_out_formula(family, res_type):
    model = MAKERS[family]()
    plain = copy.deepcopy(model)
    config = ResLoRAConfig(rank=2, alpha=4, res_type=res_type, pre_num=2)
    add_reslora(model, config)
    randomize_lora(model, scale=0.2)
    batch = inputs(model)[0]
    with torch.no_grad():
        forward(model, batch)  # trace the chains (Z-Image's are traced already)
    blocks = get_state(model).blocks
    factors = {
        p: (b.lora_A.detach().clone().requires_grad_(), b.lora_B.detach().clone().requires_grad_())
        for p, b in blocks.items()
    }
    weights = torch.randn(forward(plain, batch).shape, generator=torch.Generator().manual_seed(1))
    got = forward(model.train(), batch)
    with reference_hooks(plain.train(), factors, config.scaling, res_type, pre_num=2) as ref:
        want = forward(ref, batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for p, b in blocks.items():  # gradients of up to ~15 here: float32 rounding of ~1e-5
        torch.testing.assert_close(b.lora_A.grad, factors[p][0].grad, rtol=1e-4, atol=1e-5, msg=p)
        torch.testing.assert_close(b.lora_B.grad, factors[p][1].grad, rtol=1e-4, atol=1e-5, msg=p)


@pytest.mark.parametrize("res_type", ["is", "bs", "ms"])
def test_qwen_image_chains_run_unbroken_through_every_block(res_type):
    """Attention and feed-forward roles of both streams: one chain of all 3 blocks each."""
    model = tiny_qwen_image_transformer()
    targets = [*frontend_for(model).default_targets(model), *QWEN_IMAGE_FEEDFORWARD_TARGETS]
    add_reslora(model, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2, target_modules=targets))
    with torch.no_grad():
        forward(model, inputs(model)[0])
    segments = _segments(model)
    assert len(segments) == 12 and all(s == [3] for s in segments.values()), segments


@pytest.mark.parametrize("res_type", ["is", "bs", "ms"])
def test_z_image_chains_are_traced_when_attached_whatever_the_first_batch(res_type):
    """bs: each role one chain through the 2 noise refiners, 2 context refiners and 3 layers; is
    and ms: a segment per token sequence, the layers unbroken. A first batch whose image and
    caption sequences have the same padded length (32 tokens each) links nothing more: the
    chains were traced on attaching."""
    model = tiny_z_image_transformer()
    targets = [*frontend_for(model).default_targets(model), *Z_IMAGE_FEEDFORWARD_TARGETS]
    add_reslora(model, ResLoRAConfig(rank=2, res_type=res_type, pre_num=2, target_modules=targets))
    traced = chain_structure(model)
    same = frontend_for(model).synthetic_inputs(model, num=1, text_tokens=20, grid=(4, 4))[0]
    with torch.no_grad():
        forward(model, same)  # 16 image tokens and 20 / 15 caption tokens: 32 each after padding
    assert chain_structure(model) == traced
    want = [7] if res_type == "bs" else [2, 2, 3]
    assert len(traced) == 7 and all(s == want for s in _segments(model).values())
    q = traced["attention.to_q"]
    assert q["modules"][:4] == [
        "noise_refiner.0.attention.to_q",
        "noise_refiner.1.attention.to_q",
        "context_refiner.0.attention.to_q",
        "context_refiner.1.attention.to_q",
    ]


# ----------------------------------------------------------------------------- prompts, latents, loss


def test_qwen_image_prompts_are_encoded_as_the_pipeline_encodes_them(bases):
    """Template dropped, padding removed, zero-padded and masked; the mask gone when no prompt
    is padded. Our tokenizer cuts the template prefix into the 34 tokens the pipeline drops."""
    objective = _objective(bases["qwen-image"])
    pipe = DiffusionPipeline.from_pretrained(bases["qwen-image"])
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    for captions in (CAPTIONS, [PROMPT, PROMPT]):
        with torch.no_grad():
            text = objective.encode_text(objective.models, captions)
            want, want_mask = pipe.encode_prompt(captions, device="cpu")
        got = objective.transformer_inputs(
            torch.zeros(len(captions), 4, 8, 8), torch.zeros(len(captions)), text
        )
        assert text["encoder_hidden_states"].shape[1] == 1024  # cacheable: one length for all captions
        torch.testing.assert_close(got["encoder_hidden_states"], want, rtol=0, atol=0)
        if want_mask is None:
            assert got["encoder_hidden_states_mask"] is None and captions[0] == captions[1]
        else:
            assert torch.equal(got["encoder_hidden_states_mask"], want_mask)


def test_z_image_prompts_are_encoded_as_the_pipeline_encodes_them(bases):
    objective = _objective(bases["z-image"])
    pipe = DiffusionPipeline.from_pretrained(bases["z-image"])
    with torch.no_grad():
        text = objective.encode_text(objective.models, CAPTIONS)
        want, _ = pipe.encode_prompt(list(CAPTIONS), device="cpu", do_classifier_free_guidance=False)
    got = objective.transformer_inputs(torch.zeros(3, 4, 8, 8), torch.zeros(3), text)["cap_feats"]
    assert [g.shape for g in got] == [w.shape for w in want] and len({g.shape for g in got}) > 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def _written_out_sigma(base: Path, u: torch.Tensor, tokens: int, family: str) -> torch.Tensor:
    """The sigma the pipeline's own schedule has at index ``u N`` for an image of ``tokens``
    packed tokens with ``N`` = 1000 steps: Qwen-Image's dynamic shift (``calculate_shift``,
    ``retrieve_timesteps`` with ``mu`` and sigmas ``1 .. 1/N``), Z-Image's static shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")
    if family == "z-image":
        return scheduler.sigmas[(u * 1000).long()]
    c = scheduler.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    retrieve_timesteps(scheduler, 1000, "cpu", sigmas=np.linspace(1.0, 1 / 1000, 1000), mu=mu)
    return scheduler.sigmas[(u * 1000).long()]


@pytest.mark.parametrize("family", PIPES)
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "cosmap"])
def test_flow_matching_step_follows_the_written_out_formula(bases, family, scheme):
    """x_t = (1 - sigma) x0 + sigma eps, loss mean_b(w_b mean((v - (eps - x0))^2)). Qwen-Image:
    x0 = (z - latents_mean) / latents_std of the one-frame posterior sample, 2 x 2 packing as the
    pipeline packs, timestep sigma, sigma on the pipeline's dynamically shifted schedule for the
    image's size; Z-Image: x0 = (z - shift) * scale, one (C, 1, H, W) frame per image, t = 1 -
    sigma, v = -(the transformer's output)."""
    objective = _objective(bases[family], "--weighting_scheme", scheme)
    models = objective.models
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    batch = {"pixel_values": pixels, "captions": CAPTIONS[:2]}
    with torch.no_grad():
        torch.manual_seed(0)
        loss = objective.loss(models, batch, torch.float32)
        torch.manual_seed(0)
        step = objective.flow_batch(models, batch, torch.float32)

        torch.manual_seed(0)  # the same draws, in the same order, written out
        vae = models["vae"]
        if family == "qwen-image":
            z = vae.encode(pixels.unsqueeze(2)).latent_dist.sample()[:, :, 0]
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (QWEN_LATENTS_MEAN, QWEN_LATENTS_STD))
            x0 = (z - mean) / std
        else:
            x0 = (vae.encode(pixels).latent_dist.sample() - DIT_VAE_SHIFT) * DIT_VAE_SCALE
        eps = torch.randn(x0.shape)
        u = compute_density_for_timestep_sampling(scheme, 2, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        b, c, h, w = x0.shape
        sigma = _written_out_sigma(bases[family], u, (h // 2) * (w // 2), family)
        s = sigma.reshape(2, 1, 1, 1)
        x_t, target = (1 - s) * x0 + s * eps, eps - x0
        text = objective.encode_text(models, CAPTIONS[:2])
        if family == "qwen-image":
            x_t, target = (QwenImagePipeline._pack_latents(t, b, c, h, w) for t in (x_t, target))
            torch.testing.assert_close(step.inputs["hidden_states"], x_t)
            torch.testing.assert_close(step.inputs["timestep"], sigma)
            assert step.inputs["img_shapes"] == [[(1, h // 2, w // 2)]] * 2
            pred = models["transformer"](**step.inputs).sample
        else:
            torch.testing.assert_close(torch.stack(step.inputs["x"]), x_t.unsqueeze(2))
            torch.testing.assert_close(step.inputs["t"], (1000 - sigma * 1000) / 1000)
            caps = [s_[m] for s_, m in zip(text["cap_feats"], text["cap_mask"])]
            assert all(torch.equal(a, b_) for a, b_ in zip(step.inputs["cap_feats"], caps))
            pred = -torch.stack(models["transformer"](**step.inputs).sample).squeeze(2)
        torch.testing.assert_close(step.noise - step.latents, target)
        weight = {"cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))}.get(scheme, torch.ones(2))
        want = sum(weight[i] * ((pred[i] - target[i]) ** 2).mean() for i in range(2)) / 2
    torch.testing.assert_close(loss, want)


def test_qwen_image_sigmas_shift_with_the_image_size(bases):
    """The same u draws larger sigmas for a larger image (mu grows with the token count), and
    sigma never goes under shift_terminal."""
    objective = _objective(bases["qwen-image"])
    u = torch.linspace(0, 0.999, 50)
    small, large = (
        objective.training_scheduler(torch.zeros(1, 4, side, side)).sigmas[(u * 1000).long()]
        for side in (8, 256)
    )
    assert (large >= small).all() and (large > small + 0.01).any()
    assert small.min() >= 0.02 - 1e-6
    latents = torch.zeros(1, 4, 8, 8)
    assert objective.training_scheduler(latents) is objective.training_scheduler(latents)  # made once


def test_guidance_and_text_encoder_training_are_refused_for_both_families(bases):
    """Neither transformer has a guidance embedding, and neither pipeline's LoRA loader loads
    text-encoder weights: the flags are refused, naming the family."""
    for family in PIPES:
        name = pipeline_family(DiffusionPipeline.from_pretrained(bases[family])).name
        with pytest.raises(ValueError, match=f"--guidance_scale does not apply to {name} pipelines"):
            _objective(bases[family], "--guidance_scale", "2.0")
        with pytest.raises(ValueError, match=f"--train_text_encoder does not apply to {name} pipelines"):
            _objective(bases[family], "--train_text_encoder")


# ----------------------------------------------------------------------------- the training script

RUN_FLAGS = ("--max_train_steps", "2", "--res_type", "bs", "--pre_num", "2", "--learning_rate", "1e-2")


@pytest.fixture(scope="module")
def runs(bases, data, tmp_path_factory) -> dict[str, Path]:
    """A 2-step ResLoRA bs run per family (validated before, during and after), and a 2-step PEFT
    LoRA run on the same targets (written by the pipeline class's own ``save_lora_weights``)."""
    from accelerate.state import AcceleratorState

    root = tmp_path_factory.mktemp("qwen-runs")
    out = {}
    for family in PIPES:
        for kind, extra in (
            (
                "reslora",
                ["--checkpointing_steps", "1", "--validation_prompt", PROMPT, "--validation_steps", "1"],
            ),
            ("peft", ["--use_peft", "--checkpointing_steps", "2"]),
        ):
            AcceleratorState._reset_state(reset_partial_state=True)
            run_dit(
                bases[family],
                data,
                root / f"{family}-{kind}",
                *RUN_FLAGS,
                "--num_validation_images",
                "1",
                *extra,
            )
            out[f"{family}-{kind}"] = root / f"{family}-{kind}"
    AcceleratorState._reset_state(reset_partial_state=True)
    return out


def _losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r
    ]


def _trained(base: Path, run_dir: Path):
    """The run's ResLoRA transformer: the checkpoint in a fresh copy of the base's."""
    transformer = DiffusionPipeline.from_pretrained(base).transformer
    load_reslora_checkpoint({"transformer": transformer}, run_dir / "reslora_checkpoint.safetensors")
    return transformer


@pytest.mark.parametrize("family", PIPES)
def test_run_exports_a_lora_the_pipeline_loads_to_the_trained_model(bases, runs, family):
    out = runs[f"{family}-reslora"]
    for name in ("pytorch_lora_weights.safetensors", "merge_report.json", "reslora_checkpoint.safetensors"):
        assert (out / name).is_file(), name
    for name in (
        "checkpoint-1/reslora_checkpoint.safetensors",
        "validation/step-000001.png",
        "validation/final.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "lora_kohya.safetensors").exists()  # the diffusers file is the one file
    assert len(_losses(out)) == 2 and all(math.isfinite(x) for x in _losses(out))
    report = json.loads((out / "merge_report.json").read_text())
    assert report["components"]["transformer"]["output_error"] < 1e-5  # bs merges exactly

    pipe = DiffusionPipeline.from_pretrained(bases[family])
    pipe.load_lora_weights(out)  # the pipeline's own loader, as a user loads the file
    plain = DiffusionPipeline.from_pretrained(bases[family]).transformer
    trained = _trained(bases[family], out)
    batch = inputs(trained)[0]
    with torch.no_grad():
        loaded, untouched, want = (forward(m, batch) for m in (pipe.transformer, plain, trained))
    assert (loaded - untouched).abs().max() > 0
    assert (loaded - want).norm() / want.norm() < 1e-4


@pytest.mark.parametrize("family", PIPES)
def test_the_key_layout_is_the_pipelines_own(bases, runs, family):
    """The file's keys are those the pipeline class writes for a PEFT LoRA of the same targets
    (``save_lora_weights``), every one of them is loaded by ``load_lora_weights`` (PEFT's state
    dict of the loaded adapter has them all, with our shapes), and the adapted modules are every
    block's attention projections."""
    ours = load_file(runs[f"{family}-reslora"] / "pytorch_lora_weights.safetensors")
    theirs = load_file(runs[f"{family}-peft"] / "pytorch_lora_weights.safetensors")
    assert set(ours) == set(theirs) and all(k.startswith("transformer.") for k in ours)
    from peft.utils import get_peft_model_state_dict

    pipe = DiffusionPipeline.from_pretrained(bases[family])
    pipe.load_lora_weights(runs[f"{family}-reslora"], adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}": tuple(v.shape) for k, v in loaded.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    modules = {k.rsplit(".lora_", 1)[0] for k in ours}
    roles = pipeline_family(pipe).objective.target_modules
    blocks = {"qwen-image": 3, "z-image": 7}[family]
    assert len(modules) == blocks * len(roles)


@pytest.mark.parametrize("family", PIPES)
def test_resume_matches_the_uninterrupted_run(bases, data, tmp_path, family, fresh_accelerate_state):
    # 6 images in batches of 2: the step-2 checkpoint is mid-epoch and the resumed run crosses an
    # epoch boundary; flips, dropout, sigma draws and is's norm windows all use random state
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--res_type", "is", "--random_flip"]
    extra += ["--lora_dropout", "0.1", "--weighting_scheme", "logit_normal", "--learning_rate", "1e-2"]
    run_dit(bases[family], data, tmp_path / "full", *extra)
    resumed = from_checkpoint(tmp_path / "full", 2, tmp_path / "resumed")
    run_dit(bases[family], data, resumed, *extra, "--resume_from_checkpoint", "latest")
    full = assert_same_weights(tmp_path / "full", resumed)
    assert any(v.abs().sum() > 0 for k, v in full.items() if k.endswith("lora_B"))
    assert _losses(resumed) == _losses(tmp_path / "full")[2:]


def test_qwen_image_caches_train_as_the_uncached_run(bases, data, tmp_path, fresh_accelerate_state):
    """--cache_latents (the video VAE's one-frame posterior) and --cache_text_embeddings (states
    of one length for every caption): the same losses as without the caches."""
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--checkpointing_steps", "2"]
    run_dit(bases["qwen-image"], data, tmp_path / "plain", *extra)
    cached = ["--cache_latents", "--cache_text_embeddings", "--cache_dir", str(tmp_path / "cache")]
    run_dit(bases["qwen-image"], data, tmp_path / "cached", *extra, *cached)
    assert len(list((tmp_path / "cache" / "latents").rglob("*.safetensors"))) == 6
    np.testing.assert_allclose(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-5)


@pytest.mark.parametrize("family", PIPES)
def test_merge_cli_and_fuse_on_the_runs_checkpoint(bases, runs, tmp_path, family):
    out = tmp_path / "merged"
    ckpt = runs[f"{family}-reslora"] / "reslora_checkpoint.safetensors"
    assert merge_main([str(ckpt), "--base", str(bases[family]), "--output", str(out), "--fuse"]) == 0
    assert {p.name for p in out.iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "merge_report.json",
        "fused_pipeline",
    }
    fused = DiffusionPipeline.from_pretrained(out / "fused_pipeline").transformer
    trained = _trained(bases[family], runs[f"{family}-reslora"])
    assert sum(p.numel() for p in fused.parameters()) == sum(
        p.numel() for p in DiffusionPipeline.from_pretrained(bases[family]).transformer.parameters()
    )
    batch = inputs(trained)[0]
    with torch.no_grad():
        torch.testing.assert_close(forward(fused, batch), forward(trained, batch), rtol=1e-4, atol=1e-5)
    assert (
        merge_main(
            [str(ckpt), "--base", str(bases[family]), "--output", str(tmp_path / "k"), "--format", "kohya"]
        )
        == 2
    )


@pytest.mark.parametrize("family", PIPES)
def test_the_familys_lora_scale_keyword_scales_the_loaded_lora(bases, runs, family):
    """Scale 0 through the family's keyword draws the base's image, scale 1 the LoRA's."""
    pipe = DiffusionPipeline.from_pretrained(bases[family])
    pipe.set_progress_bar_config(disable=True)
    scales = pipeline_family(pipe).lora_scale_kwargs

    def draw(**kwargs):
        generator = torch.Generator().manual_seed(0)
        return pipe(
            PROMPT,
            num_inference_steps=2,
            height=16,
            width=16,
            generator=generator,
            output_type="pt",
            **kwargs,
        ).images

    base = draw()
    pipe.load_lora_weights(runs[f"{family}-reslora"])
    torch.testing.assert_close(draw(**scales(0.0)), base)
    assert (draw(**scales(1.0)) - base).abs().max() > 1e-4


def test_the_demo_draws_each_familys_lora_on_its_own_base(bases, runs, monkeypatch):
    """Both bases and both runs listed crosswise: a row per base, its LoRA after it, the LoRA
    changing the base's image; LoRA scale 0 draws the base's image. The demo draws at each
    pipeline's default size (Z-Image: 1024 px), which these tiny bases' position tables do not
    reach: here it draws at the 16 px they were trained at."""
    import app.app as demo_app
    from reslora_diffusers.eval import generate

    monkeypatch.setattr(demo_app, "generate", functools.partial(generate, height=16, width=16))

    names = {family: bases[family].name for family in PIPES}
    loras = "\n".join(str(runs[f"{family}-reslora"]) for family in ("z-image", "qwen-image"))
    base_text = "\n".join(str(bases[family]) for family in PIPES)
    gallery, status, rows = demo_app.render(PROMPT, "", 3, 2, 3.0, 1.0, 1, base_text, loras)
    assert status == "Rendered 4 models with the same seeds.", status
    assert [(where, [label for label, _ in models]) for where, models in rows] == [
        (names["qwen-image"], ["base", "ResLoRA bs m=2 (qwen-image-reslora)"]),
        (names["z-image"], ["base", "ResLoRA bs m=2 (z-image-reslora)"]),
    ]
    for _, ((_, base_cells), (_, lora_cells)) in rows:
        assert base_cells[0][0].tobytes() != lora_cells[0][0].tobytes()
    off, _, rows_off = demo_app.render(PROMPT, "", 3, 2, 3.0, 0.0, 1, base_text, loras)
    for (_, models), (_, models_off) in zip(rows, rows_off):
        assert models_off[1][1][0][0].tobytes() == models[0][1][0][0].tobytes()


# ----------------------------------------------------------------------------- benchmark entries


@pytest.mark.parametrize("model", ["qwen-image", "z-image"])
def test_bench_step_trains_each_family_at_its_small_size(model):
    """PEFT LoRA and ResLoRA bs on the same targets (attention and feed-forward), every chain linked."""
    bench_step = load_benchmark("bench_step")
    base, batch = bench_step.make_model(model, bench_step.SIZES[model]["small"])
    targets = bench_step.TARGET_SETS[model]["attention+ff"]
    peft = bench_step.Step(*bench_step.peft_variant(base, 4, targets), batch)
    reslora = bench_step.Step(*bench_step.reslora_variant(base, 4, "bs", 1, targets), batch)
    for step in (peft, reslora):
        wall, cpu = step()
        assert wall > 0 and cpu > 0
    peft_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in peft.unet.named_parameters() if ".lora_A" in n}
    assert {n.removesuffix(".base_layer") for n in peft_modules} == set(get_state(reslora.unet).blocks)
    assert all(len(s) == 1 for s in _segments(reslora.unet).values())


@pytest.mark.parametrize("preset", ["qwen-image", "z-image"])
def test_bench_memory_feeds_each_transformer_a_captions_states_and_its_latent_tokens(preset):
    """128 caption tokens and (pixels / 16)^2 image tokens, built directly in bf16; the floor's
    gradients reach Z-Image's per-image latents."""
    bench_memory = load_benchmark("bench_memory")
    assert bench_memory.parse_config(f"{preset}-512-2") == (preset, 512, 2)
    model = bench_memory.build_denoiser(preset, 0.05, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    batch = bench_memory.make_inputs(model, preset, 128, 2)
    if preset == "qwen-image":
        assert batch["hidden_states"].shape[:2] == (2, 64) and batch["encoder_hidden_states"].shape[1] == 128
    else:
        assert [x.shape[-2:] for x in batch["x"]] == [(16, 16)] * 2 and len(batch["cap_feats"][0]) == 128
    args = argparse.Namespace(
        device="cpu", dtype="bf16", config=f"{preset}-64-1", scale=0.05, variant="floor", mode="plain"
    )
    args.__dict__.update(rank=8, targets=None, warmup=0, steps=1)
    row = bench_memory.measure(args)
    assert row["trained_parameters"] == 0 and len(row["seconds"]) == 1

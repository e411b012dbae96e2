"""train_text_to_image.py on SD3 and Flux pipelines: the flow-matching step against its
formula, a run whose export loads into the trained model, exact resume, the PEFT baseline.

The bases are tiny random pipelines (``tests/tiny_dits.py``) saved as folders; the data is
the first images of the embedded fine-tuning set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from safetensors.torch import load_file

from reslora_diffusers import load_reslora_checkpoint
from reslora_diffusers.data import default_base_model_path
from reslora_diffusers.frontends import frontend_for
from tests.runs import (
    PROMPT,
    assert_same_weights,
    error,
    from_checkpoint,
    launch_two_processes,
    run_dit,
    script,
    subset,
)
from tests.tiny_dits import DIT_VAE_SCALE, DIT_VAE_SHIFT, tiny_flux_pipeline, tiny_sd3_pipeline

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

PIPES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit-bases")
    out = {}
    for family, make in PIPES.items():
        make(root / family).save_pretrained(root / f"tiny-{family}")
        out[family] = root / f"tiny-{family}"
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return subset(tmp_path_factory.mktemp("dit-data") / "set", 6)


def _losses(out: Path) -> list[float]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("family", PIPES)
@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "mode", "logit_normal"])
def test_flow_matching_step_follows_the_written_out_formula(bases, family, scheme):
    """x_t = (1 - sigma) x0 + sigma eps, target eps - x0, loss mean_b(w_b mean((v - target)^2)),
    with x0 = (VAE sample - shift) * scale, sigma from diffusers' density and the scheduler's
    sigmas, and the text states of the pipeline's own encode_prompt."""
    args = script.parse_args(
        ["--pretrained_model_name_or_path", str(bases[family]), "--weighting_scheme", scheme]
    )
    if family == "flux":
        args.guidance_scale = 2.5
    objective = script.load_models(args)
    models = objective.models
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = [PROMPT, "a blue circle on a black background"]
    batch = {"pixel_values": pixels, "captions": captions}
    with torch.no_grad():
        torch.manual_seed(0)
        loss = objective.loss(models, batch, torch.float32)
        torch.manual_seed(0)
        step = objective.flow_batch(models, batch, torch.float32)

        # the same draws, in the same order, written out
        torch.manual_seed(0)
        x0 = (models["vae"].encode(pixels).latent_dist.sample() - DIT_VAE_SHIFT) * DIT_VAE_SCALE
        eps = torch.randn(x0.shape)
        u = compute_density_for_timestep_sampling(scheme, 2, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(bases[family], subfolder="scheduler")
        sigma = scheduler.sigmas[(u * 1000).long()]
        s = sigma.reshape(2, 1, 1, 1)
        x_t, target = (1 - s) * x0 + s * eps, eps - x0
        b, c, h, w = x0.shape
        if family == "flux":  # diffusers' own packing and ids
            x_t, target = (FluxPipeline._pack_latents(t, b, c, h, w) for t in (x_t, target))
            ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
            torch.testing.assert_close(step.inputs["img_ids"], ids)
            torch.testing.assert_close(step.inputs["timestep"], sigma)
            torch.testing.assert_close(step.inputs["guidance"], torch.full((2,), 2.5))
        else:
            torch.testing.assert_close(step.inputs["timestep"], sigma * 1000)
        torch.testing.assert_close(step.inputs["hidden_states"], x_t)
        torch.testing.assert_close(step.noise - step.latents, target)

        pipe = DiffusionPipeline.from_pretrained(bases[family])
        encoded = pipe.encode_prompt(
            captions,
            None,
            **({"do_classifier_free_guidance": False, "prompt_3": None} if family == "sd3" else {}),
        )
        torch.testing.assert_close(step.inputs["encoder_hidden_states"], encoded[0])
        pooled = encoded[2] if family == "sd3" else encoded[1]
        torch.testing.assert_close(step.inputs["pooled_projections"], pooled)

        pred = models["transformer"](**step.inputs).sample
        weight = {
            "sigma_sqrt": sigma**-2,
            "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)),
        }.get(scheme, torch.ones(2))
        want = sum(weight[i] * ((pred[i] - target[i]) ** 2).mean() for i in range(2)) / 2
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("family", PIPES)
def test_run_exports_a_lora_that_loads_into_the_trained_model(bases, data, tmp_path, family):
    base, out = bases[family], tmp_path / "run"
    extra = ["--max_train_steps", "2", "--res_type", "bs", "--pre_num", "2", "--learning_rate", "1e-2"]
    extra += ["--checkpointing_steps", "1", "--validation_prompt", PROMPT, "--num_validation_images", "1"]
    extra += ["--validation_steps", "1"]
    text = family == "sd3"  # SD3 trains both CLIP encoders too
    summary = run_dit(base, data, out, *extra, *(["--train_text_encoder"] if text else []))

    for name in (
        "pytorch_lora_weights.safetensors",
        "merge_report.json",
        "reslora_checkpoint.safetensors",
        "README.md",
        "checkpoint-1/reslora_checkpoint.safetensors",
        "validation/step-000000.png",
        "validation/step-000001.png",
        "validation/final.png",
    ):
        assert (out / name).is_file(), name
    assert not (out / "lora_kohya.safetensors").exists()  # diffusers and ComfyUI read the diffusers file
    losses = _losses(out)
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    components = {"transformer", "text_encoder", "text_encoder_2"} if text else {"transformer"}
    assert set(summary["merge_error"]) == components and max(summary["merge_error"].values()) < 1e-5
    weights = load_file(out / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == components
    assert "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight" in weights
    card = (out / "README.md").read_text()
    assert "transformer (`to_q`" in card and "lora_kohya" not in card

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(out)
    plain = DiffusionPipeline.from_pretrained(base)
    trained = {name: getattr(DiffusionPipeline.from_pretrained(base), name) for name in components}
    load_reslora_checkpoint(trained, out / "reslora_checkpoint.safetensors")
    ids = pipe.tokenizer([PROMPT], padding="max_length", return_tensors="pt").input_ids
    for name, model in trained.items():
        batch = (
            frontend_for(model).synthetic_inputs(model, num=1)[0]
            if name == "transformer"
            else {"input_ids": ids}
        )
        with torch.no_grad():
            loaded, untouched = (getattr(p, name)(**batch)[0] for p in (pipe, plain))
            want = model(**batch)[0]
        assert (loaded - untouched).abs().max() > 0, name
        assert (loaded - want).norm() / want.norm() < 1e-4, name  # bs merges exactly


def test_flux_resume_matches_the_uninterrupted_run(bases, data, tmp_path):
    # 6 images in batches of 2: 3 steps per epoch; the step-2 checkpoint is mid-epoch and the
    # resumed run crosses an epoch boundary. Flip, dropout, sigma draws and `is` windows use state.
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--res_type", "is", "--random_flip"]
    extra += ["--lora_dropout", "0.1", "--weighting_scheme", "logit_normal", "--learning_rate", "1e-2"]
    run_dit(bases["flux"], data, tmp_path / "full", *extra)
    resumed = from_checkpoint(tmp_path / "full", 2, tmp_path / "resumed")
    run_dit(bases["flux"], data, resumed, *extra, "--resume_from_checkpoint", "latest")

    full = assert_same_weights(tmp_path / "full", resumed)
    assert any(v.abs().sum() > 0 for k, v in full.items() if k.endswith("lora_B"))
    assert _losses(resumed) == _losses(tmp_path / "full")[2:]  # the copied checkpoint has no log


def test_sd3_peft_baseline_on_transformer_and_clip_encoders(bases, data, tmp_path):
    """--use_peft --train_text_encoder: transformer.add_adapter on the default targets and the
    two CLIP encoders, saved by StableDiffusion3Pipeline.save_lora_weights with alpha metadata."""
    out = tmp_path / "peft"
    extra = ["--use_peft", "--train_text_encoder", "--max_train_steps", "2", "--rank", "4"]
    extra += ["--lora_alpha", "8", "--learning_rate", "1e-2", "--checkpointing_steps", "1"]
    summary = run_dit(bases["sd3"], data, out, *extra)
    assert "merge_error" not in summary and all(math.isfinite(x) for x in _losses(out))
    assert {p.name for p in (out / "checkpoint-1").glob("*.safetensors")} == {"peft_lora.safetensors"}

    weights = load_file(out / "pytorch_lora_weights.safetensors")
    pipe = DiffusionPipeline.from_pretrained(bases["sd3"])
    roles = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    expected = {
        f"transformer.{n}"
        for n, m in pipe.transformer.named_modules()
        if n.endswith(roles) and hasattr(m, "weight")
    }
    for name in ("text_encoder", "text_encoder_2"):
        modules = getattr(pipe, name).named_modules()
        expected |= {
            f"{name}.{n}" for n, _ in modules if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))
        }
    assert {k.rsplit(".lora_", 1)[0] for k in weights} == expected
    # trained, all but the last block's text query: that block's text output is discarded
    idle = "transformer.transformer_blocks.2.attn.add_q_proj.lora_B.weight"
    assert [k for k in weights if ".lora_B." in k and not weights[k].abs().sum() > 0] == [idle]

    batch = frontend_for(pipe.transformer).synthetic_inputs(pipe.transformer, num=1)[0]
    with torch.no_grad():
        before = pipe.transformer(**batch).sample
        pipe.load_lora_weights(out)
        after = pipe.transformer(**batch).sample
    assert (after - before).abs().max() > 1e-4
    scalings = {
        s
        for c in ("transformer", "text_encoder", "text_encoder_2")
        for m in getattr(pipe, c).modules()
        if hasattr(m, "lora_A")
        for s in m.scaling.values()
    }
    assert scalings == {2.0}  # alpha 8 / rank 4, from the file's metadata
    assert "PEFT LoRA" in (out / "README.md").read_text()


def test_flags_of_the_other_objective_are_refused(bases, data, tmp_path):
    message = error(bases["flux"], data, tmp_path / "a", "--noise_offset", "0.1")
    assert "--noise_offset does not apply to flux pipelines" in message, message
    message = error(bases["sd3"], data, tmp_path / "b", "--guidance_scale", "2")
    assert "--guidance_scale does not apply to stable_diffusion_3 pipelines" in message, message
    for gamma in ("3", "5"):  # 5 is the UNet's default: given, it is refused all the same
        message = error(bases["sd3"], data, tmp_path / "b", "--snr_gamma", gamma)
        assert "--snr_gamma does not apply to stable_diffusion_3 pipelines" in message, message
    assert not (tmp_path / "a" / "train_log.jsonl").exists()
    # and the flow-matching flags on a UNet (the embedded Stable Diffusion base)
    message = error(default_base_model_path(), data, tmp_path / "c", "--weighting_scheme", "mode")
    assert "--weighting_scheme does not apply to stable_diffusion pipelines" in message, message


@pytest.mark.slow
@pytest.mark.parametrize("family", PIPES)
def test_two_process_ddp_run_has_the_single_process_chains_and_resumes_exactly(bases, data, tmp_path, family):
    """2 CPU processes (gloo DDP) on a DiT: finite trained weights, the chain structure of a
    single-process trace, an exact ``bs`` export; Flux (packed latents, guidance) also resumes
    from its step-2 checkpoint to the same weights."""
    from safetensors import safe_open

    from reslora_diffusers import ResLoRAConfig, add_reslora, chain_structure
    from reslora_diffusers.frontends import DIT_ATTENTION_TARGETS

    dit = ["--resolution", "16", "--calibration_batches", "1", "--res_type", "bs", "--pre_num", "2"]
    dit += ["--merge", "calibrated", "--learning_rate", "1e-2", "--train_batch_size", "1"]
    out = tmp_path / "ddp"
    result = launch_two_processes(bases[family], data, out, *dit)
    assert "process 0 of 2 on cpu" in result.stderr and "process 1 of 2 on cpu" in result.stderr
    assert len(list((out / "checkpoint-2").glob("random_states_*"))) == 2
    assert all(math.isfinite(x) for x in _losses(out)) and len(_losses(out)) == 4
    weights = load_file(out / "reslora_checkpoint.safetensors")
    assert any(v.abs().sum() > 0 for k, v in weights.items() if k.endswith("lora_B"))
    with safe_open(str(out / "reslora_checkpoint.safetensors"), framework="pt") as f:
        ddp_chains = json.loads(f.metadata()["chains"])["transformer"]
    transformer = DiffusionPipeline.from_pretrained(bases[family]).transformer
    add_reslora(
        transformer, ResLoRAConfig(rank=4, res_type="bs", pre_num=2, target_modules=DIT_ATTENTION_TARGETS)
    )
    with torch.no_grad():
        transformer(**frontend_for(transformer).synthetic_inputs(transformer, num=1)[0])
    single = {
        k: {"modules": v["modules"], "links": v["links"]} for k, v in chain_structure(transformer).items()
    }
    assert ddp_chains == single
    report = json.loads((out / "merge_report.json").read_text())
    assert report["components"]["transformer"]["output_error"] < 1e-5  # bs merges exactly
    if family != "flux":
        return

    resumed = from_checkpoint(out, 2, tmp_path / "resumed")
    launch_two_processes(bases[family], data, resumed, *dit, "--resume_from_checkpoint", "latest")
    assert_same_weights(out, resumed)

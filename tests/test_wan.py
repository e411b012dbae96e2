"""Wan text-to-video: ResLoRA on ``WanTransformer3DModel``, its chains, clips as training data,
the training script's objective against its formula and ``WanPipeline.encode_prompt``, a run
whose exports ``WanPipeline.load_lora_weights`` loads to the trained model, exact resume and
``reslora-merge --fuse``. The base is a tiny random pipeline (``tests/tiny_wan.py``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, WanPipeline
from diffusers.training_utils import compute_density_for_timestep_sampling
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file

from reslora_diffusers import (
    ResLoRAConfig,
    add_reslora,
    chain_structure,
    export_lora,
    load_reslora_checkpoint,
    save_reslora_checkpoint,
)
from reslora_diffusers.cli import merge_main
from reslora_diffusers.frontends import (
    WAN_FEEDFORWARD_TARGETS,
    WAN_PIPELINES,
    WAN_TRANSFORMER,
    frontend_for,
    pipeline_family,
)
from reslora_diffusers.training.data import crop_pixels, plan_crop
from reslora_diffusers.training.video import TextVideoDataset, load_video_captions
from tests.runs import PROMPT, assert_same_weights, error, from_checkpoint, run, script
from tests.tiny_wan import SIDE, clip_folder, tiny_wan_pipeline, tiny_wan_transformer
from tests.toys import randomize_lora
from tests.transformer_checks import assert_starts_at_base_and_comes_off_exactly, forward, inputs

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

TYPES = ["none", "is", "bs", "ms"]
#: the clips' runs: 32 px frames, clips of up to 9 frames, batches of 2, one calibration batch
WAN_ARGS = (
    "--resolution",
    str(SIDE),
    "--num_frames",
    "9",
    "--train_batch_size",
    "2",
    "--calibration_batches",
    "1",
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wan")
    tiny_wan_pipeline(root).save_pretrained(root / "tiny-wan")
    return root / "tiny-wan"


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    return clip_folder(tmp_path_factory.mktemp("wan-data") / "clips")


def run_wan(base: Path, data: Path, out: Path, *extra: str) -> dict:
    return run(base, data, out, *WAN_ARGS, "--caption_extension", ".txt", *extra)


def test_the_family_and_its_model_are_recognised(base):
    pipe = DiffusionPipeline.from_pretrained(base)
    assert type(pipe) is WanPipeline and pipeline_family(pipe) is WAN_PIPELINES
    assert frontend_for(pipe.transformer) is WAN_TRANSFORMER
    assert WAN_PIPELINES.formats == ("diffusers", "comfyui")


@pytest.mark.parametrize("res_type", TYPES)
def test_every_type_starts_at_the_base_model_and_comes_off_exactly(res_type):
    assert_starts_at_base_and_comes_off_exactly(tiny_wan_transformer(), res_type)


@pytest.mark.parametrize("res_type", ["is", "bs", "ms"])
def test_every_role_is_one_chain_through_all_blocks(res_type):
    """Self- and cross-attention projections (and with them the feed-forward layers): every role
    one unbroken chain through the 4 blocks."""
    model = tiny_wan_transformer(layers=4)
    add_reslora(
        model,
        ResLoRAConfig(
            rank=2,
            res_type=res_type,
            pre_num=2,
            target_modules=["to_q", "to_k", "to_v", "to_out.0", *WAN_FEEDFORWARD_TARGETS],
        ),
    )
    forward(model.train(), inputs(model)[0])
    segments = {name: [len(s) for s in chain["segments"]] for name, chain in chain_structure(model).items()}
    roles = [f"{a}.{p}" for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")]
    assert segments == {role: [4] for role in [*roles, *WAN_FEEDFORWARD_TARGETS]}


def test_cross_attention_keys_read_the_text_states_so_is_merges_exactly(tmp_path):
    """Every block's ``attn2.to_k``/``to_v`` reads the same text states: ``x_{n-1} = x_n``, and the
    input-norm merge of ``is`` is exact on those chains."""
    model = tiny_wan_transformer()
    add_reslora(
        model,
        ResLoRAConfig(rank=2, res_type="is", record_norms=True, target_modules=["attn2.to_k", "attn2.to_v"]),
    )
    randomize_lora(model, scale=0.2)
    batches = inputs(model, num=3)
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    model.eval()
    report = export_lora(
        tmp_path / "out", transformer=model, merge="input", eval_inputs={"transformer": batches}
    )
    assert report["components"]["transformer"]["output_error"] < 1e-5


# -- clips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["txt", "jsonl"])
def test_clips_frame_folders_and_stills_load_with_their_captions(tmp_path, layout):
    root = clip_folder(tmp_path / "clips", layout)
    extension = ".txt" if layout == "txt" else None
    data = load_video_captions(root, "text", num_frames=9, step=4, caption_extension=extension)
    by_name = {Path(s).name: (c, n) for s, c, n in zip(data.sources, data.captions, data.frames, strict=True)}
    assert by_name == {
        "red.gif": ("a red square moves right", 9),
        "blue.webp": ("a blue square moves right", 7),
        "green": ("a green square moves right", 9),
        "still.png": ("a yellow square", 1),
    }
    dataset = TextVideoDataset(data, None, [(SIDE, SIDE)], num_frames=9, frame_step=4)
    frames = {Path(s).name: n for s, n in zip(data.sources, dataset.frame_counts, strict=True)}
    # 7 frames hold 1 + 4 k = 5 of them; a still is one frame
    assert frames == {"red.gif": 9, "blue.webp": 5, "green": 9, "still.png": 1}
    assert sorted(set(dataset.clip_buckets)) == [(1, (SIDE, SIDE)), (5, (SIDE, SIDE)), (9, (SIDE, SIDE))]
    # the frame folder in number order, every frame cropped alike: pixels are the PNGs themselves
    green = [Path(s).name for s in data.sources].index("green")
    item = dataset[(green, 0)]
    assert item["pixel_values"].shape == (3, 9, SIDE, SIDE)
    plan = plan_crop((SIDE, SIDE), (SIDE, SIDE), flip=False)
    for i in (0, 1, 8):
        want = crop_pixels(Image.open(root / "green" / f"frame_{i + 1}.png").convert("RGB"), plan)
        torch.testing.assert_close(item["pixel_values"][:, i], want)


def test_a_flip_mirrors_every_frame_of_a_clip_alike(tmp_path):
    root = clip_folder(tmp_path / "clips")
    data = load_video_captions(root, "text", num_frames=9, step=4, caption_extension=".txt")
    dataset = TextVideoDataset(data, None, [(SIDE, SIDE)], num_frames=9, frame_step=4, random_flip=True)
    red = [Path(s).name for s in data.sources].index("red.gif")
    flipped = next(
        dataset[(red, seed)] for seed in range(20) if dataset.plan(red, np.random.default_rng(seed)).flip
    )
    plain = dataset.pixels(red, plan_crop((SIDE, SIDE), (SIDE, SIDE), flip=False))
    torch.testing.assert_close(flipped["pixel_values"], plain.flip(-1))


def test_bad_clips_are_skipped_or_refused_with_their_names(tmp_path):
    root = clip_folder(tmp_path / "clips")
    (root / "broken.gif").write_bytes(b"GIF89a not really")
    (root / "broken.txt").write_text("a broken clip")
    data = load_video_captions(root, "text", num_frames=9, step=4, caption_extension=".txt")
    assert len(data.sources) == 4 and data.skipped_files[0].startswith(str(root / "broken.gif"))
    (root / "nocaption.gif").write_bytes((root / "red.gif").read_bytes())
    with pytest.raises(ValueError, match=r"nocaption.gif: no caption file nocaption.txt"):
        load_video_captions(root, "text", num_frames=9, step=4, caption_extension=".txt")
    coded = tmp_path / "coded"
    coded.mkdir()
    (coded / "clip.mp4").write_bytes(b"\0")
    with pytest.raises(
        ValueError, match="clip.mp4 is a coded video: make it a frame folder or animated WebP"
    ):
        load_video_captions(coded, "text", num_frames=9, step=4, caption_extension=".txt")
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        load_video_captions(coded, "text", num_frames=9, step=4)


def test_frame_and_data_flags_are_checked(base, clips, tmp_path, data):
    wan = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(clips)]
    for flags, message in (
        (["--num_frames", "8"], "--num_frames 8 must be 1 + a multiple of 4"),
        (["--num_frames", "9", "--cache_latents"], "--cache_latents keeps image latents"),
        (["--num_frames", "9", "--guidance_scale", "2"], "--guidance_scale does not apply to wan pipelines"),
        # WanLoraLoaderMixin loads the transformers' weights alone
        (["--train_text_encoder"], "--train_text_encoder does not apply to wan pipelines"),
    ):
        message_got = error(
            base, clips, tmp_path / "out", *wan, "--resolution", str(SIDE), *flags, defaults=False
        )
        assert message in message_got
    # an image family has no frames
    assert "--num_frames applies to video pipelines" in error(
        None, data, tmp_path / "out2", "--num_frames", "5", defaults=False
    )


# -- the objective ---------------------------------------------------------------------------


def test_the_step_follows_its_formula_and_the_text_is_encode_prompts(base):
    """``x0 = (VAE sample - latents_mean) / latents_std`` of a 5-frame clip, sigma from the
    density and the scheduler's sigmas shifted by its ``flow_shift`` (3), timestep ``1000 sigma``,
    and the text states of ``encode_prompt`` at the pipeline call's 512 tokens."""
    args = script.parse_args(
        ["--pretrained_model_name_or_path", str(base), "--weighting_scheme", "logit_normal"]
    )
    objective = script.load_models(args)
    models = objective.models
    pixels = torch.rand(2, 3, 5, SIDE, SIDE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    captions = [PROMPT, "a  blue circle &amp; a black background "]  # cleaned as the pipeline does
    batch = {"pixel_values": pixels, "captions": captions}
    with torch.no_grad():
        torch.manual_seed(0)
        loss = objective.loss(models, batch, torch.float32)
        torch.manual_seed(0)
        step = objective.flow_batch(models, batch, torch.float32)

        torch.manual_seed(0)
        vae = models["vae"]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        x0 = (vae.encode(pixels).latent_dist.sample() - mean) / std
        assert x0.shape == (2, 4, 2, SIDE // 8, SIDE // 8)  # 5 frames: 1 + 4 latent frames / 4
        eps = torch.randn(x0.shape)
        u = compute_density_for_timestep_sampling("logit_normal", 2, logit_mean=0.0, logit_std=1.0)
        plain = torch.linspace(1, 1 / 1000, 1000)
        sigma = (3 * plain / (1 + 2 * plain))[(u * 1000).long()]
        s = sigma.reshape(2, 1, 1, 1, 1)
        x_t, target = (1 - s) * x0 + s * eps, eps - x0
        torch.testing.assert_close(step.inputs["hidden_states"], x_t)
        torch.testing.assert_close(step.inputs["timestep"], sigma * 1000)
        pipe = DiffusionPipeline.from_pretrained(base)
        states, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, max_sequence_length=512)
        torch.testing.assert_close(step.inputs["encoder_hidden_states"], states)
        pred = models["transformer"](**step.inputs, return_dict=False)[0]
        want = ((pred - target) ** 2).reshape(2, -1).mean(dim=1).mean()
    torch.testing.assert_close(loss, want)


# -- runs ------------------------------------------------------------------------------------


def _losses(out: Path) -> list[float]:
    return [
        r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "loss" in r
    ]


def test_a_run_on_clips_exports_files_the_pipeline_loads_to_the_trained_model(base, clips, tmp_path):
    out = tmp_path / "run"
    extra = ["--max_train_steps", "2", "--res_type", "bs", "--pre_num", "2", "--learning_rate", "1e-2"]
    extra += ["--validation_prompt", PROMPT, "--num_validation_images", "1", "--validation_steps", "1"]
    summary = run_wan(base, clips, out, *extra)
    for name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors", "validation/final.png"):
        assert (out / name).is_file(), name
    assert len(_losses(out)) == 2 and all(math.isfinite(x) for x in _losses(out))
    assert summary["merge_error"]["transformer"] < 1e-5
    # validation shows each video's first, middle and last frame side by side, and no image metric
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("prompt_accuracy" not in r for r in records)

    trained = DiffusionPipeline.from_pretrained(base).transformer
    load_reslora_checkpoint({"transformer": trained}, out / "reslora_checkpoint.safetensors")
    batch = inputs(trained)[0]
    want = forward(trained, batch)
    untouched = forward(DiffusionPipeline.from_pretrained(base).transformer, batch)
    for weight_name in ("pytorch_lora_weights.safetensors", "lora_comfyui.safetensors"):
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.load_lora_weights(out, weight_name=weight_name)
        got = forward(pipe.transformer, batch)
        assert (got - untouched).abs().max() > 0, weight_name
        assert (got - want).norm() / want.norm() < 1e-5, weight_name


def test_metadata_captions_train_too(base, tmp_path):
    root = clip_folder(tmp_path / "clips", "jsonl")
    summary = run(base, root, tmp_path / "run", *WAN_ARGS, "--max_train_steps", "1", "--res_type", "none")
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])


def test_cached_text_states_train_as_the_uncached_run(base, clips, tmp_path):
    """--cache_text_embeddings: UMT5's states of every caption once (the clips' latents are
    encoded every step), the same losses as without the cache."""
    extra = ["--max_train_steps", "2", "--learning_rate", "1e-2", "--res_type", "bs"]
    run_wan(base, clips, tmp_path / "plain", *extra)
    cached = ["--cache_text_embeddings", "--cache_dir", str(tmp_path / "cache")]
    run_wan(base, clips, tmp_path / "cached", *extra, *cached)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["text"]
    np.testing.assert_allclose(_losses(tmp_path / "cached"), _losses(tmp_path / "plain"), rtol=1e-5)


def test_resume_matches_the_uninterrupted_run(base, clips, tmp_path):
    extra = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--res_type", "ms", "--random_flip"]
    extra += ["--lora_dropout", "0.1", "--learning_rate", "1e-2"]
    run_wan(base, clips, tmp_path / "full", *extra)
    resumed = from_checkpoint(tmp_path / "full", 2, tmp_path / "resumed")
    run_wan(base, clips, resumed, *extra, "--resume_from_checkpoint", "latest")
    full = assert_same_weights(tmp_path / "full", resumed)
    assert any(v.abs().sum() > 0 for k, v in full.items() if k.endswith("lora_B"))
    assert _losses(resumed) == _losses(tmp_path / "full")[2:]


def test_merge_cli_writes_both_files_and_fuses(base, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(base)
    add_reslora(pipe.transformer, ResLoRAConfig(rank=2, res_type="bs", pre_num=2))
    randomize_lora(pipe.transformer, scale=0.1)
    batch = inputs(pipe.transformer)[0]
    forward(pipe.transformer.train(), batch)
    pipe.transformer.eval()
    ckpt = save_reslora_checkpoint({"transformer": pipe.transformer}, tmp_path / "r.safetensors")
    out = tmp_path / "merged"
    assert (
        merge_main([str(ckpt), "--base", str(base), "--output", str(out), "--fuse", "--format", "both"]) == 0
    )
    assert {p.name for p in out.iterdir()} == {
        "pytorch_lora_weights.safetensors",
        "lora_comfyui.safetensors",
        "merge_report.json",
        "fused_pipeline",
    }
    fused = DiffusionPipeline.from_pretrained(out / "fused_pipeline")
    torch.testing.assert_close(
        forward(fused.transformer, batch), forward(pipe.transformer, batch), rtol=1e-4, atol=1e-5
    )


def test_a_second_expert_exports_alone_and_loads_into_transformer_2(base, tmp_path):
    """Wan 2.2 A14B's ``transformer_2``: refused beside ``transformer`` in one file (diffusers
    reads one transformer per file), exported alone and loaded with ``load_into_transformer_2``;
    the training script refuses a two-expert base with its reason."""
    pipe = DiffusionPipeline.from_pretrained(base)
    expert = add_reslora(tiny_wan_transformer(seed=1), ResLoRAConfig(rank=2, res_type="bs"))
    randomize_lora(expert, scale=0.1)
    forward(expert, inputs(expert)[0])
    with pytest.raises(ValueError, match="a Wan LoRA file holds one transformer"):
        export_lora(
            tmp_path / "both",
            transformer=add_reslora(pipe.transformer, ResLoRAConfig(rank=2)),
            transformer_2=expert,
        )
    export_lora(tmp_path / "low", transformer=expert)
    two = WanPipeline(
        **{
            **DiffusionPipeline.from_pretrained(base).components,
            "transformer_2": tiny_wan_transformer(seed=1),
        },
        boundary_ratio=0.875,
    )
    two.load_lora_weights(tmp_path / "low", load_into_transformer_2=True)
    batch = inputs(expert)[0]
    torch.testing.assert_close(
        forward(two.transformer_2, batch), forward(expert, batch), rtol=1e-4, atol=1e-5
    )
    two.save_pretrained(tmp_path / "wan22")
    with pytest.raises(ValueError, match="two experts"):
        script.load_models(script.parse_args(["--pretrained_model_name_or_path", str(tmp_path / "wan22")]))


def test_the_key_layout_is_the_pipelines_own_and_its_scale_keyword_scales_it(base, clips, tmp_path):
    """The file's keys are those ``WanPipeline.save_lora_weights`` writes for a PEFT LoRA of the
    same targets (the script's ``--use_peft`` run), ``load_lora_weights`` loads every one of them
    with our shapes, and the family's keyword (``attention_kwargs``) scales the loaded LoRA:
    scale 0 draws the base's video, scale 1 another."""
    flags = ["--max_train_steps", "1", "--learning_rate", "1e-1"]
    run_wan(base, clips, tmp_path / "reslora", *flags, "--res_type", "bs")
    run_wan(base, clips, tmp_path / "peft", *flags, "--use_peft")
    ours = load_file(tmp_path / "reslora" / "pytorch_lora_weights.safetensors")
    theirs = load_file(tmp_path / "peft" / "pytorch_lora_weights.safetensors")
    assert set(ours) == set(theirs) and all(k.startswith("transformer.") for k in ours)
    assert len({k.rsplit(".lora_", 1)[0] for k in ours}) == 3 * 8  # 3 blocks, both attentions' 4

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    scales = pipeline_family(pipe).lora_scale_kwargs

    def draw(**kwargs):
        generator = torch.Generator().manual_seed(0)
        args = {"num_inference_steps": 2, "height": SIDE, "width": SIDE, "num_frames": 5, "output_type": "pt"}
        return pipe(prompt=PROMPT, generator=generator, **args, **kwargs).frames

    plain = draw()
    pipe.load_lora_weights(tmp_path / "reslora", adapter_name="trained")
    loaded = get_peft_model_state_dict(pipe.transformer, adapter_name="trained")
    assert {f"transformer.{k}": tuple(v.shape) for k, v in loaded.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }
    assert scales(0.5) == {"attention_kwargs": {"scale": 0.5}}
    torch.testing.assert_close(draw(**scales(0.0)), plain)
    assert (draw(**scales(1.0)) - plain).abs().max() > 1e-4

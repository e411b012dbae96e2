"""The tiny DiT base: its builders, ``scripts/pretrain_tiny_base.py --family sd3`` at a toy size
(end to end, resumed after ``--max-minutes`` stops, and compiled), fine-tuning it with
``train_text_to_image.py``, the comparison's ``--base`` and the demo on it; and the UNet family of
the same script at a toy size (its loss is the library's).

No accuracy is asserted: a few toy steps train nothing. The shipped base gets its accuracy
checks in ``tests/test_tiny_dit_base.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusion3Pipeline, StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from reslora_diffusers.data import (
    BASE_RESOLUTION,
    COLORS,
    LATENT_CHANNELS,
    MODEL_MAX_LENGTH,
    SD3_NUM_LAYERS,
    UNET_CHANNELS,
    added_colors_of,
    build_clip_encoder,
    build_flow_scheduler,
    build_pipeline,
    build_sd3_pipeline,
    build_sd3_transformer,
    build_silent_t5_encoder,
    build_t5_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    default_base_model_path,
    default_dit_base_path,
    extra_colors,
    vocabulary_words,
    write_tokenizer,
)
from reslora_diffusers.eval import evaluate_pipeline
from tests.bases import assert_export_loads_and_changes_the_image, public_config, transformers_config
from tests.runs import PROMPT, run_dit, subset
from tests.runs import script as train_script
from tests.scripts import load_script

pytestmark = pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")

ROOT = Path(__file__).resolve().parent.parent
#: a toy run: 16 images, batches of 4, 4 transformer steps, one seed and 2 sampling steps to evaluate
TOY = ["--family", "sd3", "--num-images", "16", "--batch-size", "4", "--transformer-steps", "4"]
TOY += ["--checkpoint-every", "2", "--eval-seeds", "1", "--eval-steps", "2", "--threads", "1"]
TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


pretrain = load_script(ROOT / "scripts" / "pretrain_tiny_base.py")


def _pretrain(work: Path, out: Path, *extra: str) -> None:
    pretrain.main([*TOY, "--work-dir", str(work), "--output-dir", str(out), *extra])


def _weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    (file,) = (folder / name).glob("*.safetensors")
    return load_file(file)


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory) -> Path:
    """The script's sd3 family run uninterrupted at the toy size."""
    shipped_before = default_dit_base_path().exists()
    root = tmp_path_factory.mktemp("toy-sd3")
    _pretrain(root / "work", root / "base")
    assert default_dit_base_path().exists() == shipped_before  # the asset folder is not touched
    return root / "base"


def test_only_the_embedded_base_folder_calls_itself_the_embedded_base():
    for family, accessor, name in [
        ("sd3", default_dit_base_path, "tiny-sd3"),
        ("unet", default_base_model_path, "tiny-sd"),
    ]:
        base = pretrain.BASES[family]
        # reached through another spelling of the same folder, too
        shipped = pretrain.card_identity(base, accessor().parent / ".." / accessor().parent.name / name)
        assert shipped == {
            "name": name,
            "role": "the embedded",
            "load": f"reslora_diffusers.data.{accessor.__name__}()",
        }
        kept = pretrain.card_identity(base, Path("scripts/pretrain_state") / f"{name}-kept")
        assert kept == {"name": f"{name}-kept", "role": "a", "load": f"'scripts/pretrain_state/{name}-kept'"}


def test_builders_make_a_small_sd3_pipeline_of_identical_blocks(tmp_path):
    torch.manual_seed(0)
    pipe = build_sd3_pipeline(tmp_path / "tokenizer")
    blocks = pipe.transformer.transformer_blocks
    assert 6 <= len(blocks) == SD3_NUM_LAYERS <= 12
    shapes = [{n: p.shape for n, p in b.named_parameters()} for b in blocks]
    assert all(s == shapes[0] for s in shapes[:-1])  # the last block, as in SD3, has no text output
    assert sum(p.numel() for p in pipe.transformer.parameters()) == 1_192_848
    pipe.save_pretrained(tmp_path / "pipe")
    size = sum(f.stat().st_size for f in (tmp_path / "pipe").rglob("*") if f.is_file())
    assert size <= 10_000_000  # float32 safetensors

    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "pipe")
    image = loaded(PROMPT, num_inference_steps=2, generator=torch.manual_seed(0)).images[0]
    assert image.size == (BASE_RESOLUTION, BASE_RESOLUTION)
    # what the transformer reads: both CLIPs' 16 tokens, then 256 T5 tokens, all 128 wide; the T5
    # sees our CLIP-format ids, <bos> words <eos>, padded with <eos>
    states, _, pooled, _ = loaded.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False)
    assert states.shape == (1, MODEL_MAX_LENGTH + 256, 128) and pooled.shape == (1, 128)
    tok = loaded.tokenizer_3
    ids = tok(PROMPT, padding="max_length", max_length=256, truncation=True).input_ids
    words = tok(PROMPT).input_ids
    assert ids == words + [tok.eos_token_id] * (256 - len(words)) and words[0] == tok.bos_token_id


@pytest.mark.slow
def test_script_writes_a_pipeline_that_loads_matches_the_builders_and_draws(toy_base, tmp_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(toy_base)
    assert public_config(pipe.transformer.config) == public_config(build_sd3_transformer().config)
    assert public_config(pipe.scheduler.config) == public_config(build_flow_scheduler().config)
    # the default --init-from is the shipped UNet base: the run adds the colours its tokenizer knows
    shipped = default_base_model_path() / "tokenizer"
    added = added_colors_of(json.loads((shipped / "vocab.json").read_text()))
    assert added == extra_colors(3)
    tok = build_tokenizer(tmp_path / "tok", added)
    for name, build in [("text_encoder", build_clip_encoder), ("text_encoder_2", build_clip_encoder)]:
        assert transformers_config(getattr(pipe, name)) == transformers_config(build(tok)), name
    assert pipe.text_encoder_3.config.d_model == build_t5_encoder(tok).config.d_model
    for folder in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        assert (toy_base / folder / "vocab.json").read_bytes() == (shipped / "vocab.json").read_bytes()

    # the VAE is the UNet base's trained one, with SD3's latent shift set from the data
    ours = AutoencoderKL.from_pretrained(default_base_model_path(), subfolder="vae")
    for key, value in ours.state_dict().items():
        assert torch.equal(pipe.vae.state_dict()[key], value), key
    assert pipe.vae.config.shift_factor not in (None, 0.0) and pipe.vae.config.scaling_factor != 1.0

    result = evaluate_pipeline(
        pipe, [PROMPT, "a blue circle on a black background"], seeds=[0], num_inference_steps=2
    )
    assert [image.size for image in result["images"]] == [(BASE_RESOLUTION, BASE_RESOLUTION)] * 2
    assert all(a["background"] is not None for a in result["analyses"])

    card = (toy_base / "README.md").read_text()
    # a folder other than the shipped one names itself and loads from its own path
    assert card.startswith(f"# {toy_base.name}: a diffusion-transformer base of reslora-diffusers\n")
    assert f"StableDiffusion3Pipeline.from_pretrained('{toy_base.as_posix()}')" in card
    # the colours of the default --init-from, tiny-sd
    assert "| training | 16 images (with orange and cyan and pink shapes too" in card
    assert ", seed 0; transformer + text encoders 4 steps, batch 4" in card
    assert "| training time | 0 min on cpu (1 threads) |" in card
    assert "| VAE | `tiny-sd`'s trained VAE" in card  # the default --init-from, named as shipped
    assert "| held-out pairs (seeds 0-0) | 9 |" in card and "| cross (seeds 0-0) | 15 |" in card
    # both shape readings: accuracy with its interval, nearest-template accuracy, colour, shape x 2,
    # background
    assert "| accuracy | its 95 % interval | accuracy (nearest template) |" in card
    row = next(line for line in card.splitlines() if line.startswith("| held-out pairs"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert len(cells) == 9 and all(cell.endswith("%") for cell in cells[2:])
    # the interval is the Wilson score interval of the open-set accuracy of the row's 9 images
    correct, n, z = round(float(cells[2].rstrip("%")) * 9 / 100), 9, 1.959964
    p, spread = correct / n, z * math.sqrt(correct / n * (1 - correct / n) / n + z * z / (4 * n * n))
    ends = [(p + z * z / (2 * n) + sign * spread) / (1 + z * z / n) for sign in (-1, 1)]
    assert cells[3] == f"[{100 * ends[0]:.1f}, {100 * ends[1]:.1f}] %"
    # a toy run of 4 steps is far below the bar, and the card says so with its figures
    numbers = json.loads((toy_base.parent / "work" / "numbers.json").read_text())["accuracy"]
    assert (
        f"**Below its bar on the open-set reading**: held-out pairs {numbers['heldout']['accuracy']:.1%}"
        in card
    )


def test_bar_verdict_names_each_set_below_its_bar_on_the_open_set_reading():
    def acc(heldout, seen, lenient=1.0):
        return {
            name: {"accuracy": value, "accuracy_lenient": lenient}
            for name, value in (("heldout", heldout), ("seen", seen))
        }

    assert pretrain.bar_verdict(acc(0.90, 0.95)) == "The base meets its bar on the open-set reading."
    assert pretrain.bar_verdict(acc(0.722, 0.96)) == (
        "**Below its bar on the open-set reading**: held-out pairs 72.2% (bar 90%)."
    )
    # the nearest-template reading does not count: 100 % there, 94.4 % open-set on seen pairs
    assert pretrain.bar_verdict(acc(0.95, 0.944)) == (
        "**Below its bar on the open-set reading**: seen pairs 94.4% (bar 95%)."
    )


@pytest.mark.slow
def test_stopped_run_resumes_to_the_weights_of_the_uninterrupted_one(toy_base, tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    _pretrain(work, out, "--max-minutes", "0")  # stops after its first step, checkpointed
    assert not out.exists()
    state = torch.load(work / "transformer_checkpoint.pt", weights_only=True)
    assert state["step"] == 1
    runs = 1
    while not out.exists():  # the same command, a step at a time
        _pretrain(work, out, "--max-minutes", "0")
        runs += 1
    assert runs == 4
    for name in TRAINED:
        want, got = _weights(toy_base, name), _weights(out, name)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.equal(want[key], got[key]), (name, key)


@pytest.mark.slow
def test_extend_continues_a_finished_run_to_more_steps_and_the_card_says_so(toy_base, tmp_path):
    import shutil

    work, out = tmp_path / "work", tmp_path / "base"
    shutil.copytree(toy_base.parent / "work", work)  # the finished 4-step run's work dir
    with pytest.raises(SystemExit, match="--extend continues"):  # only the step total may change
        _pretrain(work, out, "--transformer-steps", "6", "--transformer-lr", "1e-3", "--extend")
    with pytest.raises(SystemExit, match="--extend continues"):  # and it must grow
        _pretrain(work, out, "--transformer-steps", "3", "--extend")
    _pretrain(work, out, "--transformer-steps", "6", "--extend")
    state = torch.load(work / "transformer_checkpoint.pt", weights_only=True)
    assert state["step"] == 6 and state["extended"] == [4]
    card = (out / "README.md").read_text()
    assert "transformer + text encoders 6 steps (extended from 4 steps: the cosine schedule restarted" in card
    before, after = _weights(toy_base, "transformer"), _weights(out, "transformer")
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_eval_every_logs_the_ema_models_accuracy_and_leaves_training_as_it_was(toy_base, tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    _pretrain(work, out, "--eval-every", "2")
    records = [json.loads(line) for line in (work / "eval_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["shape_accuracy"] <= 1 for r in records)
    for name in TRAINED:  # the probe swaps the averaged weights in and out: same final weights
        want, got = _weights(toy_base, name), _weights(out, name)
        assert all(torch.equal(want[key], got[key]) for key in want), name


@pytest.mark.slow
def test_compiled_training_repeats_the_eager_run(toy_base, tmp_path):
    """``--compile``: the same losses (the running loss of the 4 steps, float32) and weights as the
    eager run, and dynamo did compile graphs."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    work, out = tmp_path / "work", tmp_path / "base"
    _pretrain(work, out, "--compile")
    assert counters["stats"]["unique_graphs"] > 0
    eager = torch.load(toy_base.parent / "work" / "transformer_checkpoint.pt", weights_only=True)
    compiled = torch.load(work / "transformer_checkpoint.pt", weights_only=True)
    assert compiled["running_loss"] == pytest.approx(eager["running_loss"], rel=1e-5)
    for name in TRAINED:
        want, got = _weights(toy_base, name), _weights(out, name)
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    torch._dynamo.reset()


def test_checkpoint_of_other_settings_is_refused(toy_base, tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    _pretrain(work, out, "--max-minutes", "0")
    with pytest.raises(SystemExit, match="transformer_checkpoint.pt was written with"):
        _pretrain(work, out, "--transformer-lr", "1e-3")
    assert not out.exists()


@pytest.fixture(scope="module")
def toy_lora(toy_base, tmp_path_factory) -> Path:
    """train_text_to_image.py on the toy base: 2 steps of ResLoRA bs."""
    root = tmp_path_factory.mktemp("toy-sd3-lora")
    data = subset(root / "set", 4)
    run_dit(
        toy_base, data, root / "run", "--max_train_steps", "2", "--res_type", "bs", "--learning_rate", "1e-2"
    )
    return root / "run"


def test_training_script_fine_tunes_the_base_and_its_pipeline_loads_the_export(toy_base, toy_lora):
    assert_export_loads_and_changes_the_image(toy_base, toy_lora)


compare = load_script(ROOT / "benchmarks" / "compare_methods.py")


@pytest.mark.slow
def test_comparison_runs_on_another_base(toy_base, tmp_path):
    assert compare.base_args("unet") == []
    assert compare.base_args("dit") == ["--pretrained_model_name_or_path", str(default_dit_base_path())]
    data = subset(tmp_path / "set", 4)
    extra = ["--train_data_dir", str(data), "--train_batch_size", "2", "--resolution", "16"]
    extra += ["--calibration_batches", "1", "--validation_prompt", PROMPT]
    args = compare.parse_args(
        ["--output_dir", str(tmp_path / "cmp"), "--max_train_steps", "2", "--validation_steps", "1"]
        + ["--compare_step", "1", "--num_validation_images", "1", "--base", str(toy_base), "--", *extra]
    )
    result = compare.run_one("ms-m3", 0, args)
    assert len(result["loss"]) == 2 and sorted(result["accuracy"]) == [0, 1, 2]
    assert set(result["measurements"]) == {"1", "2"}  # the early step and the last, exported
    assert 0 <= result["unmerged_accuracy"] <= 1 and result["merge_error"] > 0  # ms merges approximately
    report = json.loads((tmp_path / "cmp" / "ms-m3-seed0" / "merge_report.json").read_text())
    assert report["res_type"] == "ms" and report["pre_num"] == 3
    assert report["components"]["transformer"]["output_error"] == result["merge_error"]


def test_demo_renders_the_base_and_its_lora(toy_base, toy_lora):
    import app.app as demo_app
    from reslora_diffusers.export.loading import check_lora_file

    pipe = StableDiffusion3Pipeline.from_pretrained(toy_base)
    assert check_lora_file(pipe, toy_lora).name == "pytorch_lora_weights.safetensors"
    gallery, status, rows = demo_app.render(PROMPT, "", 0, 2, 4.0, 1.0, 1, str(toy_base), str(toy_lora))
    assert status == "Rendered 2 models with the same seeds." and len(gallery) == 2
    assert [(base, [model for model, _ in models]) for base, models in rows] == [
        (toy_base.name, ["base", gallery[1][1].split(" on ")[0]])
    ]
    assert gallery[1][1].startswith("ResLoRA bs m=") and "read:" in gallery[1][1]
    # the embedded vocabulary: its notes on unseen words apply to this base
    assert "cross" in demo_app.prompt_note(PROMPT, str(toy_base))
    # a LoRA of the UNet base is named as such
    with pytest.raises(ValueError, match="component 'unet', which this pipeline lacks"):
        check_lora_file(pipe, _unet_lora_file(toy_lora.parent))
    # and so is a kohya-format file of the UNet base (lora_unet_ keys), which a UNet pipeline takes
    kohya = toy_lora.parent / "unet_kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, kohya)
    with pytest.raises(ValueError, match="kohya key .* component 'unet', which this pipeline lacks"):
        check_lora_file(pipe, kohya)
    assert check_lora_file(StableDiffusionPipeline.from_pretrained(default_base_model_path()), kohya) == kohya


def _unet_lora_file(folder: Path) -> Path:
    path = folder / "unet_lora.safetensors"
    save_file({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}, path)
    return path


@pytest.mark.slow
def test_the_unet_family_pretrains_through_the_librarys_denoising_loss(tmp_path):
    """``--family unet`` at the toy size: the VAE stage, then the UNet and text encoder trained by
    ``objectives.denoising_loss`` (v-prediction, min-SNR), a pipeline that loads, and its card;
    with 8 latent channels instead of the shipped base's 4, a weaker KL term and a UNet of other
    widths, which its checkpoint keeps: a run of the shipped widths does not continue it."""
    toy = ["--family", "unet", "--num-images", "16", "--batch-size", "4", "--vae-steps", "2"]
    toy += ["--unet-steps", "3", "--checkpoint-every", "2", "--eval-seeds", "1", "--eval-steps", "2"]
    toy += ["--latent-channels", "8", "--kl-weight", "1e-8", "--threads", "1"]
    dirs = ["--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "base")]
    pretrain.main([*toy, *dirs, "--unet-channels", "32", "48"])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    wide = build_unet(latent_channels=8, block_out_channels=(32, 48))
    assert public_config(pipe.unet.config) == public_config(wide.config)
    assert list(pipe.unet.config.block_out_channels) == [32, 48]
    assert pipe.vae.config.latent_channels == 8 and pipe.unet.config.in_channels == 8
    card = (tmp_path / "base" / "README.md").read_text()
    assert "(latents 8 x 16 x 16)" in card
    # the VAE stage's settings come from its own record in the work dir, as the card states them
    assert json.loads((tmp_path / "work" / "vae" / "numbers.json").read_text())["kl_weight"] == 1e-8
    assert "VAE 2 steps (KL weight 1e-08), then UNet + text encoder 3 steps" in card
    latents = pipe("a red circle", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 8, BASE_RESOLUTION // 2, BASE_RESOLUTION // 2)
    numbers = json.loads((tmp_path / "work" / "numbers.json").read_text())
    assert math.isfinite(numbers["unet_loss"]) and numbers["unet_loss"] > 0
    with pytest.raises(
        SystemExit, match=r"unet_checkpoint.pt was written with .*'unet_channels': \[32, 48\]"
    ):
        pretrain.main([*toy, *dirs, "--stage", "denoiser"])


@pytest.mark.slow
def test_the_unet_family_pretrains_on_latents_at_the_images_side(tmp_path):
    """``--vae-scale-factor 1``: a one-level VAE whose latents keep the 32 x 32 side, a UNet with a
    first level that has no attention at that side, a pipeline that draws 32 x 32 images and a card
    that says so; the denoiser stage of the default factor does not take that VAE."""
    toy = ["--family", "unet", "--num-images", "16", "--batch-size", "4", "--vae-steps", "2"]
    toy += ["--unet-steps", "2", "--checkpoint-every", "2", "--eval-seeds", "1", "--eval-steps", "2"]
    toy += ["--threads", "1", "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "base")]
    pretrain.main([*toy, "--vae-scale-factor", "1"])
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert pipe.vae_scale_factor == 1 and len(pipe.vae.config.block_out_channels) == 1
    assert public_config(pipe.unet.config) == public_config(build_unet(vae_scale_factor=1).config)
    assert pipe.unet.config.down_block_types[0] == "DownBlock2D"
    assert list(pipe.unet.config.block_out_channels) == [UNET_CHANNELS[0], *UNET_CHANNELS]
    assert "(latents 4 x 32 x 32)" in (tmp_path / "base" / "README.md").read_text()
    latents = pipe("a red circle", num_inference_steps=2, output_type="latent").images
    assert latents.shape == (1, 4, BASE_RESOLUTION, BASE_RESOLUTION)
    assert pipe("a red circle", num_inference_steps=2).images[0].size == (BASE_RESOLUTION, BASE_RESOLUTION)
    with pytest.raises(
        SystemExit,
        match=r"the VAE in .*work/vae has 4 latent channels and downsamples by 1, this run builds 4 and 2",
    ):
        pretrain.main([*toy, "--stage", "denoiser", "--unet-steps", "3"])


@pytest.mark.slow
def test_the_unet_family_pretrains_with_extra_colours(tmp_path, monkeypatch):
    """``--extra-colors 2``: the base set and the pipeline's vocabulary hold the two added colours
    (one token each), the card says so, the VAE's reconstruction reading leaves their images out
    (the analyser cannot name them), and a run without them does not continue the checkpoint."""
    read = []
    accuracy = pretrain.prompt_accuracy
    monkeypatch.setattr(
        pretrain, "prompt_accuracy", lambda images, texts: read.append(texts) or accuracy(images, texts)
    )
    toy = ["--family", "unet", "--num-images", "63", "--batch-size", "4", "--vae-steps", "2"]
    toy += ["--unet-steps", "2", "--checkpoint-every", "2", "--eval-seeds", "1", "--eval-steps", "2"]
    toy += ["--threads", "1", "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "base")]
    pretrain.main([*toy, "--extra-colors", "2"])
    texts = [json.loads(line)["text"] for line in (tmp_path / "work/base-set/metadata.jsonl").open()]
    added = extra_colors(2)
    assert {t.split()[1] for t in texts} == {*COLORS, *added}
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "base")
    assert [pipe.tokenizer.tokenize(color) for color in added] == [[f"{c}</w>"] for c in added]
    assert f"(with {added[0]} and {added[1]} shapes too" in (tmp_path / "base" / "README.md").read_text()
    base_set_read = read[0]
    assert len(base_set_read) == sum(t.split()[1] in COLORS for t in texts) < len(texts)
    with pytest.raises(SystemExit, match=r"unet_checkpoint.pt was written with .*'extra_colors': 2"):
        pretrain.main([*toy, "--stage", "denoiser", "--unet-steps", "3"])


def test_the_denoiser_stage_names_a_vae_of_other_latent_channels(tmp_path):
    build_vae(latent_channels=8).save_pretrained(tmp_path / "vae")
    pretrain.check_vae_layout(build_vae(latent_channels=8), tmp_path / "vae", "unused")
    with pytest.raises(
        SystemExit, match=r"has 8 latent channels and downsamples by 2, this run builds 4 and 2: retrain"
    ):
        pretrain.check_vae_layout(build_vae(), tmp_path / "vae", "retrain")


def test_each_family_names_its_own_way_to_a_vae_of_the_run_s_layout():
    # the sd3 family's VAE stage copies --init-from's VAE: the UNet flags are no remedy there
    assert "--vae-scale-factor" in pretrain.BASES["unet"].vae_remedy
    assert "--init-from" in pretrain.BASES["sd3"].vae_remedy
    assert "--vae-scale-factor" not in pretrain.BASES["sd3"].vae_remedy


def test_a_one_level_vae_keeps_the_side_and_other_factors_are_refused():
    vae = build_vae(vae_scale_factor=1)
    latents = vae.encode(torch.zeros(1, 3, BASE_RESOLUTION, BASE_RESOLUTION)).latent_dist.mean
    assert latents.shape == (1, LATENT_CHANNELS, BASE_RESOLUTION, BASE_RESOLUTION)
    assert build_vae().encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape[-1] == BASE_RESOLUTION // 2
    for builder in (lambda: build_vae(vae_scale_factor=4), lambda: build_unet(vae_scale_factor=4)):
        with pytest.raises(ValueError, match="vae_scale_factor 4: the tiny base's VAE downsamples by 1 or 2"):
            builder()


@pytest.mark.slow
def test_the_sd3_family_pretrains_with_the_extra_colours_of_its_init_from(tmp_path):
    """``--family sd3 --extra-colors 2`` from a UNet folder whose vocabulary has the two added
    colours: the base set and all three tokenizers hold them (one token each) and the card says so;
    a run whose colours differ from that folder's stops with one line before it trains."""
    added = extra_colors(2)
    unet_folder = tmp_path / "unet-base"
    unet = build_pipeline(tmp_path / "unet-tokenizer", extra_words=added)
    pretrain.save_pipeline(unet, unet_folder, vocabulary_words(added))
    toy = [*TOY, "--num-images", "63", "--init-from", str(unet_folder), "--work-dir", str(tmp_path / "work")]
    pretrain.main([*toy, "--output-dir", str(tmp_path / "base"), "--extra-colors", "2"])
    texts = [json.loads(line)["text"] for line in (tmp_path / "work/base-set/metadata.jsonl").open()]
    assert {t.split()[1] for t in texts} == {*COLORS, *added}
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path / "base")
    for tokenizer in (pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3):
        assert [tokenizer.tokenize(color) for color in added] == [[f"{c}</w>"] for c in added]
    assert f"(with {added[0]} and {added[1]} shapes too" in (tmp_path / "base" / "README.md").read_text()
    # without --extra-colors the run takes the folder's; another number stops it before it trains
    assert pretrain.parse_args(toy).added_colors == added
    other = ["--output-dir", str(tmp_path / "other"), "--work-dir", str(tmp_path / "work2")]
    with pytest.raises(
        SystemExit, match=r"knows the added colours orange, cyan, this run adds none: give --extra-colors 2"
    ):
        pretrain.main([*toy, *other, "--extra-colors", "0"])
    assert not (tmp_path / "other").exists()
    # a tokenizer of other words is no vocabulary of ours
    write_tokenizer(tmp_path / "foreign" / "tokenizer", ("some", "other", "words"))
    with pytest.raises(SystemExit, match=r"foreign: its tokenizer is not the embedded base's vocabulary"):
        pretrain.parse_args([*TOY, "--init-from", str(tmp_path / "foreign")])


def test_unet_family_flags_stop_the_sd3_family_with_one_line(capsys):
    for flags in (["--vae-scale-factor", "1"], ["--unet-channels", "48", "96"]):
        with pytest.raises(SystemExit):
            pretrain.parse_args(["--family", "sd3", *flags])
        assert f"{flags[0]}: the UNet family's only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--patch-size", "1", "--transformer-width", "128", "--no-t5"])
    assert "--patch-size, --transformer-width, --no-t5: the sd3 family's only" in capsys.readouterr().err


def test_the_sd3_family_pretrains_with_one_by_one_patches(tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    _pretrain(work, out, "--patch-size", "1", "--max-minutes", "0")
    # the patch size is a setting of the checkpoint: a run of 2 x 2 patches does not take it up
    with pytest.raises(SystemExit, match="transformer_checkpoint.pt was written with"):
        _pretrain(work, out)
    _pretrain(work, out, "--patch-size", "1")
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    assert public_config(pipe.transformer.config) == public_config(build_sd3_transformer(patch_size=1).config)
    # a 2 x 2 pixel area of the image per token: (32 / 2) ** 2 image tokens, positions up to twice the side
    latents = torch.zeros(1, LATENT_CHANNELS, BASE_RESOLUTION // 2, BASE_RESOLUTION // 2)
    assert pipe.transformer.pos_embed(latents).shape[1] == (BASE_RESOLUTION // 2) ** 2
    assert (
        pipe.transformer.pos_embed(torch.cat([latents] * 2, dim=-1)).shape[1]
        == 2 * (BASE_RESOLUTION // 2) ** 2
    )
    assert "latents 4 x 16 x 16, 1 x 1 patches" in (out / "README.md").read_text()
    result = evaluate_pipeline(pipe, [PROMPT], seeds=[0], num_inference_steps=2)
    assert result["images"][0].size == (BASE_RESOLUTION, BASE_RESOLUTION)


def test_the_sd3_family_pretrains_a_wider_shallower_transformer_without_t5(tmp_path):
    work, out = tmp_path / "work", tmp_path / "base"
    shape = ("--transformer-width", "128", "--transformer-depth", "3")
    _pretrain(work, out, "--no-t5", *shape, "--max-minutes", "0")
    # all are settings of the checkpoint: a run with T5, or of the default depth, does not take it up
    for other in (shape, ("--no-t5", "--transformer-width", "128")):
        with pytest.raises(SystemExit, match="transformer_checkpoint.pt was written with"):
            _pretrain(work, out, *other)
    _pretrain(work, out, "--no-t5", *shape)
    pipe = StableDiffusion3Pipeline.from_pretrained(out)  # loads as any SD3 folder
    expected = build_sd3_transformer(width=128, depth=3)
    assert public_config(pipe.transformer.config) == public_config(expected.config)
    assert pipe.transformer.config.num_attention_heads == 4 and len(pipe.transformer.transformer_blocks) == 3
    # its text_encoder_3 is silent: zero states for any prompt, as a pipeline without T5 pads in
    ids = pipe.tokenizer_3([PROMPT, "a blue square"], padding="max_length", return_tensors="pt").input_ids
    assert not pipe.text_encoder_3(ids)[0].any()
    without_t5 = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    drawn = [
        p(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
        for p in (pipe, without_t5)
    ]
    torch.testing.assert_close(drawn[0], drawn[1])
    card = (out / "README.md").read_text()
    assert "3 joint blocks of width 128" in card and "and no T5: trained without one" in card
    # fine-tuning it folds the zero T5 states as its pretraining did, and exports a file it loads
    data = subset(tmp_path / "set", 4)
    run_dit(
        out, data, tmp_path / "run", "--max_train_steps", "2", "--res_type", "bs", "--learning_rate", "1e-2"
    )
    assert_export_loads_and_changes_the_image(out, tmp_path / "run")


def test_fine_tuning_folds_the_t5_states_of_a_base_whose_t5_is_silent(toy_base, tmp_path):
    """A silent T5 (zero weights: what a base trained without T5 saves) gives zero T5 states, so
    the objective hands the transformer 16 + 1 text tokens and the fold's weight; the prediction
    is diffusers' own on the whole prompt. A base with a working T5 is not folded."""
    silent = StableDiffusion3Pipeline.from_pretrained(toy_base)
    silent.register_modules(text_encoder_3=build_silent_t5_encoder(silent.tokenizer))
    silent.save_pretrained(tmp_path / "silent")
    captions = [PROMPT, "a blue square on a gray background"]
    noisy, timesteps = torch.randn(2, LATENT_CHANNELS, 16, 16), torch.tensor([200.0, 800.0])
    for folder, text_tokens in (
        (toy_base, MODEL_MAX_LENGTH + 256),
        (tmp_path / "silent", MODEL_MAX_LENGTH + 1),
    ):
        objective = train_script.load_models(
            train_script.parse_args(["--pretrained_model_name_or_path", str(folder)])
        )
        with torch.no_grad():
            text = objective.encode_text(objective.models, captions)
            inputs = objective.transformer_inputs(noisy, timesteps, text)
            prediction = objective.models["transformer"](**inputs).sample
            reference = StableDiffusion3Pipeline.from_pretrained(folder).transformer  # diffusers' processors
            expected = reference(hidden_states=noisy, timestep=timesteps, **text).sample
        assert inputs["encoder_hidden_states"].shape[1] == text_tokens
        torch.testing.assert_close(prediction, expected, atol=1e-5, rtol=1e-5)
    assert inputs["joint_attention_kwargs"] == {"padding_copies": 256}


def test_unet_widths_that_its_norm_cannot_group_stop_with_one_line(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--unet-channels", "32", "40"])
    assert "--unet-channels [32, 40]: each width must be a positive multiple of 16" in capsys.readouterr().err


def test_the_card_names_another_init_from_folder_as_its_source(tmp_path):
    # a base started from a candidate folder must not claim the shipped tiny-sd's VAE
    default = pretrain.parse_args(["--family", "sd3"])
    assert pretrain.init_source(default) == "`tiny-sd`"
    other = pretrain.parse_args(["--family", "sd3", "--init-from", str(tmp_path)])
    assert pretrain.init_source(other) == f"`{tmp_path}`"


def test_the_sd3_base_takes_its_latent_channels_from_the_init_from_vae(tmp_path):
    # the DiT base reuses --init-from's VAE, so its transformer must read that VAE's channels
    build_vae(latent_channels=8).save_config(tmp_path / "vae")
    sd3_from = ["--family", "sd3", "--init-from", str(tmp_path)]
    assert pretrain.init_from_latent_channels(pretrain.parse_args(sd3_from)) == 8
    assert pretrain.init_from_latent_channels(pretrain.parse_args([*sd3_from, "--latent-channels", "8"])) == 8
    with pytest.raises(SystemExit, match=r"--latent-channels 4: .*VAE has 8 latent channels"):
        pretrain.init_from_latent_channels(pretrain.parse_args([*sd3_from, "--latent-channels", "4"]))

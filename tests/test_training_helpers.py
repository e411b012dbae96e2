"""Helpers of the training script: labelled validation grids, the model card's base model,
silencing one known third-party log line without hiding the others, the run folder, and the
ResLoRA flags generated from the config's fields."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reslora_diffusers import ResLoRAConfig, res_types
from reslora_diffusers.training.card import write_model_card
from reslora_diffusers.training.flags import reslora_config
from reslora_diffusers.training.grid import labelled_grid
from reslora_diffusers.training.run_folder import RunFolder
from reslora_diffusers.utils.quiet import dropped_log_messages
from tests.runs import ROOT, script
from tests.scripts import load_script

COLOURS = [(200, 0, 0), (0, 160, 0), (0, 0, 200), (200, 200, 0), (120, 0, 160), (0, 150, 150)]


def test_grid_enlarges_cells_sharply_and_labels_rows_and_columns():
    images = [Image.new("RGB", (32, 32), colour) for colour in COLOURS]
    images[0].putpixel((0, 0), (255, 255, 255))  # one odd pixel: must become a sharp 3 x 3 block
    prompts = ["a red cross on a white background", "a green circle", "a blue square"]
    grid = np.asarray(labelled_grid(images, ["seed 0", "seed 1"], prompts))
    height, width, _ = grid.shape
    left, top = width - 3 * 96, height - 2 * 96
    assert left > 0 and top > 0  # room for the seed labels and the prompts
    for i, colour in enumerate(COLOURS):
        y, x = top + (i // 3) * 96, left + (i % 3) * 96
        cell = grid[y : y + 96, x : x + 96]
        if i == 0:
            assert (cell[:3, :3] == 255).all() and (cell[3:, 3:] == colour).all()
            assert (cell[:3, 3] == colour).all()
        else:
            assert (cell == colour).all()
    for c in range(3):  # dark text above every column, beside every row
        assert (grid[:top, left + c * 96 : left + (c + 1) * 96] < 100).any()
    for r in range(2):
        assert (grid[top + r * 96 : top + (r + 1) * 96, :left] < 100).any()


def test_grid_refuses_a_count_that_does_not_fill_it():
    with pytest.raises(ValueError, match="5 images for 2 rows x 3 columns"):
        labelled_grid([Image.new("RGB", (8, 8))] * 5, ["seed 0", "seed 1"], ["a", "b", "c"])


def _card(tmp_path, base: str, schedule: str = "constant", res_type: str = "bs") -> str:
    args = argparse.Namespace(
        shortcut_schedule=schedule,
        shortcut_decay_start=0.5,
        pretrained_model_name_or_path=base,
        target_modules=["to_q"],
        train_text_encoder=False,
        use_peft=False,
        res_type=res_type,
        checkpointing_steps=400,
        report_to="tensorboard",
        logging_dir="logs",
        pre_num=1,
        rank=4,
        lora_alpha=None,
        merge="calibrated",
        max_train_steps=10,
        train_batch_size=2,
        gradient_accumulation_steps=1,
        learning_rate=1e-3,
    )
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return write_model_card(out, args, [], "folder data", 1, None, (None, None, 0), None).read_text()


def test_card_names_a_local_base_by_its_folder_and_a_hub_base_by_its_id(tmp_path, monkeypatch):
    base = tmp_path / "models" / "my-sd15"
    base.mkdir(parents=True)
    card = _card(tmp_path, str(base))
    assert "\nbase_model: my-sd15\n" in card
    assert f"(local folder `{base}`)" in card  # where it was, for the person who trained it
    assert f'from_pretrained("{base}")' in card
    monkeypatch.chdir(tmp_path)  # a relative folder stays as the command line gave it
    card = _card(tmp_path, "models/my-sd15")
    assert "(local folder `models/my-sd15`)" in card and 'from_pretrained("models/my-sd15")' in card
    assert str(tmp_path / "models") not in card
    card = _card(tmp_path, "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert "\nbase_model: stable-diffusion-v1-5/stable-diffusion-v1-5\n" in card


def test_card_of_a_shipped_base_names_no_folder_of_this_machine(tmp_path):
    """The embedded bases are loaded through the function that finds them on any install."""
    from reslora_diffusers.data import default_base_model_path, default_dit_base_path

    for function in (default_base_model_path, default_dit_base_path):
        card = _card(tmp_path, str(function()))
        assert str(function()) not in card and str(Path(function()).parent) not in card
        use = card.split("```python\n")[1].split("```")[0]
        assert f"from reslora_diffusers.data import {function.__name__}\n" in use
        assert f"DiffusionPipeline.from_pretrained({function.__name__}())" in use
        assert f"\nbase_model: {Path(function()).name}\n" in card


def test_card_calls_a_plain_run_lora_and_lists_every_output(tmp_path):
    card = _card(tmp_path, "some/base", res_type="none")
    method = next(line for line in card.splitlines() if line.startswith("| method |"))
    assert method == "| method | LoRA (`--res_type none`), rank 4, alpha 4, UNet (`to_q`) |"
    assert "ResLoRA `bs`" in _card(tmp_path, "some/base") and "merged with `calibrated`" in _card(
        tmp_path, "b"
    )
    assert "`checkpoint-N/` (every 400 steps" in card and "`logs/` (TensorBoard" in card


def test_card_names_a_decaying_shortcut_schedule(tmp_path):
    assert "schedule" not in _card(tmp_path, "some/base")
    card = _card(tmp_path, "some/base", schedule="cosine")
    assert (
        "ResLoRA `bs` (pre_num 1), shortcuts decayed to 0 by the `cosine` schedule from 50% of training"
        in card
    )


def test_dropped_log_messages_hides_only_the_named_lines(caplog):
    log = logging.getLogger("some.library.module")
    with caplog.at_level(logging.WARNING), dropped_log_messages("some.library.module", "harmless"):
        log.warning("a harmless %s", "note")
        log.warning("a real problem")
    log.warning("harmless again, after the block")
    assert [r.getMessage() for r in caplog.records] == ["a real problem", "harmless again, after the block"]


def test_shortcut_schedule_values_at_given_steps():
    from reslora_diffusers.core.schedule import check_schedule, shortcut_scale_at

    # 10 steps, decay from step 5 (0.5 x 10): p = (step - 5) / 5
    assert [shortcut_scale_at(s, 10, "constant") for s in (1, 5, 10)] == [1.0, 1.0, 1.0]
    linear = [shortcut_scale_at(s, 10, "linear", 0.5) for s in range(1, 11)]
    assert linear == pytest.approx([1, 1, 1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0])
    cosine = [shortcut_scale_at(s, 10, "cosine", 0.5) for s in (5, 6, 8, 10)]
    # (1 + cos(pi p)) / 2 at p = 0, 0.2, 0.6, 1: cos(0.2 pi) = 0.80902, cos(0.6 pi) = -0.30902
    assert cosine == pytest.approx([1.0, 0.904508, 0.345492, 0.0], abs=1e-6)
    assert shortcut_scale_at(10, 10, "cosine", 0.5) == 0.0 and shortcut_scale_at(10, 10, "linear", 0.3) == 0.0
    # decay from the start: step 1 of 4 is a quarter of the way down
    assert shortcut_scale_at(1, 4, "linear", 0.0) == pytest.approx(0.75)
    assert check_schedule("cosine", None) == 0.5 and check_schedule("linear", 0.25) == 0.25
    for schedule, start, message in (
        ("constant", 0.3, "needs a decaying"),
        ("linear", 1.0, r"in \[0, 1\)"),
        ("step", None, "unknown"),
    ):
        with pytest.raises(ValueError, match=message):
            check_schedule(schedule, start)


# -- the run folder -------------------------------------------------------------------------
def _run_folder(tmp_path: Path, report: dict | None, log: list[str]) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    if report is not None:
        run.report_file.write_text(json.dumps(report))
    run.log_file.write_text("".join(line + "\n" for line in log))
    return run


@pytest.mark.parametrize(
    "report,label",
    [
        ({"res_type": "ms", "pre_num": 1}, "ResLoRA ms m=1 (run)"),
        ({"res_type": "is", "pre_num": 1}, "ResLoRA is (run)"),  # is always takes one predecessor
        ({"res_type": "none", "pre_num": 1}, "LoRA (run)"),
        ({"res_type": "bs", "pre_num": 0}, "LoRA (run)"),  # no predecessor: a plain LoRA
        ({"res_type": "zz", "pre_num": 2}, "ResLoRA zz m=2 (run)"),  # a plugin's type, not imported here
        (None, "run"),
    ],
)
def test_run_folder_labels_its_method_from_the_merge_report(tmp_path, report, label):
    assert _run_folder(tmp_path, report, []).label() == label


def test_run_folder_reads_its_log_and_names_its_files(tmp_path, caplog):
    lines = [
        '{"step": 0, "kind": "validation", "prompt_accuracy": 0.1}',
        '{"step": 1, "loss": 0.5}',
        '{"step": 2, "loss": 0.4}',
        '{"step": 2, "kind": "final", "prompt_accuracy": 0.6}',
        '{"step": 3, "lo',  # torn by a crash mid-write
    ]
    run = _run_folder(tmp_path, None, lines)
    assert run.accuracies() == [(0, 0.1), (2, 0.6)] and run.steps_trained() == 2
    assert run.final_record() == {"step": 2, "kind": "final", "prompt_accuracy": 0.6}
    assert "dropped its last line 5" in caplog.text
    assert RunFolder.of(run.path / "pytorch_lora_weights.safetensors").path == run.path
    assert {p.name for p in run.lora_files().values()} == {
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "lora_comfyui.safetensors",
    }
    (run.path / "checkpoint-4").mkdir()
    run.grid("final").parent.mkdir()
    assert {p.name for p in run.outputs("logs")} == {"train_log.jsonl", "checkpoint-4", "validation"}
    assert not run.has_lora() and run.merge_report() is None


# -- ResLoRA's flags -------------------------------------------------------------------------
def _example_parser():
    """The language-model examples' flags (``examples/lm_common.py``, as the examples build them)."""
    module = load_script(ROOT / "examples" / "lm_common.py")
    parser = argparse.ArgumentParser()
    module.add_method_arguments(parser, learning_rate=1e-3, max_train_steps=1)
    return parser


def _options(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {action.option_strings[0]: action.help for action in parser._actions if action.option_strings}


def test_reslora_flags_are_the_config_fields_in_the_script_and_the_examples():
    script_flags, example_flags = _options(script.build_parser()), _options(_example_parser())
    for field in dataclasses.fields(ResLoRAConfig):
        flag = "--" + field.metadata.get("flag", field.name)
        assert field.metadata["help"] and flag in script_flags and flag in example_flags, flag
    for flag in ("--lora_dropout", "--pre_num", "--norm_window", "--init", "--shortcut_module"):
        assert script_flags[flag] == example_flags[flag], flag
    # the help lists the registered types by kind (bs/ms use pre_num; is/ms merge approximately;
    # and any type a plugin registered, as tests/test_new_shortcut.py's ls when it is imported)
    assert f"a {'/'.join(res_types(uses_pre_num=True))} shortcut" in script_flags["--pre_num"]
    assert {"bs", "ms"} <= set(res_types(uses_pre_num=True)) and "is" not in res_types(uses_pre_num=True)
    assert f"the {'/'.join(res_types(exact_merge=False))} shortcuts" in script_flags["--merge"]
    assert {"is", "ms"} <= set(res_types(exact_merge=False)) and "bs" not in res_types(exact_merge=False)


def test_the_parsed_flags_are_the_config_written_out():
    argv = ["--rank", "2", "--lora_alpha", "3", "--lora_dropout", "0.1", "--res_type", "is", "--pre_num", "2"]
    argv += ["--target_modules", "to_q", "to_v", "--exclude_modules", "a.b", "--merge", "weight"]
    argv += ["--norm_window", "7", "--record_norms", "--init", "gaussian"]
    want = ResLoRAConfig(
        rank=2,
        alpha=3.0,
        dropout=0.1,
        res_type="is",
        pre_num=2,
        target_modules=["to_q", "to_v"],
        exclude_modules=["a.b"],
        merge="weight",
        norm_window=7,
        record_norms=True,
        init="gaussian",
    )
    assert reslora_config(script.parse_args(argv)) == want
    # the defaults: the script's rank and type, the config's for the rest
    assert reslora_config(script.parse_args([])) == ResLoRAConfig(rank=8, res_type="ms")

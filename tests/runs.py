"""Running ``train_text_to_image.py`` from the tests: the script as a module and the helpers
the script's tests share (the fixtures they use are in ``conftest.py``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reslora_diffusers.data import default_finetune_data_dir
from reslora_diffusers.training.run_folder import RunFolder
from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "train_text_to_image.py"
PROMPT = "a red cross on a white background"


#: ``train_text_to_image.py``, loaded once
script = load_script(SCRIPT)


def subset(out: Path, num: int) -> Path:
    """The first ``num`` images of the embedded fine-tuning set, in an imagefolder ``out``."""
    lines = (default_finetune_data_dir() / "metadata.jsonl").read_text().splitlines()[:num]
    out.mkdir(parents=True)
    for line in lines:
        name = json.loads(line)["file_name"]
        shutil.copy(default_finetune_data_dir() / name, out / name)
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def run(base: Path, data: Path, out: Path, *extra: str) -> dict:
    """A training run in this process (batches of 3, no TensorBoard); its summary."""
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data)]
    argv += ["--output_dir", str(out), "--train_batch_size", "3", "--report_to", "none", *extra]
    return script.train(script.parse_args(argv), argv)


#: the DiT runs' size: 16 px images, batches of 2, one calibration batch (later flags win)
DIT_ARGS = ("--train_batch_size", "2", "--resolution", "16", "--calibration_batches", "1")


def run_dit(base: Path, data: Path, out: Path, *extra: str) -> dict:
    """:func:`run` at the DiTs' size."""
    return run(base, data, out, *DIT_ARGS, *extra)


def error(base: Path, data: Path, out: Path, *extra: str, defaults: bool = True) -> str:
    """The one-line error ``main`` exits with for these flags (``defaults``: base and data given)."""
    argv = ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data)] if defaults else []
    argv += ["--output_dir", str(out), "--report_to", "none", "--max_train_steps", "1", *extra]
    with pytest.raises(SystemExit) as info:
        script.main(argv)
    message = str(info.value.code)
    assert "\n" not in message and message.startswith("train_text_to_image.py: error: ")
    return message


def records(out: Path) -> list[dict]:
    """The run's ``train_log.jsonl``, every line parsed as JSON (a torn line fails the test)."""
    return [json.loads(line) for line in (out / RunFolder.LOG).read_text().splitlines()]


def from_checkpoint(run_dir: Path, step: int, resumed: Path) -> Path:
    """A new output folder ``resumed`` holding only ``run_dir``'s ``checkpoint-<step>``."""
    resumed.mkdir()
    shutil.copytree(run_dir / f"checkpoint-{step}", resumed / f"checkpoint-{step}")
    return resumed


def assert_same_weights(expected: Path, got: Path, name: str = RunFolder.CHECKPOINT) -> dict:
    """Both runs' ``name`` files hold the same keys and bit-identical tensors; returns ``expected``'s."""
    want, have = load_file(expected / name), load_file(got / name)
    assert want.keys() == have.keys()
    for key in want:
        assert torch.equal(want[key], have[key]), key
    return want


def launch_two_processes(base: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """A 2-process DDP run (gloo on the CPU) through ``accelerate launch``, 4 steps of ResLoRA ms."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT)]
    cmd += ["--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data)]
    cmd += ["--output_dir", str(out), "--train_batch_size", "2", "--max_train_steps", "4"]
    cmd += ["--checkpointing_steps", "2", "--res_type", "ms", "--merge", "input", "--rank", "4"]
    cmd += ["--report_to", "none", "--random_flip", *extra]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result

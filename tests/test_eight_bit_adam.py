"""``--use_8bit_adam``: bitsandbytes' AdamW8bit in the training script, and a clear refusal
where bitsandbytes does not load."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from reslora_diffusers.training.speed import make_adamw

bitsandbytes = pytest.importorskip(
    "bitsandbytes", reason="bitsandbytes is a dev dependency (pip install -e .[dev])"
)
ROOT = Path(__file__).resolve().parent.parent


def test_8bit_state_for_large_tensors_and_adamw_steps():
    """State of a 64 x 4096 factor in uint8 (a quarter of float32's bytes); the steps follow
    float32 AdamW to 8-bit precision."""
    torch.manual_seed(0)
    p8 = torch.nn.Parameter(torch.randn(64, 4096))
    p32 = torch.nn.Parameter(p8.detach().clone())
    opt8 = make_adamw([p8], None, torch.device("cpu"), use_8bit=True, lr=1e-3)
    opt32 = make_adamw([p32], None, torch.device("cpu"), lr=1e-3)
    assert isinstance(opt8, bitsandbytes.optim.AdamW8bit)
    start = p8.detach().clone()
    for _ in range(5):
        grad = torch.randn_like(p8)
        p8.grad, p32.grad = grad.clone(), grad.clone()
        opt8.step()
        opt32.step()
    moments = [v for v in opt8.state[p8].values() if torch.is_tensor(v) and v.numel() == p8.numel()]
    assert moments and all(v.dtype == torch.uint8 for v in moments)
    step8, step32 = p8.detach() - start, p32.detach() - start
    assert float((step8 - step32).norm() / step32.norm()) < 0.05


def test_refused_naming_the_package_where_it_does_not_load(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import raises ImportError
    with pytest.raises(ValueError, match="--use_8bit_adam needs bitsandbytes"):
        make_adamw([torch.nn.Parameter(torch.zeros(2))], None, torch.device("cpu"), use_8bit=True, lr=1e-3)
    with pytest.raises(ValueError, match="choose one"):
        make_adamw([torch.nn.Parameter(torch.zeros(2))], True, torch.device("cpu"), use_8bit=True, lr=1e-3)


def _subset(out: Path, num: int) -> Path:
    """The first ``num`` images of the embedded fine-tuning set (a folder of one's own: no
    default validation prompts)."""
    import json
    import shutil

    from reslora_diffusers.data import default_finetune_data_dir

    lines = (default_finetune_data_dir() / "metadata.jsonl").read_text().splitlines()[:num]
    out.mkdir(parents=True)
    for line in lines:
        shutil.copy(default_finetune_data_dir() / json.loads(line)["file_name"], out)
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


@pytest.mark.slow
def test_training_script_trains_and_resumes_exactly_with_8bit_adam(tmp_path):
    """Rank 64 on the tiny UNet: its 64-wide factors have 4096 elements, so their moments are
    8-bit; a run resumed from checkpoint-2 ends at the uninterrupted run's weights."""
    import shutil

    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from reslora_diffusers.data import build_pipeline

    spec = importlib.util.spec_from_file_location("train_text_to_image", ROOT / "train_text_to_image.py")
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    build_pipeline(tmp_path / "tok").save_pretrained(tmp_path / "base")
    data = _subset(tmp_path / "data", 6)

    def run(out, *extra):
        AcceleratorState._reset_state(reset_partial_state=True)
        argv = ["--pretrained_model_name_or_path", str(tmp_path / "base"), "--output_dir", str(out)]
        argv += ["--train_data_dir", str(data), "--train_batch_size", "3", "--use_8bit_adam", "--rank", "64"]
        argv += ["--report_to", "none", "--calibration_batches", "1", "--checkpointing_steps", "2"]
        argv += ["--max_train_steps", "3", *extra]
        return script.train(script.parse_args(argv), argv)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(tmp_path / "full")
        (tmp_path / "resumed").mkdir()
        shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
        run(tmp_path / "resumed", "--resume_from_checkpoint", "latest")
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    full, resumed = (load_file(tmp_path / d / "reslora_checkpoint.safetensors") for d in ("full", "resumed"))
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key

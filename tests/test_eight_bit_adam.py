"""``--use_8bit_adam``: bitsandbytes' AdamW8bit in the training script, and a clear refusal
where bitsandbytes does not load."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from reslora_diffusers.training.speed import make_adamw
from tests.runs import assert_same_weights, from_checkpoint, run

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


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread", "fresh_accelerate_state")
def test_training_script_trains_and_resumes_exactly_with_8bit_adam(base, data, tmp_path):
    """Rank 64 on the tiny UNet: its 64-wide factors have 4096 elements, so their moments are
    8-bit; a run resumed from checkpoint-2 ends at the uninterrupted run's weights."""
    extra = ["--use_8bit_adam", "--rank", "64", "--calibration_batches", "1", "--checkpointing_steps", "2"]
    extra += ["--max_train_steps", "3"]
    run(base, data, tmp_path / "full", *extra)
    resumed = from_checkpoint(tmp_path / "full", 2, tmp_path / "resumed")
    run(base, data, resumed, *extra, "--resume_from_checkpoint", "latest")
    assert_same_weights(tmp_path / "full", resumed)
    torch._dynamo.reset()

"""Fixtures the test modules share: one torch thread, a fresh accelerate state per test, and
the tiny base and data of the training script's runs (built once per session: every test
only reads them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reslora_diffusers.data import build_pipeline
from tests.runs import subset


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two OpenMP threads wait on each other, and
    models this small run fastest on one."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state; a run with another --mixed_precision needs a new one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A random tiny StableDiffusionPipeline folder (the embedded base's architecture)."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    build_pipeline(root / "tokenizer-src").save_pretrained(root / "tiny-sd")
    return root / "tiny-sd"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The first 8 images of the embedded fine-tuning set."""
    return subset(tmp_path_factory.mktemp("data") / "set", 8)

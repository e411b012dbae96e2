"""The project's scripts (training script, benchmarks, examples, tools) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Run the file at ``path`` as the module ``name`` (default: the file's stem) and return it.

    The module is registered in ``sys.modules`` under ``name``, where dataclasses and worker
    processes look it up, and the script's folder is on ``sys.path`` while it runs, so that a
    benchmark imports its neighbours by name.
    """
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as the module ``name`` (:func:`load_script`)."""
    return load_script(BENCHMARKS / f"{name}.py")

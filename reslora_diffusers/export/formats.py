"""LoRA file formats: the contract a format fulfils, and their registry.

A format (one file each: :mod:`.diffusers`, :mod:`.kohya`) declares its name, the file it
writes into an output folder, the pipeline families it applies to, how it writes a merged
LoRA and how it reads a file back: which keys are its own, which pipeline components they are
for, and whether they fit a pipeline before diffusers' ``load_lora_weights`` loads them.
:func:`~.pipeline.export_lora`, ``reslora-merge``, the training run's folder and model card,
:func:`~.loading.check_lora_file` and the demo all ask the registry, so a new format is one
file with one :func:`register_format` call (``tests/test_formats.py`` defines one that way).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from ..frontends import PipelineFamily

#: the merge report written beside the LoRA files (and into PEFT adapter folders)
REPORT_FILE = "merge_report.json"

#: ``{component: {"<module path as files spell it>.lora_A.weight": A, "....lora_B.weight": B}}``,
#: the scale baked into ``B``
ComponentLoRAs = dict[str, dict[str, torch.Tensor]]


class LoRAFormat(ABC):
    """One LoRA file format; a subclass sets the class attributes and the methods below."""

    #: the format's name (``export_lora(formats=...)``, ``reslora-merge --format``)
    name: ClassVar[str]
    #: the file it writes into an output folder
    file_name: ClassVar[str]
    #: what the file holds, for model cards (``kohya-ss keys``)
    description: ClassVar[str]
    #: the key suffixes of its weights, for the error about a file that has no LoRA weights
    key_names: ClassVar[str]

    def applies_to(self, family: PipelineFamily) -> bool:
        """Whether pipelines of ``family`` load files of this format (default: every family)."""
        return True

    def refusal(self, family: PipelineFamily) -> str:
        """The error for a file of this format asked of a family it does not apply to."""
        return f"no {self.name} file for {family.name} pipelines"

    @abstractmethod
    def write(
        self,
        path: Path,
        loras: ComponentLoRAs,
        components: dict[str, nn.Module],
        report: dict,
        metadata: dict[str, str] | None = None,
    ) -> None:
        """Write the merged ``loras`` of ``components`` (a pipeline family's) to ``path``;
        ``report`` is the merge report, ``metadata`` extra provenance for formats that keep it."""

    @abstractmethod
    def owns(self, keys: Iterable[str]) -> bool:
        """Whether a file with these keys is in this format."""

    @abstractmethod
    def components(self, keys: Iterable[str]) -> set[str]:
        """The pipeline components a file of this format with these keys is for."""

    @abstractmethod
    def check(self, pipe, filename: str, shapes: dict[str, tuple[int, ...]]) -> None:
        """``ValueError`` naming the first key of the file ``{key: shape}`` that does not fit ``pipe``."""

    def load(self, pipe, path: Path) -> None:
        """Load a checked file into ``pipe`` (default: diffusers' ``load_lora_weights``, which
        reads the diffusers and the kohya-ss keys)."""
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)


_FORMATS: dict[str, LoRAFormat] = {}


def register_format(fmt: LoRAFormat) -> LoRAFormat:
    """Make ``fmt`` available by its name; files are recognised in registration order."""
    known = _FORMATS.get(fmt.name)
    if known is not None and type(known) is not type(fmt):
        raise ValueError(f"LoRA format {fmt.name!r} is registered already (by {type(known).__name__})")
    _FORMATS[fmt.name] = fmt
    return fmt


def unregister_format(name: str) -> None:
    """Remove the format ``name`` (a plugin replacing it, a test done with its own)."""
    _FORMATS.pop(name, None)


def lora_formats() -> tuple[LoRAFormat, ...]:
    """The registered formats, in registration order."""
    return tuple(_FORMATS.values())


def get_format(name: str) -> LoRAFormat:
    """The format ``name`` (``ValueError`` naming the registered ones)."""
    if name not in _FORMATS:
        raise ValueError(f"LoRA format {name!r} is unknown; allowed: {' | '.join(_FORMATS)}")
    return _FORMATS[name]


def format_of(keys: Iterable[str]) -> LoRAFormat | None:
    """The first registered format that owns a file with these keys (None: no format does)."""
    keys = list(keys)
    return next((fmt for fmt in _FORMATS.values() if fmt.owns(keys)), None)

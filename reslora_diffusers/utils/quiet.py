"""Third-party console lines that are harmless where the package triggers them, dropped at their
source: each only on its own logger, only while the call that causes it runs, and only the
message named, so that every other warning of that library still shows."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

#: transformers (5.x) warns once per process when a module imports an image processor under its
#: old name (``CLIPImageProcessor``) while torchvision is not installed, and hands it the PIL
#: implementation, the one the name meant before. diffusers' Stable Diffusion and IP-adapter
#: modules import two such names when a pipeline is first loaded; nothing here runs them.
TORCHVISION_FALLBACK = (
    "transformers.utils.import_utils",
    "requires torchvision (not installed); falling back to",
)
#: diffusers warns for every pipeline component that a LoRA file holds no keys for: the text
#: encoders, for a LoRA of the UNet or transformer alone. ``check_lora_file`` has checked each
#: key the file does hold, so the file is complete without them.
NO_KEYS_FOR_COMPONENT = ("diffusers.loaders.lora_base", "No LoRA keys associated to")


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


@contextlib.contextmanager
def dropped_log_messages(logger_name: str, *fragments: str) -> Iterator[None]:
    """While the block runs, records of logger ``logger_name`` containing any of ``fragments``
    are dropped; every other record of that logger still shows."""
    logger = logging.getLogger(logger_name)
    drop = _DropMessages(fragments)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


#: bitsandbytes (0.50, where installed for ``--use_8bit_adam``) warns once per process, when
#: diffusers' quantizers import it with the pipeline modules, that it could not fetch its 4-bit
#: CPU kernel from a hub: 4-bit layers are never used here, and 8-bit AdamW needs no kernel.
BITSANDBYTES_KERNELS = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


@contextlib.contextmanager
def loading_pipeline() -> Iterator[None]:
    """Around a call that may be the first to import diffusers' pipeline modules (importing a
    pipeline class, ``DiffusionPipeline.from_pretrained``): transformers' torchvision notice
    (:data:`TORCHVISION_FALLBACK`) and bitsandbytes' kernel notice (:data:`BITSANDBYTES_KERNELS`)
    dropped."""
    with dropped_log_messages(*TORCHVISION_FALLBACK), dropped_log_messages(*BITSANDBYTES_KERNELS):
        yield

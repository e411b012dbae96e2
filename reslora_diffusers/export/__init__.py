"""Standard LoRA files out: diffusers/PEFT keys, kohya-ss keys, PEFT adapter folders.

:mod:`.keys` names LoRA keys once; :mod:`.diffusers` writes pipeline LoRA files and the merge
report; :mod:`.kohya` the kohya-ss file (names from the model families); :mod:`.peft` adapter
folders for transformers models; :mod:`.loading` checks a file against a pipeline.

The writers are imported on first use: the merge package reads :mod:`.keys` and the
writers read the merge package, so importing them here would make a cycle.
"""

from importlib import import_module

_WRITERS = {
    "DIFFUSERS_FILE": ".diffusers",
    "REPORT_FILE": ".diffusers",
    "export_lora": ".diffusers",
    "fuse_lora": ".diffusers",
    "KOHYA_FILE": ".kohya",
    "export_peft_adapter": ".peft",
}


def __getattr__(name: str):
    if name in _WRITERS:
        return getattr(import_module(_WRITERS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_WRITERS)

"""Training-loop integrations: the HF ``Trainer`` callback (:mod:`.trainer`, imports
transformers on use)."""


def __getattr__(name: str):
    if name == "ResLoRACallback":
        from .trainer import ResLoRACallback

        return ResLoRACallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ResLoRACallback"]

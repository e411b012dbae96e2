"""diffusers pipelines: which components carry ResLoRA, per pipeline family, and a registry.

A pipeline family (Stable Diffusion in :mod:`.sd_pipeline`, SD3 in :mod:`.sd3`, Flux in
:mod:`.flux`) names its denoiser component (``unet``, ``transformer``), the text encoders that
``train_text_encoder`` adapts (those diffusers' ``load_lora_weights`` loads for it), and the
LoRA file formats written for it. The family of a pipeline, or of a ``{component: model}``
dict as :func:`~reslora_diffusers.export.export_lora` gets it, is the one whose denoiser
component belongs to its model family.
"""

from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from ..core import ResLoRAConfig, has_reslora
from .base import frontend_for, is_instance


class PipelineFamily:
    """One kind of diffusers pipeline; subclasses set the names and, for kohya files, the layout."""

    name = "pipeline"
    #: families are tried from the highest priority down; a set of text encoders alone
    #: belongs to the first family that has them all (Stable Diffusion's, the oldest)
    priority = 0
    #: the denoiser's component name and the :class:`~.base.FrontEnd` name of its model family
    denoiser = "unet"
    denoiser_family = ""
    #: the text encoders ``train_text_encoder`` adapts (those the family's LoRA loader loads)
    text_encoders: tuple[str, ...] = ()
    #: the LoRA files :func:`~reslora_diffusers.export.export_lora` writes by default
    formats: tuple[str, ...] = ("diffusers",)
    #: why there is no kohya-ss file (for the error when one is asked for)
    no_kohya_reason = ""

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)

    def owns(self, components: dict[str, nn.Module]) -> bool:
        """Whether ``{component: model}`` is this family's (by its denoiser's model family)."""
        denoiser = components.get(self.denoiser)
        return denoiser is not None and frontend_for(denoiser).name == self.denoiser_family

    def check_components(self, components: dict[str, nn.Module], formats: tuple[str, ...]) -> None:
        """Refuse components or formats the family's LoRA files cannot carry, naming them."""
        extra = sorted(set(components) - set(self.components))
        if extra:
            raise ValueError(
                f"{self.name} pipelines load LoRA weights for {', '.join(self.components)} only "
                f"(diffusers' load_lora_weights); component {extra[0]!r} cannot go into its LoRA file "
                "(export a transformers text encoder with export_peft_adapter)"
            )
        if "kohya" in formats and "kohya" not in self.formats:
            raise ValueError(f"no kohya-ss file for {self.name} pipelines: {self.no_kohya_reason}")

    # -- kohya-ss files (families whose ``formats`` include ``kohya`` override these) ---------
    def kohya_layout(self, components: dict[str, nn.Module]) -> str:
        """The kohya-ss naming scheme of these components (e.g. ``sd``, ``sdxl``)."""
        raise ValueError(f"no kohya-ss file for {self.name} pipelines: {self.no_kohya_reason}")

    def kohya_prefix(self, component: str, layout: str) -> str:
        """The key prefix of a component (``lora_unet``, ``lora_te1``...)."""
        raise ValueError(f"no kohya-ss file for {self.name} pipelines: {self.no_kohya_reason}")

    def kohya_metadata(self, components: dict[str, nn.Module], layout: str) -> dict[str, str]:
        """The ``ss_*`` metadata that names the base model."""
        return {}


_PIPELINES: list[PipelineFamily] = []


def register_pipeline_family(family: PipelineFamily) -> PipelineFamily:
    _PIPELINES.append(family)
    _PIPELINES.sort(key=lambda f: -f.priority)
    return family


def is_pipeline(obj) -> bool:
    return is_instance(obj, "diffusers", ("DiffusionPipeline",))


def pipeline_family(pipe) -> PipelineFamily:
    """The family of a pipeline (``ValueError`` naming its class when none fits)."""
    comps = {f.denoiser: getattr(pipe, f.denoiser, None) for f in _PIPELINES}
    return _family_of({k: v for k, v in comps.items() if v is not None}, type(pipe).__name__)


def components_family(components: dict[str, nn.Module]) -> PipelineFamily:
    """The family of ``{component: model}`` (by the denoiser; by priority for text encoders alone)."""
    if not any(f.denoiser in components for f in _PIPELINES):
        family = next((f for f in _PIPELINES if set(components) <= set(f.components)), None)
        if family is not None:
            return family
    return _family_of(components, "components " + ", ".join(components))


def _family_of(components: dict[str, nn.Module], what: str) -> PipelineFamily:
    for family in _PIPELINES:
        if family.owns(components):
            return family
    raise ValueError(
        f"ResLoRA knows no pipeline family for {what}; known: {', '.join(f.name for f in _PIPELINES)}"
    )


def pipeline_components(pipe, train_text_encoder: bool = True) -> dict[str, nn.Module]:
    """``{"unet" or "transformer": ..., "text_encoder": ..., ...}`` of a pipeline (those present)."""
    family = pipeline_family(pipe)
    names = family.components if train_text_encoder else (family.denoiser,)
    return {n: getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None}


def reslora_components(pipe) -> dict[str, nn.Module]:
    """The pipeline's components that carry ResLoRA."""
    return {k: v for k, v in pipeline_components(pipe).items() if has_reslora(v)}


def add_reslora_to_pipeline(pipe, config: ResLoRAConfig, train_text_encoder: bool = False):
    """ResLoRA on the pipeline's denoiser and, with ``train_text_encoder``, on its text encoder(s).

    ``config.target_modules`` applies to the denoiser; text encoders use their family's preset.
    """
    denoiser = pipeline_family(pipe).denoiser
    for name, module in pipeline_components(pipe, train_text_encoder).items():
        component_config = (
            config if name == denoiser else replace(config, target_modules=None, exclude_modules=None)
        )
        frontend_for(module).attach(module, component_config)
    return pipe


def remove_reslora_from_pipeline(pipe):
    for module in reslora_components(pipe).values():
        frontend_for(module).detach(module)
    return pipe

"""diffusers pipelines: the pipeline-family contract, its registry, and ResLoRA on pipelines.

A pipeline family (one file each: :mod:`.sd`, :mod:`.sdxl`, :mod:`.sd3`, :mod:`.flux`), like the
``*LoraLoaderMixin`` classes of diffusers with their ``_lora_loadable_modules``, declares what
the library and the training script need of its pipelines: its denoiser component (``unet``,
``transformer``) and that component's model family, the text encoders ``train_text_encoder``
adapts (those diffusers' ``load_lora_weights`` loads for it), every text encoder its prompts
go through, its training objective (:mod:`reslora_diffusers.objectives`), the keyword its
pipelines take the LoRA scale in, and the LoRA file formats written for it by default. The
family of a pipeline, or of a ``{component: model}`` dict as
:func:`~reslora_diffusers.export.export_lora` gets it, is the one whose denoiser component
belongs to its model family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import torch.nn as nn

from ..core import ResLoRAConfig, has_reslora
from ..eval import register_call_rewriter
from .base import frontend_for, is_instance


class PipelineFamily:
    """One kind of diffusers pipeline; a subclass sets the class attributes (module doc)."""

    #: the family's name in messages and file metadata (``stable_diffusion_xl``)
    name = "pipeline"
    #: how people name it (``SDXL``)
    title = ""
    #: families are tried from the highest priority down; a set of text encoders alone
    #: belongs to the first family that has them all (Stable Diffusion's, the oldest)
    priority = 0
    #: the diffusers class its pipelines load as (``StableDiffusionXLPipeline``), by name: the
    #: package imports no diffusers until it is used
    pipeline_class = "DiffusionPipeline"
    #: the denoiser's component name (``unet``) and the :class:`~.base.FrontEnd` name of its
    #: model family
    denoiser = ""
    denoiser_family = ""
    #: the text encoders ``train_text_encoder`` adapts (those the family's LoRA loader loads)
    text_encoders: tuple[str, ...] = ()
    #: every text encoder its prompts go through, in the order their states are joined (SD3's
    #: T5 encoder is one, though its LoRA loader loads no T5 weights)
    prompt_encoders: tuple[str, ...] = ()
    #: the latents its denoiser reads are ``(z - shift_factor) * scaling_factor`` (SD3, Flux),
    #: not ``z * scaling_factor`` (their VAEs have a ``shift_factor``)
    shifts_latents = False
    #: the keyword argument of the pipeline call that takes the LoRA scale as ``{"scale": s}``
    lora_scale_kwarg = ""
    #: the LoRA files :func:`~reslora_diffusers.export.export_lora` writes by default (names of
    #: :mod:`reslora_diffusers.export` formats)
    formats: tuple[str, ...] = ("diffusers",)
    #: how ``train_text_to_image.py`` trains its pipelines (an
    #: :class:`~reslora_diffusers.objectives.Objective` subclass); None: it does not
    objective: type | None = None

    @property
    def components(self) -> tuple[str, ...]:
        return (self.denoiser, *self.text_encoders)

    def owns(self, components: dict[str, nn.Module]) -> bool:
        """Whether ``{component: model}`` is this family's (by its denoiser's model family)."""
        denoiser = components.get(self.denoiser)
        return denoiser is not None and frontend_for(denoiser).name == self.denoiser_family

    def lora_scale_kwargs(self, scale: float) -> dict:
        """The pipeline call's keyword arguments that scale every loaded LoRA by ``scale``."""
        return {self.lora_scale_kwarg: {"scale": scale}}

    def generation_kwargs(self) -> dict:
        """Keyword arguments of the pipeline call beyond a text-to-image one's, for the demo and
        validation (a video family's frame count); none by default."""
        return {}

    @contextlib.contextmanager
    def cheaper_call(self, pipe, call_kwargs: dict) -> Iterator[dict]:
        """A context for one pipeline call: the keyword arguments that draw the images
        ``call_kwargs`` draws at less cost (with whatever the pipeline needs set for the call and
        restored after it). By default ``call_kwargs`` themselves."""
        yield call_kwargs

    def check_components(self, components: dict[str, nn.Module]) -> None:
        """Refuse components the family's LoRA files cannot carry, naming the first."""
        extra = sorted(set(components) - set(self.components))
        if extra:
            raise ValueError(
                f"{self.name} pipelines load LoRA weights for {', '.join(self.components)} only "
                f"(diffusers' load_lora_weights); component {extra[0]!r} cannot go into its LoRA file "
                "(export a transformers text encoder with export_peft_adapter)"
            )


_PIPELINES: list[PipelineFamily] = []


def register_pipeline_family(family: PipelineFamily) -> PipelineFamily:
    """Add a family; pipelines and components are matched against families by ``priority``,
    highest first."""
    _PIPELINES.append(family)
    _PIPELINES.sort(key=lambda f: -f.priority)
    return family


def pipeline_families() -> tuple[PipelineFamily, ...]:
    """The registered pipeline families, highest priority first."""
    return tuple(_PIPELINES)


def is_pipeline(obj) -> bool:
    return is_instance(obj, "diffusers", ("DiffusionPipeline",))


def pipeline_family(pipe) -> PipelineFamily:
    """The family of a pipeline (``ValueError`` naming its class when none fits)."""
    comps = {f.denoiser: getattr(pipe, f.denoiser, None) for f in _PIPELINES}
    return _family_of({k: v for k, v in comps.items() if v is not None}, type(pipe).__name__)


@contextlib.contextmanager
def cheaper_call(pipe, call_kwargs: dict) -> Iterator[dict]:
    """The pipeline family's :meth:`PipelineFamily.cheaper_call` for ``pipe``; ``call_kwargs``
    as they are for an object no family knows (any callable that draws images)."""
    family = None
    if is_pipeline(pipe):
        with contextlib.suppress(ValueError):
            family = pipeline_family(pipe)
    if family is None:
        yield call_kwargs
        return
    with family.cheaper_call(pipe, call_kwargs) as kwargs:
        yield kwargs


register_call_rewriter(cheaper_call)


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

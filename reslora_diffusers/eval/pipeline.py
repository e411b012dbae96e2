"""Generate images with a text-to-image pipeline and score them with the prompt metric."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data.tiny_base import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS
from .analysis import ATTRIBUTES, analyse_image, attribute_matches, parse_prompt

#: context managers ``rewrite(pipe, call_kwargs)`` yielding the keyword arguments of a cheaper call
#: that draws the same images; the pipeline families register theirs
#: (:func:`reslora_diffusers.frontends.cheaper_call`) from the floor above this one
_CALL_REWRITERS: list[Callable[[object, dict], contextlib.AbstractContextManager[dict]]] = []


def register_call_rewriter(
    rewrite: Callable[[object, dict], contextlib.AbstractContextManager[dict]],
) -> None:
    """Have :func:`generate` draw through ``rewrite(pipe, call_kwargs)`` (once per function)."""
    if rewrite not in _CALL_REWRITERS:
        _CALL_REWRITERS.append(rewrite)


@contextlib.contextmanager
def _rewritten(pipe, call_kwargs: dict) -> Iterator[dict]:
    with contextlib.ExitStack() as stack:
        for rewrite in _CALL_REWRITERS:
            call_kwargs = stack.enter_context(rewrite(pipe, call_kwargs))
        yield call_kwargs


@contextlib.contextmanager
def _quiet_progress(pipe) -> Iterator[None]:
    """Silence the pipeline's per-call progress bar, restoring its setting afterwards."""
    saved = getattr(pipe, "_progress_bar_config", None)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**(saved or {}))


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = BASE_NUM_INFERENCE_STEPS,
    guidance_scale: float = BASE_GUIDANCE_SCALE,
    height: int | None = None,
    width: int | None = None,
    progress: tqdm | None = None,
    **pipe_kwargs,
) -> list:
    """One image per (prompt, seed) pair; each image's noise comes from its own CPU generator.

    An image thus depends on its prompt and seed only, not on the batch it is made in.
    ``progress``, if given, advances by one per denoising step (the pipeline's own bar stays off);
    ``pipe_kwargs`` go to the pipeline call (``negative_prompt``, ``cross_attention_kwargs``,
    ``num_frames``...). ``height``/``width`` left None are the pipeline's defaults. The call is
    its family's cheaper equivalent where it has one (an SD3 pipeline without T5 folds the
    prompt's T5 padding: :func:`~reslora_diffusers.frontends.cheaper_call`, registered with
    :func:`register_call_rewriter`). A video
    pipeline's video is its first, middle and last frame side by side (:func:`key_frames`).
    """
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    callback = {}
    if progress is not None:

        def step_done(pipe, step: int, timestep, tensors: dict) -> dict:
            progress.update(1)
            return tensors

        callback["callback_on_step_end"] = step_done
    call = {
        "prompt": list(prompts),
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "generator": generators,
        **{k: v for k, v in (("height", height), ("width", width)) if v is not None},
        **callback,
        **pipe_kwargs,
    }
    with _quiet_progress(pipe), _rewritten(pipe, call) as call:
        output = pipe(**call)
    if getattr(output, "frames", None) is not None:  # video pipelines (WanPipelineOutput)
        return [key_frames(video) for video in output.frames]
    return output.images


def key_frames(video) -> Image.Image:
    """A video's first, middle (``(F - 1) // 2``) and last frame side by side, left to right;
    ``video`` as video pipelines return it: ``(F, H, W, 3)`` floats in [0, 1] or PIL frames."""
    frames = [
        f
        if isinstance(f, Image.Image)
        else Image.fromarray(np.clip(np.rint(np.asarray(f) * 255), 0, 255).astype(np.uint8))
        for f in video
    ]
    picked = [frames[0], frames[(len(frames) - 1) // 2], frames[-1]]
    strip = Image.new("RGB", (sum(f.width for f in picked), picked[0].height))
    left = 0
    for frame in picked:
        strip.paste(frame.convert("RGB"), (left, 0))
        left += frame.width
    return strip


def evaluate_pipeline(
    pipe, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 64, **generate_kwargs
) -> dict:
    """Generate every prompt with every seed (:func:`generate`, which ``generate_kwargs`` such as
    ``num_inference_steps``, ``guidance_scale``, ``height`` go to) and score the images.

    Returns ``accuracy`` (all named attributes right, the shape by the open-set call),
    ``accuracy_lenient`` (the shape by the nearest template), ``<attribute>_accuracy`` for
    colour, shape and background, ``shape_accuracy_lenient``, and per image (seed-major
    order) ``images``, ``prompts``, ``seeds``, ``analyses`` and ``correct`` /
    ``correct_lenient`` (all named attributes right, in each reading).
    """
    jobs = [(seed, prompt) for seed in seeds for prompt in prompts]
    images = []
    for start in tqdm(range(0, len(jobs), batch_size), desc="evaluate", leave=False):
        batch_seeds, batch_prompts = zip(*jobs[start : start + batch_size], strict=True)
        images += generate(pipe, batch_prompts, batch_seeds, **generate_kwargs)
    analyses = [analyse_image(image) for image in images]
    parsed = [parse_prompt(p) for _, p in jobs]
    result = {}
    for suffix, open_set in (("", True), ("_lenient", False)):
        matches = [attribute_matches(a, p, open_set) for a, p in zip(analyses, parsed, strict=True)]
        result[f"correct{suffix}"] = [all(m.values()) for m in matches]
        result[f"accuracy{suffix}"] = float(np.mean(result[f"correct{suffix}"]))
        for key in ATTRIBUTES if open_set else ("shape",):
            named = [m[key] for m in matches if key in m]
            result[f"{key}_accuracy{suffix}"] = float(np.mean(named)) if named else float("nan")
    result.update(images=images, prompts=[p for _, p in jobs], seeds=[s for s, _ in jobs], analyses=analyses)
    return result

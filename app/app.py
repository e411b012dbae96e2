"""Gradio demo: each base model beside its LoRA and ResLoRA, with training curves and merge reports.

    python app/app.py [--base DIR ...] [--lora PATH ...] [--runs_dir DIR] [--host 127.0.0.1] [--port 7860]

LoRA outputs are training/export folders (holding ``pytorch_lora_weights.safetensors``) or
``.safetensors`` files; they are loaded with diffusers' ``load_lora_weights``, the way any
user of the exported files loads them, on the first base whose pipeline has the modules their
keys name. Without ``--base`` the demo shows the embedded UNet and DiT bases (each whose folder
exists); without ``--lora`` it uses the runs in ``--runs_dir`` (``runs/``) and offers a
button that trains the missing ones on the embedded data. Bound to an address other machines
reach, it reads LoRA outputs only from ``--runs_dir`` and those named at start, and bases only
from those listed at start (:class:`AllowedPaths`).
"""

# ruff: noqa: E402 (the command line is parsed before the heavy imports, so --help is instant)
from __future__ import annotations

import argparse
import base64
import functools
import html
import inspect
import io
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

#: Addresses that only this machine reaches; the Train button is offered on these only, and
#: on any other the paths a client may name are restricted (:class:`AllowedPaths`).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base",
        nargs="*",
        default=None,
        help="diffusers pipeline folders or hub names (default: the embedded UNet base, and the "
        "embedded DiT base)",
    )
    parser.add_argument("--lora", nargs="*", default=None, help="LoRA folders or files (default: runs/*)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default: loopback only); on any other address the Train button, which "
        "starts training processes on this machine, is left out of the page and the API, and "
        "clients may name only the runs in --runs_dir and the bases and LoRA outputs named at start",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    parser.add_argument(
        "--runs_dir",
        default=None,
        help="folder of training runs, listed when --lora is not given (default: runs/ of the checkout)",
    )
    return parser.parse_args(argv)


def port_taken(host: str, port: int) -> str | None:
    """Why the demo cannot serve on ``host:port`` (another server holds it), or None.

    Tried with a socket of our own, before the heavy imports, so that a port in use is one line
    instead of a traceback from the web server after a long start.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        return f"--host {host}: not an address of this machine ({err.strerror})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the web server binds
        try:
            probe.bind(address)
        except OSError as err:
            return f"--port {port}: {host}:{port} is in use ({err.strerror}); stop the other server or choose another --port"
    return None


if __name__ == "__main__":
    ARGS = parse_args()
    if (TAKEN := port_taken(ARGS.host, ARGS.port)) is not None:
        sys.exit(f"app.py: error: {TAKEN}")

try:
    import gradio as gr
    import matplotlib
except ImportError as err:  # the demo's packages are the [app] extra; the library needs neither
    _MISSING = (
        f"the demo needs {err.name}: pip install 'reslora-diffusers[app]' (scripts/setup.sh installs it)"
    )
    if __name__ == "__main__":
        sys.exit(f"app.py: error: {_MISSING}")
    raise ImportError(_MISSING) from err

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from reslora_diffusers.data import (
    added_colors_of,
    default_base_model_path,
    default_dit_base_path,
    unseen_words,
    vocabulary_text,
)
from reslora_diffusers.data.tiny_base import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS
from reslora_diffusers.eval import analyse_image, generate, parse_prompt
from reslora_diffusers.eval.analysis import attribute_matches
from reslora_diffusers.export.loading import (
    check_lora_file,
    load_lora_file,
    lora_file_components,
    resolve_lora_file,
)
from reslora_diffusers.frontends import DIT_ATTENTION_TARGETS, DIT_IMAGE_FEEDFORWARD_TARGETS, pipeline_family
from reslora_diffusers.training.grid import label_font
from reslora_diffusers.training.run_folder import RunFolder
from reslora_diffusers.utils.errors import one_line
from reslora_diffusers.utils.quiet import loading_pipeline

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO / "runs"
#: the embedded bases the training button trains on, by key
DEFAULT_BASES: dict[str, Path] = {"unet": default_base_model_path(), "dit": default_dit_base_path()}
#: the runs the Train buttons make: label -> (output folder, res_type, key in ``DEFAULT_BASES``)
DEFAULT_RUNS = {
    "LoRA": ("lora", "none", "unet"),
    "ResLoRA": ("reslora", "ms", "unet"),
    "DiT LoRA": ("dit-lora", "none", "dit"),
    "DiT ResLoRA": ("dit-reslora", "ms", "dit"),
}
#: the runs of the README's quick start (its two training commands); the other default runs are
#: optional extras, offered under their own heading and never called missing
QUICK_START_RUNS = ("LoRA", "ResLoRA")
#: training steps of the runs the buttons train, by base: the UNet base learns the cross in the
#: training script's default 800 steps, the DiT base in 2000 (README, fine-tuning the DiT base)
TRAIN_STEPS: dict[str, int] = {"unet": 800, "dit": 2000}
#: minutes one such run takes on an idle 2-core CPU, by base, for the buttons' labels: the UNet
#: run took 5 min 20 s (2026-12-01, README quick start), the DiT ResLoRA run 7 min 51 s on the DiT
#: base shipped since 2026-12-07 (README Demo app)
TRAIN_MINUTES: dict[str, int] = {"unet": 5, "dit": 8}
#: flags of those runs by base: the DiT base needs its image-stream feed-forward layers as targets
BASE_TRAIN_ARGS: dict[str, list[str]] = {
    "unet": [],
    "dit": ["--target_modules", *DIT_ATTENTION_TARGETS, *DIT_IMAGE_FEEDFORWARD_TARGETS],
}
#: further flags for those runs (a base or data other than the embedded ones, say)
TRAIN_EXTRA_ARGS: list[str] = []
DEFAULT_PROMPT = "a blue cross on a white background"
#: images are shown enlarged to about this many pixels
DISPLAY_SIDE = 192
#: at most this many images side by side
GALLERY_COLUMNS = 6
#: side in px of each image in the Generate tab's comparison grid
GRID_SIDE = 128
#: images per model the page starts with
IMAGES_PER_MODEL = 2
#: what a video's cell shows (the image metric reads still images, not frame strips)
VIDEO_CAPTION = "first, middle and last frame"


class PipelineCache:
    """Pipelines by (base, LoRA file), least recently used dropped beyond ``size``, and whether a
    base takes a LoRA file, by (base, LoRA file), least recently used dropped beyond ``decisions``."""

    def __init__(self, size: int = 4, decisions: int = 256) -> None:
        self.size = size
        self.decisions = decisions
        self._pipes: OrderedDict[tuple[str, str | None], DiffusionPipeline] = OrderedDict()
        self._rejections: OrderedDict[tuple[str, str], str | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, base: str, lora: str | None) -> DiffusionPipeline:
        key = (base, lora)
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
        with loading_pipeline():
            pipe = DiffusionPipeline.from_pretrained(base)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            load_lora_file(pipe, lora)  # checked against the pipeline, NaN refused, loaded quietly
        with self._lock:
            self._pipes[key] = pipe
            while len(self._pipes) > self.size:
                self._pipes.popitem(last=False)
        return pipe

    def rejection(self, base: str, lora: str) -> str | None:
        """Why the pipeline ``base`` cannot take the LoRA file ``lora`` (``check_lora_file``'s
        message: a component or module its keys name that the pipeline lacks, say), None when it
        can. Decided once per pair: every render asks it of every LoRA and base, and a base
        pipeline dropped from the cache would otherwise be loaded again just to answer."""
        key = (base, lora)
        with self._lock:
            if key in self._rejections:
                self._rejections.move_to_end(key)
                return self._rejections[key]
        try:
            check_lora_file(self.get(base, None), lora)
            reason = None
        except ValueError as err:
            reason = one_line(err)
        with self._lock:
            self._rejections[key] = reason
            while len(self._rejections) > self.decisions:
                self._rejections.popitem(last=False)
        return reason


#: room for the two embedded bases with their LoRA and ResLoRA, and two more LoRA outputs: a
#: smaller cache would reload pipelines on every render of the default page
CACHE = PipelineCache(size=8)


def run_label(path: str | Path) -> str:
    """``LoRA (lora)`` / ``ResLoRA ms m=1 (reslora)`` for a run folder or its exported LoRA file,
    from the run's merge report (:meth:`RunFolder.label`); any other file or folder by its own name."""
    path = Path(path)
    run = RunFolder.of(path)
    exported = {p.name for p in run.lora_files().values()}  # a run's merge report describes these
    if run.merge_report() is not None and (path.is_dir() or path.name in exported):
        return run.label()
    return path.name


def found_runs(runs_dir: Path | None = None) -> list[str]:
    """Run folders under ``runs_dir`` (default ``RUNS_DIR``) that hold an exported LoRA: the
    default runs in ``DEFAULT_RUNS`` order (each base's LoRA before its ResLoRA), then the others
    by name."""
    runs_dir = RUNS_DIR if runs_dir is None else runs_dir
    order = [name for name, *_ in DEFAULT_RUNS.values()]
    runs = [
        p
        for p in sorted(runs_dir.glob("*"))
        if not p.name.startswith(".")  # hidden or an interrupted export's temporary folder
        and RunFolder(p).has_lora()
    ]
    runs.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    return [str(p) for p in runs]


def missing_runs(runs_dir: Path | None = None, labels: tuple[str, ...] | None = None) -> list[str]:
    """Labels of the default runs ``labels`` (default: all of ``DEFAULT_RUNS``) that have no
    exported LoRA in ``runs_dir`` (default ``RUNS_DIR``) yet and whose base folder exists (a base
    folder that is missing has no runs to train)."""
    runs_dir = RUNS_DIR if runs_dir is None else runs_dir
    return [
        label
        for label, (folder, _, base) in DEFAULT_RUNS.items()
        if (labels is None or label in labels)
        and Path(DEFAULT_BASES[base]).is_dir()
        and not RunFolder(runs_dir / folder).has_lora()
    ]


def extra_runs() -> tuple[str, ...]:
    """The default runs that are not the quick start's: optional extras."""
    return tuple(label for label in DEFAULT_RUNS if label not in QUICK_START_RUNS)


def updated_run_list(
    box: str, known: list[str] | None, runs_dir: Path | None = None
) -> tuple[str, list[str]]:
    """The LoRA box after a rescan of ``runs_dir``, and the runs found there (the next ``known``):
    runs that appeared since the last scan (``known``) are added, runs of that scan whose folders
    are gone are dropped, and every line the user typed stays. ``known`` None: the box lists
    what the command line named, and no folder is scanned."""
    if known is None:
        return box, None
    found = found_runs(runs_dir)
    kept = [line for line in _lines(box) if line in found or line not in known]
    return "\n".join(kept + [run for run in found if run not in kept and run not in known]), found


def default_bases() -> list[str]:
    """The embedded UNet base, and the embedded DiT base when its folder exists (it is pretrained
    apart and shipped later)."""
    return [str(path) for key, path in DEFAULT_BASES.items() if key == "unet" or Path(path).is_dir()]


def parse_bases(base: str | list[str] | None) -> list[str]:
    """The base models named one per line (the textbox) or as a list (the command line), each once,
    in order; the default bases when none is named."""
    named = base.splitlines() if isinstance(base, str) else base or []
    return list(dict.fromkeys(b.strip() for b in named if b.strip())) or default_bases()


def base_name(base: str) -> str:
    """A base's label: its folder's name (``tiny-sd``), or the hub name's last part."""
    return Path(base).name or base


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=16)
def _added_colors(base: str) -> tuple[str, ...] | None:
    """The pretraining-only colours of the pipeline folder ``base`` when it reads prompts with the
    embedded bases' vocabulary (then its notes on unseen words apply), else None."""
    from transformers import AutoTokenizer

    if not (Path(base) / "tokenizer").is_dir():
        return None
    try:
        vocab = AutoTokenizer.from_pretrained(base, subfolder="tokenizer").get_vocab()
    except (OSError, ValueError):
        return None
    return added_colors_of(vocab)


def prompt_note(prompt: str, base: str) -> str:
    """Markdown beside the images: the words of ``prompt`` the embedded base has never seen, when
    the first base reads prompts with its vocabulary."""
    added = _added_colors(parse_bases(base)[0])
    if added is None:
        return ""
    unseen = unseen_words(prompt, added)
    if not unseen:
        return "Every word of the prompt is one the base model was trained on."
    listed = "; ".join(f"**{word}**: {why}" for word, why in unseen)
    return f"Words of the prompt the base model never saw in this role: {listed}."


def score_caption(image, prompt: str) -> str:
    """What the analyser read, against what the prompt asked."""
    analysis = analyse_image(image)
    matches = attribute_matches(analysis, parse_prompt(prompt))
    if not matches:
        return "no colour/shape in the prompt to score"
    marks = ", ".join(f"{k} {'ok' if v else 'wrong'}" for k, v in matches.items())
    return f"{marks} (read: {analysis['color']} {analysis['shape']} on {analysis['background']})"


def crisp(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """``image`` enlarged by a whole factor to about ``side`` px, nearest-neighbour: the pixels of
    a 32 px sample stay sharp squares instead of a browser's blurry upscale."""
    factor = max(1, side // max(image.size))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def lora_scale_kwargs(pipe, scale: float) -> dict:
    """The LoRA scale as the pipeline's family takes it (``cross_attention_kwargs`` for UNet
    pipelines, ``joint_attention_kwargs`` for SD3 and Flux: ``PipelineFamily.lora_scale_kwarg``)."""
    return pipeline_family(pipe).lora_scale_kwargs(scale)


def lora_base(bases: list[str], lora: str) -> tuple[str, str]:
    """The first of ``bases`` whose pipeline takes the LoRA ``lora`` (a folder or file), with the
    LoRA's file: a DiT LoRA (``transformer.`` keys) goes to a DiT base, a UNet one (``unet.``
    keys) to a UNet base. Raises ``FileNotFoundError`` or ``ValueError`` saying why none does."""
    path = str(resolve_lora_file(lora))
    reasons = {}
    for base in bases:
        reason = CACHE.rejection(base, path)
        if reason is None:
            return base, path
        reasons[base_name(base)] = reason
    if not reasons:
        raise ValueError("no base model loaded")
    if len(set(reasons.values())) == 1:  # the file itself is at fault (no LoRA keys, say)
        raise ValueError(next(iter(reasons.values())))
    raise ValueError("no base model takes it: " + "; ".join(f"{b}: {r}" for b, r in reasons.items()))


def render(
    prompt: str,
    negative_prompt: str,
    seed: float,
    steps: float,
    guidance: float,
    lora_scale: float,
    num_images: float,
    base: str,
    loras: str,
):
    """Images of every base model, each followed by the LoRAs made for it, all with the same
    seeds, labelled and scored; a model that fails is reported and the others still render."""
    problems = []
    pipes = {}
    for name in parse_bases(base):
        try:
            pipes[name] = CACHE.get(name, None)
        except Exception as err:  # a base that does not load fails alone: the others still render
            logger.warning("base %s failed to load: %s", name, err)
            problems.append(f"**base {base_name(name)}** (not loadable, not shown): {one_line(err)}")
    owned: dict[str, list[tuple[str, str]]] = {name: [] for name in pipes}
    for lora in _lines(loras):
        label = run_label(lora)
        try:
            owner, path = lora_base(list(pipes), lora)
        except Exception as err:  # not a LoRA, or one for none of these bases: it fails alone
            logger.warning("%s fits no base: %s", label, err)
            problems.append(f"**{label}** (not a usable LoRA, not shown): {one_line(err)}")
            continue
        owned[owner].append((label, path))
    n = int(num_images)
    seeds = [int(seed) + i for i in range(n)]
    gallery, shown = [], 0
    rows: list[tuple[str, list[tuple[str, list[tuple[Image.Image, str]]]]]] = []
    for name, models in owned.items():
        where = base_name(name)
        rows.append((where, []))
        for label, lora in [(f"base {where}", None), *models]:
            try:
                pipe = CACHE.get(name, lora)
            except Exception as err:  # not loadable by diffusers either: this model fails alone
                logger.warning("%s failed to load on %s: %s", label, where, err)
                problems.append(f"**{label}** (not a usable LoRA for {where}, not shown): {one_line(err)}")
                continue
            model = f"{label} on {where}" if lora else label
            # a video family's frame count: each video shows as its first, middle and last frame
            video = pipeline_family(pipe).generation_kwargs()
            try:
                images = generate(
                    pipe,
                    [prompt] * n,
                    seeds,
                    num_inference_steps=int(steps),
                    guidance_scale=float(guidance),
                    **({"negative_prompt": [negative_prompt] * n} if negative_prompt else {}),
                    **video,
                    **(lora_scale_kwargs(pipe, float(lora_scale)) if lora else {}),
                )
            except Exception as err:  # each model fails alone: the others' images are still shown
                logger.warning("%s failed: %s", model, err)
                problems.append(f"**{model}**: {one_line(err)}")
                continue
            cells = [
                (image, f"seed {image_seed} | {VIDEO_CAPTION if video else score_caption(image, prompt)}")
                for image, image_seed in zip(images, seeds)
            ]
            gallery += [(crisp(image), f"{model} | {caption}") for image, caption in cells]
            rows[-1][1].append((label if lora else "base", cells))
            shown += 1
    status = f"Rendered {shown} models with the same seeds."
    if problems:
        status += "\n\n" + "\n\n".join(problems)
    return gallery, status, rows


def comparison_grid(rows) -> str:
    """The Generate tab's comparison: one row per base, its models side by side (the base, then
    its LoRAs), each model's seeds as columns, every image over what the analyser read. The
    images are inline PNGs (no lazy loading: a full-page screenshot has them all), shown at
    ``GRID_SIDE`` px with square pixels."""
    if not rows:
        return ""
    parts = ['<div class="compare">']
    for where, models in rows:
        parts.append(f'<div class="base-row"><div class="base-name">{html.escape(where)}</div>')
        for label, cells in models:
            parts.append(
                f'<div class="model"><div class="model-name">{html.escape(label)}</div><div class="seeds">'
            )
            for image, caption in cells:
                seed_text, _, reading = caption.partition(" | ")
                width = round(GRID_SIDE * image.width / image.height)  # a video's frames side by side
                parts.append(
                    f'<figure><img src="{_data_url(image)}" width="{width}" height="{GRID_SIDE}" '
                    f'alt="{html.escape(label)}, {html.escape(seed_text)}">'
                    f"<figcaption><b>{html.escape(seed_text)}</b> {html.escape(reading)}</figcaption></figure>"
                )
            parts.append("</div></div>")
        parts.append("</div>")
    parts.append("</div>")
    return "".join(parts)


def _data_url(image: Image.Image) -> str:
    """``image`` as an inline PNG, shrunk to at most ``2 * GRID_SIDE`` px (a 512 px sample would
    make the page megabytes long for a 128 px cell); small samples stay as they are."""
    if max(image.size) > 2 * GRID_SIDE:
        image = image.copy()
        image.thumbnail((2 * GRID_SIDE, 2 * GRID_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def gallery_columns(num_images: float, base: str, loras: str) -> dict:
    """All the models' images (every base and every LoRA) in one row when they fit, else one row
    per model."""
    models = len(parse_bases(base)) + len(_lines(loras))
    per_model = int(num_images)
    return gr.update(columns=models * per_model if models * per_model <= GALLERY_COLUMNS else per_model)


def smoothed_loss(steps: list[int], values: list[float], points: int = 20) -> tuple[list[int], list[float]]:
    """Trailing mean over ``len(values) // points`` steps, from the first full window on: the
    first steps alone are too few and too noisy to average, and drew a spike that flattened
    the rest of the curve."""
    window = max(1, len(values) // points)
    means = [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]
    return list(steps[window - 1 :]), means


def lora_family(path: str) -> str:
    """What a LoRA output adapts, which sets the scale of its training loss: ``UNet`` (a file of
    ``unet`` weights in any format: a DDPM noise-prediction loss, about 0.1 here) or
    ``DiT transformer`` (``transformer`` weights: a flow-matching loss, about 1); ``other`` for
    anything else, an unreadable file included."""
    try:
        components = lora_file_components(path)
    except Exception:  # the Generate tab names what is wrong with the file; the chart just skips it
        return "other"
    if "transformer" in components:
        return "DiT transformer"
    return "UNet" if "unet" in components else "other"


def curves(loras: str):
    """Loss and prompt accuracy against steps for every run: one row of two charts per family
    (:func:`lora_family`), so that a DiT run's flow-matching loss (about 1) does not flatten the
    UNet runs' curves (about 0.1)."""
    families: dict[str, list[Path]] = {}
    for path in _lines(loras):
        families.setdefault(lora_family(path), []).append(RunFolder.of(path))
    fig, axes = plt.subplots(
        max(1, len(families)), 2, figsize=(10, 3.5 * max(1, len(families))), squeeze=False
    )
    for (family, runs), (ax_loss, ax_acc) in zip(families.items(), axes):
        for run in runs:
            label = run.label()
            losses = [(r["step"], r["loss"]) for r in run.read_log() if "loss" in r]
            if losses:
                ax_loss.plot(*smoothed_loss(*map(list, zip(*losses))), label=label)
            accs = run.accuracies()
            if accs:
                ax_acc.plot(*zip(*accs), marker="o", label=label)
        ax_loss.set(title=f"{family} runs: training loss (smoothed)", xlabel="step")
        ax_acc.set(title=f"{family} runs: prompt accuracy", xlabel="step", ylim=(0, 1))
    for ax in axes.flat:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_table(loras: str) -> list[list]:
    """One row per run and evaluation: the numbers behind the accuracy chart."""
    rows = []
    for path in _lines(loras):
        run = RunFolder.of(path)
        for step, acc in run.accuracies():
            rows.append([run.label(), step, f"{acc:.1%}"])
    return rows


def merge_table(loras: str) -> list[list]:
    """One row per run, component and merge method: the relative output error of the merge."""
    rows = []
    for path in _lines(loras):
        run = RunFolder.of(path)
        report = run.merge_report()
        if report is None:
            continue
        for comp, info in report.get("components", {}).items():
            if run.trained_plain_lora():  # every merge method gives the trained LoRA itself
                rows.append([run.label(), comp, "none (plain LoRA)", f"{info['output_error']:.2e}", "yes"])
                continue
            for method, result in info.get("methods", {}).items():
                exported = "yes" if method == report.get("merge") else ""
                rows.append([run.label(), comp, method, f"{result['total']:.2e}", exported])
    return rows


def comparison_table(loras: str) -> list[list]:
    """One row per run: steps, prompt accuracy before and after training, error of the exported merge."""
    rows = []
    for path in _lines(loras):
        run = RunFolder.of(path)
        points = dict(run.accuracies())
        final = run.final_record()
        steps = run.steps_trained()
        after = final.get("prompt_accuracy") if final else None
        report = run.merge_report()
        error = "n/a"
        if report is not None:
            error = ", ".join(f"{k} {v['output_error']:.1e}" for k, v in report.get("components", {}).items())
        rows.append(
            [
                run.label(),
                "n/a" if steps is None else steps,
                "n/a" if 0 not in points else f"{points[0]:.1%}",
                "n/a" if after is None else f"{after:.1%}",
                error,
            ]
        )
    return rows


def final_grids(loras: str) -> Image.Image | None:
    """The runs' final validation grids (the same prompts and seeds for every run) stacked into
    one image, each under its run's label; None when no run has one."""
    parts = []
    for path in _lines(loras):
        run = RunFolder.of(path)
        if run.grid("final").is_file():
            parts.append((run.label(), Image.open(run.grid("final")).convert("RGB")))
    if not parts:
        return None
    font = label_font()
    strip = 24
    stacked = Image.new(
        "RGB", (max(g.width for _, g in parts), sum(g.height + strip for _, g in parts)), "white"
    )
    draw, y = ImageDraw.Draw(stacked), 0
    for label, grid in parts:
        draw.text((4, y + 6), label, fill="black", font=font)
        stacked.paste(grid, (0, y + strip))
        y += grid.height + strip
    return stacked


def reports(loras: str):
    """Everything the training tab and the comparison table show, for the runs listed."""
    return (
        curves(loras),
        accuracy_table(loras),
        merge_table(loras),
        comparison_table(loras),
        final_grids(loras),
    )


def train_runs(labels: tuple[str, ...], box: str, known: list[str] | None, progress) -> tuple:
    """Train those of the default runs ``labels`` that are missing, on the embedded data, each on
    its embedded base, reporting ``progress`` from their logs; a run that exists is never
    retrained or overwritten. Returns the LoRA box and ``known`` rescanned
    (:func:`updated_run_list`), the training offer (:func:`training_offer`) and a message."""
    RUNS_DIR.mkdir(exist_ok=True)
    todo = missing_runs(RUNS_DIR, labels)
    message = f"Trained {', '.join(todo)} into {RUNS_DIR}." if todo else "Nothing to train: every run exists."
    for i, label in enumerate(todo):
        error = train_one(label, lambda frac, desc, i=i: progress((i + frac) / len(todo), desc=desc))
        if error:
            message = f"Training {label} failed: {error}"
            break
    box, known = updated_run_list(box, known, RUNS_DIR)
    button, extras_section, extras_button, note = training_offer(RUNS_DIR)
    return (box, known, button, extras_section, extras_button, " ".join(filter(None, [message, note])))


def train_one(label: str, progress) -> str | None:
    """Train the default run ``label`` into its folder of ``RUNS_DIR``, calling
    ``progress(fraction, desc)`` about once a second; the last line of its error output when it
    fails, else None."""
    folder, res_type, base = DEFAULT_RUNS[label]
    out = RUNS_DIR / folder
    steps = TRAIN_STEPS[base]
    cmd = [sys.executable, str(REPO / "train_text_to_image.py"), "--res_type", res_type]
    cmd += ["--output_dir", str(out), "--pretrained_model_name_or_path", str(DEFAULT_BASES[base])]
    cmd += ["--overwrite_output_dir"]  # a missing run's folder may hold an interrupted attempt
    cmd += ["--max_train_steps", str(steps), "--report_to", "none", *BASE_TRAIN_ARGS[base], *TRAIN_EXTRA_ARGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:
        rows = RunFolder(out).read_log()
        step = rows[-1]["step"] if rows else 0
        progress(min(step / steps, 1.0), f"training {label} ({res_type}): step {step} of {steps}")
        time.sleep(1.0)
    if proc.returncode == 0:
        return None
    err = (proc.stderr.read() or "").strip().splitlines()
    return err[-1] if err else f"exit status {proc.returncode}"


def train_quick_start(box: str, known: list[str] | None, progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
    """The Train button: the quick start's runs that are missing."""
    return train_runs(QUICK_START_RUNS, box, known, progress)


def train_extras(box: str, known: list[str] | None, progress=gr.Progress()):  # noqa: B008
    """The optional extras' button: the DiT base's runs that are missing."""
    return train_runs(extra_runs(), box, known, progress)


def _train_button_text(labels: list[str]) -> str:
    """``Train LoRA and ResLoRA (800 steps each, about 10 min in all on an idle 2-core CPU)``."""
    if not labels:
        return "Train"
    names = " and ".join(labels) if len(labels) < 3 else f"{', '.join(labels[:-1])} and {labels[-1]}"
    bases = [DEFAULT_RUNS[label][2] for label in labels]
    steps = " or ".join(sorted({str(TRAIN_STEPS[base]) for base in bases}, key=int))
    each, total = (" each", " in all") if len(labels) > 1 else ("", "")
    minutes = sum(TRAIN_MINUTES[base] for base in bases)
    return f"Train {names} ({steps} steps{each}, about {minutes} min{total} on an idle 2-core CPU)"


def missing_note(missing: list[str]) -> str:
    """What the page says while quick-start runs are missing (nothing once they exist)."""
    if not missing:
        return ""
    names = " and ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"The quick start's {names} run{'s' if len(missing) > 1 else ''} {verb} missing from `{RUNS_DIR}`: "
        "press the Train button, or run the quick start's commands and press Refresh."
    )


def training_offer(runs_dir: Path | None = None) -> tuple[dict, dict, dict, str]:
    """Updates of the Train button (the quick start's missing runs), the optional extras'
    section and its button (the DiT base's runs not yet made), and the note on missing runs."""
    missing = missing_runs(runs_dir, QUICK_START_RUNS)
    extras = missing_runs(runs_dir, extra_runs())
    return (
        gr.update(value=_train_button_text(missing), visible=bool(missing)),
        gr.update(visible=bool(extras)),
        gr.update(value=_train_button_text(extras), visible=bool(extras)),
        missing_note(missing),
    )


def refresh_runs(box: str, known: list[str] | None) -> tuple:
    """Refresh (and page load): rescan ``RUNS_DIR`` into the LoRA box, and the training offer."""
    box, known = updated_run_list(box, known)
    if known is None:  # LoRAs named on the command line: no runs folder, no training offer
        return (box, known, gr.update(), gr.update(), gr.update(), gr.update())
    return (box, known, *training_offer())


CSS = """
/* every image whole and square, its whole caption (model, seed, what the analyser read) below
   it instead of cut off over it, and the gallery as tall as its rows */
#gallery .fixed-height { min-height: 0 !important; max-height: none !important; }
#gallery .grid-wrap { overflow-y: visible !important; }
#gallery .thumbnail-item { aspect-ratio: auto !important; height: auto !important; display: flex !important;
  flex-direction: column; overflow: visible !important; }
#gallery .thumbnail-item img { aspect-ratio: 1 / 1; width: 100%; height: auto; object-fit: contain; }
#gallery .caption-label { position: static !important; max-width: none !important; white-space: normal !important;
  text-overflow: clip !important; opacity: 1 !important; border: none !important; }
/* the browser may still rescale an image: keep the pixels square */
#gallery img, #grids img, #compare img { image-rendering: pixelated; }
/* the comparison grid: one row per base (its name, then each model's seeds side by side) */
#compare .compare { display: flex; flex-direction: column; gap: 10px; }
#compare .base-row { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 6px 18px;
  padding-bottom: 10px; border-bottom: 1px solid var(--border-color-primary); }
#compare .base-name { flex: 0 0 96px; font-weight: 600; padding-top: 22px; overflow-wrap: anywhere; }
#compare .model-name { font-weight: 600; font-size: 0.9em; margin-bottom: 4px; }
#compare .seeds { display: flex; gap: 6px; }
#compare figure { margin: 0; width: min-content; }  /* as wide as its image (GRID_SIDE) */
#compare img { display: block; max-width: none; }
#compare figcaption { font-size: 0.75em; line-height: 1.25; margin-top: 2px; }
"""


def launch(demo: gr.Blocks, host: str, port: int, **kwargs) -> None:
    """``demo.launch`` with the page's CSS (a launch argument since Gradio 6, a Blocks one before)."""
    if "css" in inspect.signature(demo.launch).parameters:
        kwargs["css"] = CSS
    else:
        demo.css = CSS
    demo.launch(server_name=host, server_port=port, **kwargs)


class AllowedPaths:
    """The paths a client of a demo that other machines reach may name: LoRA outputs inside
    ``runs_dir`` or inside those named at start, and the bases listed at start (folders, or hub
    names as given).

    Paths are compared resolved (``..`` and symlinks followed), so ``runs/../..`` is outside. A
    path outside is refused before anything reads it, with a note that does not name it: whether
    it exists, or is a file or a folder, never shows in an answer.
    """

    def __init__(self, runs_dir: str | Path, bases: list[str], loras: list[str] | None = None) -> None:
        self.bases = list(bases)
        self.base_keys = {_base_key(b) for b in self.bases}
        self.lora_roots = [Path(runs_dir).resolve(), *(Path(lora).resolve() for lora in loras or [])]

    def allows_base(self, base: str) -> bool:
        return _base_key(base) in self.base_keys

    def allows_lora(self, lora: str) -> bool:
        path = Path(lora).resolve()
        return any(path.is_relative_to(root) for root in self.lora_roots)

    def keep_bases(self, text: str) -> tuple[str, list[str]]:
        """The bases of ``text`` (one per line) this demo may load, with a note for those left
        out; no base named means the listed ones."""
        named = _lines(text)
        kept = [b for b in named if self.allows_base(b)]
        notes = []
        if len(kept) < len(named):
            notes.append(
                f"**{len(named) - len(kept)} base model(s) not shown**: a demo reachable from other "
                "machines uses only the base models it was started with."
            )
        return "\n".join(kept if named else self.bases), notes

    def keep_loras(self, text: str) -> tuple[str, list[str]]:
        """The LoRA outputs of ``text`` (one per line) this demo may read, with a note for those left out."""
        named = _lines(text)
        kept = [lora for lora in named if self.allows_lora(lora)]
        notes = []
        if len(kept) < len(named):
            notes.append(
                f"**{len(named) - len(kept)} LoRA output(s) not shown**: a demo reachable from other "
                "machines reads LoRA outputs only from its runs folder and those named when it started."
            )
        return "\n".join(kept), notes


def _base_key(base: str) -> str:
    """A base as :class:`AllowedPaths` compares it: a path resolved, a hub name as it is."""
    local = base.startswith((".", "/", "~")) or os.path.exists(base)
    return str(Path(base).resolve()) if local else base


def restricted(allowed: AllowedPaths) -> dict:
    """The endpoints that read paths (``render``, ``reports``, ``prompt_note``), taking out the
    bases and LoRA outputs ``allowed`` refuses; ``render`` says what it left out, without paths."""
    render_args, note_args = inspect.signature(render), inspect.signature(prompt_note)

    @functools.wraps(render)
    def render_allowed(*args, **kwargs):
        bound = render_args.bind(*args, **kwargs)
        bound.arguments["base"], base_notes = allowed.keep_bases(bound.arguments["base"])
        bound.arguments["loras"], lora_notes = allowed.keep_loras(bound.arguments["loras"])
        if not bound.arguments["base"]:
            return [], "\n\n".join(["Nothing rendered.", *base_notes, *lora_notes]), []
        gallery, status, rows = render(*bound.args, **bound.kwargs)
        return gallery, "\n\n".join([status, *base_notes, *lora_notes]), rows

    @functools.wraps(reports)
    def reports_allowed(loras: str):
        return reports(allowed.keep_loras(loras)[0])

    @functools.wraps(prompt_note)
    def note_allowed(*args, **kwargs):
        bound = note_args.bind(*args, **kwargs)
        bound.arguments["base"], _ = allowed.keep_bases(bound.arguments["base"])
        return prompt_note(*bound.args, **bound.kwargs) if bound.arguments["base"] else ""

    return {"render": render_allowed, "reports": reports_allowed, "prompt_note": note_allowed}


def build_app(
    base: str | list[str] | None = None,
    loras: list[str] | None = None,
    allow_training: bool = True,
    allowed: AllowedPaths | None = None,
) -> gr.Blocks:
    """The demo page for the base models ``base`` (one per line, or a list; default: the embedded
    ones) and the LoRA outputs ``loras`` (default: the runs in ``RUNS_DIR``, rescanned at every
    page load and Refresh); ``allow_training=False`` leaves out the Train buttons (and their API
    endpoints); ``allowed`` restricts the paths a client may name (a demo other machines reach)."""
    base = "\n".join(parse_bases(base))
    using_runs = loras is None
    loras = found_runs() if using_runs else loras
    offering = using_runs and allow_training
    endpoints = {"render": render, "reports": reports, "prompt_note": prompt_note}
    if allowed is not None:
        endpoints = restricted(allowed)
    with gr.Blocks(title="ResLoRA vs LoRA") as demo:
        gr.Markdown(
            "# ResLoRA vs LoRA\nSame prompt, same seeds: each base model, then every LoRA file made "
            "for it. The embedded base models draw one shape on a plain background, 32 px: "
            f"{vocabulary_text(_added_colors(str(default_base_model_path())) or ())}",
            elem_id="vocabulary",
        )
        with gr.Row():
            base_box = gr.Textbox(value=base, label="Base models (one diffusers folder per line)", lines=2)
            lora_box = gr.Textbox(
                value="\n".join(loras), label="LoRA outputs (one folder or .safetensors per line)", lines=2
            )
        known = gr.State(loras if using_runs else None)
        offer = run_controls(offering)
        with gr.Tab("Generate"):
            with gr.Row():
                prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", elem_id="prompt")
                negative = gr.Textbox(value="", label="Negative prompt")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                steps = gr.Slider(1, 50, value=BASE_NUM_INFERENCE_STEPS, step=1, label="Inference steps")
                guidance = gr.Slider(1.0, 12.0, value=BASE_GUIDANCE_SCALE, step=0.5, label="Guidance scale")
                lora_scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA scale")
                num_images = gr.Slider(1, 4, value=IMAGES_PER_MODEL, step=1, label="Images per model")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            note = gr.Markdown(prompt_note(DEFAULT_PROMPT, base), label="prompt note", elem_id="prompt_note")
            grid = gr.HTML(label="comparison", elem_id="compare")
            status = gr.Markdown("", label="status", elem_id="status")
            comparison = gr.Dataframe(
                headers=["run", "steps", "prompt accuracy before", "after", "merge error (exported)"],
                label="runs compared (prompt accuracy: the training script's 15 concept prompts x 2 seeds)",
                elem_id="comparison",
            )
            with gr.Accordion("Every image on its own (enlarge, download)", open=False):
                # PNG: a lossy format would smear the enlarged pixels
                gallery = gr.Gallery(
                    label="each base, then its LoRA and ResLoRA",
                    columns=gallery_columns(IMAGES_PER_MODEL, base, "\n".join(loras))["columns"],
                    elem_id="gallery",
                    object_fit="contain",
                    format="png",
                )
        with gr.Tab("Training and merge"):
            plot = gr.Plot(label="curves")
            accuracy = gr.Dataframe(
                headers=["run", "step", "prompt accuracy"], label="prompt accuracy", elem_id="accuracy"
            )
            table = gr.Dataframe(
                headers=["run", "component", "merge", "relative error", "exported"], label="merge reports"
            )
            gr.Markdown("Final validation grids: the same prompts (columns) and seeds (rows) for every run.")
            grids = gr.Image(label="final validation grids", show_label=False, format="png", elem_id="grids")
        layout = gr.State()  # the images by base and model, for the comparison grid (not in the API)
        generate.click(
            endpoints["render"],
            [prompt, negative, seed, steps, guidance, lora_scale, num_images, base_box, lora_box],
            [gallery, status, layout],
            api_name="generate",
        ).then(comparison_grid, layout, grid, api_name=False)
        for source in (num_images, base_box, lora_box):
            source.change(gallery_columns, [num_images, base_box, lora_box], gallery, api_name=False)
        prompt.change(endpoints["prompt_note"], [prompt, base_box], note, api_name="prompt_note")
        base_box.change(endpoints["prompt_note"], [prompt, base_box], note, api_name=False)
        outputs = [plot, accuracy, table, comparison, grids]
        wire_run_controls(demo, offer, lora_box, known, outputs, endpoints["reports"])
    return demo.queue(default_concurrency_limit=1)


def run_controls(offering: bool) -> dict:
    """The controls over the runs, above the tabs: Refresh, the note on missing quick-start runs
    and, when ``offering`` training, the Train button and the optional extras' section with its
    own button (each shown only while it has runs to train)."""
    controls = {}
    button, _, extras_button, note = training_offer() if offering else ({}, {}, {}, "")
    with gr.Row():
        controls["refresh"] = gr.Button(
            "Refresh runs and reports", elem_id="refresh", size="sm", scale=0, min_width=220
        )
        if offering:
            controls["train"] = gr.Button(
                button["value"], visible=button["visible"], elem_id="train", variant="primary"
            )
    controls["note"] = gr.Markdown(note, label="runs note", elem_id="runs_note")
    if offering:
        with gr.Accordion(
            "Optional extras: LoRA and ResLoRA on the DiT base",
            open=False,
            visible=extras_button["visible"],
            elem_id="extras",
        ) as controls["extras"]:
            gr.Markdown(
                f"The embedded DiT base (`{base_name(str(DEFAULT_BASES['dit']))}`, an SD3 pipeline) takes "
                "LoRAs too. Its runs are not part of the quick start: train them here to fill its row "
                f"of the comparison, with its recipe (the image stream's feed-forward layers added to "
                f"the targets, {TRAIN_STEPS['dit']} steps; README, Demo app). A machine busy with other "
                "work takes two to three times as long."
            )
            controls["train_extras"] = gr.Button(
                extras_button["value"], visible=extras_button["visible"], elem_id="train_extras"
            )
    return controls


def wire_run_controls(demo: gr.Blocks, controls: dict, lora_box, known, outputs: list, reports_fn) -> None:
    """Page load and Refresh rescan the runs (:func:`refresh_runs`), then redraw the reports
    ``outputs`` with ``reports_fn`` (:func:`reports`, or its restricted form); the Train buttons
    train and do the same."""
    offering = "train" in controls
    offer = [controls["train"], controls["extras"], controls["train_extras"]] if offering else []
    targets = [lora_box, known, *offer, controls["note"]]

    def rescan(box: str, known_runs: list[str] | None):
        box, known_runs, *rest = refresh_runs(box, known_runs)
        # without Train buttons (a remote demo) there is nothing to offer or press
        return (box, known_runs, *rest) if offering else (box, known_runs, "")

    controls["refresh"].click(rescan, [lora_box, known], targets, api_name="refresh").then(
        reports_fn, [lora_box], outputs, api_name="reports"
    )
    demo.load(rescan, [lora_box, known], targets, api_name=False).then(
        reports_fn, [lora_box], outputs, api_name=False
    )
    if offering:
        controls["train"].click(train_quick_start, [lora_box, known], targets, api_name="train").then(
            reports_fn, [lora_box], outputs, api_name=False
        )
        controls["train_extras"].click(
            train_extras, [lora_box, known], targets, api_name="train_extras"
        ).then(reports_fn, [lora_box], outputs, api_name=False)


def allowed_paths(args: argparse.Namespace) -> AllowedPaths | None:
    """None on a loopback address (only this machine's users reach the demo, and they can read
    any file anyway); elsewhere the runs folder and the bases and LoRA outputs of the command line."""
    if args.host in LOOPBACK_HOSTS:
        return None
    return AllowedPaths(RUNS_DIR, parse_bases(args.base), args.lora)


def main(args: argparse.Namespace) -> None:
    global RUNS_DIR
    logging.basicConfig(level=logging.INFO)
    if args.runs_dir is not None:
        RUNS_DIR = Path(args.runs_dir)
    demo = build_app(
        args.base, args.lora, allow_training=args.host in LOOPBACK_HOSTS, allowed=allowed_paths(args)
    )
    try:
        launch(demo, args.host, args.port)
    except OSError as err:  # the port was taken between port_taken's check and the start
        sys.exit(f"app.py: error: --port {args.port}: {one_line(err)}")


if __name__ == "__main__":
    main(ARGS)

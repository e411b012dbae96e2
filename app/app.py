"""Gradio demo: the base model, LoRA and ResLoRA side by side, with training curves and merge reports.

    python app/app.py [--base DIR] [--lora PATH ...] [--host 127.0.0.1] [--port 7860]

LoRA outputs are training/export folders (holding ``pytorch_lora_weights.safetensors``) or
``.safetensors`` files; they are loaded with diffusers' ``load_lora_weights``, the way any
user of the exported files loads them. Without ``--lora`` the demo uses the runs in
``runs/`` and offers a button that trains the missing ones on the embedded data.
"""

# ruff: noqa: E402 (the command line is parsed before the heavy imports, so --help is instant)
from __future__ import annotations

import argparse
import inspect
import json
import logging
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from functools import lru_cache
from pathlib import Path

#: Addresses that only this machine reaches; the Train button is offered on these only.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base", default=None, help="diffusers pipeline folder or hub name (default: the embedded tiny base)"
    )
    parser.add_argument("--lora", nargs="*", default=None, help="LoRA folders or files (default: runs/*)")
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default: loopback only); on any other address the Train button, which "
        "starts training processes on this machine, is left out of the page and the API",
    )
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default: 7860)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse_args()

import gradio as gr
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from diffusers import DiffusionPipeline
from PIL import Image, ImageDraw

from reslora_diffusers.data import default_base_model_path, unseen_words, vocabulary_text
from reslora_diffusers.data.tiny_base import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS
from reslora_diffusers.eval import analyse_image, generate, parse_prompt
from reslora_diffusers.eval.analysis import attribute_matches
from reslora_diffusers.export.loading import check_lora_file, resolve_lora_file
from reslora_diffusers.training.grid import label_font
from reslora_diffusers.utils.safety import check_finite_file

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
RUNS_DIR = REPO / "runs"
#: the runs the training button makes: label -> (output folder, res_type)
DEFAULT_RUNS = {"LoRA": ("lora", "none"), "ResLoRA": ("reslora", "bs")}
#: training steps of each run the button trains (the training script's default run)
TRAIN_STEPS = 800
#: further flags for those runs (a base or data other than the embedded ones, say)
TRAIN_EXTRA_ARGS: list[str] = []
DEFAULT_PROMPT = "a blue cross on a white background"
#: the names a training run exports its LoRA under (a run's merge report describes these)
EXPORTED_FILES = ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors")
#: images are shown enlarged to about this many pixels
DISPLAY_SIDE = 192
#: at most this many images side by side
GALLERY_COLUMNS = 6
#: images per model the page starts with
IMAGES_PER_MODEL = 2


class PipelineCache:
    """Pipelines by (base, LoRA file), least recently used dropped beyond ``size``."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._pipes: OrderedDict[tuple[str, str | None], DiffusionPipeline] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, base: str, lora: str | None) -> DiffusionPipeline:
        key = (base, lora)
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
        pipe = DiffusionPipeline.from_pretrained(base)
        pipe.set_progress_bar_config(disable=True)
        if lora is not None:
            path = check_lora_file(pipe, lora)
            check_finite_file(path)  # NaN weights would render black images
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        with self._lock:
            self._pipes[key] = pipe
            while len(self._pipes) > self.size:
                self._pipes.popitem(last=False)
        return pipe


CACHE = PipelineCache()


def run_label(path: str | Path) -> str:
    """``LoRA (lora)`` / ``ResLoRA bs m=1 (reslora)`` for a run folder or its exported LoRA file,
    from the run's merge report; any other file or folder by its own name."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    report = folder / "merge_report.json"
    if report.is_file() and (path.is_dir() or path.name in EXPORTED_FILES):
        info = json.loads(report.read_text())
        if info.get("res_type") == "none":
            return f"LoRA ({folder.name})"
        return f"ResLoRA {info.get('res_type')} m={info.get('pre_num')} ({folder.name})"
    return path.name


def found_runs(runs_dir: Path = RUNS_DIR) -> list[str]:
    """Run folders under ``runs_dir`` that hold an exported LoRA, LoRA first."""
    order = [name for name, _ in DEFAULT_RUNS.values()]
    runs = [
        p
        for p in sorted(runs_dir.glob("*"))
        if not p.name.startswith(".")  # hidden or an interrupted export's temporary folder
        and (p / "pytorch_lora_weights.safetensors").is_file()
    ]
    runs.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
    return [str(p) for p in runs]


def missing_runs(runs_dir: Path = RUNS_DIR) -> list[str]:
    """Labels of the default runs (``DEFAULT_RUNS``) that have no exported LoRA yet."""
    return [
        label
        for label, (folder, _) in DEFAULT_RUNS.items()
        if not (runs_dir / folder / "pytorch_lora_weights.safetensors").is_file()
    ]


@lru_cache(maxsize=16)
def _embedded_vocabulary(base: str) -> bool:
    """Whether the pipeline folder ``base`` reads prompts with the embedded base's vocabulary
    (then its notes on unseen words apply)."""
    from transformers import AutoTokenizer

    if not (Path(base) / "tokenizer").is_dir():
        return False
    try:
        mine = AutoTokenizer.from_pretrained(base, subfolder="tokenizer").get_vocab()
    except (OSError, ValueError):
        return False
    ours = AutoTokenizer.from_pretrained(str(default_base_model_path()), subfolder="tokenizer")
    return mine == ours.get_vocab()


def prompt_note(prompt: str, base: str) -> str:
    """Markdown beside the images: the words of ``prompt`` the embedded base has never seen."""
    if not _embedded_vocabulary(base.strip() or str(default_base_model_path())):
        return ""
    unseen = unseen_words(prompt)
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
    """The LoRA scale as the pipeline takes it: ``cross_attention_kwargs`` (UNet pipelines) or
    ``joint_attention_kwargs`` (SD3 and Flux)."""
    parameters = inspect.signature(pipe.__call__).parameters
    name = "cross_attention_kwargs" if "cross_attention_kwargs" in parameters else "joint_attention_kwargs"
    return {name: {"scale": scale}}


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
    """Images of the base model and of every LoRA, same seeds, labelled and scored."""
    base = base.strip() or str(default_base_model_path())
    methods = [("base", None)] + [(run_label(p.strip()), p.strip()) for p in loras.splitlines() if p.strip()]
    gallery, problems = [], []
    for label, lora in methods:
        try:
            pipe = CACHE.get(base, str(resolve_lora_file(lora)) if lora else None)
        except Exception as err:  # not loadable by diffusers either: this model fails alone
            logger.warning("%s failed to load: %s", label, err)
            problems.append(f"**{label}** (not a usable LoRA, not shown): {' '.join(str(err).split())}")
            continue
        n = int(num_images)
        try:
            images = generate(
                pipe,
                [prompt] * n,
                [int(seed) + i for i in range(n)],
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                negative_prompt=[negative_prompt] * n if negative_prompt else None,
                **(lora_scale_kwargs(pipe, float(lora_scale)) if lora else {}),
            )
        except Exception as err:  # each model fails alone: the others' images are still shown
            logger.warning("%s failed: %s", label, err)
            problems.append(f"**{label}**: {' '.join(str(err).split())}")
            continue
        for i, image in enumerate(images):
            caption = f"{label} | seed {int(seed) + i} | {score_caption(image, prompt)}"
            gallery.append((crisp(image), caption))
    shown = len(methods) - len(problems)
    status = f"Rendered {shown} models with the same seeds."
    if problems:
        status += "\n\n" + "\n\n".join(problems)
    return gallery, status


def gallery_columns(num_images: float, loras: str) -> dict:
    """All the models' images in one row when they fit, else one row per model."""
    models = 1 + sum(1 for p in loras.splitlines() if p.strip())
    per_model = int(num_images)
    return gr.update(columns=models * per_model if models * per_model <= GALLERY_COLUMNS else per_model)


def read_log(run: Path) -> list[dict]:
    log = run / "train_log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _run_folder(path: str) -> Path:
    return Path(path) if Path(path).is_dir() else Path(path).parent


def smoothed_loss(steps: list[int], values: list[float], points: int = 20) -> tuple[list[int], list[float]]:
    """Trailing mean over ``len(values) // points`` steps, from the first full window on: the
    first steps alone are too few and too noisy to average, and drew a spike that flattened
    the rest of the curve."""
    window = max(1, len(values) // points)
    means = [sum(values[i - window + 1 : i + 1]) / window for i in range(window - 1, len(values))]
    return list(steps[window - 1 :]), means


def accuracy_points(rows: list[dict]) -> list[tuple[int, float]]:
    """``(step, prompt accuracy)`` of a run's validations and final evaluation, by step."""
    return sorted((r["step"], r["prompt_accuracy"]) for r in rows if r.get("prompt_accuracy") is not None)


def curves(loras: str):
    """Loss and prompt accuracy against steps for every run, in one figure."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        run = _run_folder(path)
        rows = read_log(run)
        label = run_label(run)
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if losses:
            ax_loss.plot(*smoothed_loss(*map(list, zip(*losses))), label=label)
        accs = accuracy_points(rows)
        if accs:
            ax_acc.plot(*zip(*accs), marker="o", label=label)
    ax_loss.set(title="training loss (smoothed)", xlabel="step")
    ax_acc.set(title="prompt accuracy", xlabel="step", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def accuracy_table(loras: str) -> list[list]:
    """One row per run and evaluation: the numbers behind the accuracy chart."""
    rows = []
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        run = _run_folder(path)
        for step, acc in accuracy_points(read_log(run)):
            rows.append([run_label(run), step, f"{acc:.1%}"])
    return rows


def merge_table(loras: str) -> list[list]:
    """One row per run, component and merge method: the relative output error of the merge."""
    rows = []
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        run = _run_folder(path)
        report_file = run / "merge_report.json"
        if not report_file.is_file():
            continue
        report = json.loads(report_file.read_text())
        for comp, info in report.get("components", {}).items():
            for method, result in info.get("methods", {}).items():
                exported = "yes" if method == report.get("merge") else ""
                rows.append([run_label(run), comp, method, f"{result['total']:.2e}", exported])
    return rows


def comparison_table(loras: str) -> list[list]:
    """One row per run: steps, prompt accuracy before and after training, error of the exported merge."""
    rows = []
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        run = _run_folder(path)
        log = read_log(run)
        points = dict(accuracy_points(log))
        final = next((r for r in reversed(log) if r.get("kind") == "final"), None)
        steps = max((r["step"] for r in log if "loss" in r), default=None)
        after = final.get("prompt_accuracy") if final else None
        error = "n/a"
        report_file = run / "merge_report.json"
        if report_file.is_file():
            report = json.loads(report_file.read_text())
            error = ", ".join(f"{k} {v['output_error']:.1e}" for k, v in report.get("components", {}).items())
        rows.append(
            [
                run_label(run),
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
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        grid = _run_folder(path) / "validation" / "final.png"
        if grid.is_file():
            parts.append((run_label(_run_folder(path)), Image.open(grid).convert("RGB")))
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


def train_missing_runs(progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
    """Train the default runs that are missing on the embedded data, reporting progress from their
    logs; a run that already exists is never retrained or overwritten."""
    RUNS_DIR.mkdir(exist_ok=True)
    script = REPO / "train_text_to_image.py"
    todo = missing_runs(RUNS_DIR)
    for i, label in enumerate(todo):
        folder, res_type = DEFAULT_RUNS[label]
        out = RUNS_DIR / folder
        cmd = [sys.executable, str(script), "--res_type", res_type, "--output_dir", str(out)]
        cmd += ["--overwrite_output_dir"]  # a missing run's folder may hold an interrupted attempt
        cmd += ["--max_train_steps", str(TRAIN_STEPS), "--report_to", "none", *TRAIN_EXTRA_ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            rows = read_log(out)
            step = rows[-1]["step"] if rows else 0
            progress(
                (i + min(step / TRAIN_STEPS, 1.0)) / len(todo),
                desc=f"training {label} ({res_type}): step {step}",
            )
            time.sleep(1.0)
        if proc.returncode != 0:
            err = (proc.stderr.read() or "").strip().splitlines()
            return gr.update(), gr.update(), f"Training {label} failed: {err[-1] if err else proc.returncode}"
    runs = "\n".join(found_runs(RUNS_DIR))
    message = f"Trained {', '.join(todo)} into {RUNS_DIR}." if todo else "Nothing to train: every run exists."
    return gr.update(value=runs), gr.update(visible=bool(missing_runs(RUNS_DIR))), message


def _train_button_text(missing: list[str]) -> str:
    return f"Train {' and '.join(missing)} ({TRAIN_STEPS} steps each, minutes on a CPU)"


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
#gallery img, #grids img { image-rendering: pixelated; }
"""


def launch(demo: gr.Blocks, host: str, port: int, **kwargs) -> None:
    """``demo.launch`` with the page's CSS (a launch argument since Gradio 6, a Blocks one before)."""
    if "css" in inspect.signature(demo.launch).parameters:
        kwargs["css"] = CSS
    else:
        demo.css = CSS
    demo.launch(server_name=host, server_port=port, **kwargs)


def build_app(
    base: str | None = None, loras: list[str] | None = None, allow_training: bool = True
) -> gr.Blocks:
    """The demo page; ``allow_training=False`` leaves out the Train button (and its API endpoint)."""
    base = base or str(default_base_model_path())
    using_runs = loras is None
    loras = found_runs() if using_runs else loras
    missing = missing_runs() if using_runs and allow_training else []
    with gr.Blocks(title="ResLoRA vs LoRA") as demo:
        gr.Markdown(
            "# ResLoRA vs LoRA\nSame prompt, same seeds: the base model, then every LoRA file. "
            f"The embedded base model draws one shape on a plain background, 32 px: {vocabulary_text()}",
            elem_id="vocabulary",
        )
        with gr.Row():
            base_box = gr.Textbox(value=base, label="Base model (diffusers folder)")
            lora_box = gr.Textbox(
                value="\n".join(loras), label="LoRA outputs (one folder or .safetensors per line)", lines=2
            )
        if allow_training:
            train_btn = gr.Button(_train_button_text(missing), visible=bool(missing), elem_id="train")
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
            note = gr.Markdown(prompt_note(DEFAULT_PROMPT, base), elem_id="prompt_note")
            # PNG: a lossy format would smear the enlarged pixels
            gallery = gr.Gallery(
                label="base | LoRA | ResLoRA",
                columns=gallery_columns(IMAGES_PER_MODEL, "\n".join(loras))["columns"],
                elem_id="gallery",
                object_fit="contain",
                format="png",
            )
            status = gr.Markdown(
                f"Runs missing: {', '.join(missing)}. Press the Train button above." if missing else "",
                elem_id="status",
            )
            comparison = gr.Dataframe(
                headers=["run", "steps", "prompt accuracy before", "after", "merge error (exported)"],
                label="runs compared (prompt accuracy: the training script's 15 concept prompts x 2 seeds)",
                elem_id="comparison",
            )
        with gr.Tab("Training and merge"):
            refresh = gr.Button("Refresh")
            plot = gr.Plot(label="curves")
            accuracy = gr.Dataframe(
                headers=["run", "step", "prompt accuracy"], label="prompt accuracy", elem_id="accuracy"
            )
            table = gr.Dataframe(
                headers=["run", "component", "merge", "relative error", "exported"], label="merge reports"
            )
            gr.Markdown("Final validation grids: the same prompts (columns) and seeds (rows) for every run.")
            grids = gr.Image(label="final validation grids", show_label=False, format="png", elem_id="grids")
        generate.click(
            render,
            [prompt, negative, seed, steps, guidance, lora_scale, num_images, base_box, lora_box],
            [gallery, status],
            api_name="generate",
        )
        for source in (num_images, lora_box):
            source.change(gallery_columns, [num_images, lora_box], gallery, api_name=False)
        prompt.change(prompt_note, [prompt, base_box], note, api_name="prompt_note")
        base_box.change(prompt_note, [prompt, base_box], note, api_name=False)
        outputs = [plot, accuracy, table, comparison, grids]
        refresh.click(reports, [lora_box], outputs, api_name="reports")
        if allow_training:
            train_btn.click(train_missing_runs, None, [lora_box, train_btn, status], api_name="train").then(
                reports, [lora_box], outputs, api_name=False
            )
        demo.load(reports, [lora_box], outputs)
    return demo.queue(default_concurrency_limit=1)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO)
    demo = build_app(args.base, args.lora, allow_training=args.host in LOOPBACK_HOSTS)
    launch(demo, args.host, args.port)


if __name__ == "__main__":
    main(ARGS)

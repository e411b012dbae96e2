"""Gradio demo: the base model, LoRA and ResLoRA side by side, with training curves and merge reports.

    python app/app.py [--base DIR] [--lora PATH ...] [--host 127.0.0.1] [--port 7860]

LoRA outputs are training/export folders (holding ``pytorch_lora_weights.safetensors``) or
``.safetensors`` files; they are loaded with diffusers' ``load_lora_weights``, the way any
user of the exported files loads them. Without ``--lora`` the demo uses the runs in
``runs/`` and offers a button that trains them on the embedded data.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from diffusers import DiffusionPipeline  # noqa: E402

from reslora_diffusers.data import default_base_model_path  # noqa: E402
from reslora_diffusers.data.tiny_base import BASE_GUIDANCE_SCALE, BASE_NUM_INFERENCE_STEPS  # noqa: E402
from reslora_diffusers.eval import analyse_image, parse_prompt  # noqa: E402
from reslora_diffusers.eval.analysis import attribute_matches  # noqa: E402
from reslora_diffusers.export.loading import check_lora_file, resolve_lora_file  # noqa: E402
from reslora_diffusers.utils.safety import check_finite_file  # noqa: E402

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
    """``LoRA`` / ``ResLoRA (bs, m=1)`` from a run's merge report, else the file or folder name."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    report = folder / "merge_report.json"
    if report.is_file():
        info = json.loads(report.read_text())
        if info.get("res_type") == "none":
            return f"LoRA ({folder.name})"
        return f"ResLoRA {info.get('res_type')} m={info.get('pre_num')} ({folder.name})"
    return path.stem if path.is_file() else path.name


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


def score_caption(image, prompt: str) -> str:
    """What the analyser read, against what the prompt asked."""
    analysis = analyse_image(image)
    matches = attribute_matches(analysis, parse_prompt(prompt))
    if not matches:
        return "no colour/shape in the prompt to score"
    marks = " ".join(f"{k} {'ok' if v else 'x'}" for k, v in matches.items())
    return f"{marks} (read: {analysis['color']} {analysis['shape']})"


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
    methods = [("base", None)] + [(run_label(p), p.strip()) for p in loras.splitlines() if p.strip()]
    gallery, problems = [], []
    for label, lora in methods:
        n = int(num_images)
        generators = [torch.Generator("cpu").manual_seed(int(seed) + i) for i in range(n)]
        try:
            pipe = CACHE.get(base, str(resolve_lora_file(lora)) if lora else None)
            with torch.no_grad():
                images = pipe(
                    prompt=[prompt] * n,
                    negative_prompt=[negative_prompt] * n if negative_prompt else None,
                    num_inference_steps=int(steps),
                    guidance_scale=float(guidance),
                    generator=generators,
                    cross_attention_kwargs={"scale": float(lora_scale)} if lora else None,
                ).images
        except Exception as err:  # each model fails alone: the others' images are still shown
            logger.warning("%s failed: %s", label, err)
            problems.append(f"**{label}**: {' '.join(str(err).split())}")
            continue
        for i, image in enumerate(images):
            gallery.append((image, f"{label} | seed {int(seed) + i} | {score_caption(image, prompt)}"))
    status = "\n\n".join(problems) if problems else f"Rendered {len(methods)} models with the same seeds."
    return gallery, status


def read_log(run: Path) -> list[dict]:
    log = run / "train_log.jsonl"
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def curves(loras: str):
    """Loss and prompt accuracy against steps for every run, in one figure."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.5))
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        run = Path(path) if Path(path).is_dir() else Path(path).parent
        rows = read_log(run)
        label = run_label(run)
        losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if losses:
            steps, values = zip(*losses)
            window = max(1, len(values) // 20)
            smooth = [
                sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
                for i in range(len(values))
            ]
            ax_loss.plot(steps, smooth, label=label)
        accs = [(r["step"], r["accuracy"]) for r in rows if r.get("accuracy") is not None]
        if accs:
            ax_acc.plot(*zip(*accs), marker="o", label=label)
    ax_loss.set(title="training loss (smoothed)", xlabel="step")
    ax_acc.set(title="prompt accuracy", xlabel="step", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def merge_table(loras: str) -> list[list]:
    """One row per run, component and merge method: the relative output error of the merge."""
    rows = []
    for path in [p.strip() for p in loras.splitlines() if p.strip()]:
        run = Path(path) if Path(path).is_dir() else Path(path).parent
        report_file = run / "merge_report.json"
        if not report_file.is_file():
            continue
        report = json.loads(report_file.read_text())
        for comp, info in report.get("components", {}).items():
            for method, result in info.get("methods", {}).items():
                exported = "yes" if method == report.get("merge") else ""
                rows.append([run_label(run), comp, method, f"{result['total']:.2e}", exported])
    return rows


def train_default_runs(progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
    """Train the LoRA and ResLoRA runs on the embedded data, reporting progress from their logs."""
    RUNS_DIR.mkdir(exist_ok=True)
    script = REPO / "train_text_to_image.py"
    for i, (label, (folder, res_type)) in enumerate(DEFAULT_RUNS.items()):
        out = RUNS_DIR / folder
        cmd = [sys.executable, str(script), "--res_type", res_type, "--output_dir", str(out)]
        cmd += ["--overwrite_output_dir"]  # the button retrains: the previous run is replaced
        cmd += ["--max_train_steps", str(TRAIN_STEPS), "--report_to", "none", *TRAIN_EXTRA_ARGS]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while proc.poll() is None:
            rows = read_log(out)
            step = rows[-1]["step"] if rows else 0
            progress(
                (i + min(step / TRAIN_STEPS, 1.0)) / len(DEFAULT_RUNS),
                desc=f"training {label} ({res_type}): step {step}",
            )
            time.sleep(1.0)
        if proc.returncode != 0:
            err = (proc.stderr.read() or "").strip().splitlines()
            return gr.update(), f"Training {label} failed: {err[-1] if err else proc.returncode}"
    runs = "\n".join(found_runs(RUNS_DIR))
    return gr.update(value=runs), f"Trained {', '.join(DEFAULT_RUNS)} into {RUNS_DIR}."


def build_app(base: str | None = None, loras: list[str] | None = None) -> gr.Blocks:
    base = base or str(default_base_model_path())
    loras = loras if loras is not None else found_runs()
    with gr.Blocks(title="ResLoRA vs LoRA") as demo:
        gr.Markdown("# ResLoRA vs LoRA\nSame prompt, same seeds: the base model, then every LoRA file.")
        status = gr.Markdown(
            "" if loras else "No trained LoRA yet: press **Train LoRA and ResLoRA** (a few minutes on CPU)."
        )
        with gr.Row():
            base_box = gr.Textbox(value=base, label="Base model (diffusers folder)")
            lora_box = gr.Textbox(
                value="\n".join(loras), label="LoRA outputs (one folder or .safetensors per line)", lines=2
            )
        train_btn = gr.Button("Train LoRA and ResLoRA", visible=True)
        with gr.Tab("Generate"):
            with gr.Row():
                prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", elem_id="prompt")
                negative = gr.Textbox(value="", label="Negative prompt")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed")
                steps = gr.Slider(1, 50, value=BASE_NUM_INFERENCE_STEPS, step=1, label="Inference steps")
                guidance = gr.Slider(1.0, 12.0, value=BASE_GUIDANCE_SCALE, step=0.5, label="Guidance scale")
                lora_scale = gr.Slider(0.0, 1.5, value=1.0, step=0.05, label="LoRA scale")
                num_images = gr.Slider(1, 4, value=2, step=1, label="Images per model")
            generate = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="base | LoRA | ResLoRA", columns=4, elem_id="gallery")
        with gr.Tab("Training and merge"):
            refresh = gr.Button("Refresh")
            plot = gr.Plot(label="curves")
            table = gr.Dataframe(
                headers=["run", "component", "merge", "relative error", "exported"], label="merge reports"
            )
        generate.click(
            render,
            [prompt, negative, seed, steps, guidance, lora_scale, num_images, base_box, lora_box],
            [gallery, status],
            api_name="generate",
        )
        refresh.click(lambda s: (curves(s), merge_table(s)), [lora_box], [plot, table], api_name="reports")
        train_btn.click(train_default_runs, None, [lora_box, status], api_name="train")
        demo.load(lambda s: (curves(s), merge_table(s)), [lora_box], [plot, table])
    return demo.queue(default_concurrency_limit=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--base", default=None, help="diffusers pipeline folder (default: the embedded tiny base)"
    )
    parser.add_argument("--lora", nargs="*", default=None, help="LoRA folders or files (default: runs/*)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build_app(args.base, args.lora).launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()

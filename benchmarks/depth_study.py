#!/usr/bin/env python
"""Depth study: does ResLoRA reach LoRA's loss in fewer steps as the network gets deeper?

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/depth_study.py              # run (resumes), then report
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/depth_study.py --max_minutes 60   # one part of it
    python benchmarks/depth_study.py --report_only                              # tables and plot so far

**Task.** A frozen network of ``depth`` pre-norm transformer blocks of width ``width`` (self-attention
with ``q_proj``/``k_proj``/``v_proj``/``o_proj``, heads of 16 features; an MLP ``fc1 -> GELU -> fc2``
four times as wide; a LayerNorm before each) and a final LayerNorm. ``residual`` blocks compute
``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``; ``plain`` blocks are the same without their residual
connections (``attn(ln1(x))``, ``mlp(ln2(x))``), where the path from an early layer to the output is
longest. Weights are ``N(0, 1/fan_in)``, biases 0. The teacher is the base network with a random
rank-``teacher_rank`` change ``dW = B A`` in every projection of every block (``A ~ N(0, 1/in)``,
``B ~ N(0, g^2/r_t)``, so ``||dW x|| ~ g ||W x||`` with ``g = --teacher_scale``). Students put a
rank-``--rank`` adapter on the same six projections of every block, so the best loss is 0 (at
the teacher). Inputs are Gaussian token sequences.

**Library models** (the depth users fine-tune, 24 blocks by default): ``llama``, transformers'
``LlamaModel`` (RMSNorm, causal rotary attention, SwiGLU MLP; residual blocks) fed Gaussian
embeddings, adapted on ``q/k/v/o_proj`` and ``gate/up/down_proj``; ``sd3``, diffusers'
``SD3Transformer2DModel`` (joint image-text blocks with adaLN modulation; residual) fed Gaussian
latents (4 x 8 x 8), text states, pooled text and a timestep, adapted on the joint attention and both
feed-forward streams (this project's DiT targets). Their linear layers are drawn ``N(0, 1/fan_in)``
as above, and teacher and students are built the same way. They run PEFT LoRA, the default
``ms``-cosine and the configurations that gained on the ``plain`` stacks (``ms``, ``bs``).

A seed draws the base network, the teacher's changes, the training and held-out inputs and the
order of the training batches; every method of a seed sees the same (runs of one seed are
paired), and each method's adapters are initialised from ``torch.manual_seed(seed)``.

**Loss.** The held-out loss is ``||f(x) - teacher(x)||^2 / ||base(x) - teacher(x)||^2`` summed over
the held-out inputs: 1 at step 0 (LoRA's ``B = 0``), 0 at the teacher. Training minimises the mean
squared error to the teacher's outputs with Adam at a constant learning rate.

**Methods.** ``peft-lora``: the ``peft`` library's LoRA (``LoraConfig`` + ``inject_adapter_in_model``,
alpha = rank), the baseline. ResLoRA (``add_reslora``): ``is``; ``bs`` and ``ms`` with ``pre_num`` 1
and 3 (``-m3``); each with the constant shortcut scale and with the ``cosine`` schedule of
:mod:`reslora_diffusers.core.schedule` (``-cosine``: full shortcuts for the first half, decayed
to 0 at the last step). ``is`` has no ``pre_num`` (it always reads one predecessor).

**Protocol.** Per cell (architecture, width, depth), each method's learning rate is the one of
``--lrs`` whose trained model ends with the lowest mean log held-out loss over ``--tune_seeds``
(separate from the evaluation seeds); where an end of the grid wins, the next rate beyond it (x2
or /2) is tuned too, up to ``--lr_extensions`` times. Then each method runs ``--seeds`` at its
rate. Every
``steps / --evals`` steps a run measures the held-out loss of the trained model (shortcuts in
place) and of its exported plain LoRA (``merge_to_lora``, the calibrated merge fitted on 4
training batches, loaded in place of the shortcuts with ``merged_view``); for PEFT LoRA the two
are the same. Order: the tuning of the residual width-64 cells of depth 4, 16 and 64, then their
evaluation seeds, then every other cell (tuning, then evaluation).

**Report** (``depth_study.md``, ``depth_study_w<width>.png``, from whatever has finished): per cell
and method, for the trained model and the export, the median over seeds of the paired ratio to
PEFT LoRA's run of the same seed, with the 95 % bootstrap interval of the median: the held-out
loss at 25, 50 and 100 % of the steps, and the steps needed to reach PEFT LoRA's final held-out loss
(first crossing, interpolated linearly in log loss between measurements; a run that never reaches
it counts at the last step, a lower bound, and the table counts such runs). A ratio below 1 is a
gain for ResLoRA; a gain holds where the whole interval is below 1.

**Resuming.** Every finished run is one small JSON in ``--results_dir``
(``<arch>-w<width>-d<depth>/<tune|eval>/<method>-lr<lr>-seed<seed>.json``) and is never run again;
``--max_minutes`` stops starting runs after that long, so the study runs in parts on any machine.
A result file made with other settings (steps, batch, sizes, ranks) is refused by name.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import bootstrap_interval  # noqa: E402

from reslora_diffusers import (  # noqa: E402
    ResLoRAConfig,
    add_reslora,
    merge_to_lora,
    set_shortcut_scale,
    trainable_parameters,
)
from reslora_diffusers.core.schedule import shortcut_scale_at  # noqa: E402
from reslora_diffusers.frontends.dit import DIT_ATTENTION_TARGETS, DIT_FEEDFORWARD_TARGETS  # noqa: E402
from reslora_diffusers.frontends.transformers_lm import PRESETS  # noqa: E402
from reslora_diffusers.merge import eval_mode, merged_view, relative_error  # noqa: E402
from reslora_diffusers.utils.io import atomic_path  # noqa: E402

logger = logging.getLogger("depth_study")

HEAD_DIM = 16
#: the synthetic stacks of :class:`DeepNet`
STACKS = ("residual", "plain")
#: real blocks from the libraries users fine-tune: :class:`LlamaNet`, :class:`SD3Net`
LIBRARY_ARCHS = ("llama", "sd3")
ARCHS = STACKS + LIBRARY_ARCHS
DEPTHS = (2, 4, 8, 16, 32, 64)
WIDTHS = (64, 128)
#: the depths an architecture runs unless ``--depths`` says otherwise: the library models at the
#: depth of the models users train (24 blocks: Qwen2.5-0.5B's layers; SD3-medium's DiT)
DEFAULT_DEPTHS = {**dict.fromkeys(STACKS, DEPTHS), **dict.fromkeys(LIBRARY_ARCHS, (24,))}
#: the widths likewise (the library models at the stacks' narrower width, where their runs took
#: 20-40 s of one thread at depth 24)
DEFAULT_WIDTHS = {**dict.fromkeys(STACKS, WIDTHS), **dict.fromkeys(LIBRARY_ARCHS, (64,))}
#: the adapted projections per architecture: every projection of every block (the library models:
#: the targets this project's front ends default to for them, feed-forward layers included)
TARGETS = {
    **dict.fromkeys(STACKS, ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")),
    "llama": PRESETS["llama"],
    "sd3": DIT_ATTENTION_TARGETS + DIT_FEEDFORWARD_TARGETS,
}
#: the SD3 DiT's latent side (4 channels, patches of 2: 16 image tokens beside ``--tokens`` text tokens)
SD3_LATENT = 8
#: the cells run first (after their tuning), as (arch, width, depth)
PRIORITY = tuple(("residual", 64, d) for d in (4, 16, 64))
#: the fractions of the step budget at which losses are compared
FRACTIONS = (0.25, 0.5, 1.0)
CALIBRATION_BATCHES = 4


class Method(NamedTuple):
    res_type: str | None  # None: PEFT's LoRA
    pre_num: int = 1
    schedule: str = "constant"


BASELINE = "peft-lora"
METHODS = {BASELINE: Method(None)}
for _type, _pre in (("is", 1), ("bs", 1), ("bs", 3), ("ms", 1), ("ms", 3)):
    for _schedule in ("constant", "cosine"):
        _name = _type + ("-m3" if _pre == 3 else "") + ("-cosine" if _schedule == "cosine" else "")
        METHODS[_name] = Method(_type, _pre, _schedule)
#: what the library models run unless ``--methods`` says otherwise: PEFT LoRA, the default
#: (``ms``-cosine), and what gained on the plain stacks (``ms``: fewest steps at depth 8; ``bs``:
#: lowest final loss at depth 16, exported exactly)
LIBRARY_METHODS = (BASELINE, "ms", "ms-cosine", "bs")
#: what each result file records of the study's settings; a file must match them to be used
SETTINGS = ("steps", "batch_size", "tokens", "train_size", "eval_size", "evals", "rank", "teacher_rank")
SETTINGS += ("teacher_scale",)


class Cell(NamedTuple):
    arch: str
    width: int
    depth: int

    @property
    def name(self) -> str:
        return f"{self.arch}-w{self.width}-d{self.depth}"


# ---------------------------------------------------------------------------------------------
# the network, the teacher and the data


class Attention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = max(1, width // HEAD_DIM)
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        )
        return self.o_proj(y.transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    """A pre-norm transformer block; ``residual=False`` drops its two residual connections."""

    def __init__(self, width: int, residual: bool) -> None:
        super().__init__()
        self.residual = residual
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width)
        self.fc1, self.fc2 = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn(self.ln1(x))
        x = x + a if self.residual else a
        m = self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return x + m if self.residual else m


def token_inputs(cell: Cell, n: int, tokens: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` Gaussian sequences of ``tokens`` vectors of width ``width``: a token network's inputs."""
    return {"x": torch.randn(n, tokens, cell.width, generator=gen)}


class DeepNet(nn.Module):
    """``depth`` :class:`Block` s and a final LayerNorm: ``residual`` or ``plain`` (:data:`STACKS`)."""

    inputs = staticmethod(token_inputs)

    def __init__(self, cell: Cell) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cell.width, cell.arch == "residual") for _ in range(cell.depth))
        self.ln_f = nn.LayerNorm(cell.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)


class LlamaNet(nn.Module):
    """transformers' ``LlamaModel`` (pre-norm residual blocks: RMSNorm, causal rotary attention,
    SwiGLU MLP ``4 x width`` wide; a final RMSNorm), fed Gaussian embeddings; its hidden states out."""

    inputs = staticmethod(token_inputs)

    def __init__(self, cell: Cell) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        heads = cell.width // HEAD_DIM
        config = LlamaConfig(
            vocab_size=8,  # the embedding table is not used: inputs are embeddings
            hidden_size=cell.width,
            intermediate_size=4 * cell.width,
            num_hidden_layers=cell.depth,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=64,
        )
        self.model = LlamaModel(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=x).last_hidden_state


class SD3Net(nn.Module):
    """diffusers' ``SD3Transformer2DModel`` (MMDiT joint blocks with adaLN modulation from the
    timestep and pooled text; residual) at width ``width``; its velocity prediction out."""

    def __init__(self, cell: Cell) -> None:
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.model = SD3Transformer2DModel(
            sample_size=SD3_LATENT,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=cell.depth,
            attention_head_dim=HEAD_DIM,
            num_attention_heads=cell.width // HEAD_DIM,
            joint_attention_dim=cell.width,
            caption_projection_dim=cell.width,
            pooled_projection_dim=cell.width,
            pos_embed_max_size=SD3_LATENT,
        )

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> torch.Tensor:
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            pooled_projections=pooled_projections,
            timestep=timestep,
            return_dict=False,
        )[0]

    @staticmethod
    def inputs(cell: Cell, n: int, tokens: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """``n`` Gaussian latents, text states and pooled text, and timesteps uniform in [0, 1000)."""
        return {
            "hidden_states": torch.randn(n, 4, SD3_LATENT, SD3_LATENT, generator=gen),
            "encoder_hidden_states": torch.randn(n, tokens, cell.width, generator=gen),
            "pooled_projections": torch.randn(n, cell.width, generator=gen),
            "timestep": 1000 * torch.rand(n, generator=gen),
        }


#: the network class of each architecture; its ``forward`` takes the keys its ``inputs`` draws
NETWORKS = {**dict.fromkeys(STACKS, DeepNet), "llama": LlamaNet, "sd3": SD3Net}


def take(inputs: dict[str, torch.Tensor], index) -> dict[str, torch.Tensor]:
    """The samples ``index`` (an index tensor or a slice) of every input."""
    return {k: v[index] for k, v in inputs.items()}


def target_layers(model: nn.Module, arch: str) -> Iterator[nn.Linear]:
    """The adapted projections (:data:`TARGETS` of ``arch``) of every block, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS[arch]):
            yield module


class Task(NamedTuple):
    base: nn.Module
    targets: tuple[str, ...]
    train_x: dict[str, torch.Tensor]  # the network's inputs by name (its class's ``inputs``)
    train_y: torch.Tensor
    eval_x: dict[str, torch.Tensor]
    eval_y: torch.Tensor
    #: ``||base(x) - teacher(x)||^2`` on the held-out inputs: the loss's unit
    eval_norm: float
    order: torch.Tensor  # the training-sample index of every step's batch, (steps, batch)


@functools.lru_cache(maxsize=1)  # the methods of one seed run one after another
def make_task(cell: Cell, seed: int, settings: tuple) -> Task:
    """The frozen base, the teacher's outputs on the training and held-out inputs, and the data
    order of ``seed`` (``settings``: :data:`SETTINGS` values, in order)."""
    s = dict(zip(SETTINGS, settings))
    gen = torch.Generator().manual_seed(seed)
    network = NETWORKS[cell.arch]
    # the parameters the loop below does not re-draw (SD3's patch-embedding convolution) come from
    # torch's global generator, whose start differs from process to process: fix it per seed
    torch.manual_seed(seed)
    base = network(cell).requires_grad_(False)
    with torch.no_grad():
        for module in base.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(
                    torch.randn(module.weight.shape, generator=gen) / math.sqrt(module.in_features)
                )
                if module.bias is not None:
                    module.bias.zero_()
        teacher = copy.deepcopy(base)
        r = s["teacher_rank"]
        for layer in target_layers(teacher, cell.arch):
            a = torch.randn(r, layer.in_features, generator=gen) / math.sqrt(layer.in_features)
            b = torch.randn(layer.out_features, r, generator=gen) * (s["teacher_scale"] / math.sqrt(r))
            layer.weight.add_(b @ a)
        train_x = network.inputs(cell, s["train_size"], s["tokens"], gen)
        eval_x = network.inputs(cell, s["eval_size"], s["tokens"], gen)
        train_y, eval_y = teacher(**train_x), teacher(**eval_x)
        eval_norm = float((base(**eval_x) - eval_y).square().sum())
    epochs = -(-s["steps"] * s["batch_size"] // s["train_size"])
    order = torch.cat([torch.randperm(s["train_size"], generator=gen) for _ in range(epochs)])
    order = order[: s["steps"] * s["batch_size"]].view(s["steps"], s["batch_size"])
    return Task(base, TARGETS[cell.arch], train_x, train_y, eval_x, eval_y, eval_norm, order)


def student(task: Task, method: Method, rank: int, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    """A copy of the base with ``method``'s adapters (initialised from ``seed``) and their parameters."""
    model = copy.deepcopy(task.base)
    torch.manual_seed(seed)
    if method.res_type is None:
        from peft import LoraConfig, inject_adapter_in_model

        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(task.targets)), model)
        return model, [p for p in model.parameters() if p.requires_grad]
    config = ResLoRAConfig(
        rank=rank, res_type=method.res_type, pre_num=method.pre_num, target_modules=list(task.targets)
    )
    add_reslora(model, config)
    return model, trainable_parameters(model)


def held_out_loss(model: nn.Module, task: Task) -> float:
    """``||model(x) - teacher(x)||^2 / ||base(x) - teacher(x)||^2`` on the held-out inputs (eval mode)."""
    with eval_mode(model):
        return float((model(**task.eval_x) - task.eval_y).square().sum()) / task.eval_norm


def exported_loss(model: nn.Module, task: Task, batch_size: int) -> tuple[float, dict]:
    """The held-out loss of the plain LoRA that ``merge_to_lora`` (calibrated merge on the first
    :data:`CALIBRATION_BATCHES` training batches) exports from ``model``, and that LoRA."""
    calibration = [
        take(task.train_x, slice(i * batch_size, (i + 1) * batch_size)) for i in range(CALIBRATION_BATCHES)
    ]
    merged = merge_to_lora(model, "calibrated", calibration=calibration)
    with merged_view(model, merged):
        return held_out_loss(model, task), merged


# ---------------------------------------------------------------------------------------------
# one run


def settings_of(args: argparse.Namespace) -> tuple:
    return tuple(getattr(args, k) for k in SETTINGS)


def run_path(results_dir: Path, cell: Cell, phase: str, method: str, lr: float, seed: int) -> Path:
    return results_dir / cell.name / phase / f"{method}-lr{lr:g}-seed{seed}.json"


def eval_steps(steps: int, evals: int) -> list[int]:
    """The steps after which a run measures its held-out losses, 0 (before training) included."""
    return [k * steps // evals for k in range(evals + 1)]


def train_run(
    cell: Cell, method_name: str, lr: float, seed: int, args: argparse.Namespace, export: bool
) -> dict:
    """Train one method once; ``{"steps", "trained", "exported" (with ``export``), "merge_error",
    "seconds", ...}``: held-out losses after each of :func:`eval_steps` (``inf`` from the first
    non-finite training loss on)."""
    start = time.time()
    task = make_task(cell, seed, settings_of(args))
    method = METHODS[method_name]
    model, params = student(task, method, args.rank, seed)
    optimizer = torch.optim.Adam(params, lr=lr)
    measured = eval_steps(args.steps, args.evals)
    trained, exported = [], []
    merge_error = None
    diverged = False
    for step in range(args.steps + 1):
        if step in measured:
            if diverged:
                trained.append(math.inf)
                exported.append(math.inf)
            else:
                trained.append(held_out_loss(model, task))
                if export and method.res_type is not None:
                    loss, merged = exported_loss(model, task, args.batch_size)
                    exported.append(loss)
                    if step == args.steps:
                        merge_error = relative_merge_error(model, merged, task)
                else:
                    exported.append(trained[-1])
        if step == args.steps or diverged:
            continue
        if method.res_type is not None and method.schedule != "constant":
            set_shortcut_scale(model, shortcut_scale_at(step + 1, args.steps, method.schedule))
        batch = task.order[step]
        loss = F.mse_loss(model(**take(task.train_x, batch)), task.train_y[batch])
        if not torch.isfinite(loss):
            diverged = True
            continue
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    result = {
        "cell": cell._asdict(),
        "method": method_name,
        "lr": lr,
        "seed": seed,
        "settings": dict(zip(SETTINGS, settings_of(args))),
        "steps": measured,
        "trained": [_round(v) for v in trained],
        "seconds": round(time.time() - start, 2),
    }
    if export:
        result["exported"] = [_round(v) for v in exported]
        result["merge_error"] = None if merge_error is None else _round(merge_error)
    return result


def relative_merge_error(model: nn.Module, merged: dict, task: Task) -> float:
    """``||y_export - y_trained|| / ||y_trained||`` on the held-out inputs."""
    return relative_error(model, merged, [task.eval_x])


def _round(value: float) -> float:
    return float(f"{value:.5g}") if math.isfinite(value) else math.inf


# ---------------------------------------------------------------------------------------------
# the plan: what to run, in which order, and what is finished


def read_run(path: Path, args: argparse.Namespace) -> dict:
    """A finished run's result, refused by name when it was made with other settings."""
    result = json.loads(path.read_text())
    wanted = dict(zip(SETTINGS, settings_of(args)))
    made = result.get("settings", {})
    if made != wanted:
        diff = [k for k in SETTINGS if made.get(k) != wanted[k]]
        raise SystemExit(
            f"{path}: made with other settings ({', '.join(f'{k} {made.get(k)}' for k in diff)}; this study: "
            f"{', '.join(f'{k} {wanted[k]}' for k in diff)}); pass another --results_dir"
        )
    return result


def finished(path: Path, args: argparse.Namespace) -> dict | None:
    return read_run(path, args) if path.is_file() else None


def cells_in_order(args: argparse.Namespace) -> tuple[list[Cell], list[Cell]]:
    """``(priority, rest)``: the cells of ``--archs x --widths x --depths``, the :data:`PRIORITY`
    ones first, the rest by width, architecture and depth."""
    cells = [
        Cell(a, w, d)
        for w in sorted(set(args.widths or WIDTHS))
        for a in args.archs
        if w in (args.widths or DEFAULT_WIDTHS[a])
        for d in args.depths or DEFAULT_DEPTHS[a]
    ]
    priority = [c for c in map(Cell._make, PRIORITY) if c in cells]
    return priority, [c for c in cells if c not in priority]


class Tuning(NamedTuple):
    best: float | None  # the chosen rate; None until the tuning is finished
    next: float | None  # the rate whose tuning runs are still missing; None when finished
    edge: bool  # the best rate is the lowest or highest tried, even after every extension


def tuning(cell: Cell, method: str, args: argparse.Namespace) -> Tuning:
    """The learning rate of ``method`` in ``cell``: of the rates tried, the one whose trained model
    ends with the lowest mean log held-out loss over ``--tune_seeds``. The rates tried are
    ``--lrs``, extended by a factor of 2 beyond whichever end wins, up to ``--lr_extensions`` times
    at each end, so that a method whose best rate lies outside the grid is not held back by it."""
    rates = sorted(args.lrs)
    extended = {"low": 0, "high": 0}
    while True:
        scores = {}
        for lr in rates:
            runs = [
                finished(run_path(args.results_dir, cell, "tune", method, lr, s), args)
                for s in args.tune_seeds
            ]
            if None in runs:
                return Tuning(None, lr, False)
            scores[lr] = float(np.mean([math.log(max(r["trained"][-1], 1e-30)) for r in runs]))
        best = min(rates, key=lambda lr: (scores[lr], lr))
        if best == rates[0] and extended["low"] < args.lr_extensions:
            extended["low"] += 1
            rates.insert(0, best / 2)
        elif best == rates[-1] and extended["high"] < args.lr_extensions:
            extended["high"] += 1
            rates.append(best * 2)
        else:
            return Tuning(best, None, best in (rates[0], rates[-1]))


def methods_of(cell: Cell, args: argparse.Namespace) -> list[str]:
    """The methods run in ``cell``: ``--methods``, else all (stacks) or :data:`LIBRARY_METHODS`."""
    return args.methods or list(METHODS if cell.arch in STACKS else LIBRARY_METHODS)


def best_lrs(cell: Cell, args: argparse.Namespace) -> dict[str, float] | None:
    """Per method, its :func:`tuning` rate; None until every method's tuning is finished."""
    chosen = {method: tuning(cell, method, args).best for method in methods_of(cell, args)}
    return None if None in chosen.values() else chosen


def planned_runs(args: argparse.Namespace) -> Iterator[tuple[Cell, str, str, float, int]]:
    """``(cell, phase, method, lr, seed)`` in the study's order. A cell's tuning runs the grid
    first, then each method's extensions one rate at a time (each planned once the rates before it
    are finished: :func:`run_study` runs every yielded run before asking for the next), and its
    evaluation runs are planned once the tuning is finished."""

    def tune(cell):
        for seed in args.tune_seeds:  # seed by seed: one task per seed
            for method in methods_of(cell, args):
                for lr in args.lrs:
                    yield cell, "tune", method, lr, seed
        for method in methods_of(cell, args):
            while (lr := tuning(cell, method, args).next) is not None:
                for seed in args.tune_seeds:
                    yield cell, "tune", method, lr, seed

    def evaluate(cell):
        lrs = best_lrs(cell, args)
        if lrs is None:
            return
        for seed in args.seeds:
            for method in methods_of(cell, args):
                yield cell, "eval", method, lrs[method], seed

    priority, rest = cells_in_order(args)
    for cell in priority:
        yield from tune(cell)
    for cell in priority:
        yield from evaluate(cell)
    for cell in rest:
        yield from tune(cell)
        yield from evaluate(cell)


def run_study(args: argparse.Namespace) -> int:
    """Run every planned run not yet finished (until ``--max_minutes``); the number run."""
    start, done = time.time(), 0
    for cell, phase, method, lr, seed in planned_runs(args):
        path = run_path(args.results_dir, cell, phase, method, lr, seed)
        if finished(path, args) is not None:
            continue
        if args.max_minutes is not None and time.time() - start > 60 * args.max_minutes:
            logger.info(
                "--max_minutes %s reached: stopping; run the same command to continue", args.max_minutes
            )
            break
        result = train_run(cell, method, lr, seed, args, export=phase == "eval")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result, separators=(",", ":")))
        done += 1
        logger.info(
            "%s %s %s lr %g seed %d: final loss %.4g (%.1f s)",
            cell.name,
            phase,
            method,
            lr,
            seed,
            result["trained"][-1],
            result["seconds"],
        )
    return done


# ---------------------------------------------------------------------------------------------
# the report maths


def steps_to_reach(steps: list[int], losses: list[float], target: float) -> float | None:
    """The first step at which ``losses`` (measured after ``steps``) reaches ``target``: between
    the last measurement above it (``s0``, ``l0``) and the first at or below it (``s1``, ``l1``),
    ``s0 + (s1 - s0) * (log l0 - log target) / (log l0 - log l1)``; None when none reaches it."""
    for i, loss in enumerate(losses):
        if loss <= target:
            if i == 0:
                return float(steps[0])
            s0, s1, l0 = steps[i - 1], steps[i], losses[i - 1]
            if loss <= 0:
                return float(s1)
            return s0 + (s1 - s0) * (math.log(l0) - math.log(target)) / (math.log(l0) - math.log(loss))
    return None


def loss_at(run: dict, kind: str, fraction: float) -> float:
    """The held-out loss of ``kind`` (``trained`` or ``exported``) after ``fraction`` of the steps."""
    return run[kind][run["steps"].index(round(fraction * run["steps"][-1]))]


class Ratios(NamedTuple):
    values: list[float]  # one paired ratio per seed
    censored: int  # runs that never reached the target (counted at the last step)


def paired_ratios(
    runs: dict[int, dict], baseline: dict[int, dict], kind: str, measure: float | str
) -> Ratios:
    """Per seed that both have, ``run / baseline run of the same seed`` of one measure of ``kind``:
    ``measure`` a fraction of :data:`FRACTIONS` (the held-out loss there) or ``"steps"`` (the steps
    to reach the baseline's final loss, :func:`steps_to_reach`, over the baseline's own). The
    baseline's measure is its trained one (PEFT LoRA's export is the trained model)."""
    values, censored = [], 0
    for seed in sorted(set(runs) & set(baseline)):
        run, base = runs[seed], baseline[seed]
        if measure == "steps":
            target = base["trained"][-1]
            own = steps_to_reach(base["steps"], base["trained"], target)
            reached = steps_to_reach(run["steps"], run[kind], target)
            if reached is None:
                censored += 1
                reached = float(run["steps"][-1])
            values.append(reached / own if own > 0 else math.nan)
        else:
            values.append(loss_at(run, kind, measure) / loss_at(base, "trained", measure))
    return Ratios(values, censored)


def median_interval(values: list[float]) -> tuple[float, float, float] | None:
    """``(median, low, high)``: the median and its 95 % bootstrap interval (None under 2 values;
    a diverged run's infinite ratio counts as 1e9, which the median ignores unless it is the middle)."""
    finite = [min(v, 1e9) for v in values if not math.isnan(v)]
    if len(finite) < 2:
        return None
    return bootstrap_interval(finite, statistic=np.median)


MEASURES = (*FRACTIONS, "steps")


def cell_table(cell: Cell, args: argparse.Namespace) -> dict | None:
    """``{"lrs", "edge", "rows": {method: {"seeds", kind: {measure: (median, low, high) | None,
    "censored": n}}}, "baseline": {...}}`` of the finished evaluation runs of ``cell``; None before
    its tuning is finished."""
    lrs = best_lrs(cell, args)
    if lrs is None:
        return None
    runs = {}
    for method in methods_of(cell, args):
        by_seed = {}
        for seed in args.seeds:
            run = finished(run_path(args.results_dir, cell, "eval", method, lrs[method], seed), args)
            if run is not None:
                by_seed[seed] = run
        runs[method] = by_seed
    base = runs.get(BASELINE, {})
    rows = {}
    for method, by_seed in runs.items():
        paired = sorted(set(by_seed) & set(base))
        row = rows[method] = {"seeds": sorted(by_seed), "paired": paired}
        for kind in ("trained", "exported"):
            cells = row[kind] = {}
            for measure in MEASURES:
                ratios = paired_ratios(by_seed, base, kind, measure)
                cells[str(measure)] = median_interval(ratios.values)
                if measure == "steps":
                    cells["censored"] = ratios.censored
        errors = [r["merge_error"] for r in by_seed.values() if r.get("merge_error") is not None]
        row["merge_error"] = float(np.median(errors)) if errors else None
    absolute = {str(f): median_interval([loss_at(r, "trained", f) for r in base.values()]) for f in FRACTIONS}
    edge = {m: tuning(cell, m, args).edge for m in lrs}
    return {"lrs": lrs, "edge": edge, "rows": rows, "baseline_loss": absolute}


#: the fewest paired seeds whose interval may call a gain or a loss
MIN_SEEDS = 5


def verdict(value: tuple[float, float, float] | None, seeds: int) -> str | None:
    """``"gain"`` where the interval of a ratio lies wholly below 1, ``"loss"`` where wholly above,
    from at least :data:`MIN_SEEDS` paired seeds; None otherwise."""
    if value is None or seeds < MIN_SEEDS:
        return None
    return "gain" if value[2] < 1 else "loss" if value[1] > 1 else None


def verdicts(tables: dict[Cell, dict]) -> dict[str, list[str]]:
    """``{"gain": [...], "loss": [...]}``: ``cell method kind measure ratio`` of every such interval."""
    found = {"gain": [], "loss": []}
    for cell, table in tables.items():
        for method, row in table["rows"].items():
            if method == BASELINE:
                continue
            for kind in ("trained", "exported"):
                for measure in MEASURES:
                    value = row[kind][str(measure)]
                    side = verdict(value, len(row["paired"]))
                    if side is not None:
                        found[side].append(
                            f"{cell.name} {method} {kind}: {_measure_name(measure)} {_fmt(value)}"
                        )
    return found


def _measure_name(measure) -> str:
    return "steps to PEFT LoRA's final loss" if measure == "steps" else f"loss at {int(100 * measure)} %"


def _fmt(value: tuple[float, float, float] | None) -> str:
    if value is None:
        return "n/a"
    mean, low, high = value
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


# ---------------------------------------------------------------------------------------------
# tables and plot


def cells_begun(results_dir: Path) -> list[Cell]:
    """Every cell with a folder of runs in ``results_dir``, by :data:`ARCHS` order, width and depth:
    the report covers them all, whichever ``--archs``/``--widths``/``--depths`` ran this time."""
    cells = []
    for path in results_dir.iterdir() if results_dir.is_dir() else ():
        match = re.fullmatch(r"([a-z0-9]+)-w(\d+)-d(\d+)", path.name)
        if match and match[1] in ARCHS and path.is_dir():
            cells.append(Cell(match[1], int(match[2]), int(match[3])))
    return sorted(cells, key=lambda c: (ARCHS.index(c.arch), c.width, c.depth))


def status_lines(args: argparse.Namespace) -> list[str]:
    """Per cell begun or planned by this command: tuning runs finished (and whether the tuning
    is), evaluation runs finished out of planned."""
    lines = []
    priority, rest = cells_in_order(args)
    begun = cells_begun(args.results_dir)
    for cell in begun + [c for c in priority + rest if c not in begun]:
        tuned = len(list((args.results_dir / cell.name / "tune").glob("*.json")))
        lrs = best_lrs(cell, args)
        evaluated = 0
        if lrs is not None:
            evaluated = sum(
                run_path(args.results_dir, cell, "eval", m, lrs[m], s).is_file()
                for m in methods_of(cell, args)
                for s in args.seeds
            )
        total = len(methods_of(cell, args)) * len(args.seeds)
        lines.append(f"| {cell.name} | {tuned} ({'done' if lrs else 'not done'}) | {evaluated}/{total} |")
    return ["| cell | tuning runs | evaluation runs |", "|---|---|---|", *lines]


def markdown(tables: dict[Cell, dict], args: argparse.Namespace) -> str:
    found = verdicts(tables)
    seconds = sum(json.loads(p.read_text())["seconds"] for p in args.results_dir.glob("*/*/*.json"))
    head = [
        "# Depth study (`benchmarks/depth_study.py`)\n",
        f"Settings: {', '.join(f'{k} {v}' for k, v in zip(SETTINGS, settings_of(args)))}; learning rates "
        f"{', '.join(f'{lr:g}' for lr in args.lrs)} tuned on seeds {', '.join(map(str, args.tune_seeds))}; "
        f"evaluation seeds {', '.join(map(str, args.seeds))}. Finished runs took {seconds / 3600:.2f} h "
        "of one CPU thread in all.\n",
        "Each ratio: median over seeds of (ResLoRA run) / (PEFT LoRA run of the same seed) "
        "[95 % bootstrap interval of the median]; below 1 is a gain for ResLoRA. Loss: held-out loss "
        "relative to the base's (1 at step 0, 0 at the teacher) at 25, 50 and 100 % of the steps; "
        "steps: steps to reach PEFT LoRA's final loss over PEFT LoRA's own (a run that never reaches "
        "it counts at the last step; `(k n.r.)`: k such runs). **Bold**: the interval is wholly "
        f"below 1, *italic*: wholly above (from at least {MIN_SEEDS} paired seeds). Trained: the model with its shortcuts; exported: the plain LoRA of `merge_to_lora` "
        "(calibrated merge). The `peft-lora` rows give its own loss (not a ratio). lr: the tuned rate; `(edge)`: the "
        "lowest or highest rate tried, even after the grid's extensions.\n",
        "## Status\n",
        *status_lines(args),
        "",
        "## Verdict\n",
        f"Intervals wholly below 1 (ResLoRA better than PEFT LoRA), from at least {MIN_SEEDS} paired seeds: "
        f"{len(found['gain'])}." + ("" if found["gain"] else " None."),
        *[f"- {g}" for g in found["gain"]],
        "",
        f"Intervals wholly above 1 (ResLoRA worse): {len(found['loss'])}.",
        "",
    ]
    body = []
    for kind in ("trained", "exported"):
        for arch in ARCHS:
            for width in sorted({c.width for c in tables}):
                cells = [c for c in tables if c.arch == arch and c.width == width]
                if not cells:
                    continue
                body += [
                    f"## {arch}, width {width}, {kind}\n",
                    "| depth | method | lr | seeds | loss @ 25 % | loss @ 50 % | loss @ 100 % | steps to PEFT LoRA's final loss |",
                    "|---|---|---|---|---|---|---|---|",
                ]
                for cell in sorted(cells, key=lambda c: c.depth):
                    body += table_rows(cell, tables[cell], kind)
                body.append("")
    return "\n".join(head + body) + "\n"


def table_rows(cell: Cell, table: dict, kind: str) -> list[str]:
    lines = []
    for method, row in table["rows"].items():
        if not row["seeds"]:
            continue
        lr = f"{table['lrs'][method]:g}" + (" (edge)" if table["edge"][method] else "")
        seeds = len(row["paired"])
        if method == BASELINE:
            cells = [_fmt(table["baseline_loss"][str(f)]) for f in FRACTIONS] + ["1"]
        else:
            values = row[kind]
            cells = [_marked(values[str(m)], seeds) for m in MEASURES]
            if values["censored"]:
                cells[-1] += f" ({values['censored']} n.r.)"
        lines.append(f"| {cell.depth} | {method} | {lr} | {seeds} | " + " | ".join(cells) + " |")
    return lines


def _marked(value, seeds: int) -> str:
    """The ratio, bold where it is a gain and italic where a loss (:func:`verdict`)."""
    text = _fmt(value)
    side = verdict(value, seeds)
    return f"**{text}**" if side == "gain" else f"*{text}*" if side == "loss" else text


def plot(tables: dict[Cell, dict], args: argparse.Namespace, width: int, path: Path) -> None:
    """Rows: stack architecture x (steps ratio, final-loss ratio); columns: shortcut type; one line per
    variant (solid: trained, dashed: exported), median with its 95 % interval against depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullLocator

    methods = args.methods or list(METHODS)
    types = sorted(
        {METHODS[m].res_type for m in methods if METHODS[m].res_type}, key=["is", "bs", "ms"].index
    )
    archs = [a for a in STACKS if any(c.arch == a and c.width == width for c in tables)]
    rows = [(a, m) for a in archs for m in ("steps", 1.0)]
    fig, axes = plt.subplots(
        len(rows), len(types), figsize=(4.2 * len(types), 3.2 * len(rows)), squeeze=False
    )
    for (arch, measure), ax_row in zip(rows, axes):
        cells = sorted((c for c in tables if c.arch == arch and c.width == width), key=lambda c: c.depth)
        for res_type, ax in zip(types, ax_row):
            for i, method in enumerate(m for m in methods if METHODS[m].res_type == res_type):
                for kind, style in (("trained", "-"), ("exported", "--")):
                    points = [(c.depth, tables[c]["rows"][method][kind][str(measure)]) for c in cells]
                    points = [(d, v) for d, v in points if v is not None]
                    if not points:
                        continue
                    depths = np.array([d for d, _ in points]) * (1 + 0.03 * i)  # spread the bars
                    med = np.array([v[0] for _, v in points])
                    err = np.array([[v[0] - v[1] for _, v in points], [v[2] - v[0] for _, v in points]])
                    ax.errorbar(
                        depths,
                        med,
                        yerr=err,
                        fmt=style + "o",
                        ms=3,
                        capsize=2,
                        color=f"C{i}",
                        label=method if kind == "trained" else None,
                    )
            ax.axhline(1.0, color="k", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks([c.depth for c in cells], [str(c.depth) for c in cells])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
            what = "steps to PEFT LoRA's final loss" if measure == "steps" else "final loss"
            ax.set(
                xlabel="depth (blocks)",
                ylabel=f"{what} / PEFT LoRA's",
                title=f"{res_type}, {arch}, width {width}",
            )
            ax.legend(fontsize=7)
    fig.suptitle(
        "ResLoRA / PEFT LoRA, paired by seed: median and 95 % interval (below 1: ResLoRA better; "
        "solid trained, dashed exported)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def report(args: argparse.Namespace) -> str:
    """Write ``depth_study.md``, ``depth_study.json`` and one plot per width of the finished runs."""
    tables = {c: t for c in cells_begun(args.results_dir) if (t := cell_table(c, args)) is not None}
    text = markdown(tables, args)
    with atomic_path(args.results_dir / "depth_study.md") as tmp:
        tmp.write_text(text)
    with atomic_path(args.results_dir / "depth_study.json") as tmp:
        tmp.write_text(json.dumps({c.name: t for c, t in tables.items()}, indent=1))
    for width in sorted({c.width for c in tables if c.arch in STACKS}):
        if any(c.width == width and t["rows"][BASELINE]["seeds"] for c, t in tables.items()):
            plot(tables, args, width, args.results_dir / f"depth_study_w{width}.png")
    return text


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    p.add_argument(
        "--widths", nargs="+", type=int, help="default: 64 and 128 for the stacks, 64 for the library models"
    )
    p.add_argument(
        "--depths", nargs="+", type=int, help="default: 2-64 for the stacks, 24 for the library models"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        help="default: all for the stacks, " + " ".join(LIBRARY_METHODS) + " for the library models",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=list(range(10)), help="evaluation seeds")
    p.add_argument(
        "--tune_seeds", nargs="+", type=int, default=[1000, 1001], help="learning-rate tuning seeds"
    )
    p.add_argument("--lrs", nargs="+", type=float, default=[1.25e-3, 2.5e-3, 5e-3, 1e-2])
    p.add_argument(
        "--lr_extensions",
        type=int,
        default=2,
        help="tune at up to this many further rates (each x2 or /2) beyond a grid end that wins",
    )
    p.add_argument("--steps", type=int, default=200, help="the step budget of every run")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--tokens", type=int, default=8, help="tokens per input sequence")
    p.add_argument("--train_size", type=int, default=1024, help="training sequences per seed")
    p.add_argument("--eval_size", type=int, default=128, help="held-out sequences per seed")
    p.add_argument("--evals", type=int, default=8, help="held-out measurements per run (a multiple of 4)")
    p.add_argument("--rank", type=int, default=8, help="the students' adapter rank")
    p.add_argument("--teacher_rank", type=int, default=4)
    p.add_argument("--teacher_scale", type=float, default=0.2, help="g: ||dW x|| ~ g ||W x|| in the teacher")
    p.add_argument("--results_dir", type=Path, default=ROOT / "benchmarks" / "results" / "depth_study")
    p.add_argument("--max_minutes", type=float, default=None, help="start no run after this many minutes")
    p.add_argument("--report_only", action="store_true", help="run nothing: report the finished runs")
    args = p.parse_args(argv)
    if args.methods and BASELINE not in args.methods:
        p.error(f"--methods must include the baseline {BASELINE}")
    if args.evals % 4 or not 0 < args.evals <= args.steps or args.steps % args.evals:
        p.error(f"--evals {args.evals} must be a multiple of 4 that divides --steps {args.steps}")
    if args.widths and (min(args.widths) < HEAD_DIM or any(w % HEAD_DIM for w in args.widths)):
        p.error(f"--widths must be multiples of {HEAD_DIM} (the head size)")
    if args.lr_extensions < 0:
        p.error("--lr_extensions must be >= 0")
    if args.rank < 1 or args.teacher_rank < 1 or args.batch_size > args.train_size:
        p.error("--rank and --teacher_rank must be >= 1 and --batch_size at most --train_size")
    shared = sorted(set(args.seeds) & set(args.tune_seeds))
    if shared:
        p.error(f"--seeds and --tune_seeds share {shared}: tune on separate seeds")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if not args.report_only:
        run_study(args)
    text = report(args)
    print(text)
    return text


if __name__ == "__main__":
    main()

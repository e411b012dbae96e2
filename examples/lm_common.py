"""What the NLU and NLG examples (the scripts beside this file) share: the method flags, the
``TrainingArguments`` they map to, training one method with the ``Trainer``, model-ready batches
for the merge (calibration and held-out output error), exporting and scoring the PEFT adapters,
and the results table."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from reslora_diffusers.core import SCHEDULES, ResLoRAConfig, get_shortcut, res_types
from reslora_diffusers.merge import DEFAULT_DISTILL_STEPS, MergedLoRA, compare_merges
from reslora_diffusers.training.flags import add_reslora_arguments, reslora_config, type_texts


def load_raw_dataset(name: str, config_name: str | None = None):
    """A local CSV/JSON(L) file (by its suffix) or a hub dataset, as ``datasets.load_dataset`` reads it."""
    from datasets import load_dataset

    suffix = Path(name).suffix
    if suffix in (".csv", ".json", ".jsonl"):
        return load_dataset("csv" if suffix == ".csv" else "json", data_files=name)
    return load_dataset(name, config_name)


def add_method_arguments(
    parser: argparse.ArgumentParser,
    *,
    learning_rate: float,
    max_train_steps: int,
    lr_scheduler: str = "linear",
) -> None:
    """LoRA/ResLoRA and training flags: the ResLoRA flags are the training script's (one per
    ``ResLoRAConfig`` field), ``--res_type`` and ``--merge`` taking several values here."""
    g = parser.add_argument_group("LoRA / ResLoRA")
    add_reslora_arguments(
        g,
        defaults={"rank": 8, "lora_alpha": 16.0, "res_type": list(res_types()), "merge": ["calibrated"]},
        several=("res_type", "merge"),
        helps={
            "res_type": f"methods to train and compare on the same base ({type_texts()['all_types']}; "
            "'none' is plain LoRA)",
            "merge": f"how the {type_texts()['approximate_types']} shortcuts are merged away for the PEFT "
            f"export ({type_texts()['exact_types']}: exactly); the first writes <output_dir>/<method>/"
            "peft_adapter, each further one peft_adapter_<merge>",
        },
    )
    g.add_argument(
        "--distill_steps",
        type=int,
        default=DEFAULT_DISTILL_STEPS,
        help="--merge distill: Adam steps fitting the merged LoRA to the trained model's logits",
    )
    g.add_argument(
        "--shortcut_schedule",
        default="constant",
        choices=SCHEDULES,
        help="shortcut scale: constant 1, or 1 until --shortcut_decay_start then down to 0 at the last step",
    )
    g.add_argument(
        "--shortcut_decay_start",
        type=float,
        default=None,
        help="fraction of the training steps where a linear/cosine schedule starts (default 0.5)",
    )
    g.add_argument(
        "--compare_merges",
        action="store_true",
        help=f"also print the error of every {type_texts()['approximate_types']} merge method",
    )
    t = parser.add_argument_group("training")
    t.add_argument("--learning_rate", type=float, default=learning_rate)
    t.add_argument("--lr_scheduler", default=lr_scheduler, help="a transformers scheduler type (5%% warmup)")
    t.add_argument("--num_train_epochs", type=float, default=3.0)
    t.add_argument(
        "--max_train_steps", type=int, default=max_train_steps, help="overrides --num_train_epochs; -1: off"
    )
    t.add_argument("--per_device_train_batch_size", type=int, default=32)
    t.add_argument("--gradient_checkpointing", action="store_true")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--output_dir", type=Path, default=None, help="default: outputs/<example name>")
    t.add_argument(
        "--num_threads", type=int, default=None, help="CPU threads (default: 1 for the tiny embedded model)"
    )


def method_config(args: argparse.Namespace, res_type: str) -> ResLoRAConfig:
    """The config of one of the ``--res_type`` methods, with the first ``--merge``."""
    # --compare_merges reports merge="input" too, which reads the training norm windows
    record_norms = True if args.compare_merges else args.record_norms
    return reslora_config(args, res_type=res_type, merge=args.merge[0], record_norms=record_norms)


def reslora_callback(args: argparse.Namespace):
    """The Trainer callback that saves ResLoRA checkpoints and runs ``--shortcut_schedule``."""
    from reslora_diffusers.integrations.trainer import ResLoRACallback

    return ResLoRACallback(shortcut_schedule=args.shortcut_schedule, decay_start=args.shortcut_decay_start)


def set_threads(args: argparse.Namespace, tiny_model: bool) -> None:
    """One thread for the tiny default model: its matrices are too small to split, and a
    shared CPU is not oversubscribed."""
    threads = args.num_threads or (1 if tiny_model else None)
    if threads:
        torch.set_num_threads(threads)


def training_arguments(args: argparse.Namespace, output_dir: Path, **overrides):
    """``TrainingArguments`` from the flags: no intermediate checkpoints, no logging."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        max_steps=args.max_train_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=128,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=0.05,
        weight_decay=0.0,
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=args.seed,
    )
    if args.gradient_checkpointing:
        name = "activation_checkpointing"  # transformers >= 5; older: gradient_checkpointing
        kwargs[name if name in TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"] = True
    return TrainingArguments(**{**kwargs, **overrides})


def export_adapters(
    model, args: argparse.Namespace, res_type: str, method_dir: Path, calibration: list, held_out: list
) -> tuple[dict[str, tuple[Path, MergedLoRA]], dict[str, float] | None]:
    """Write one PEFT adapter of ``model`` per ``--merge`` (with ``--distill_steps``): the first
    into ``<method_dir>/peft_adapter``, the others into ``peft_adapter_<merge>``. Returns
    ``{merge: (folder, merge result)}``, with every merge method's output error when
    ``--compare_merges`` asks for it and the type merges approximately (else None)."""
    from reslora_diffusers.export import export_peft_adapter

    errors = None
    if args.compare_merges and not get_shortcut(res_type, args.pre_num).exact_merge:
        errors = compare_merges(model, held_out, calibration=calibration)
    exports = {}
    for i, merge in enumerate(dict.fromkeys(args.merge)):  # a merge named twice exports once
        folder = method_dir / ("peft_adapter" if i == 0 else f"peft_adapter_{merge}")
        merged = export_peft_adapter(
            model,
            folder,
            merge,
            calibration=calibration,
            eval_inputs=held_out,
            distill_steps=args.distill_steps,
        )
        exports[merge] = (folder, merged)
    return exports, errors


def score_exports(
    exports: dict[str, tuple[Path, MergedLoRA]], build_base: Callable, score: Callable, metric: str
) -> dict[str, dict[str, float]]:
    """Per merge of :func:`export_adapters`: its merge error and ``metric`` = ``score(model)`` of
    its adapter loaded with ``PeftModel.from_pretrained`` onto a fresh ``build_base()``."""
    from peft import PeftModel

    scores = {}
    for merge, (folder, merged) in exports.items():
        model = PeftModel.from_pretrained(build_base(), folder)
        scores[merge] = {"merge_error": merged.report.output_error, metric: score(model)}
    return scores


def train_method(model, args: argparse.Namespace, res_type: str, out_dir: Path, train, collate) -> None:
    """Train one ``--res_type`` method with the HF ``Trainer`` (``ResLoRACallback`` writing its
    checkpoint and running ``--shortcut_schedule``) and print one line: steps, seconds, loss."""
    from transformers import PrinterCallback, Trainer

    trainer = Trainer(
        model=model,
        args=training_arguments(args, out_dir),
        train_dataset=train,
        data_collator=collate,
        callbacks=[reslora_callback(args)],
    )
    trainer.remove_callback(PrinterCallback)
    result = trainer.train()
    print(
        f"{res_type}: {result.global_step} steps in {result.metrics['train_runtime']:.0f} s, "
        f"loss {result.training_loss:.3f}"
    )


def export_and_score(
    model,
    args: argparse.Namespace,
    res_type: str,
    out_dir: Path,
    batches: tuple[list, list],
    build_base: Callable,
    score: Callable,
    metric: str,
) -> dict:
    """:func:`export_adapters` then :func:`score_exports` (``batches`` = calibration, held out):
    ``{"exports": {merge: {"merge_error": ..., "peft_<metric>": ...}}}``, with the first
    ``--merge``'s entries (the adapter in ``peft_adapter``) at the top level too."""
    calibration, held_out = batches
    exports, errors = export_adapters(model, args, res_type, out_dir, calibration, held_out)
    if errors is not None:
        print(f"{res_type}: merge errors", errors)
    scores = score_exports(exports, build_base, score, f"peft_{metric}")
    return {"exports": scores, **scores[args.merge[0]]}


def print_results(results: dict[str, dict], metric: str, footer: str) -> None:
    """One row per method and merge: the trained model's score (``results[method][metric]``),
    then its exported adapter's (``peft_<metric>``) and merge error."""
    header = metric.replace("_", " ")
    width = max(len(header), 9)
    print(f"\n{'method':10} {header:>{width}} {'merge':>10} {'PEFT export':>12} {'merge error':>12}")
    for res_type, r in results.items():
        name = "LoRA" if res_type == "none" else f"ResLoRA {res_type}"
        for merge, e in r["exports"].items():
            print(
                f"{name:10} {r[metric]:{width}.3f} {merge:>10} {e['peft_' + metric]:12.3f} "
                f"{e['merge_error']:12.2e}"
            )
    print(footer)


def model_batches(dataset, collate, batch_size: int, n_batches: int, device: torch.device) -> list[dict]:
    """The first ``n_batches`` batches of ``dataset`` as model keyword arguments (labels dropped)."""
    batches = []
    for start in range(0, min(len(dataset), batch_size * n_batches), batch_size):
        batch = collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
        batches.append({k: v.to(device) for k, v in batch.items() if k != "labels"})
    return batches

"""Sequence classification (NLU) with plain LoRA and ResLoRA on the same base model.

Each method is trained with the HF ``Trainer`` (the ResLoRA checkpoint is written by
``ResLoRACallback``), evaluated, merged into a plain LoRA, exported as a PEFT adapter, and
the adapter is loaded back with ``PeftModel.from_pretrained`` and evaluated again.

With no arguments it needs no download: a tiny RoBERTa built from a config learns a
generated sentiment set (1 or 3 clauses, majority polarity, ``not`` flips a clause)::

    python examples/nlu_classification.py
    python examples/nlu_classification.py --res_type none bs --pre_num 2
    python examples/nlu_classification.py --model_name_or_path roberta-base \\
        --dataset_name glue --dataset_config_name sst2 --text_column sentence
    python examples/nlu_classification.py --dataset_name reviews.csv   # columns: text, label
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from reslora_diffusers import add_reslora
from reslora_diffusers.data.text_tasks import sentiment_examples, tiny_roberta_config, word_tokenizer
from reslora_diffusers.training.flags import import_shortcut_modules

# lm_common.py lies beside this script: importable when it runs, and when it is loaded by path
# (tests, benchmarks/compare_lm.py)
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from lm_common import (  # noqa: E402
    add_method_arguments,
    export_and_score,
    load_raw_dataset,
    method_config,
    model_batches,
    print_results,
    set_threads,
    train_method,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import_shortcut_modules(argv)  # a plugin's shortcut type is a --res_type choice
    p = argparse.ArgumentParser(description="Sequence classification with LoRA vs ResLoRA.")
    p.add_argument("--model_name_or_path", default=None, help="default: a tiny RoBERTa built from a config")
    p.add_argument(
        "--dataset_name", default=None, help="hub dataset or local .csv/.json/.jsonl (default: generated set)"
    )
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--text_column", default="text")
    p.add_argument("--label_column", default="label")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument(
        "--modules_to_save",
        nargs="+",
        default=["classifier", "score"],
        help="modules trained in full (the new head) and saved in the adapter",
    )
    add_method_arguments(p, learning_rate=2e-3, max_train_steps=300)
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or Path("outputs/nlu_classification")
    return args


# -- data -----------------------------------------------------------------------------
def load_splits(args: argparse.Namespace) -> DatasetDict:
    """``train`` and ``eval`` splits with ``text`` and integer ``label`` columns."""
    if args.dataset_name is None:
        return DatasetDict(
            train=Dataset.from_list(sentiment_examples(2000, seed=args.seed)),
            eval=Dataset.from_list(sentiment_examples(500, seed=args.seed + 1)),
        )
    raw = load_raw_dataset(args.dataset_name, args.dataset_config_name)
    eval_split = next((s for s in ("validation", "test") if s in raw and _labelled(raw[s], args)), None)
    if eval_split is None:
        raw = raw["train"].train_test_split(test_size=0.2, seed=args.seed)
        eval_split = "test"
    splits = DatasetDict(train=raw["train"], eval=raw[eval_split])
    splits = splits.select_columns([args.text_column, args.label_column])
    splits = splits.rename_columns({args.text_column: "text", args.label_column: "label"})
    if isinstance(splits["train"][0]["label"], str):
        splits = splits.class_encode_column("label")
    return splits


def _labelled(split: Dataset, args: argparse.Namespace) -> bool:
    return args.label_column in split.column_names and min(split[args.label_column][:100]) != -1


def tokenize(splits: DatasetDict, tokenizer, args: argparse.Namespace) -> DatasetDict:
    if args.max_train_samples:
        splits["train"] = splits["train"].select(range(min(args.max_train_samples, len(splits["train"]))))
    if args.max_eval_samples:
        splits["eval"] = splits["eval"].select(range(min(args.max_eval_samples, len(splits["eval"]))))

    def encode(batch):
        enc = tokenizer(batch["text"], truncation=True, max_length=args.max_length)
        return {**enc, "labels": batch["label"]}

    return splits.map(encode, batched=True, remove_columns=["text", "label"])


# -- model ----------------------------------------------------------------------------
def build_base(args: argparse.Namespace, tokenizer, num_labels: int):
    """The same base (and the same freshly initialised head) for every method."""
    torch.manual_seed(args.seed)
    if args.model_name_or_path:
        return AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path, num_labels=num_labels
        )
    return AutoModelForSequenceClassification.from_config(tiny_roberta_config(len(tokenizer), num_labels))


def accuracy(model, dataset, collate) -> float:
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dataset), 128):
            batch = collate([dataset[i] for i in range(start, min(len(dataset), start + 128))])
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def run_method(args, res_type: str, tokenizer, data: DatasetDict, num_labels: int) -> dict:
    out_dir = args.output_dir / res_type
    model = add_reslora(build_base(args, tokenizer, num_labels), method_config(args, res_type))
    for name, module in model.named_children():
        if name in args.modules_to_save:
            module.requires_grad_(True)
    collate = DataCollatorWithPadding(tokenizer)
    train_method(model, args, res_type, out_dir, data["train"], collate)
    result = {"accuracy": accuracy(model, data["eval"], collate)}

    device = next(model.parameters()).device
    batches = (
        model_batches(data["train"], collate, 64, 8, device),  # calibration
        model_batches(data["eval"], collate, 64, 4, device),  # held out
    )
    result |= export_and_score(
        model,
        args,
        res_type,
        out_dir,
        batches,
        lambda: build_base(args, tokenizer, num_labels),
        lambda peft_model: accuracy(peft_model.to(device), data["eval"], collate),
        "accuracy",
    )
    return result


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    set_threads(args, tiny_model=args.model_name_or_path is None)
    if args.model_name_or_path:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    else:
        tokenizer = word_tokenizer(args.max_length)
    splits = load_splits(args)
    num_labels = len(set(splits["train"]["label"]))
    data = tokenize(splits, tokenizer, args)

    results = {rt: run_method(args, rt, tokenizer, data, num_labels) for rt in args.res_type}
    majority = max(Counter(data["eval"]["labels"]).values()) / len(data["eval"])
    footer = (
        f"(majority class: {majority:.3f}; adapters in {args.output_dir}/<method>/peft_adapter[_<merge>])"
    )
    print_results(results, "accuracy", footer)
    return results


if __name__ == "__main__":
    main()

"""Causal-LM fine-tuning (NLG) on prompt/answer pairs with plain LoRA and ResLoRA.

Each method is trained with the HF ``Trainer`` on ``question`` -> ``answer`` pairs (loss on
the answer tokens only; ``ResLoRACallback`` writes the ResLoRA checkpoint), scored by exact
match of the GSM8K final answer (the text after ``####``) under greedy ``model.generate()``,
merged into a plain LoRA, exported as a PEFT adapter, loaded back with
``PeftModel.from_pretrained`` and scored again.

With no arguments it needs no download: a tiny LLaMA built from a config learns generated
GSM8K-style arithmetic ("tom has 7 coins . tom loses 3 . how many coins ..." ->
"7 - 3 = 4 #### 4")::

    python examples/nlg_causal_lm.py
    python examples/nlg_causal_lm.py --res_type none bs --pre_num 2 --max_train_steps 600
    python examples/nlg_causal_lm.py --model_name_or_path meta-llama/Llama-2-7b-hf \\
        --dataset_name gsm8k --dataset_config_name main --max_new_tokens 256 \\
        --prompt_template "Question: {question}\\nAnswer: "
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import datasets
import torch
from datasets import Dataset, DatasetDict
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq

from reslora_diffusers import add_reslora
from reslora_diffusers.data.text_tasks import (
    arithmetic_examples,
    greedy_exact_match,
    tiny_llama_config,
    word_tokenizer,
)
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
    p = argparse.ArgumentParser(description="Causal-LM fine-tuning with LoRA vs ResLoRA.")
    p.add_argument("--model_name_or_path", default=None, help="default: a tiny LLaMA built from a config")
    p.add_argument(
        "--dataset_name", default=None, help="hub dataset or local .csv/.json/.jsonl (default: generated set)"
    )
    p.add_argument("--dataset_config_name", default=None)
    p.add_argument("--question_column", default="question")
    p.add_argument("--answer_column", default="answer")
    p.add_argument("--prompt_template", default="{question}", help="how a question becomes the prompt")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--max_new_tokens", type=int, default=16)
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=200)
    add_method_arguments(
        p,
        learning_rate=3e-3,
        max_train_steps=300,
        lr_scheduler="constant_with_warmup",
    )
    args = p.parse_args(argv)
    args.output_dir = args.output_dir or Path("outputs/nlg_causal_lm")
    return args


# -- data -----------------------------------------------------------------------------
def load_splits(args: argparse.Namespace) -> DatasetDict:
    """``train`` and ``eval`` splits with ``question`` and ``answer`` columns."""
    if args.dataset_name is None:
        return DatasetDict(
            train=Dataset.from_list(arithmetic_examples(4000, seed=args.seed)),
            eval=Dataset.from_list(arithmetic_examples(200, seed=args.seed + 1)),
        )
    raw = load_raw_dataset(args.dataset_name, args.dataset_config_name)
    if "test" not in raw:
        raw = raw["train"].train_test_split(test_size=0.1, seed=args.seed)
    splits = DatasetDict(train=raw["train"], eval=raw["test"])
    splits = splits.select_columns([args.question_column, args.answer_column])
    return splits.rename_columns({args.question_column: "question", args.answer_column: "answer"})


def prompt_ids(tokenizer, question: str, template: str) -> list[int]:
    ids = tokenizer(template.format(question=question), add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + ids


def encoded(split: Dataset, tokenizer, args: argparse.Namespace) -> Dataset:
    """``input_ids`` = prompt + answer + eos; ``labels`` mask the prompt with -100."""

    def encode(example):
        prompt = prompt_ids(tokenizer, example["question"], args.prompt_template)
        answer = tokenizer(" " + example["answer"], add_special_tokens=False)["input_ids"]
        ids = (prompt + answer + [tokenizer.eos_token_id])[: args.max_length]
        labels = ([-100] * len(prompt) + answer + [tokenizer.eos_token_id])[: args.max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    return split.map(encode, remove_columns=split.column_names)


# -- model ----------------------------------------------------------------------------
def load_tokenizer(args: argparse.Namespace):
    if args.model_name_or_path is None:
        tokenizer = word_tokenizer(args.max_length, add_special_tokens=False)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_base(args: argparse.Namespace, tokenizer):
    torch.manual_seed(args.seed)
    if args.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
    return AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer)))


def exact_match(model, tokenizer, examples: Dataset, args: argparse.Namespace, batch_size: int = 64) -> float:
    """Share of questions whose generated final answer (after ``####``) equals the reference."""
    prompts = [prompt_ids(tokenizer, q, args.prompt_template) for q in examples["question"]]
    return greedy_exact_match(model, tokenizer, prompts, examples["answer"], args.max_new_tokens, batch_size)


def run_method(args, res_type: str, tokenizer, splits: DatasetDict, train: Dataset) -> dict:
    out_dir = args.output_dir / res_type
    model = add_reslora(build_base(args, tokenizer), method_config(args, res_type))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    train_method(model, args, res_type, out_dir, train, collate)
    scores = {"exact_match": exact_match(model, tokenizer, splits["eval"], args)}

    device = next(model.parameters()).device
    batches = (
        model_batches(train, collate, 64, 8, device),  # calibration
        model_batches(encoded(splits["eval"], tokenizer, args), collate, 64, 2, device),  # held out
    )
    scores |= export_and_score(
        model,
        args,
        res_type,
        out_dir,
        batches,
        lambda: build_base(args, tokenizer),
        lambda peft_model: exact_match(peft_model.to(device), tokenizer, splits["eval"], args),
        "exact_match",
    )
    return scores


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    datasets.disable_progress_bars()
    set_threads(args, tiny_model=args.model_name_or_path is None)
    tokenizer = load_tokenizer(args)
    splits = load_splits(args)
    if args.max_train_samples:
        splits["train"] = splits["train"].select(range(min(args.max_train_samples, len(splits["train"]))))
    splits["eval"] = splits["eval"].select(range(min(args.max_eval_samples, len(splits["eval"]))))
    train = encoded(splits["train"], tokenizer, args)

    results = {rt: run_method(args, rt, tokenizer, splits, train) for rt in args.res_type}
    print_results(results, "exact_match", f"(adapters in {args.output_dir}/<method>/peft_adapter[_<merge>])")
    return results


if __name__ == "__main__":
    main()

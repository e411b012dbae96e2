#!/usr/bin/env python
"""Pretrain a deep tiny LLaMA for the NLG example: the language examples at the depth users have.

    python scripts/pretrain_tiny_lm.py --output-dir runs/tiny-llama-24       # 24 layers
    python examples/nlg_causal_lm.py --model_name_or_path runs/tiny-llama-24 # fine-tune it
    python benchmarks/compare_lm.py --examples nlg -- --model_name_or_path runs/tiny-llama-24

The NLG example's default base is a 4-layer LLaMA with random weights; this one is 24 layers
deep (width 64, :func:`reslora_diffusers.data.text_tasks.tiny_llama_config`) and trained, all
of its weights, on a corpus that holds everything the fine-tuning task needs except the skill
itself: word problems that add ("tom has 3 coins . tom buys 4 more . how many coins does tom
have now ?" -> "3 + 4 = 7 #### 7") and bare equations of both signs ("9 - 4 = 5"). Half of the
NLG task's questions take something away ("gives away", "loses": words the base has never
read) and must be answered with the ``-`` it knows only from bare equations, so the base
answers about half of them and fine-tuning has the rest to learn.

Causal-LM loss on every token, AdamW with a warm-up and a cosine decay, one seed for the
weights and the batches. The folder (written under a temporary name, then renamed) holds
the model (safetensors), the word tokenizer and a card (``README.md``) with the command, the
time and the base's exact match on held-out questions of each kind.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from reslora_diffusers.data.text_tasks import (  # noqa: E402
    arithmetic_examples,
    greedy_exact_match,
    tiny_llama_config,
    word_tokenizer,
)

logger = logging.getLogger("pretrain_tiny_lm")
#: the NLG example's questions that take away (the skill the base is not taught)
TAKE_AWAY = ("gives away", "loses")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, required=True)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-examples", type=int, default=200, help="held-out questions of each kind")
    return p.parse_args(argv)


def is_take_away(question: str) -> bool:
    return any(verb in question for verb in TAKE_AWAY)


def corpus(n: int, seed: int) -> list[str]:
    """``n`` pretraining texts: half word problems that add (question and answer), half bare
    equations, ``a + b = c`` or ``a - b = c`` with ``a >= b``, digits 0-9."""
    rng = random.Random(seed)
    adds = itertools.cycle(e for e in arithmetic_examples(n, seed=seed) if not is_take_away(e["question"]))
    texts = []
    for _ in range(n):
        if rng.random() < 0.5:
            example = next(adds)
            texts.append(f"{example['question']} {example['answer']}")
        else:
            a, b = sorted((rng.randint(0, 9), rng.randint(0, 9)), reverse=True)
            sign, result = rng.choice((("+", a + b), ("-", a - b)))
            texts.append(f"{a} {sign} {b} = {result}")
    return texts


def batches(texts: list[str], tokenizer, batch_size: int, steps: int, seed: int):
    """``steps`` batches of ``<s> text </s>`` (padding masked out of the labels), drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = [texts[i] for i in torch.randint(len(texts), (batch_size,), generator=gen).tolist()]
        ids = [[tokenizer.bos_token_id, *tokenizer(t)["input_ids"], tokenizer.eos_token_id] for t in rows]
        batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        yield batch


def held_out(n: int, seed: int, texts: list[str]) -> dict[str, list[dict]]:
    """``n`` NLG-style questions of each kind drawn with ``seed``, none of them in ``texts``."""
    seen = {t.partition("?")[0] for t in texts}
    examples = [
        e for e in arithmetic_examples(20 * n, seed=seed) if e["question"].partition("?")[0] not in seen
    ]
    kinds = {
        "add": [e for e in examples if not is_take_away(e["question"])][:n],
        "take_away": [e for e in examples if is_take_away(e["question"])][:n],
    }
    short = {kind: len(found) for kind, found in kinds.items() if len(found) < n}
    if short:  # a card that says n questions must have read n
        raise ValueError(f"only {short} questions outside the corpus among {20 * n} drawn; ask for fewer")
    return kinds


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then ``0.5 (1 + cos(pi t))`` down to 0 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = word_tokenizer(64, add_special_tokens=False)
    from transformers import AutoModelForCausalLM

    # LLaMA's own 0.02 initialisation: the example's 0.1 suits a random base, not 24 trained layers
    config = tiny_llama_config(len(tokenizer), num_hidden_layers=args.layers, initializer_range=0.02)
    model = AutoModelForCausalLM.from_config(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup, args.steps))
    texts = corpus(20000, seed=args.seed)
    start, losses = time.time(), []
    model.train()
    for step, batch in enumerate(batches(texts, tokenizer, args.batch_size, args.steps, args.seed)):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, args.steps // 10) == 0:
            logger.info("step %d/%d: loss %.4f", step + 1, args.steps, sum(losses[-50:]) / len(losses[-50:]))
    minutes = (time.time() - start) / 60
    questions = held_out(args.eval_examples, args.seed + 1000, texts)
    # prompted as the NLG example prompts them: <s> and the question
    prompts = {
        k: [[tokenizer.bos_token_id, *tokenizer(e["question"])["input_ids"]] for e in ex]
        for k, ex in questions.items()
    }
    accuracy = {
        kind: greedy_exact_match(
            model, tokenizer, prompts[kind], [e["answer"] for e in ex], max_new_tokens=16
        )
        for kind, ex in questions.items()
    }
    numbers = {"loss": sum(losses[-50:]) / len(losses[-50:]), "minutes": minutes, "exact_match": accuracy}
    save(model, tokenizer, numbers, args)
    return numbers


def card(numbers: dict, args: argparse.Namespace) -> str:
    accuracy = numbers["exact_match"]
    return f"""# Tiny LLaMA, {args.layers} layers, pretrained for the NLG example

Made by `scripts/pretrain_tiny_lm.py` (reslora-diffusers):

```bash
python scripts/pretrain_tiny_lm.py --output-dir {args.output_dir} --layers {args.layers} --steps {args.steps} \\
  --batch-size {args.batch_size} --lr {args.lr} --warmup {args.warmup} --seed {args.seed} --threads {args.threads}
```

Width 64, {args.layers} layers, the word tokenizer of the project's text tasks. Trained on word
problems that add and on bare equations of both signs (never on questions that take away):
{args.steps} steps of {args.batch_size}, final loss {numbers["loss"]:.4f}, {numbers["minutes"]:.1f} min
on {args.threads} CPU thread(s).

Exact match on {args.eval_examples} NLG-style questions of each kind that the corpus does not hold
(greedy, the text after `####`): adding **{100 * accuracy["add"]:.1f} %**, taking away
**{100 * accuracy["take_away"]:.1f} %** (the skill fine-tuning is to teach).
"""


def save(model, tokenizer, numbers: dict, args: argparse.Namespace) -> None:
    """The folder under a temporary name, renamed into place once complete."""
    out = args.output_dir
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    (partial / "numbers.json").write_text(json.dumps(numbers, indent=1))
    (partial / "README.md").write_text(card(numbers, args))
    if out.exists():
        shutil.rmtree(out)
    partial.rename(out)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    numbers = train(parse_args(argv))
    logger.info("done: %s", json.dumps(numbers))


if __name__ == "__main__":
    main()

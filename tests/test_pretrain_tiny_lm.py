"""The deep tiny LLaMA's pretraining script: its corpus, schedule and the folder the NLG example loads."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from tests.scripts import load_script

ROOT = Path(__file__).resolve().parent.parent


pretrain = load_script(ROOT / "scripts" / "pretrain_tiny_lm.py")


def test_the_corpus_adds_in_words_and_takes_away_only_in_bare_equations():
    texts = pretrain.corpus(2000, seed=3)
    problems = [t for t in texts if "?" in t]
    equations = [t for t in texts if "?" not in t]
    assert 800 < len(problems) < 1200 and not any("gives away" in t or "loses" in t for t in problems)
    for text in problems:  # "... have now ? a + b = c #### c"
        a, b, c, d = map(int, re.fullmatch(r".* \? (\d) \+ (\d) = (\d+) #### (\d+)", text).groups())
        assert a + b == c == d
    signs = set()
    for text in equations:
        a, sign, b, c = re.fullmatch(r"(\d) ([+-]) (\d) = (\d+)", text).groups()
        signs.add(sign)
        assert int(c) == (int(a) + int(b) if sign == "+" else int(a) - int(b)) and int(c) >= 0
    assert signs == {"+", "-"}
    assert pretrain.corpus(2000, seed=3) == texts and pretrain.corpus(2000, seed=4) != texts


def test_held_out_questions_are_not_in_the_corpus_and_split_by_kind():
    texts = pretrain.corpus(3000, seed=0)
    questions = pretrain.held_out(40, seed=1000, texts=texts)
    assert len(questions["add"]) == len(questions["take_away"]) == 40
    prefixes = {t.split("?")[0] for t in texts}
    for kind, examples in questions.items():
        for example in examples:
            assert example["question"].split("?")[0] not in prefixes
            assert (" - " in example["answer"]) == (kind == "take_away")
    with pytest.raises(ValueError, match="questions outside the corpus"):
        # 8000 draws hold about 240 questions that add outside a corpus holding most of them
        pretrain.held_out(400, seed=1000, texts=pretrain.corpus(80000, seed=0))


def test_the_learning_rate_warms_up_linearly_then_decays_on_a_cosine_to_zero():
    warmup, steps = 10, 110
    assert pretrain.lr_factor(0, warmup, steps) == pytest.approx(0.1)
    assert pretrain.lr_factor(9, warmup, steps) == pytest.approx(1.0)
    for step in (10, 35, 60, 85, 109):
        t = (step - warmup) / (steps - warmup)
        assert pretrain.lr_factor(step, warmup, steps) == pytest.approx((1 + math.cos(math.pi * t)) / 2)
    assert pretrain.lr_factor(60, warmup, steps) == pytest.approx(0.5)


def test_a_toy_run_writes_a_folder_that_the_nlg_example_fine_tunes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "tiny-llama"
    argv = [
        "--output-dir",
        str(out),
        "--layers",
        "2",
        "--steps",
        "30",
        "--warmup",
        "5",
        "--eval-examples",
        "8",
    ]
    numbers = pretrain.train(pretrain.parse_args(argv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]  # no .partial left behind
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == len(tokenizer)
    assert tokenizer("tom has 12 coins")["input_ids"] == tokenizer.convert_tokens_to_ids(
        ["tom", "has", "1", "2", "coins"]
    )
    # the saved weights are the trained ones: the card's loss is their loss on the corpus's batches
    batch = next(pretrain.batches(pretrain.corpus(500, seed=0), tokenizer, 64, 1, seed=9))
    with torch.no_grad():
        assert model(**batch).loss.item() < math.log(len(tokenizer))  # below a uniform guess
    assert json.loads((out / "numbers.json").read_text()) == numbers
    card = (out / "README.md").read_text()
    assert "--layers 2 --steps 30" in card and f"{100 * numbers['exact_match']['add']:.1f} %" in card

    nlg = load_script(ROOT / "examples" / "nlg_causal_lm.py")
    argv = ["--model_name_or_path", str(out), "--max_train_steps", "2", "--max_train_samples", "32"]
    argv += ["--max_eval_samples", "4", "--res_type", "none", "--output_dir", str(tmp_path / "nlg")]
    results = nlg.main(argv)
    assert 0 <= results["none"]["exact_match"] <= 1
    assert (tmp_path / "nlg" / "none" / "peft_adapter" / "adapter_config.json").is_file()

"""Generated language tasks, a word-level tokenizer and tiny model configs for the NLU/NLG
examples, so that they run with no model or dataset download.

* :func:`sentiment_examples`: review sentences labelled by the majority polarity of their
  clauses, where ``not`` flips a clause (``the plot was not bad`` is positive).
* :func:`arithmetic_examples`: GSM8K-style ``question`` / ``answer`` pairs about adding
  and taking away things; the answer ends with ``#### <number>`` as in GSM8K.
* :func:`greedy_exact_match`: GSM8K's exact match of a causal LM's greedy answers.
"""

from __future__ import annotations

import random

import torch

NAMES = ("tom", "ann", "bob", "eva", "sam", "mia", "leo", "zoe")
ITEMS = ("apples", "books", "coins", "cards", "pens", "shells")
NOUNS = ("movie", "plot", "acting", "music", "story", "cast", "ending", "script")
POSITIVE = ("good", "great", "nice", "superb", "lovely", "fine")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring", "weak")
ADVERBS = ("", "really", "quite", "very")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>")

_QUESTION_WORDS = "has . buys gets finds more gives away loses how many does have now ?".split()
_ANSWER_WORDS = "+ - = ####".split()
_REVIEW_WORDS = "the was is and but not".split()


def vocabulary() -> list[str]:
    """Every word both tasks use, digits as single characters (numbers are split into digits)."""
    words = [*NAMES, *ITEMS, *NOUNS, *POSITIVE, *NEGATIVE, *[a for a in ADVERBS if a]]
    words += _QUESTION_WORDS + _ANSWER_WORDS + _REVIEW_WORDS + [str(d) for d in range(10)]
    return list(dict.fromkeys(words))


def word_tokenizer(model_max_length: int = 64, add_special_tokens: bool = True):
    """A ``PreTrainedTokenizerFast`` over :func:`vocabulary`: whitespace words, digits one by one.

    With ``add_special_tokens`` every text is encoded as ``<s> ... </s>`` (the encoder
    classification layout); the causal-LM example adds ``<s>``/``</s>`` itself.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocabulary()])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)]
    )
    if add_special_tokens:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )


def _clause(rng: random.Random) -> tuple[str, int]:
    polarity = rng.choice((1, -1))
    negated = rng.random() < 0.4
    adjective = rng.choice(POSITIVE if polarity * (-1 if negated else 1) > 0 else NEGATIVE)
    words = [
        "the",
        rng.choice(NOUNS),
        rng.choice(("was", "is")),
        "not" if negated else "",
        rng.choice(ADVERBS),
    ]
    return " ".join(w for w in [*words, adjective] if w), polarity


def sentiment_examples(n: int, seed: int = 0) -> list[dict]:
    """``n`` dicts ``{"text", "label"}``: 1 or 3 clauses, label 1 when most clauses are positive."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        clauses = [_clause(rng) for _ in range(rng.choice((1, 3)))]
        text = " and ".join(c for c, _ in clauses)
        out.append({"text": text, "label": int(sum(p for _, p in clauses) > 0)})
    return out


def arithmetic_examples(n: int, seed: int = 0, max_value: int = 9) -> list[dict]:
    """``n`` dicts ``{"question", "answer"}``; the answer is ``a + b = c #### c`` (or ``-``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(0, max_value), rng.randint(0, max_value)
        if rng.random() < 0.5:
            verb = rng.choice(("buys", "gets", "finds"))
            question = f"{name} has {a} {item} . {name} {verb} {b} more ."
            result, equation = a + b, f"{a} + {b}"
        else:
            a, b = max(a, b), min(a, b)
            verb = rng.choice(("gives away", "loses"))
            question = f"{name} has {a} {item} . {name} {verb} {b} ."
            result, equation = a - b, f"{a} - {b}"
        question += f" how many {item} does {name} have now ?"
        out.append({"question": question, "answer": f"{equation} = {result} #### {result}"})
    return out


def final_answer(text: str) -> str:
    """The GSM8K final answer: what follows the last ``####``, digits joined."""
    return "".join(text.rpartition("####")[2].split())


def greedy_exact_match(
    model, tokenizer, prompts: list[list[int]], answers: list[str], max_new_tokens: int, batch_size: int = 64
) -> float:
    """Share of ``prompts`` (token ids) whose greedy continuation has the final answer of the
    matching reference: ``final_answer(generated) == final_answer(answer)``, GSM8K's exact match.
    Prompts are left-padded in batches of ``batch_size`` on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    hits = 0
    for start in range(0, len(prompts), batch_size):
        rows = {"input_ids": prompts[start : start + batch_size]}
        batch = tokenizer.pad(rows, padding_side="left", return_tensors="pt").to(device)
        with torch.no_grad():
            generated = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        texts = tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        references = answers[start : start + batch_size]
        hits += sum(final_answer(t) == final_answer(a) for t, a in zip(texts, references, strict=True))
    return hits / len(prompts)


def _tiny_sizes(vocab_size: int) -> dict:
    """What both tiny models share: 4 layers of width 64, and the special-token ids of
    :func:`word_tokenizer`."""
    return dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )


def tiny_llama_config(vocab_size: int, **overrides):
    """A small LLaMA (4 layers, width 64) that trains in seconds on CPU.

    Its weights are drawn with std 0.1 instead of LLaMA's 0.02: a random base with the default
    has near-uniform next-token logits, which LoRA cannot sharpen through the frozen ``lm_head``.
    """
    from transformers import LlamaConfig

    kwargs = dict(
        _tiny_sizes(vocab_size),
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    return LlamaConfig(**{**kwargs, **overrides})


def tiny_roberta_config(vocab_size: int, num_labels: int = 2, **overrides):
    """A small RoBERTa encoder (4 layers, width 64) for sequence classification."""
    from transformers import RobertaConfig

    kwargs = dict(_tiny_sizes(vocab_size), max_position_embeddings=72, num_labels=num_labels)
    return RobertaConfig(**{**kwargs, **overrides})

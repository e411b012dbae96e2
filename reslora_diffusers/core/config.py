"""The ResLoRA configuration: one serialisable dataclass, validated on creation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

from .shortcuts import res_types

MERGE_METHODS = ("input", "weight", "calibrated", "sequential", "distill")
#: the merges that fit ``A'_n = A_n + G_n`` on calibration batches (sequential: block by block;
#: distill: then refines all factors by gradient steps on the model's outputs)
CALIBRATED_METHODS = ("calibrated", "sequential", "distill")
INIT_METHODS = ("kaiming", "gaussian")


@dataclass
class ResLoRAConfig:
    """How ResLoRA is applied to a model.

    The branch of layer ``n`` computes ``s * B_n A_n x_n`` with ``s = alpha / rank``;
    ``res_type`` adds the shortcut between consecutive branches of a chain:

    * ``none``: plain LoRA, ``h_n = W_n x_n + s B_n A_n x_n``
    * ``is``:   ``h_n = W_n x_n + s B_n A_n (x_n + x_{n-1})``
    * ``bs``:   ``h_n = W_n x_n + s (sum_{k=0..m} B_{n-k} A_{n-k}) x_n``
    * ``ms``:   ``h_n = W_n x_n + s B_n (sum_{k=0..m} A_{n-k} x_{n-k})``

    with ``m = pre_num`` (``is`` always uses one predecessor).

    Args:
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; ``None`` means ``alpha = rank`` (scaling 1).
        dropout: dropout probability on the branch input during training.
        res_type: shortcut type: ``none | is | bs | ms`` or a type added with
            :func:`~reslora_diffusers.core.shortcuts.register_shortcut`.
        pre_num: number of earlier blocks in the ``bs``/``ms`` shortcut (``m``).
        target_modules: module-name suffixes to adapt, matched on ``.`` boundaries as in PEFT;
            ``None`` picks the preset of the model's front end (diffusers attention, or the
            transformers model type).
        exclude_modules: full module paths never adapted even where a target matches them
            (Flux's final ``proj_out``, which the single blocks' ``proj_out`` target also names).
        merge: default way to remove the shortcuts, ``input | weight | calibrated | sequential | distill``.
        norm_window: length of the sliding window of input norms per block.
        record_norms: record those windows in training (the statistics of ``merge="input"``;
            a few small operations per block and step, 5-10 % of a small model's step on a
            CPU). ``None``: only when ``merge`` is ``"input"``.
        init: ``kaiming`` (A kaiming-uniform, as PEFT) or ``gaussian`` (A ~ N(0, 1/r)); B is zero.
    """

    # ``metadata``: the help text of the command-line flag generated from the field
    # (:mod:`reslora_diffusers.training.flags`; ``{types}`` placeholders there), the flag's name
    # where it is not the field's (diffusers' scripts' ``--lora_alpha``), and its choices
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float | None = field(
        default=None,
        metadata={
            "flag": "lora_alpha",
            "help": "LoRA alpha, scaling s = alpha / rank (default: the rank, s = 1)",
        },
    )
    dropout: float = field(
        default=0.0, metadata={"flag": "lora_dropout", "help": "dropout on the branch input in training"}
    )
    res_type: str = field(
        default="bs",
        metadata={"choices": res_types, "help": "shortcut type ({all_types}; none: plain LoRA)"},
    )
    pre_num: int = field(default=1, metadata={"help": "earlier blocks m in a {pre_num_types} shortcut"})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "module-name suffixes to adapt (default: the preset of the model's family)"},
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "full module paths never adapted, even where a target names them"}
    )
    merge: str = field(
        default="calibrated",
        metadata={
            "choices": MERGE_METHODS,
            "help": "how the {approximate_types} shortcuts are merged away at export ({exact_types}: exactly)",
        },
    )
    norm_window: int = field(
        default=100, metadata={"help": "length of each block's sliding window of input norms (merge input)"}
    )
    record_norms: bool | None = field(
        default=None,
        metadata={
            "help": "record the norm windows of merge input even when the merge is another "
            "({approximate_types}; merge input records them anyway): for a later merge input"
        },
    )
    init: str = field(
        default="kaiming",
        metadata={"choices": INIT_METHODS, "help": "A's initialisation (kaiming: PEFT's); B starts at zero"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = [t for t in self.target_modules.replace(",", " ").split() if t]
        elif self.target_modules is not None:
            self.target_modules = list(self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = list(self.exclude_modules)
        if self.alpha is None:
            self.alpha = float(self.rank) if _is_int(self.rank) else self.rank
        self.validate()

    @property
    def records_norms(self) -> bool:
        """Whether blocks record their norm windows in training (see ``record_norms``)."""
        return self.merge == "input" if self.record_norms is None else self.record_norms

    @property
    def scaling(self) -> float:
        """``s = alpha / rank``."""
        return float(self.alpha) / self.rank

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field and what it allows."""
        _check(_is_int(self.rank) and self.rank > 0, "rank", self.rank, "an integer > 0")
        _check(_is_number(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a number > 0")
        _check(
            _is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)"
        )
        _check(self.res_type in res_types(), "res_type", self.res_type, " | ".join(res_types()))
        _check(_is_int(self.pre_num) and self.pre_num >= 0, "pre_num", self.pre_num, "an integer >= 0")
        _check(
            self.target_modules is None
            or (len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules)),
            "target_modules",
            self.target_modules,
            "None (the model's preset) or a non-empty list of module-name suffixes",
        )
        _check(
            self.exclude_modules is None or all(isinstance(t, str) and t for t in self.exclude_modules),
            "exclude_modules",
            self.exclude_modules,
            "None or a list of full module paths",
        )
        _check(self.merge in MERGE_METHODS, "merge", self.merge, " | ".join(MERGE_METHODS))
        _check(
            _is_int(self.norm_window) and self.norm_window > 0,
            "norm_window",
            self.norm_window,
            "an integer > 0",
        )
        _check(
            self.record_norms in (None, True, False), "record_norms", self.record_norms, "None, True or False"
        )
        _check(self.init in INIT_METHODS, "init", self.init, " | ".join(INIT_METHODS))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> ResLoRAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"ResLoRAConfig: unknown field {unknown[0]!r}; allowed: {', '.join(sorted(known))}"
            )
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> ResLoRAConfig:
        return cls.from_dict(json.loads(text))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"ResLoRAConfig.{name}={value!r} is invalid; allowed: {allowed}")

"""The shortcut schedule: train as ResLoRA first, end as the plain LoRA that is exported.

``shortcut_scale_at(step, total, schedule, decay_start)`` is the shortcut scale ``c`` that
training step ``step`` (1-based, ``1..total``) runs with. With ``D = decay_start * total`` and
``p = (step - D) / (total - D)`` the decay's progress:

* ``constant``: ``c = 1`` at every step (the paper's ResLoRA);
* ``linear``:   ``c = 1`` for ``step <= D``, then ``c = 1 - p``;
* ``cosine``:   ``c = 1`` for ``step <= D``, then ``c = (1 + cos(pi p)) / 2``;

so a decaying schedule reaches ``c = 0`` exactly at the last step (``p = 1``), and the
trained model is a plain LoRA that every merge exports exactly.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "linear", "cosine")
#: where ``linear``/``cosine`` start to decay, as a fraction of the training steps
DEFAULT_DECAY_START = 0.5


def check_schedule(schedule: str, decay_start: float | None) -> float:
    """The decay start to use (the default where None); ``ValueError`` naming a bad value."""
    if schedule not in SCHEDULES:
        raise ValueError(f"shortcut schedule {schedule!r} is unknown; allowed: {' | '.join(SCHEDULES)}")
    if decay_start is None:
        return DEFAULT_DECAY_START
    if schedule == "constant":
        raise ValueError("a shortcut decay start needs a decaying shortcut schedule (linear or cosine)")
    if not (isinstance(decay_start, (int, float)) and 0 <= decay_start < 1):
        raise ValueError(f"shortcut decay start {decay_start!r} must be a fraction in [0, 1)")
    return float(decay_start)


def shortcut_scale_at(
    step: int, total: int, schedule: str = "constant", decay_start: float = DEFAULT_DECAY_START
) -> float:
    """The shortcut scale ``c`` of training step ``step`` of ``total`` (see the module doc)."""
    if schedule == "constant":
        return 1.0
    start = decay_start * total
    if step <= start:
        return 1.0
    if step >= total:
        return 0.0
    progress = (step - start) / (total - start)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"shortcut schedule {schedule!r} is unknown; allowed: {' | '.join(SCHEDULES)}")

"""Confidence intervals of the accuracies the evaluation reports."""

from __future__ import annotations

import math

#: the normal quantile of a two-sided 95 % interval
Z_95 = 1.959964


def wilson_interval(correct: int, images: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``p = correct / images``:
    ``(p + z^2 / 2n -+ z sqrt(p (1 - p) / n + z^2 / 4n^2)) / (1 + z^2 / n)``.

    It stays inside [0, 1] and is honest at the small counts of a model card (72 images)."""
    if images <= 0 or not 0 <= correct <= images:
        raise ValueError(f"wilson_interval: {correct} correct of {images} images")
    p, n = correct / images, images
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)

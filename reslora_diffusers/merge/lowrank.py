"""Low-rank truncation of merged updates (``bs`` stacks to rank ``(m+1) r``)."""

from __future__ import annotations

import math

import torch


def truncate(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of ``B @ A`` and the relative Frobenius error they leave.

    Works on the factors as matrices (``A`` ``(r, in ...)``, ``B`` ``(out, r ...)``; convolution
    factors keep their trailing kernel dimensions): QR of both factors, then an SVD of the
    small ``r x r`` core, so ``B @ A`` is never formed.
    """
    if a.shape[0] <= rank:
        return a, b, 0.0
    qb, rb = torch.linalg.qr(b.reshape(b.shape[0], -1).double())
    qa, ra = torch.linalg.qr(a.reshape(a.shape[0], -1).double().t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    root = s[:rank].sqrt()
    new_b = (qb @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ qa.t())
    total = float(s.square().sum())
    error = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    new_a = new_a.reshape(rank, *a.shape[1:]).to(a.dtype)
    new_b = new_b.reshape(b.shape[0], rank, *b.shape[2:]).to(b.dtype)
    return new_a, new_b, error

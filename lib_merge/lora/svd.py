"""Truncated SVD of a weight difference and the choice of its rank.

Exact ``torch.linalg.svd`` in fp32 per module: the rank-r truncation is then the best rank-r approximation
(Eckart-Young), and its relative error is known from the singular values alone. A conv k×k weight is flattened
to (out, in·k·k), and the factors are shaped as kohya writes them: up (out, r, 1, 1), down (r, in, k, k).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MergeError


@dataclass(frozen=True)
class Factors:
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    down: torch.Tensor  # (r, in) or (r, in, k, k)
    rank: int
    rel_error: float  # ||ΔW - up@down||_F / ||ΔW||_F


def rank_for_energy(s: torch.Tensor, fraction: float) -> int:
    """The smallest r whose first r squared singular values keep ``fraction`` of the squared Frobenius norm."""
    sq = s.double() ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(sq, 0) / total
    hit = torch.nonzero(cum >= fraction - 1e-12)
    return int(hit[0]) + 1 if len(hit) else len(s)


def check_energy(fraction: float, where: str = "--energy") -> float:
    if not (0.0 < fraction <= 1.0):
        raise MergeError(f"energy must be in (0, 1], got {fraction}, {where}")
    return fraction


def check_rank(rank: int, where: str) -> int:
    if rank < 1:
        raise MergeError(f"rank must be at least 1, got {rank}, {where}")
    return rank


def factorize(delta: torch.Tensor, rank: int | None = None, energy: float | None = None) -> Factors:
    """Split ΔW into up @ down of the given rank, or of the smallest rank reaching ``energy``; the rank is
    capped by the matrix's smaller side."""
    shape = tuple(delta.shape)
    mat = delta.reshape(shape[0], -1).to(torch.float32)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = rank_for_energy(s, energy) if rank is None else rank
    r = max(1, min(r, s.numel()))
    sq = s.double() ** 2
    total = float(sq.sum())
    rel = float(sq[r:].sum().sqrt() / total ** 0.5) if total > 0 else 0.0
    up = (u[:, :r] * s[:r]).contiguous()
    down = vh[:r].contiguous()
    if len(shape) == 4:
        up = up.reshape(shape[0], r, 1, 1)
        down = down.reshape(r, *shape[1:])
    return Factors(up.cpu(), down.cpu(), r, rel)

"""Modes over any number of models with A as the base: linear combination, task arithmetic, TIES, DARE,
DARE-TIES, DELLA, Model Stock, geometric median.

Each key's ratio ``alpha`` (after block weights, presets and elemental rules) scales the task vector, so
``A + alpha · τ`` is block-weighted TIES, DARE, …; alpha 0 returns A exactly. Inputs are fp32 scratch tensors
owned by the engine (overwritten here). Formulas: issue 12, ``docs/merge-libraries.md`` (sd-mecha, mergekit).
Everything that needs a whole tensor (a top-k, a rank, a random mask, a norm) sees the whole tensor in both
sinks; random masks come from a CPU generator seeded per key, so results never depend on threads, chunking,
device or key order.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from . import streamed as S
from .params import Param
from .modes import variadic_mode

DENSITY = Param("density", float, 0.2, "fraction of each task vector's entries kept (per tensor, per model)", 0.0, 1.0)
DOT_CHUNK = 1 << 16  # elements per fp64 partial sum (stable dot products without fp64 copies of whole tensors)


def _deltas(tensors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """A and the task vectors δᵢ = Mᵢ − A, computed in place in the models' buffers."""
    a = tensors[0]
    return a, [m.sub_(a) for m in tensors[1:]]


def _dot(x: Tensor, y: Tensor) -> float:
    """⟨x, y⟩ of two flat tensors, accumulated in fp64 over fixed chunks."""
    total = 0.0
    for s in range(0, x.numel(), DOT_CHUNK):
        total += float(torch.dot(x[s:s + DOT_CHUNK].double(), y[s:s + DOT_CHUNK].double()))
    return total


def _summed(deltas: list[Tensor]) -> Tensor:
    """Σᵢ δᵢ, accumulated into ``deltas[0]``."""
    total = deltas[0]
    for d in deltas[1:]:
        total.add_(d)
    return total


# -- linear combination, task arithmetic -------------------------------------------------------------------
def _weights_match(params: Mapping[str, Any], n: int) -> str | None:
    w = params["model_weights"]
    if w is not None and len(w) != n:
        return f"model_weights has {len(w)} values for {n} models (one per model, A first), -p model_weights"
    return None


@variadic_mode("linear_combination", 2, "Σ wᵢ · Mᵢ (model_weights, one per model, A first; default: the mean)",
               params=(Param("model_weights", tuple, None, "one weight per model, A first (1,1 is a plain sum); "
                             "default 1/n each"),),
               elementwise=True, per_key_ratio=False, check_models=_weights_match)
def linear_combination(tensors, alpha, beta, params, key, seed):
    w = params["model_weights"] or (1.0 / len(tensors),) * len(tensors)
    out = tensors[0].mul_(w[0])
    for m, wi in zip(tensors[1:], w[1:]):
        out.add_(m, alpha=wi)
    return out


@variadic_mode("task_arithmetic", 2, "A + alpha · Σᵢ (Mᵢ − A) over the models after A", elementwise=True)
def task_arithmetic(tensors, alpha, beta, params, key, seed):
    a = tensors[0]
    if alpha == 0.0:
        return a
    _, deltas = _deltas(tensors)
    return a.add_(_summed(deltas), alpha=alpha)


# -- TIES ---------------------------------------------------------------------------------------------------
def _kth_smallest(mag: Tensor, kth: int) -> Tensor:
    """The ``kth`` smallest entry (1-based) of a flat tensor this call may reorder. On the CPU a numpy in-place
    partition (no copy; torch.kthvalue clones the input and adds an int64 index per entry: 3x its size); both
    return the exact order statistic, NaN counted largest, so the threshold is the same value."""
    if mag.device.type == "cpu":
        a = mag.numpy()
        a.partition(kth - 1)
        return torch.tensor(a[kth - 1], dtype=mag.dtype)
    return torch.kthvalue(mag, kth).values


def keep_top(d: Tensor, density: float) -> Tensor:
    """``d`` with all but its top ``density`` fraction by magnitude set to 0, in place: k = ⌈density · n⌉
    entries are kept (entries tied with the k-th largest magnitude are kept too). Extra memory: one fp32 and
    one bool copy of ``d``."""
    n = d.numel()
    k = math.ceil(density * n)
    if k >= n:
        return d
    if k == 0:
        return d.zero_()
    mag = d.abs().reshape(-1)
    threshold = _kth_smallest(mag, n - k + 1)
    torch.abs(d.reshape(-1), out=mag)  # the selection reordered it
    drop = torch.lt(mag, threshold)
    del mag
    return d.masked_fill_(drop.view(d.shape), 0.0)


def disjoint_mean(deltas: list[Tensor]) -> Tensor:
    """TIES' merge of (trimmed) task vectors: elect each entry's sign as the sign of Σᵢ δᵢ, then take the mean
    of the non-zero δᵢ with that sign (0 where none). Overwrites ``deltas`` (``deltas[0]`` holds the result).
    Extra memory: one fp32 sum (freed once the signs are taken), then a few bool/uint8 masks per entry."""
    total = deltas[0].clone()
    for d in deltas[1:]:
        total.add_(d)
    pos, neg = total > 0, total < 0  # the elected sign (NaN elects neither, as sign(NaN) * d > 0 is false)
    del total
    count = torch.zeros(pos.shape, dtype=torch.uint8, device=pos.device)  # at most MAX_MODELS - 1 agree
    for d in deltas:
        agree = (d > 0).logical_and_(pos).logical_or_((d < 0).logical_and_(neg))  # non-zero with that sign
        count.add_(agree)
        d.masked_fill_(agree.logical_not_(), 0.0)
    mean = deltas[0]  # 0 + δ₀' is δ₀' exactly, so summing into δ₀' adds the same numbers in the same order
    for d in deltas[1:]:
        mean.add_(d)
    return mean.div_(count.clamp_(min=1))


def _on_cpu(tensors: list[Tensor]) -> bool:
    return all(t.device.type == "cpu" for t in tensors)


def _fp32_copies(tensors: list[Tensor]) -> list[Tensor]:
    return [t.to(torch.float32, copy=True) for t in tensors]


@variadic_mode("ties", 2, "A + alpha · τ, τ the disjoint mean of the task vectors trimmed to their top density "
               "fraction by magnitude, with the sign of their sum elected per entry", params=(DENSITY,),
               streams=True)
def ties(tensors, alpha, beta, params, key, seed):
    if alpha == 0.0:
        return tensors[0].to(torch.float32, copy=True)
    if _on_cpu(tensors):
        return S.ties(tensors, alpha, params["density"], disjoint_mean)
    a, deltas = _deltas(_fp32_copies(tensors))
    for d in deltas:
        keep_top(d, params["density"])
    return a.add_(disjoint_mean(deltas), alpha=alpha)


# -- DARE, DARE-TIES, DELLA -----------------------------------------------------------------------------------
def _keep_mask(seed: int, model: int, like: Tensor, p: Tensor | float) -> Tensor:
    """Model ``model``'s keep mask for a whole task vector (True where kept), drawn on the CPU."""
    u = S.KeepDraws(seed, model).next(like.numel())
    if isinstance(p, Tensor):
        keep = S.keep_varying(u, p.reshape(-1).cpu().numpy())
    else:
        keep = S.keep_fixed(u, p, np.empty(like.numel(), dtype=bool))
    return torch.from_numpy(keep).to(like.device).view(like.shape)


def drop_and_rescale(deltas: list[Tensor], density: float, seed: int) -> None:
    """DARE on whole task vectors, in place: keep each entry with probability ``density`` (model i's mask from
    its own stream of the key's draws, ``streamed.KeepDraws``) and divide the kept ones by ``density``."""
    for i, d in enumerate(deltas, 1):
        keep = _keep_mask(seed, i, d, density)
        if density > 0.0:
            d.div_(density)
        d.masked_fill_(keep.logical_not_(), 0.0)


SEED_NOTE = "; masks drawn per key from the recipe's seed"


@variadic_mode("dare", 2, "A + alpha · Σᵢ (mᵢ ⊙ δᵢ) / density, mᵢ a Bernoulli(density) mask per entry" + SEED_NOTE,
               params=(DENSITY,), seeded=True, streams=True)
def dare(tensors, alpha, beta, params, key, seed):
    if alpha == 0.0:
        return tensors[0].to(torch.float32, copy=True)
    if _on_cpu(tensors):
        return S.dare(tensors, alpha, params["density"], seed, False, _summed)
    a, deltas = _deltas(_fp32_copies(tensors))
    drop_and_rescale(deltas, params["density"], seed)
    return a.add_(_summed(deltas), alpha=alpha)


@variadic_mode("dare_ties", 2, "A + alpha · τ, τ TIES' sign election and disjoint mean of the DARE-masked and "
               "rescaled task vectors" + SEED_NOTE, params=(DENSITY,), seeded=True, streams=True)
def dare_ties(tensors, alpha, beta, params, key, seed):
    if alpha == 0.0:
        return tensors[0].to(torch.float32, copy=True)
    if _on_cpu(tensors):
        return S.dare(tensors, alpha, params["density"], seed, True, disjoint_mean)
    a, deltas = _deltas(_fp32_copies(tensors))
    drop_and_rescale(deltas, params["density"], seed)
    return a.add_(disjoint_mean(deltas), alpha=alpha)


def keep_probabilities(d: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's keep probability per entry: within each row (dim 0; a 0/1-dim tensor is one row), entries ranked
    by magnitude from smallest to largest get probabilities spread evenly over [density − ε, density + ε]
    (clamped to [0, 1]), so larger entries are kept more often; a row of one entry gets ``density``."""
    rows = d.reshape(d.shape[0] if d.dim() > 1 else 1, -1)
    m = rows.shape[1]
    if m == 1:
        return torch.full_like(d, density).clamp_(0.0, 1.0)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=d.device).expand_as(order))
    del order
    p = ranks.to(torch.float32).mul_(2.0 * epsilon / (m - 1)).add_(density - epsilon)
    return p.clamp_(0.0, 1.0).reshape(d.shape)


@variadic_mode("della", 2, "A + alpha · τ, τ TIES' sign election and disjoint mean of task vectors whose entries "
               "are kept with magnitude-ranked probabilities p in [density − epsilon, density + epsilon] (per row) "
               "and divided by p" + SEED_NOTE,
               params=(DENSITY, Param("epsilon", float, 0.1, "spread of the keep probabilities around density", 0.0,
                                      0.5)), seeded=True)
def della(tensors, alpha, beta, params, key, seed):
    a = tensors[0]
    if alpha == 0.0:
        return a
    _, deltas = _deltas(tensors)
    for i, d in enumerate(deltas, 1):
        p = keep_probabilities(d, params["density"], params["epsilon"])
        keep = _keep_mask(seed, i, d, p)
        d.div_(p.masked_fill_(~keep, 1.0)).masked_fill_(~keep, 0.0)
    return a.add_(disjoint_mean(deltas), alpha=alpha)


# -- Model Stock, geometric median -----------------------------------------------------------------------------
def stock_ratio(deltas: list[Tensor]) -> float:
    """Model Stock's t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean cosine over every pair of the N task
    vectors (flattened; a pair with a zero vector counts 0), clamped to [0, 1] so t stays in [0, 1]."""
    flat = [d.reshape(-1) for d in deltas]
    norms = [math.sqrt(_dot(f, f)) for f in flat]
    cosines = []
    for i in range(len(flat)):
        for j in range(i + 1, len(flat)):
            den = norms[i] * norms[j]
            cosines.append(_dot(flat[i], flat[j]) / den if den > 0.0 else 0.0)
    cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
    n = len(deltas)
    return n * cos / (1.0 + (n - 1) * cos)


def _two_task_vectors(params: Mapping[str, Any], n: int) -> str | None:
    return None if n >= 3 else f"needs a base and at least 2 fine-tuned models (3 or more), got {n}"


@variadic_mode("model_stock", 3, "A + alpha · t · mean(δᵢ), t = N·cosθ / (1 + (N − 1)·cosθ), cosθ the mean "
               "pairwise cosine of the N task vectors (clamped to [0, 1]; alpha 1 is the paper's formula)",
               check_models=_two_task_vectors)
def model_stock(tensors, alpha, beta, params, key, seed):
    a = tensors[0]
    if alpha == 0.0:
        return a
    _, deltas = _deltas(tensors)
    t = stock_ratio(deltas)
    return a.add_(_summed(deltas), alpha=alpha * t / len(deltas))


def weiszfeld(points: list[Tensor], eps: float, max_iter: int) -> Tensor:
    """The geometric median of ``points`` (the point minimising Σ‖x − pᵢ‖ over flattened tensors) by Weiszfeld
    iterations from their mean: weights 1 / max(‖x − pᵢ‖, eps); stops after ``max_iter`` steps or when the
    sum of distances improves by no more than eps times itself."""
    x = points[0].clone()
    for p in points[1:]:
        x.add_(p)
    x.div_(len(points))
    diff = torch.empty_like(x)

    def distances(x: Tensor) -> list[float]:
        out = []
        for p in points:
            torch.sub(x, p, out=diff)
            flat = diff.reshape(-1)
            out.append(math.sqrt(_dot(flat, flat)))
        return out

    dist = distances(x)
    objective = sum(dist)
    for _ in range(max_iter):
        w = [1.0 / max(d, eps) for d in dist]
        new = points[0] * (w[0] / sum(w))
        for p, wi in zip(points[1:], w[1:]):
            new.add_(p, alpha=wi / sum(w))
        new_dist = distances(new)
        new_objective = sum(new_dist)
        x, dist = new, new_dist
        if objective - new_objective <= eps * new_objective:
            break
        objective = new_objective
    return x


@variadic_mode("geometric_median", 2, "A + alpha · (G − A), G the geometric median of all the models (A "
               "included; Weiszfeld iterations, per tensor)",
               params=(Param("eps", float, 1e-6, "smallest distance (and relative improvement) Weiszfeld counts",
                             1e-12, 1.0),
                       Param("max_iter", int, 100, "most Weiszfeld iterations", 1, 10000)))
def geometric_median(tensors, alpha, beta, params, key, seed):
    a = tensors[0]
    if alpha == 0.0:
        return a
    g = weiszfeld(tensors, params["eps"], params["max_iter"])
    return g.sub_(a).mul_(alpha).add_(a) if alpha != 1.0 else g

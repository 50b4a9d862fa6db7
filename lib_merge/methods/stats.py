"""The statistics pass of methods that normalise by the whole model (cosine_a, cosine_b; supermerger's
"stage 0"): read every eligible key's (A, B) once, collect the values the method declares per key, reduce them
to a trimmed (min, max), and bind that into the Formula. Both sinks get the Formula from ``build_plan``, so they
use the same numbers, and the numbers enter the live re-merge signature.

Memory: only the collected values are kept (the cosine along dim 0: one value per column, i.e. numel / rows of
each key), as float32; the tensors themselves are released key by key.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, MutableMapping

import numpy as np
import torch

from .formula import Formula

PERCENTILE_LOW, PERCENTILE_HIGH = 1, 99  # supermerger: values below the 1st / above the 99th are discarded


def reduce_range(values: np.ndarray) -> tuple[float, float] | None:
    """(min, max) of ``values`` without NaN, after discarding values below the 1st percentile and then, of
    the rest, those above the 99th ('midpoint' percentiles, in that order, as supermerger does). None when no
    value is left."""
    v = values[~np.isnan(values)]
    if v.size == 0:
        return None
    v = v[v >= np.percentile(v, PERCENTILE_LOW, method="midpoint")]
    v = v[v <= np.percentile(v, PERCENTILE_HIGH, method="midpoint")]
    return float(v.min()), float(v.max())


def collect(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], keys: Iterable[str],
            read_a: Callable[[str], torch.Tensor], read_b: Callable[[str], torch.Tensor]) -> tuple[float, float] | None:
    """Run the method's per-key statistic over ``keys`` (fp32 A and B) and reduce to (min, max)."""
    parts = []
    with torch.no_grad():
        for key in keys:
            a = read_a(key).to(dtype=torch.float32, device="cpu")
            b = read_b(key).to(dtype=torch.float32, device="cpu")
            parts.append(fn(a, b).reshape(-1).numpy().astype(np.float32, copy=True))
    if not parts:
        return None
    return reduce_range(np.concatenate(parts))


def with_stats(formula: Formula, keys: list[str], read_a: Callable[[str], torch.Tensor],
               read_b: Callable[[str], torch.Tensor], identity: tuple,
               cache: MutableMapping | None = None) -> Formula:
    """``formula`` with its method's statistics bound (unchanged when the method declares none).

    ``identity`` names the sources' contents (path, size, mtime): a ``cache`` (the live session's) holds the
    last result under (method, identity, keys), so a re-merge that changes only ratios reads nothing."""
    fn = formula.method.stats
    if fn is None:
        return formula
    token = (formula.method.name, identity, tuple(keys))
    if cache is not None and token in cache:
        return replace(formula, stats=cache[token])
    stats = collect(fn, keys, read_a, read_b)
    if cache is not None:
        cache.clear()  # one entry: the sources of the current merge
        cache[token] = stats
    return replace(formula, stats=stats)

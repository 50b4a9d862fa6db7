"""The two-model methods: SLERP, tensor swap (dim 0 or 1), self scale and add noise (weighted_sum); train difference and extract
(add_difference). Formulas: supermerger's calculation modes (``docs/merge-conventions.md`` §1.3); SLERP as
issue 12 states it."""
from __future__ import annotations

import math

import torch

from ..errors import MergeError
from .params import Param
from .registry import method

SLERP_LINEAR_BELOW = 1e-6  # sin ω below this: A and B (anti)parallel, interpolate linearly
TRAIN_DIFFERENCE_GAIN = 1.8  # supermerger's fixed gain


def _unit(ratio: float) -> str | None:
    return None if 0.0 <= ratio <= 1.0 else f"ratio {ratio} is outside [0, 1]"


def _alpha_zero(alpha: float, beta: float) -> bool:
    return alpha == 0.0


DOT_CHUNK = 1 << 16  # elements per fp64 partial sum: cache-resident, instead of fp64 copies of whole tensors


def _dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """⟨A,A⟩, ⟨B,B⟩, ⟨A,B⟩ of two flat tensors, accumulated in fp64 over fixed chunks (stable for tensors of
    tens of millions of elements; a whole-tensor fp64 copy cost 16 bytes per element and most of SLERP's time)."""
    aa = bb = ab = 0.0
    for s in range(0, a.numel(), DOT_CHUNK):
        x, y = a[s:s + DOT_CHUNK].double(), b[s:s + DOT_CHUNK].double()
        aa += float(torch.dot(x, x))
        bb += float(torch.dot(y, y))
        ab += float(torch.dot(x, y))
    return aa, bb, ab


@method("slerp", "sin((1-t)ω)/sin ω · A + sin(tω)/sin ω · B, ω the angle between flattened A and B, t = alpha "
        "(linear when sin ω < 1e-6, a norm is 0, or the tensor has one element)", ("weighted_sum",),
        elementwise=False, keeps_a=_alpha_zero, swaps=True)
def slerp(a, b, c, alpha, beta, params, key, seed):
    t = alpha
    if t == 0.0:
        return a
    if t == 1.0:
        return b
    if a.numel() > 1:
        aa, bb, ab = _dots(a.reshape(-1), b.reshape(-1))
        na, nb = math.sqrt(aa), math.sqrt(bb)
        if na > 0.0 and nb > 0.0:
            cos = max(-1.0, min(1.0, ab / (na * nb)))
            omega = math.acos(cos)
            so = math.sin(omega)
            if so >= SLERP_LINEAR_BELOW:
                return a.mul_(math.sin((1.0 - t) * omega) / so).add_(b, alpha=math.sin(t * omega) / so)
    return a.lerp_(b, t)


@method("train_difference", "A + (B - C) · |B - A| / (|B - C| + |B - A|) · 1.8 · alpha (0 where both are 0)",
        ("add_difference",), keeps_a=_alpha_zero)
def train_difference(a, b, c, alpha, beta, params, key, seed):
    if alpha == 0.0:
        return a
    ba = (b - a).abs_()
    d = b.sub_(c)
    den = d.abs().add_(ba)
    s = ba.div_(den).masked_fill_(den == 0, 0.0)
    return a.add_(d.mul_(s), alpha=TRAIN_DIFFERENCE_GAIN * alpha)


def swap_rows(n: int, alpha: float, beta: float) -> tuple[bool, int, int]:
    """(start from B, first row, end row) of the rows taken from the other model, clamped to [0, n]."""
    clamp = lambda x: max(0, min(n, math.floor(x)))  # noqa: E731
    if alpha + beta <= 1.0:
        return False, clamp(n * beta), clamp(n * (alpha + beta))
    return True, clamp(n * (alpha + beta - 1.0)), clamp(n * beta)


@method("tensor_swap", "rows [⌊n·beta⌋, ⌊n·(alpha+beta)⌋) of dim 0 from B, the rest A; when alpha + beta > 1, B "
        "with rows [⌊n·(alpha+beta-1)⌋, ⌊n·beta⌋) from A (0-dim tensors stay A)", ("weighted_sum",),
        elementwise=False, uses_beta=True, keeps_a=lambda alpha, beta: alpha == 0.0 and alpha + beta <= 1.0)
def tensor_swap(a, b, c, alpha, beta, params, key, seed):
    return _swap(a, b, alpha, beta, dim=0, n=a.shape[0] if a.dim() else 0)


def _swap(a, b, alpha: float, beta: float, dim: int, n: int):
    """Slices [lo, hi) along ``dim`` from the other model (bounds from ``n``, clipped to the size along ``dim``)."""
    if a.dim() == 0:
        return a
    from_b, lo, hi = swap_rows(n, alpha, beta)
    dst, src = (b, a) if from_b else (a, b)
    hi = min(hi, dst.shape[dim])
    if lo < hi:
        dst.narrow(dim, lo, hi - lo).copy_(src.narrow(dim, lo, hi - lo))
    return dst


@method("tensor_swap_dim1", "as tensor_swap, but slices along dim 1 of tensors with 2 or more dims; the bounds use "
        "dim 1's size when it is over 100, else dim 0's", ("weighted_sum",), elementwise=False, uses_beta=True,
        keeps_a=lambda alpha, beta: alpha == 0.0 and alpha + beta <= 1.0)
def tensor_swap_dim1(a, b, c, alpha, beta, params, key, seed):
    if a.dim() < 2:
        return _swap(a, b, alpha, beta, dim=0, n=a.shape[0] if a.dim() else 0)
    return _swap(a, b, alpha, beta, dim=1, n=a.shape[1] if a.shape[1] > 100 else a.shape[0])


@method("extract", "A + lerp(B - A, C - A, alpha) · lerp(d, 1 - d, beta), d = ((cos + 1) / 2)^gamma, cos the cosine "
        "of B - A and C - A along the last dim (alpha: 0 = B, 1 = C; beta: 0 similar, 1 dissimilar features)",
        ("add_difference",), elementwise=False, uses_beta=True, check_ratio=_unit,
        params=(Param("gamma", float, 1.0, "selectivity: high counts only very similar features as similar", 0.0),))
def extract(a, b, c, alpha, beta, params, key, seed):
    da, db = b.sub_(a), c.sub_(a)
    rows = (lambda t: t.reshape(1)) if a.dim() == 0 else (lambda t: t)
    cos = torch.nn.functional.cosine_similarity(rows(da), rows(db), dim=-1).clamp_(-1.0, 1.0)
    d = cos.add_(1.0).div_(2.0).pow_(params["gamma"])
    weight = d.add((1.0 - 2.0 * d), alpha=beta).unsqueeze(-1) if a.dim() else d.add((1.0 - 2.0 * d), alpha=beta)
    return a.add_(rows(da).lerp_(rows(db), alpha).mul_(weight).reshape(a.shape))


NOISE_SPARED = ("to_out", "proj_out", "norm")  # supermerger leaves these keys alone (add_noise, self_scale)


@method("self_scale", "alpha · A (keys containing to_out, proj_out or norm stay A; alpha 0 leaves A)",
        ("weighted_sum",), keeps_a=lambda alpha, beta: alpha in (0.0, 1.0))
def self_scale(a, b, c, alpha, beta, params, key, seed):
    if alpha in (0.0, 1.0) or any(s in key for s in NOISE_SPARED):
        return a
    return a.mul_(alpha)


@method("add_noise", "A + alpha · N(0, 1), one draw per key from the recipe's seed (keys containing to_out, proj_out "
        "or norm stay A)", ("weighted_sum",), elementwise=False, keeps_a=_alpha_zero, seeded=True)
def add_noise(a, b, c, alpha, beta, params, key, seed):
    if alpha == 0.0 or any(s in key for s in NOISE_SPARED):
        return a
    g = torch.Generator(device="cpu").manual_seed(seed)  # CPU: the same numbers on every device
    noise = torch.randn(a.shape, generator=g, dtype=torch.float32)
    return a.add_(noise.to(a.device), alpha=alpha)


SMOOTH_MEDIAN_SIZE = 3  # supermerger's smoothAdd: median filter of size 3, then a Gaussian of sigma 1
SMOOTH_SIGMA = 1.0


def _ndimage():
    """scipy.ndimage, imported only when smooth_add runs (the rest of the engine does not need scipy)."""
    try:
        from scipy import ndimage
    except ImportError:  # pragma: no cover - scipy is a declared dependency
        raise MergeError("method smooth_add needs scipy (pip install scipy), --method smooth_add") from None
    return ndimage


@method("smooth_add", "A + alpha · Gauss_σ=1(Median_size=3(B - C)), both filters over every tensor axis "
        "(scipy.ndimage, mode 'reflect', Gaussian truncated at 4σ)", ("add_difference",), elementwise=False,
        keeps_a=_alpha_zero)
def smooth_add(a, b, c, alpha, beta, params, key, seed):
    """scipy filters every axis of the tensor, including a conv's output channels (supermerger does the
    same); a 0-dim tensor is filtered as a one-element array (the filters leave it unchanged)."""
    if alpha == 0.0:
        return a
    nd = _ndimage()
    d = b.sub_(c).cpu().numpy()
    d = nd.gaussian_filter(nd.median_filter(d, size=SMOOTH_MEDIAN_SIZE, mode="reflect"), sigma=SMOOTH_SIGMA,
                           mode="reflect")
    return a.add_(torch.from_numpy(d).to(a.device), alpha=alpha)


COSINE_SKIPS = "first_stage_model"  # supermerger's cosine modes skip the VAE (stage 0 and the merge)


def _cos_dim0(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of A and B along dim 0 (one value per column; a 1-D or 0-dim tensor gives one 0-dim value).
    A zero column gives 0 (torch's eps), never NaN."""
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    return torch.nn.functional.cosine_similarity(a, b, dim=0)


def _cos_global(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the flattened tensors (fp64 sums); 0 when a norm is 0."""
    aa, bb, ab = _dots(a.reshape(-1), b.reshape(-1))
    return ab / math.sqrt(aa * bb) if aa > 0.0 and bb > 0.0 else 0.0


def _unit0(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised along dim 0 (a zero column stays zero)."""
    return torch.nn.functional.normalize(t.reshape(1) if t.dim() == 0 else t, p=2, dim=0).reshape(t.shape)


def _cosine_a_stat(a, b):
    return _cos_dim0(_unit0(a), _unit0(b))


def _cosine_b_stat(a, b):
    return _cos_dim0(a, b).add_(_cos_global(a, b)).div_(2.0)


def _relative(sim: torch.Tensor, stats: tuple[float, float] | None) -> torch.Tensor:
    """(sim - min) / (max - min) with the statistics pass's range; where the range is empty (max == min, or no
    statistics at all: every key equally similar) 1, so that k = 1 - alpha makes it a plain weighted sum."""
    if stats is None or not stats[1] > stats[0]:
        return torch.ones_like(sim)
    lo, hi = stats
    return sim.sub(lo).div_(hi - lo)


def _blend(a, b, k):
    """k·A + (1 - k)·B, k per column (broadcast along dim 0)."""
    return b.mul_(1.0 - k).add_(a.mul_(k))


@method("cosine_a", "k·A + (1-k)·B per column, k = clip((s - min)/(max - min) - |alpha|, 0, 1), s = (cos along "
        "dim 0 + cos of the flattened tensors)/2 of A and B L2-normalised along dim 0; min/max of the dim-0 cosines "
        "over all keys (1st-99th percentile); VAE keys stay A", ("weighted_sum",), elementwise=False,
        stats=_cosine_a_stat)
def cosine_a(a, b, c, alpha, beta, params, key, seed, stats):
    """Favours A's structure: the more a column of A and B agree (relative to the whole model), the more of A
    it keeps; alpha pushes toward B. VAE keys (``first_stage_model``) are returned as A, as supermerger's merge
    loop skips them (they are also left out of the statistics). Zero tensors give s = 0, never NaN."""
    if COSINE_SKIPS in key:
        return a
    an, bn = _unit0(a), _unit0(b)
    sim = _cos_dim0(an, bn).add_(_cos_global(an, bn)).div_(2.0)
    k = _relative(sim, stats).sub_(abs(alpha)).clamp_(0.0, 1.0)
    return _blend(a, b, k)


@method("cosine_b", "as cosine_a without the normalisation (s of the raw tensors; min/max collected on s itself) "
        "and k = clip((s - min)/(max - min) - alpha, 0, 1); VAE keys stay A", ("weighted_sum",), elementwise=False,
        stats=_cosine_b_stat)
def cosine_b(a, b, c, alpha, beta, params, key, seed, stats):
    """Supermerger's cosineB ("favours B's structure"); VAE keys are returned as A (see cosine_a)."""
    if COSINE_SKIPS in key:
        return a
    k = _relative(_cosine_b_stat(a, b), stats).sub_(alpha).clamp_(0.0, 1.0)
    return _blend(a, b, k)

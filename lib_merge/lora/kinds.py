"""The ΔW of each LoRA module kind, as the WebUI's built-in Lora extension computes it (so a baked checkpoint
matches BASE + ``<lora:…:1>``).

- LoRA: ΔW = up @ down · alpha/rank (rank = down's rows); with LoCon's ``lora_mid`` (CP conv),
  ΔW[o,c,h,w] = Σ up[o,i] · mid[i,j,h,w] · down[j,c].
- LoHa: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha/rank, rank = w1_b's rows; a half with ``hada_t1``/``hada_t2``
  (CP conv) is Σ t[i,j,h,w] · w_a[i,o] · w_b[j,c].
- LoKr: ΔW = kron(w1, w2) · scale, w1 = ``lokr_w1`` or w1_a @ w1_b, w2 = ``lokr_w2``, w2_a @ w2_b or the CP
  form with ``lokr_t2``; a 2-D w1 against a 4-D w2 is taken as (a, b, 1, 1). scale = alpha/rank where rank is
  w2_b's rows when w2 is factored, else w1_b's rows when w1 is, and 1 when neither is or alpha is absent.

A missing ``alpha`` means scale 1 for every kind (alpha = rank). Every module gives ΔW as an fp32 matrix
(out rows, in·k·k columns): conv weights are compared and patched flattened.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import torch

from ..errors import MergeError

KINDS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                       "alpha"}),
}
LABEL = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr"}


def _f32(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if t is None else t.to(device, torch.float32)


def _mat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """CP (Tucker) conv factors: Σ_ij t[i,j,h,w] · wa[i,o] · wb[j,c] -> (o, c, h, w)."""
    return torch.einsum("ijhw,io,jc->ochw", t, _mat(wa), _mat(wb)).contiguous()


class Module:
    """A LoRA module of some kind: its name and its ΔW (scale included, strength not)."""
    name: str
    kind: ClassVar[str] = "lora"

    def delta(self, device: str = "cpu") -> torch.Tensor:
        """ΔW as an fp32 matrix (out, in·k·k)."""
        raise NotImplementedError

    def dims(self) -> tuple[int, int]:
        """ΔW's (rows, columns), from the factor shapes alone (computed on the meta device)."""
        rows, cols = self.delta("meta").shape
        return int(rows), int(cols)


@dataclass(frozen=True)
class LoraModule(Module):
    name: str
    up: torch.Tensor
    down: torch.Tensor
    alpha: float  # alpha missing in the file: the rank
    mid: torch.Tensor | None = None  # LoCon CP conv core (rank, rank, k, k)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """up (out, r) and down (r, in·k·k) in fp32: conv factors reshaped to the matrices they multiply as."""
        return _mat(self.up.to(torch.float32)), _mat(self.down.to(torch.float32))

    def dims(self) -> tuple[int, int]:
        """(up's rows, down's columns): read off the factors (the meta-device path costs milliseconds a module)."""
        if self.mid is None:
            return int(self.up.shape[0]), math.prod(int(d) for d in self.down.shape[1:])
        return super().dims()

    def delta(self, device: str = "cpu") -> torch.Tensor:
        up, down = _mat(_f32(self.up, device)), _mat(_f32(self.down, device))
        if self.mid is None:
            return (up @ down) * self.scale
        core = torch.einsum("ijhw,oi,jc->ochw", _f32(self.mid, device), up, down)
        return _mat(core) * self.scale


@dataclass(frozen=True)
class LohaModule(Module):
    name: str
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    kind: ClassVar[str] = "loha"

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / int(self.w1b.shape[0])

    def delta(self, device: str = "cpu") -> torch.Tensor:
        halves = []
        for wa, wb, t in ((self.w1a, self.w1b, self.t1), (self.w2a, self.w2b, self.t2)):
            wa, wb = _f32(wa, device), _f32(wb, device)
            halves.append(_mat(_cp(_f32(t, device), wa, wb)) if t is not None else _mat(wa) @ _mat(wb))
        return halves[0] * halves[1] * self.scale


@dataclass(frozen=True)
class LokrModule(Module):
    name: str
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    kind: ClassVar[str] = "lokr"

    @property
    def scale(self) -> float:
        factored = self.w2b if self.w2b is not None else self.w1b
        if self.alpha is None or factored is None:
            return 1.0
        return self.alpha / int(factored.shape[0])

    def delta(self, device: str = "cpu") -> torch.Tensor:
        w1 = _f32(self.w1, device) if self.w1 is not None else _f32(self.w1a, device) @ _f32(self.w1b, device)
        if self.w2 is not None:
            w2 = _f32(self.w2, device)
        elif self.t2 is not None:
            w2 = _cp(_f32(self.t2, device), _f32(self.w2a, device), _f32(self.w2b, device))
        else:
            w2 = _mat(_f32(self.w2a, device)) @ _mat(_f32(self.w2b, device))
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        return _mat(torch.kron(w1.contiguous(), w2.contiguous())) * self.scale


def _alpha(got: dict[str, torch.Tensor]) -> float | None:
    return float(got["alpha"].reshape(-1)[0]) if "alpha" in got else None


def _need(got: dict[str, torch.Tensor], names: tuple[str, ...], kind: str, path: Path, module: str) -> None:
    missing = [n for n in names if n not in got]
    if missing:
        raise MergeError(f"{LABEL[kind]} module has no {missing[0]}, {path} module {module}")


def _lora(name: str, got: dict[str, torch.Tensor], path: Path) -> LoraModule:
    _need(got, ("lora_up.weight", "lora_down.weight"), "lora", path, name)
    up, down, mid = got["lora_up.weight"], got["lora_down.weight"], got.get("lora_mid.weight")
    if up.dim() not in (2, 4) or down.dim() != up.dim() or up.shape[1] != down.shape[0]:
        raise MergeError(f"LoRA module factors do not fit (up {tuple(up.shape)}, down {tuple(down.shape)}), "
                         f"{path} module {name}")
    alpha = _alpha(got)
    return LoraModule(name, up, down, float(down.shape[0]) if alpha is None else alpha, mid)


def _loha(name: str, got: dict[str, torch.Tensor], path: Path) -> LohaModule:
    _need(got, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "loha", path, name)
    return LohaModule(name, got["hada_w1_a"], got["hada_w1_b"], got["hada_w2_a"], got["hada_w2_b"],
                      got.get("hada_t1"), got.get("hada_t2"), _alpha(got))


def _lokr(name: str, got: dict[str, torch.Tensor], path: Path) -> LokrModule:
    for side in ("1", "2"):
        if f"lokr_w{side}" not in got:
            _need(got, (f"lokr_w{side}_a", f"lokr_w{side}_b"), "lokr", path, name)
    return LokrModule(name, got.get("lokr_w1"), got.get("lokr_w1_a"), got.get("lokr_w1_b"), got.get("lokr_w2"),
                      got.get("lokr_w2_a"), got.get("lokr_w2_b"), got.get("lokr_t2"), _alpha(got))


BUILDERS = {"lora": _lora, "loha": _loha, "lokr": _lokr}


def build_module(kind: str, name: str, got: dict[str, torch.Tensor], path: Path) -> Module:
    """The module of ``kind`` from its tensors; missing tensors or factors that do not multiply are errors."""
    mod = BUILDERS[kind](name, got, path)
    try:
        mod.dims()
    except RuntimeError as e:
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(got.items()) if k != "alpha")
        raise MergeError(f"{LABEL[kind]} module factors do not fit ({shapes}), {path} module {name}") from e
    return mod


def rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A weight's shape as the matrix ΔW is compared with: (out, in·k·k)."""
    return int(shape[0]), math.prod(shape[1:])

"""A nested recipe as an input of a live merge: its values are computed from the session's file caches when the
outer merge reads them, exactly as the file sink computes them (``merge_tensors``, then a cast to the step's
output dtype), so a saved chain equals its preview.

Each key's identity (:meth:`ChainInput.key_id`) is the nested step's own signature for that key (formula,
parameters, ratios, seed, and its inputs' identities, recursively) plus the output dtype: the outer re-merge
recomputes a key exactly when something it depends on changed, at any depth.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Callable, Iterable, Union

import torch

from ..chain import RecipeSource
from ..dtypes import ST_TO_TORCH
from ..errors import MergeError
from ..io.filesink import whole_task
from ..io.sources import Source
from ..methods.compute import merge_tensors
from ..plan import KeyPlan, build_plan
from ..recipe import Recipe
from ..roles import describe_role
from ..metadata import file_name
from .cache import TensorCache

LiveInput = Union[TensorCache, "ChainInput"]


class ChainInput:
    """The result of ``recipe`` over live inputs (file caches or other chains), read like a :class:`TensorCache`:
    ``get``, ``chunk``, ``key_id``, ``source``, ``release``. Only the session's request thread uses it."""

    def __init__(self, recipe: Recipe, inputs: list[LiveInput], role: str):
        self.recipe = recipe
        self.inputs = inputs
        self.name = f"{describe_role(role)} = recipe of {', '.join(file_name(p) for _, p in recipe.leaves())}"
        srcs = [c.source() for c in inputs]
        try:
            self.plan = build_plan(recipe, srcs)
        except MergeError as e:  # name the step, as file merges do
            raise MergeError(f"in the recipe of model {describe_role(role)}: {e}") from None
        self.order = self.plan.arrange(inputs)  # what the formula reads (plan order: --swap-ab)
        self._by_key: dict[str, KeyPlan] = self.plan.by_key()
        self._source = RecipeSource(self.name, self.plan, self.plan.arrange(srcs), None)
        self._last: tuple[str, torch.Tensor] | None = None  # the last whole value computed (read in chunks)
        self._lock = threading.Lock()

    def recorded(self) -> Recipe:
        """The step as it was computed: the seeds its random ratios were drawn with filled in, nested steps too
        (so a Save or a later re-merge of the recorded recipe gives the previewed numbers)."""
        return recorded_tree(self.recipe, self.inputs, self.plan)

    @property
    def device(self) -> torch.device:
        return self.order[0].device

    def source(self) -> Source:
        """The step's output keys, dtypes and shapes (what the outer plan reads); ``read`` computes from files."""
        return self._source

    def leaf_caches(self) -> list[TensorCache]:
        return leaf_caches(self.inputs)

    def __contains__(self, key: str) -> bool:
        return False  # nothing is kept: values are computed from the leaves' caches

    # -- identity --------------------------------------------------------------------------------------
    def key_id(self, key: str) -> tuple:
        """What this step's value of ``key`` depends on, recursively; equal ids mean equal values."""
        kp = self._by_key[key]
        ids = tuple(input_id(c, key) for c in self.order)
        if kp.action == "merge":
            sig = self.plan.formula.signature(kp, ids)
        else:
            sig = (kp.action, ids[:1] if kp.action != "copy_b" else ids[1:2], kp.lora)
        return ("chain", sig, kp.out_dtype)

    # -- values ----------------------------------------------------------------------------------------
    def _inputs_for(self, kp: KeyPlan) -> list[LiveInput]:
        if kp.action == "copy_b":
            return self.order[1:2]
        return self.order[: self.plan.formula.models] if kp.action == "merge" else self.order[:1]

    def _value(self, kp: KeyPlan, read: Callable[[LiveInput], torch.Tensor]) -> torch.Tensor:
        """The step's value (or chunk) of ``kp`` in its output dtype, from what ``read`` gives of each input."""
        ins = [read(c) for c in self._inputs_for(kp)]
        if kp.action == "copy_b" or (kp.action != "merge" and not kp.lora):
            res = ins[0]  # cast straight to the output dtype, as the file sink copies
        else:
            res = merge_tensors(self.plan.formula, kp, ins, device=self.device)
        return res.to(dtype=ST_TO_TORCH[kp.out_dtype], copy=True)

    def get(self, key: str, populate: bool = True) -> torch.Tensor:
        kp = self._by_key[key]
        with self._lock:
            if self._last is not None and self._last[0] == key:
                return self._last[1]
        t = self._value(kp, lambda c: c.get(key)).reshape(kp.shape)
        with self._lock:
            self._last = (key, t)
        return t

    def chunk(self, key: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of ``key`` (flattened): computed from the inputs' chunks where the step's formula
        is elementwise, else sliced from the whole value (computed once for the key's chunks)."""
        kp = self._by_key[key]
        if whole_task(self.plan, kp) or kp.action == "copy_b":
            return self.get(key).reshape(-1)[start:end]
        return self._value(kp, lambda c: c.chunk(key, start, end))

    def release(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        with self._lock:
            if self._last is not None and self._last[0] in keys:
                self._last = None
        for c in self.inputs:
            c.release(keys)

    def close(self) -> None:
        self._last = None
        self._source.close()


def input_id(c: LiveInput, key: str) -> object:
    """What an input's value of ``key`` depends on: a file's identity (path, size, mtime) or a step's key id."""
    return c.key_id(key) if isinstance(c, ChainInput) else c.id


def leaf_caches(inputs: Iterable[LiveInput]) -> list[TensorCache]:
    """The file caches under ``inputs`` (chains expanded)."""
    out: list[TensorCache] = []
    for c in inputs:
        out += c.leaf_caches() if isinstance(c, ChainInput) else [c]
    return out


def recorded_tree(recipe: Recipe, inputs: list[LiveInput], plan) -> Recipe:
    """``recipe`` with its nested steps recorded (:meth:`ChainInput.recorded`) and the seed ``plan`` drew."""
    models = [c.recorded() if isinstance(c, ChainInput) else m for m, c in zip(recipe.models, inputs)]
    seed = plan.seed if plan.random is not None else recipe.seed
    return replace(recipe, models=models, seed=seed)

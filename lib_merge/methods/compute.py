"""Compute one output tensor (or a chunk of it) from the plan: shared by the file sink and the live sink.

``merge_chunk`` takes source tensors (any dtype), computes in fp32 on ``device`` and returns the fp32 result;
casting to the output dtype is the sink's job, done once.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..adjust import apply
from ..lora.apply import add_lora
from ..plan import KeyPlan
from .formula import Formula


def merge_tensors(formula: Formula, kp: KeyPlan, tensors: list[Tensor], scratch: list[Tensor] | None = None,
                  device: torch.device | str = "cpu", a_ready: bool = False, owned: bool = False) -> Tensor:
    """fp32 result of ``formula`` (a mode bound to its method) on ``tensors`` (A first) for key plan ``kp``.

    ``scratch``: optional fp32 buffers (one per input, same numel as the inputs) that may be overwritten;
    ``a_ready``: ``scratch[0]`` already holds A's values in fp32 (the live sink converted them for its check);
    ``owned``: ``tensors`` are fp32 copies on ``device`` that may be overwritten (used as they are, not copied).
    Then adds the key's LoRA patches and applies its Adjust (§1.12) last; a patched or adjusted key is always
    computed whole (both sinks see to it). A "copy_a" key with LoRA patches is A's value (``tensors[0]``) patched.
    Handles the inpainting first conv (merge only the first ``kp.channels`` input channels, keep A's rest).
    """
    if kp.action != "merge":
        return finish(kp, tensors[0].to(device=device, dtype=torch.float32))
    if kp.channels is not None:
        a = tensors[0].to(device=device, dtype=torch.float32, copy=True)
        parts = [a[:, :kp.channels].clone()] + [t[:, :kp.channels].to(device=device, dtype=torch.float32, copy=True)
                                                for t in tensors[1:]]
        a[:, :kp.channels] = formula.compute_all(parts, kp.alpha, kp.beta, kp.key)
        return finish(kp, a)
    if formula.mode.streams:  # reads the inputs as they are and never writes them: no fp32 copies
        return finish(kp, formula.compute_all([t.to(device) for t in tensors], kp.alpha, kp.beta, kp.key))
    ins: list[Tensor] = []
    for i, t in enumerate(tensors):
        if owned:
            ins.append(t)
        elif scratch is not None:
            buf = scratch[i][: t.numel()].view(t.shape)
            if not (i == 0 and a_ready):
                buf.copy_(t)
            ins.append(buf)
        else:
            ins.append(t.to(device=device, dtype=torch.float32, copy=True))
    return finish(kp, formula.compute_all(ins, kp.alpha, kp.beta, kp.key))


def finish(kp: KeyPlan, result: Tensor) -> Tensor:
    """What follows the formula, in this order: the LoRAs' ΔW, then Adjust (on the whole fp32 result)."""
    return apply(kp.adjust, add_lora(kp.lora, result))

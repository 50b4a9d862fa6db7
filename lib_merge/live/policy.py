"""Where the live caches keep source tensors: the one place that knows what each policy means."""
from __future__ import annotations

from enum import Enum

import torch

from ..errors import MergeError


class CachePolicy(Enum):
    """``cpu``: RAM (files mapped first, copied into RAM in the background); ``mmap``: views of the mapped files
    (least memory, reads go through the page cache); ``gpu``: VRAM (read from the file, then moved)."""

    CPU = "cpu"
    MMAP = "mmap"
    GPU = "gpu"

    @classmethod
    def parse(cls, value: "CachePolicy | str", where: str = "cache policy") -> "CachePolicy":
        """A policy from its name (any case); a setting or option with another value names it in the error."""
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).strip().lower())
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise MergeError(f"unknown cache policy {value!r} (use {names}), {where}") from None

    @property
    def maps_files(self) -> bool:
        """Safetensors sources are read as views of the mapped file (no copy at the first merge)."""
        return self is not CachePolicy.GPU

    @property
    def copies_to_ram(self) -> bool:
        """The background copier turns mapped views into RAM copies after a merge."""
        return self is CachePolicy.CPU

    @property
    def prefetches(self) -> bool:
        """Tensors a merge did not need are cached too, so that no later re-merge reads a file."""
        return self is not CachePolicy.MMAP

    def device(self) -> torch.device:
        """The device cached tensors live on. ``gpu`` without CUDA is refused: callers that want a fallback
        (the WebUI setting "gpu when there is room") choose ``cpu`` before they get here."""
        if self is not CachePolicy.GPU:
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise MergeError("the gpu cache policy needs a CUDA device and torch sees none, cache policy gpu")
        return torch.device("cuda", torch.cuda.current_device())

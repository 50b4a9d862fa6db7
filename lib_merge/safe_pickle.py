"""Load ``.ckpt``/``.pt``/``.pth`` checkpoints without running code from them.

``torch.load`` is given a pickle module whose ``find_class`` allows only tensors, storages, ``OrderedDict``,
numpy scalars/dtypes, and maps PyTorch Lightning's ``ModelCheckpoint`` (pickled into real SD1 checkpoints) to
a harmless stub. Any other global is refused with an error naming it.
"""
from __future__ import annotations

import collections
import pickle
import types
from pathlib import Path

import torch

from .errors import MergeError

_TORCH_REBUILD = {
    "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
    "_rebuild_parameter_with_state", "_rebuild_device_tensor_from_numpy", "_rebuild_qtensor",
}
_STUB_CLASSES = {
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
}


class _Stub:
    """Stands in for harmless training objects; accepts any state and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _allowed(module: str, name: str):
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module in ("torch._utils", "torch._tensor") and (name in _TORCH_REBUILD or name == "_rebuild_from_type_v2"):
        import importlib
        return getattr(importlib.import_module(module), name)
    if module == "torch" and (name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)):
        return getattr(torch, name)
    if module == "torch.nn.parameter" and name == "Parameter":
        return torch.nn.Parameter
    if module == "torch" and name == "Size":
        return torch.Size
    if module == "torch.serialization" and name == "_get_layout":
        return torch.serialization._get_layout
    if module == "torch" and name in ("strided", "sparse_coo"):
        return getattr(torch, name)
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        import numpy
        return numpy.core.multiarray.scalar if name == "scalar" else numpy.core.multiarray._reconstruct
    if module == "numpy" and name in ("dtype", "ndarray"):
        import numpy
        return getattr(numpy, name)
    if module == "_codecs" and name == "encode":
        import _codecs
        return _codecs.encode
    if (module, name) in _STUB_CLASSES:
        return _Stub
    return None


class RestrictedUnpickler(pickle.Unpickler):
    source = "checkpoint"

    def find_class(self, module, name):
        obj = _allowed(module, name)
        if obj is None:
            raise MergeError(f"refusing to load: the pickle needs {module}.{name}, which could run code, {self.source}")
        return obj


def _pickle_module(source: str) -> types.ModuleType:
    mod = types.ModuleType("blockmerge_safe_pickle")

    class _U(RestrictedUnpickler):
        pass

    _U.source = source
    mod.Unpickler = _U
    mod.load = pickle.load
    mod.__name__ = "blockmerge_safe_pickle"
    return mod


def _load_restricted(p: Path):
    """Our allow-list (torch's plus a stub for Lightning's ModelCheckpoint); any other global is refused.
    ``weights_only`` cannot be combined with a custom pickle module, so the allow-list lives in ``find_class``."""
    try:
        return torch.load(p, map_location="cpu", pickle_module=_pickle_module(str(p)), weights_only=False)
    except MergeError:
        raise
    except Exception as e:
        raise MergeError(f"cannot read checkpoint ({e.__class__.__name__}: {str(e)[:200]}), {p}") from None


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a pickled checkpoint safely and return its flat tensor dict (``state_dict`` unwrapped)."""
    p = Path(path)
    try:
        # torch's own allow-list first; it refuses PyTorch Lightning's callback that real SD1 files carry
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        obj = _load_restricted(p)
    except Exception as e:  # corrupt zip, truncated file, ...
        raise MergeError(f"cannot read checkpoint ({e.__class__.__name__}: {str(e)[:200]}), {p}") from None
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise MergeError(f"checkpoint does not hold a state dict (got {type(obj).__name__}), {p}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v.detach()
    if not out:
        raise MergeError(f"checkpoint holds no tensors, {p}")
    return out

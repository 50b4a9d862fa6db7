"""The one restricted unpickler that every pickle inside a ``.ckpt``/``.pt``/``.pth`` goes through.

Why not ``torch.load``: whatever ``pickle_module`` it is given, torch decides which of its functions it calls
(``load`` for the legacy magic-number/protocol/sys-info/storage-key pickles and the tar format, ``Unpickler``
for the main pickle), and that differs between torch versions; torch <= 2.5.1 also had a code-execution hole
in ``weights_only=True`` itself (CVE-2025-32434). So :mod:`lib_merge.io.ckpt_reader` parses the checkpoint
formats itself and feeds every pickle to :class:`RestrictedUnpickler`; torch only turns bytes into tensors.

``find_class`` is the allow-list: ``OrderedDict`` and a few plain builtin containers, torch dtypes/``Size``/
``device``, storage types (mapped to :class:`StorageType` markers, never torch's storage classes), the tensor
rebuild functions (mapped to our own, which build inert :class:`TensorRef` records and never call torch's
``_rebuild_*``), numpy scalars/dtypes/arrays, ``_codecs.encode`` for latin-1 only, and PyTorch Lightning's
``ModelCheckpoint`` (pickled into real SD1 checkpoints) mapped to a harmless stub. Any other global is refused
with a :class:`MergeError` naming it. Nothing from a checkpoint ever runs: the only callables a pickle can reach
are the ones listed here.
"""
from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable, NamedTuple

import torch

from ..errors import MergeError

#: the Python object that the legacy format's first pickle holds
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
#: the legacy format's second pickle
PROTOCOL_VERSION = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64,
    "UntypedStorage": torch.uint8,
}
_STORAGE_MODULES = {"torch", "torch.cuda", "torch.storage"}
_DTYPES = {n: getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)}
_STUB_CLASSES = {
    ("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    ("lightning.pytorch.callbacks.model_checkpoint", "ModelCheckpoint"),
}
_PLAIN_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex}  # not bytearray(n): n zeroed bytes


class StorageType(NamedTuple):
    """What a pickled storage class (``torch.FloatStorage`` ...) becomes: only its element dtype."""
    dtype: torch.dtype


class StorageRef(NamedTuple):
    """A storage named by a checkpoint: ``nbytes`` bytes at ``byte_offset`` of the data record ``key``."""
    key: str
    dtype: torch.dtype
    byte_offset: int
    nbytes: int


class TensorRef(NamedTuple):
    """A tensor described by a pickle; :mod:`lib_merge.io.ckpt_reader` builds it once the storage bytes are read."""
    storage: StorageRef
    offset: int
    size: tuple
    stride: tuple
    dtype: torch.dtype


class _Stub:
    """Stands in for harmless training objects; accepts any state and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list, torch.Size)) or not all(type(x) is int for x in v):
        raise MergeError(f"corrupt tensor record: {what} is not a tuple of ints")
    return tuple(v)


def _tensor_ref(storage: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise MergeError(f"corrupt tensor record: expected a storage, got {type(storage).__name__}")
    if type(offset) is not int:
        raise MergeError("corrupt tensor record: storage offset is not an int")
    dtype = storage.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype):
        raise MergeError("corrupt tensor record: dtype is not a torch dtype")
    return TensorRef(storage, offset, _int_tuple(size, "size"), _int_tuple(stride, "stride"), dtype)


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    """``torch._utils._rebuild_tensor`` / ``_v2``: requires_grad, backward hooks and metadata are dropped."""
    return _tensor_ref(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad=False, hooks=None, dtype=None, *_ignored):
    """``torch._utils._rebuild_tensor_v3``: an untyped storage viewed as ``dtype`` (fp8, uint16, ...)."""
    return _tensor_ref(storage, storage_offset, size, stride, dtype)


def _rebuild_parameter(data, *_ignored):
    """``torch._utils._rebuild_parameter(_with_state)``: a Parameter is kept as its plain tensor."""
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    """``torch._tensor._rebuild_from_type_v2``: ``func`` came through :func:`allowed` too; subclass/state dropped."""
    if not callable(func) or not isinstance(args, tuple):
        raise MergeError("corrupt tensor record: bad subclass rebuild arguments")
    return func(*args)


def _latin1_encode(obj, encoding="utf-8"):
    """``_codecs.encode`` as numpy's protocol-2 pickles use it (bytes stored as latin-1 text); nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise MergeError(f"refusing to load: the pickle needs _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1")


_TORCH_FUNCS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _rebuild_parameter,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("_codecs", "encode"): _latin1_encode,
}


def _multiarray():
    try:
        from numpy._core import multiarray  # numpy 2 (numpy 1.26 maps it to numpy.core quietly)
    except ImportError:
        from numpy.core import multiarray
    return multiarray


class _NdarrayName:
    """What ``numpy.ndarray`` becomes: only :func:`_np_reconstruct` takes it (not a type, so NEWOBJ cannot
    call ``ndarray.__new__`` with a shape of its choosing)."""


_NDARRAY = _NdarrayName()


def _np_reconstruct(subtype, shape, dtype):
    """numpy's ``_reconstruct`` as ``ndarray.__reduce__`` uses it: an empty plain array that BUILD then fills
    from the pickle's own data (so its size is bounded by the file, unlike ``_reconstruct(ndarray, (1e9,), 'O')``)."""
    import numpy
    if subtype is not _NDARRAY or not isinstance(shape, tuple) or 0 not in shape:
        raise MergeError("corrupt checkpoint: numpy array record that is not an empty ndarray")
    return _multiarray()._reconstruct(numpy.ndarray, shape, dtype)


def _numpy_global(module: str, name: str):
    import numpy
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("scalar", "_reconstruct"):
        return _multiarray().scalar if name == "scalar" else _np_reconstruct
    if module == "numpy" and name == "dtype":
        return numpy.dtype
    if module == "numpy" and name == "ndarray":
        return _NDARRAY
    return None


def allowed(module: str, name: str):
    """The object a pickle may name as ``module.name``, or None when it is not on the allow-list."""
    if not isinstance(module, str) or not isinstance(name, str):
        return None
    if module == "collections" and name == "OrderedDict":
        return collections.OrderedDict
    if module in ("builtins", "__builtin__") and name in _PLAIN_BUILTINS:
        return _PLAIN_BUILTINS[name]
    if (module, name) in _TORCH_FUNCS:
        return _TORCH_FUNCS[module, name]
    if module in _STORAGE_MODULES and name in _STORAGE_DTYPES:
        return StorageType(_STORAGE_DTYPES[name])
    if module == "torch" and name in _DTYPES:
        return _DTYPES[name]
    if module.split(".")[0] == "numpy":
        return _numpy_global(module, name)
    if (module, name) in _STUB_CLASSES:
        return _Stub
    return None


def _shown(text: object) -> str:
    """A pickle-supplied name as it goes into a one-line message: printable, at most 100 characters."""
    s = text if isinstance(text, str) else repr(text)
    s = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in s)
    return s if len(s) <= 100 else s[:100] + "..."


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` limited to :func:`allowed`; persistent ids go to ``on_persistent`` (None: refused)."""

    def __init__(self, file: io.BufferedIOBase, source: str,
                 on_persistent: Callable[[Any], Any] | None = None):
        super().__init__(file)
        self.source = source
        self.on_persistent = on_persistent

    def find_class(self, module, name):
        obj = allowed(module, name)
        if obj is None:
            raise MergeError(f"refusing to load: the pickle needs {_shown(module)}.{_shown(name)}, "
                             f"which could run code, {self.source}")
        return obj

    def persistent_load(self, pid):
        if self.on_persistent is None:
            raise MergeError(f"corrupt checkpoint: unexpected persistent id in a header pickle, {self.source}")
        return self.on_persistent(pid)


def restricted_loads(data: bytes, source: str, on_persistent: Callable[[Any], Any] | None = None) -> Any:
    """Unpickle ``data`` (one pickle, already checked by :mod:`lib_merge.io.pickle_bounds`) through the allow-list."""
    return RestrictedUnpickler(io.BytesIO(data), source, on_persistent).load()

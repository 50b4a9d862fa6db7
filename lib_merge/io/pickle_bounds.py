"""Find where a pickle ends and check it is sane before the C unpickler sees it.

The allow-list stops code from running, but a corrupt or hostile pickle can still make CPython's unpickler
spend minutes and gigabytes: ``LONG_BINPUT 1061630321`` grows the memo to a billion slots, and counted
strings/bytes are allocated at their declared length before they are read. So every pickle is first walked
with :func:`pickletools.genops` over an in-memory copy: it must end in STOP within
:data:`MAX_PICKLE_BYTES`, every length field must fit the bytes that follow, and memo indexes must stay
below the number of opcodes seen (the pickler numbers them 0, 1, 2 ...). Only then is it unpickled, from
memory. SD checkpoints' pickles are well under 10 MB (a few tens of thousands of opcodes).
"""
from __future__ import annotations

import io
import pickletools
from typing import BinaryIO

from ..errors import MergeError

MAX_PICKLE_BYTES = 256 * 1024 * 1024
_FIRST_WINDOW = 1 << 16
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_OUT_OF_DATA = ("not enough data", "no newline found", "but only", "exhausted before seeing STOP", "runs past")


class _Short(Exception):
    """The pickle may go on past the bytes we looked at."""


def pickle_length(data: bytes, source: str, complete: bool = True) -> int:
    """Bytes from the start of ``data`` to just past its pickle's STOP. ``complete``: ``data`` is all there is
    (else running out of bytes raises :class:`_Short` so the caller can look further)."""
    ops = 0
    end = None
    try:
        for op, arg, pos in pickletools.genops(io.BytesIO(data)):
            ops += 1
            if op.name in _PUTS and (type(arg) is not int or not 0 <= arg <= ops):
                raise MergeError(f"corrupt checkpoint: pickle memo index {arg} at byte {pos}, {source}")
            if op.name == "FRAME" and arg > len(data) - pos:
                raise ValueError(f"frame of {arg} bytes at byte {pos} runs past the data")
            end = pos + 1
    except ValueError as e:  # pickletools' messages; some of them mean "ran out of bytes"
        if not complete and any(m in str(e) for m in _OUT_OF_DATA):
            raise _Short() from None
        raise MergeError(f"corrupt checkpoint: bad pickle ({' '.join(str(e).split())[:160]}), {source}") from None
    if end is None:
        raise MergeError(f"corrupt checkpoint: empty pickle, {source}")
    return end


def take_pickle(f: BinaryIO, source: str) -> bytes:
    """The next pickle in file ``f``, checked; ``f`` is left just past it (the legacy format's pickles are
    back to back, followed by raw tensor bytes)."""
    start = f.tell()
    window = _FIRST_WINDOW
    while True:
        f.seek(start)
        data = f.read(window)
        try:
            end = pickle_length(data, source, complete=len(data) < window)
            break
        except _Short:
            if window >= MAX_PICKLE_BYTES:
                raise MergeError(f"corrupt checkpoint: a pickle longer than {MAX_PICKLE_BYTES} bytes, "
                                 f"{source}") from None
            window = min(window * 8, MAX_PICKLE_BYTES)
    f.seek(start + end)
    return data[:end]

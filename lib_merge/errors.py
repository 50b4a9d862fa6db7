"""The engine's error types: one for what the user can fix, one for what only a code change can fix.

``MergeError`` messages follow ``<what>, <which file/key/token>`` so the CLI can print them as one line
(``error: <message>``, exit 2) and the HTTP API as one ``detail``. ``InternalError`` is a broken invariant of the
engine itself: callers should not turn it into a user-facing message, since nothing the user changes fixes it.
"""
from __future__ import annotations


class MergeError(Exception):
    """A problem with the user's input, files or machine (disk, device); never a bug in the engine."""


class MergeInterrupted(MergeError):
    """The caller asked the merge to stop (between tensors)."""


class InternalError(RuntimeError):
    """A broken invariant inside the engine (a bug to report), never caused by the user's input."""

"""The one error type the engine raises for bad input.

Messages follow ``<what>, <which file/key/token>`` so the CLI can print them as one line.
"""
from __future__ import annotations


class MergeError(Exception):
    """A problem with the user's input or files; never a bug in the engine."""


class MergeInterrupted(MergeError):
    """The caller asked the merge to stop (between tensors)."""

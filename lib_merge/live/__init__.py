"""The live sink: apply a planned merge in place to a loaded model's parameters, re-merge incrementally, roll
back on interrupt, restore the original weights exactly.

- :mod:`.session`: :class:`LiveSession`, the requests (apply, restore) and their rollback;
- :mod:`.cache`: :class:`TensorCache`, one source file's tensors, shared with the background copier;
- :mod:`.policy`: :class:`CachePolicy`, where the caches keep tensors (cpu / mmap / gpu).
"""
from .cache import SourceId, TensorCache
from .policy import CachePolicy
from .session import (CHUNK, ORIGINAL, ApplyReport, FreeReport, LiveSession, LiveStatus, LiveTarget, Signature,
                      fingerprint)

__all__ = ["CHUNK", "ORIGINAL", "ApplyReport", "CachePolicy", "FreeReport", "LiveSession", "LiveStatus",
           "LiveTarget", "Signature", "SourceId", "TensorCache", "fingerprint"]

"""Give memory back to the operating system after a catch-up.

Taking in a burst holds its pages and events in memory for a moment (megabytes for a few
thousand events). Python frees those objects at once, but glibc's allocator keeps the
freed heap pages mapped, so an idle daemon would keep the burst's high-water mark for
good. `malloc_trim(0)` hands the free pages back. Elsewhere (musl, macOS) there is no
such call and this does nothing.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

_Trim = Callable[[int], int]
_trim: _Trim | None = None
_looked = False


def _malloc_trim() -> _Trim | None:
    """glibc's malloc_trim, looked up once (ctypes is imported only when first needed)."""
    global _trim, _looked  # noqa: PLW0603 - a lazily made module-wide handle
    if not _looked:
        _looked = True
        import ctypes  # noqa: PLC0415 - costs memory a daemon that never trims need not pay

        try:
            function = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError):
            return None
        function.argtypes = [ctypes.c_size_t]
        function.restype = ctypes.c_int
        _trim = function
    return _trim


def give_back() -> bool:
    """Collect garbage and return the free heap to the OS; True when it was handed back."""
    gc.collect()
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

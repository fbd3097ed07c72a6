"""Give memory back to the operating system after a catch-up.

Taking in a burst holds its pages and events in memory for a moment (megabytes for a few
thousand events). Python frees those objects at once, but glibc's allocator keeps the
freed heap pages mapped, so an idle daemon would keep the burst's high-water mark for
good. `malloc_trim(0)` hands the free pages back. Elsewhere (musl, macOS) there is no
such call and this does nothing.
"""

from __future__ import annotations

import gc
import time
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


class AfterWork:
    """When to give memory back again: once the daemon has gone quiet after a stretch of work.

    The take-in gives back what reading a burst held, but the burst's deliveries come after
    it: requests, bodies and attempt records leave the heap grown once more. Asked on each
    poll, `due` is true once `at` deliveries or more have been noted and none for `quiet_s`.
    It starts armed, because starting (imports, the first reads) leaves freed heap too.
    """

    def __init__(self, *, at: int, quiet_s: float, clock: Callable[[], float] = time.monotonic):
        self._at = at
        self._quiet_s = quiet_s
        self._clock = clock
        self._work = at
        self._last = clock()

    def note(self) -> None:
        """One more piece of work (a delivery's outcome), just now."""
        self._work += 1
        self._last = self._clock()

    def due(self) -> bool:
        """True once (until `reset`): enough work, then quiet."""
        return self._work >= self._at and self._clock() - self._last >= self._quiet_s

    def reset(self) -> None:
        """The memory was given back: wait for the next stretch of work."""
        self._work = 0

"""Crash points, so fault tests can kill the process at an exact instant.

`UNLEASH_POLLER_CRASH_AT="delivery.after_post:25"` kills the process with SIGKILL the 25th
time it reaches that point (as `kill -9` would: no clean-up, no flush). Unset, a crash
point costs one comparison. Points: `poll.page_fetched` (between pages of a catch-up),
`poll.run_taken` (a burst read oldest page first, after one page's events were taken in),
`state.before_commit` (inside a state transaction, before COMMIT), `delivery.before_post`,
`delivery.after_post` (the receiver has the event, the state does not know yet).
"""

from __future__ import annotations

import os
import signal

ENV = "UNLEASH_POLLER_CRASH_AT"


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, count = spec.partition(":")
    return name, int(count or "1")


_target = _parse(os.environ.get(ENV))
_seen = 0


def crash_point(name: str) -> None:
    global _seen  # noqa: PLW0603 - one counter per process is the point
    if _target is None or _target[0] != name:
        return
    _seen += 1
    if _seen >= _target[1]:
        os.kill(os.getpid(), signal.SIGKILL)

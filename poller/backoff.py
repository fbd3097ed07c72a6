"""One back-off for every wait that grows after a failure: doubling, capped, and, where
many clients may have failed together, with "equal jitter"."""

from __future__ import annotations

MAX_DOUBLINGS = 30  # past any cap for any sane base; keeps 2.0**n finite however many tries


def backoff_s(attempt: int, base_s: float, cap_s: float, jitter: float | None = None) -> float:
    """The wait after `attempt` earlier tries: `base_s * 2**attempt`, at most `cap_s`.

    With `jitter` in [0, 1), half of that wait is fixed and half is spread by `jitter`
    ("equal jitter"), so pollers that lost Unleash together do not come back in step.
    """
    delay = min(cap_s, base_s * 2.0 ** min(attempt, MAX_DOUBLINGS))
    if jitter is None:
        return delay
    return delay / 2 + delay / 2 * jitter

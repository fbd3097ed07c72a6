"""The one back-off formula: doubling from a base, capped, with optional equal jitter."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.backoff import backoff_s


@pytest.mark.parametrize(
    ("attempt", "base_s", "cap_s", "jitter", "expected"),
    [
        (0, 1.0, 30.0, None, 1.0),
        (1, 1.0, 30.0, None, 2.0),
        (4, 1.0, 30.0, None, 16.0),
        (5, 1.0, 30.0, None, 30.0),  # 32 capped
        (1, 5.0, 60.0, None, 10.0),
        (10_000, 1.0, 30.0, None, 30.0),  # 2.0**10000 would overflow a float
        (1, 5.0, 60.0, 0.0, 5.0),  # equal jitter: half fixed...
        (1, 5.0, 60.0, 0.5, 7.5),
        (4, 5.0, 60.0, 0.999, 30.0 + 30.0 * 0.999),  # ...half spread, on the capped wait
    ],
)
def test_backoff_table(
    attempt: int, base_s: float, cap_s: float, jitter: float | None, expected: float
) -> None:
    """Each wait is base * 2**attempt, capped, and with jitter lies in [half, whole)."""
    assert backoff_s(attempt, base_s, cap_s, jitter) == pytest.approx(expected)


@settings(max_examples=50)
@given(
    attempt=st.integers(0, 5000),
    base_s=st.floats(0.001, 3600.0),
    cap_s=st.floats(0.001, 86400.0),
    jitter=st.floats(0.0, 1.0, exclude_max=True),
)
def test_backoff_stays_within_cap_and_grows(
    attempt: int, base_s: float, cap_s: float, jitter: float
) -> None:
    """Never above the cap, never shrinking with more tries, jitter within half to whole."""
    plain = backoff_s(attempt, base_s, cap_s)
    assert 0 < plain <= cap_s
    assert backoff_s(attempt + 1, base_s, cap_s) >= plain
    assert plain / 2 <= backoff_s(attempt, base_s, cap_s, jitter) <= plain

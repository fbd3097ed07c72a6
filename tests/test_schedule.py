"""The schedule that says when a webhook may send next: rate limit, 429 holds, pauses and
probes, without asyncio or a clock."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from poller.deliver import Outcome
from poller.schedule import PROBE_MAX_S, Action, Schedule

OK = Outcome("delivered", "HTTP 200")
FAILED = Outcome("give_up", "HTTP 500 after 2 attempts")
RETRY = Outcome("retry", "HTTP 500", 1.0)
GONE = Outcome("pause", "HTTP 410 Gone")


def _hold(seconds: float) -> Outcome:
    return Outcome(
        "retry", "HTTP 429", seconds, rate_limited=True, webhook_wait=True, counted=False
    )


def test_unlimited_webhook_may_always_send_now() -> None:
    """Without max_per_second, nothing waits."""
    schedule = Schedule()
    for now in (0.0, 0.0, 0.001):
        assert schedule.gate(now) == now
        schedule.took(now)


def test_rate_limit_spaces_starts_and_a_late_start_does_not_catch_up() -> None:
    """At 4/s starts are 0.25 s apart; one that starts late pushes the next one back."""
    schedule = Schedule(max_per_second=4)
    schedule.took(10.0)
    assert schedule.gate(10.0) == 10.25
    schedule.took(10.25)
    assert schedule.gate(10.3) == 10.5
    schedule.took(11.0)  # started late
    assert schedule.gate(11.0) == 11.25


@settings(max_examples=60)
@given(
    rate=st.floats(min_value=0.2, max_value=50.0),
    asks=st.lists(st.floats(min_value=0.0, max_value=0.5), min_size=1, max_size=200),
)
def test_rate_limit_holds_over_any_window(rate: float, asks: list[float]) -> None:
    """However often it is asked, starts granted by the gate never exceed rate * w + 1 in
    any window of w seconds."""
    schedule = Schedule(max_per_second=rate)
    now, starts = 0.0, []
    for pause in asks:
        now += pause
        now = schedule.gate(now)
        schedule.took(now)
        starts.append(now)
    for window in (1.0, 3.0):
        for i, start in enumerate(starts):
            inside = sum(1 for t in starts[i:] if t < start + window - 1e-9)
            assert inside <= rate * window + 1


def test_429_hold_applies_to_the_whole_webhook_and_counts_in_a_row() -> None:
    """A 429's wait holds every row (head or not); a success ends the run of 429s."""
    schedule = Schedule()
    assert schedule.settle(_hold(2.0), 100.0) == Action("retry", 102.0)
    assert schedule.gate(100.5, head=False) == 102.0
    assert schedule.rate_limited == 1
    schedule.settle(_hold(4.0), 102.0)
    assert schedule.rate_limited == 2
    schedule.settle(OK, 106.0)
    assert schedule.rate_limited == 0
    assert schedule.gate(106.0) == 106.0


def test_pauses_after_n_events_fail_for_good_in_a_row() -> None:
    """Four give-ups are dead letters; the fifth is one too and pauses; the next failure is
    kept pending for the probe; a success in between starts the count afresh."""
    schedule = Schedule(pause_after_failures=5, probe_interval_s=60)
    for _ in range(4):
        assert schedule.settle(FAILED, 0.0) == Action("dead_letter")
    assert schedule.settle(OK, 0.0) == Action("delivered")
    for _ in range(4):
        assert schedule.settle(FAILED, 0.0) == Action("dead_letter")
    assert schedule.paused is None
    assert schedule.settle(FAILED, 10.0) == Action("dead_letter")
    assert schedule.paused is not None
    assert "5 events in a row" in schedule.paused.reason
    assert schedule.gate(10.0) == 70.0  # the head waits for the probe
    assert schedule.gate(10.0, head=False) == math.inf  # nothing else goes
    assert schedule.settle(FAILED, 70.0) == Action("keep", 190.0)
    assert schedule.settle(RETRY, 190.0) == Action("keep", 430.0)


def test_probe_interval_backs_off_to_fifteen_minutes() -> None:
    """Failed probes double the wait: 120, 240, 480, then 900 s for good."""
    schedule = Schedule(pause_after_failures=1, probe_interval_s=60)
    schedule.settle(FAILED, 0.0)
    waits = []
    now = 60.0
    for _ in range(6):
        action = schedule.settle(FAILED, now)
        waits.append(action.at - now)
        now = action.at
    assert waits == [120.0, 240.0, 480.0, PROBE_MAX_S, PROBE_MAX_S, PROBE_MAX_S]


def test_a_delivered_probe_resumes() -> None:
    """The first probe delivered lifts the pause; everything may go at once."""
    schedule = Schedule(pause_after_failures=1, probe_interval_s=60)
    schedule.settle(FAILED, 0.0)
    assert schedule.settle(OK, 60.0) == Action("delivered")
    assert schedule.paused is None
    assert schedule.gate(60.0, head=False) == 60.0


def test_410_pauses_at_once_until_resumed_by_hand() -> None:
    """A 410 keeps its event and pauses with no probe; only restore(None) lifts it."""
    schedule = Schedule()
    assert schedule.settle(GONE, 5.0) == Action("keep", math.inf)
    assert schedule.paused is not None
    assert schedule.paused.awaits_resume
    assert schedule.gate(1e9) == math.inf
    schedule.restore(None)
    assert schedule.gate(7.0) == 7.0


def test_pause_after_failures_zero_never_pauses() -> None:
    """pause_after_failures = 0 turns pausing off: every give-up is a dead letter."""
    schedule = Schedule(pause_after_failures=0)
    for _ in range(50):
        assert schedule.settle(FAILED, 0.0) == Action("dead_letter")
    assert schedule.paused is None


def test_failures_of_requests_already_out_do_not_push_the_probe_back() -> None:
    """Unordered lanes still out when the pause began fail before the probe is due: they
    wait for that probe time, which does not move."""
    schedule = Schedule(pause_after_failures=1, probe_interval_s=60)
    schedule.settle(FAILED, 0.0)
    assert schedule.settle(FAILED, 0.5) == Action("keep", 60.0)
    assert schedule.settle(RETRY, 0.6) == Action("keep", 60.0)
    assert schedule.gate(1.0) == 60.0
    assert schedule.settle(FAILED, 60.0) == Action("keep", 180.0)

"""Delivery controls against a real local HTTP receiver: rate limits, 429 holds, pauses
with probes, 410 and the attempt log. Workers run as the daemon runs them (not --once)
where the control is about time; every figure is measured from the receiver's own
arrival times, not from sleeps."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from poller.app import make_session
from poller.config import Config, StateConfig, parse_config
from poller.replay import replay_dead_letters
from poller.state import StateStore
from poller.worker import Worker, make_worker
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.stores import Run, stored_text


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def _config(tmp_path: Path, hooks: str) -> Config:
    return parse_config(
        tomllib.loads(f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
{hooks}
"""),
        tmp_path,
    )


def _hook(name: str, url: str, extra: str = "") -> str:
    return f'[[webhooks]]\nname = "{name}"\nurl = "{url}"\n{extra}\n'


def _event(i: int) -> str:
    return json.dumps({"id": i, "type": "feature-created", "featureName": f"f{i}"})


async def _take_in(state: StateStore, hooks: list[str], ids: range) -> None:
    await state.ingest([(i, _event(i)) for i in ids], [(h, i) for i in ids for h in hooks], ids[-1])


def _fill(run: Run[Any], state: StateStore, hooks: list[str], ids: range) -> None:
    run(_take_in(state, hooks, ids))


async def _nothing_owed(state: StateStore) -> bool:
    return await state.pending_counts() == {}


async def _paused(state: StateStore, hook: str) -> bool:
    return await state.pause(hook) is not None


def _ids(requests: list[RecordedRequest]) -> list[int]:
    return [json.loads(r.body)["id"] for r in requests]


def _max_in_window(times: list[float], window_s: float) -> int:
    """The most arrivals in any half-open window [t, t + window_s)."""
    times = sorted(times)
    best = 0
    for i, start in enumerate(times):
        best = max(best, sum(1 for t in times[i:] if t < start + window_s))
    return best


async def _holds(until: Callable[[], bool | Awaitable[bool]]) -> bool:
    held = until()
    return await held if inspect.isawaitable(held) else held


async def _run(
    config: Config,
    state: StateStore,
    until: Callable[[], bool | Awaitable[bool]],
    *,
    timeout_s: float,
    meanwhile: Callable[[list[Worker]], Awaitable[None]] | None = None,
) -> list[Worker]:
    """Run a daemon-mode worker per webhook until `until()` holds (checked every 50 ms);
    `meanwhile(workers)` runs at each check (to add events while they run)."""
    stop = asyncio.Event()
    async with make_session(config) as session:
        workers = [make_worker(h, state, session, stop) for h in config.webhooks]
        tasks = [asyncio.create_task(w.run()) for w in workers]
        deadline = time.monotonic() + timeout_s
        try:
            while not await _holds(until):
                if time.monotonic() > deadline:
                    raise AssertionError(f"condition not met within {timeout_s} s")
                if meanwhile is not None:
                    await meanwhile(workers)
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            for w in workers:
                w.wake.set()
            await asyncio.gather(*tasks)
    return workers


@pytest.mark.parametrize(("max_in_flight", "count"), [(1, 60), (4, 30)])
def test_rate_limit_spaces_deliveries_and_spares_other_webhooks(
    state: StateStore,
    run: Run[Any],
    tmp_path: Path,
    receiver: Receiver,
    max_in_flight: int,
    count: int,
) -> None:
    """At max_per_second = 5, 60 events take 11-13 s (30 unordered: 5.5-6.5 s), never more
    than 6 in any 1 s window; an unlimited webhook beside it is done in under 3 s."""
    config = _config(
        tmp_path,
        _hook("slow", receiver.url("/slow"), f"max_per_second = 5\nmax_in_flight = {max_in_flight}")
        + _hook("fast", receiver.url("/fast")),
    )
    _fill(run, state, ["slow", "fast"], range(1, count + 1))
    run(
        _run(
            config,
            state,
            lambda: (
                len(receiver.requests("/slow")) >= count
                and len(receiver.requests("/fast")) >= count
            ),
            timeout_s=60,
        )
    )
    slow = [r.received_at for r in receiver.requests("/slow")]
    fast = [r.received_at for r in receiver.requests("/fast")]
    took = slow[-1] - slow[0]
    expected = (count - 1) / 5
    print(
        f"FIGURES: rate limit (max_in_flight {max_in_flight}): {count} events at 5/s in "
        f"{took:.2f} s, at most {_max_in_window(slow, 1.0)} in any 1 s window; unlimited "
        f"webhook beside it {fast[-1] - fast[0]:.2f} s"
    )
    assert expected - 0.8 <= took <= expected + 1.2, took
    assert _max_in_window(slow, 1.0) <= 6
    assert fast[-1] - fast[0] < 3.0
    if max_in_flight == 1:
        assert _ids(receiver.requests("/slow")) == list(range(1, count + 1))
    assert run(state.pending_counts()) == {}


def test_429_with_retry_after_holds_the_webhook_and_never_dead_letters(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A receiver answering 429 + Retry-After: 2 to one request in three gets every event,
    in order, none dead-lettered though retries = 0; nothing is sent during a hold."""
    receiver.respond("/a", statuses=[200, 200, 429] * 20, retry_after=2)
    config = _config(tmp_path, _hook("a", receiver.url("/a"), "retries = 0"))
    _fill(run, state, ["a"], range(1, 13))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=60))
    got = receiver.requests("/a")
    statuses = ([200, 200, 429] * 20)[: len(got)]
    delivered = [i for i, s in zip(_ids(got), statuses, strict=True) if s == 200]
    assert delivered == list(range(1, 13))
    assert run(state.dead_letter_counts()) == {}
    holds = [
        got[n + 1].received_at - got[n].received_at for n, s in enumerate(statuses[:-1]) if s == 429
    ]
    print(
        f"FIGURES: 429 one in three: {len(got)} requests for 12 events, {len(holds)} holds of "
        f"{min(holds):.2f}-{max(holds):.2f} s, no dead letters"
    )
    assert len(holds) >= 5
    assert min(holds) >= 2.0, holds
    log = run(state.attempt_log("a"))
    assert [r.status for r in log] == statuses
    assert sum(1 for r in log if r.status == 429) == len(holds) + (statuses[-1] == 429)


def test_429_holds_every_lane_of_an_unordered_webhook(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """Unordered (4 lanes): after a 429 with Retry-After: 2 no lane sends for 2 s."""
    receiver.respond("/a", statuses=[200] * 5 + [429], retry_after=2)
    config = _config(tmp_path, _hook("a", receiver.url("/a"), "max_in_flight = 4"))
    _fill(run, state, ["a"], range(1, 21))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    got = receiver.requests("/a")
    assert sorted(_ids(got)) == sorted([*range(1, 21), _ids(got)[5]])
    # Lanes already out when the 429 came back may still arrive; after that, silence.
    after = [r.received_at - got[5].received_at for r in got[6:]]
    late = [t for t in after if t < 2.0]
    assert len(late) <= 3, after
    assert any(t >= 2.0 for t in after)
    assert run(state.dead_letter_counts()) == {}


def test_receiver_down_pauses_after_five_dead_letters_then_delivers_the_rest_in_order(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A receiver down (500) while 200 events arrive: 5 dead letters, then paused with
    probes of the head event only; once it is back, events 6-200 arrive in order, once each.

    The issue's 5 minutes are scaled down through config, not by changing behaviour:
    retry_schedule_s = [0.05] (one quick retry) and probe_interval_s = 0.5 (doubling), so
    the outage lasts until two probes have failed (about 2 s here); the 200 events are
    added in batches of 20 while it lasts, and the receiver comes back only after that."""
    receiver.respond("/a", status=500)
    config = _config(
        tmp_path,
        _hook(
            "a",
            receiver.url("/a"),
            "retry_schedule_s = [0.05]\npause_after_failures = 5\nprobe_interval_s = 0.5",
        ),
    )
    added = [0]
    paused_seen: list[float] = []

    async def feed(workers: list[Worker]) -> None:
        if added[0] < 200:
            await _take_in(state, ["a"], range(added[0] + 1, added[0] + 21))
            added[0] += 20
            workers[0].wake.set()

    async def probed_twice() -> bool:
        if await state.pause("a") is not None and not paused_seen:
            paused_seen.append(time.monotonic())
        return (
            added[0] == 200
            and bool(paused_seen)
            and sum(1 for r in receiver.requests("/a") if r.received_at > paused_seen[0]) >= 2
        )

    started = time.monotonic()
    run(_run(config, state, probed_twice, timeout_s=60, meanwhile=feed))
    outage_s = time.monotonic() - started
    pause = run(state.pause("a"))
    assert pause is not None
    assert not pause.awaits_resume
    assert "5 events in a row" in pause.reason
    assert [d.event_id for d in run(state.dead_letters("a"))] == [1, 2, 3, 4, 5]
    assert run(state.pending_counts()) == {"a": 195}
    during = [r for r in receiver.requests("/a") if r.received_at > paused_seen[0]]
    assert set(_ids(during)) == {6}  # only the head is probed

    receiver.respond("/a", status=200)
    back = time.monotonic()
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=60))
    after = [r for r in receiver.requests("/a") if r.received_at > back]
    print(
        f"FIGURES: receiver down {outage_s:.1f} s with 200 events: "
        f"{len(run(state.dead_letters('a')))} dead letters, paused, {len(during)} probes; "
        f"{len(after)} delivered in order {after[-1].received_at - back:.2f} s after it came back"
    )
    assert _ids(after) == list(range(6, 201))
    assert run(state.pause("a")) is None
    assert len(run(state.dead_letters("a"))) == 5


def test_410_pauses_at_once_and_a_resume_delivers_everything(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A 410 pauses the webhook at once: no dead letter, no probes; after a resume (as
    `webhooks resume` does it) and a restart, every event arrives in order."""
    receiver.respond("/a", statuses=[200, 200, 410], status=200)
    config = _config(tmp_path, _hook("a", receiver.url("/a"), "probe_interval_s = 0.1"))
    _fill(run, state, ["a"], range(1, 11))
    run(_run(config, state, lambda: _paused(state, "a"), timeout_s=30))
    time.sleep(0.5)  # long enough for several probes, were any made
    assert len(receiver.requests("/a")) == 3
    pause = run(state.pause("a"))
    assert pause is not None
    assert pause.awaits_resume
    assert "410" in pause.reason
    assert run(state.dead_letter_counts()) == {}
    assert run(state.pending_counts()) == {"a": 8}

    # Restarted while still paused: the pause survives, nothing is sent.
    run(_run(config, state, lambda: True, timeout_s=5))
    assert len(receiver.requests("/a")) == 3
    assert run(state.resume("a", retry_now=True))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    assert _ids(receiver.requests("/a")) == [1, 2, 3, 3, 4, 5, 6, 7, 8, 9, 10]


def test_attempt_log_records_every_attempt_and_keeps_the_last_n(
    state: StateStore, state_config: StateConfig, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """Every attempt is logged (event, attempt number, status or error, latency, outcome);
    only the last attempt_log_size per webhook are kept; no body or secret is stored."""
    receiver.respond("/a", statuses=[500], status=200)
    config = _config(
        tmp_path,
        _hook(
            "a",
            receiver.url("/a"),
            'attempt_log_size = 5\nretry_schedule_s = [0.05]\nauthorization = "Bearer s3cr3t"\n'
            'signing_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"',
        )
        + _hook("down", "http://127.0.0.1:1/", "retries = 0"),
    )
    _fill(run, state, ["a"], range(1, 9))
    _fill(run, state, ["down"], range(9, 10))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    log = run(state.attempt_log("a"))
    assert [(r.event_id, r.attempt) for r in log] == [(4, 1), (5, 1), (6, 1), (7, 1), (8, 1)]
    assert all(r.status == 200 and r.latency_ms is not None for r in log)
    first = run(state.attempt_log("a", event_id=1))
    assert first == []  # trimmed
    (down,) = run(state.attempt_log("down"))
    assert (down.status, down.outcome, down.attempt) == (None, "dead_letter", 1)
    assert down.error is not None
    assert "connection failed" in down.error
    raw = stored_text(state, state_config)
    assert b"connection failed" in raw  # the attempt log is in what was read
    assert b"s3cr3t" not in raw
    assert b"MfKQ9r8G" not in raw


def test_attempt_log_counts_a_retry_as_attempt_two(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A 500 then a 200: attempt 1 (500, retry) and attempt 2 (200, delivered)."""
    receiver.respond("/a", statuses=[500], status=200)
    config = _config(tmp_path, _hook("a", receiver.url("/a"), "retry_schedule_s = [0.05]"))
    _fill(run, state, ["a"], range(1, 2))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    log = run(state.attempt_log("a", event_id=1))
    assert [(r.attempt, r.status, r.outcome) for r in log] == [
        (1, 500, "retry"),
        (2, 200, "delivered"),
    ]


def test_dead_letter_replay_is_in_the_attempt_log(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """`dead-letters replay` (daemon stopped) logs its attempts too, numbered afresh."""
    config = _config(tmp_path, _hook("a", receiver.url("/a")))
    _fill(run, state, ["a"], range(1, 3))
    run(state.dead_letter("a", 1, 2, "HTTP 500 after 2 attempts"))
    receiver.respond("/a", statuses=[503], status=200)
    assert run(replay_dead_letters(config, state, "a")) == (1, 0)
    log = run(state.attempt_log("a", event_id=1))
    assert [(r.attempt, r.status, r.outcome) for r in log] == [
        (1, 503, "retry"),
        (2, 200, "delivered"),
    ]


def test_429s_do_not_use_up_the_retries(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """Two 429s, then a 500, then a 200, with one retry allowed: the 429s did not count,
    so the 500 is retried and the event delivered (attempts numbered 1-4 in the log)."""
    receiver.respond("/a", statuses=[429, 429, 500], retry_after="0", status=200)
    config = _config(tmp_path, _hook("a", receiver.url("/a"), "retry_schedule_s = [0.05]"))
    _fill(run, state, ["a"], range(1, 2))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    assert run(state.dead_letter_counts()) == {}
    log = run(state.attempt_log("a", event_id=1))
    assert [(r.attempt, r.status, r.outcome) for r in log] == [
        (1, 429, "retry"),
        (2, 429, "retry"),
        (3, 500, "retry"),
        (4, 200, "delivered"),
    ]


def test_unordered_webhook_pauses_probes_with_one_lane_and_resumes(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """Unordered (4 lanes) against a dead receiver: 5 dead letters, then paused with one
    probe at a time (of the lowest pending id); once back, every other event arrives."""
    receiver.respond("/a", status=500)
    config = _config(
        tmp_path,
        _hook("a", receiver.url("/a"), "max_in_flight = 4\nretries = 0\nprobe_interval_s = 0.3"),
    )
    _fill(run, state, ["a"], range(1, 41))
    paused_at: list[float] = []

    async def probed_three_times() -> bool:
        if await state.pause("a") is not None and not paused_at:
            paused_at.append(time.monotonic())
        return (
            bool(paused_at)
            and sum(1 for r in receiver.requests("/a") if r.received_at > paused_at[0] + 0.1) >= 3
        )

    run(_run(config, state, probed_three_times, timeout_s=30))
    dead = [d.event_id for d in run(state.dead_letters("a"))]
    assert len(dead) == 5
    probes = [r for r in receiver.requests("/a") if r.received_at > paused_at[0] + 0.1]
    head = min(set(range(1, 41)) - set(dead))
    assert set(_ids(probes)) == {head}
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(probes)]
    assert min(gaps) >= 0.3  # one probe at a time, at the probe interval or later

    receiver.respond("/a", status=200)
    back = time.monotonic()
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    after = _ids([r for r in receiver.requests("/a") if r.received_at > back])
    assert sorted(after) == sorted(set(range(1, 41)) - set(dead))
    assert run(state.pause("a")) is None


# -- providers: their requests go through poller.dispatch and must mean what a plain
# webhook's do (issue 14 for the provider path).


def _slack_event(i: int) -> str:
    return json.dumps(
        {"id": i, "type": "feature-created", "createdBy": "me",
         "createdAt": "2026-11-28T10:00:00.000Z", "data": {}, "tags": [],
         "featureName": f"flag{i}x", "project": "default", "environment": None}
    )  # fmt: skip


def _slack_hook(url: str, extra: str = "") -> str:
    return (
        '[[webhooks]]\nname = "app"\nprovider = "slack-app"\naccess_token = "xoxb-1"\n'
        f'default_channels = ["a", "b", "c"]\nurl = "{url}"\n{extra}\n'
    )


def test_slack_429s_hold_the_whole_webhook_and_lose_nothing(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A Slack App endpoint answering 429 with Retry-After: 1 to one request in three:
    every message arrives, per channel in event order, nothing is dead-lettered, the 429s
    do not use up `retries`, and after each 429 no request to any channel comes for 1 s."""
    receiver.respond(
        "/slack", statuses=[200, 200, 429] * 6, status=200, retry_after=1, body='{"ok":true}'
    )
    # One retry only: were the 429s counted, the event with two of them would be given up.
    config = _config(tmp_path, _slack_hook(receiver.url("/slack"), "retry_schedule_s = [0.05]"))
    ids = range(1, 5)
    run(state.ingest([(i, _slack_event(i)) for i in ids], [("app", i) for i in ids], ids[-1]))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=60))
    got = receiver.requests("/slack")
    assert run(state.dead_letter_counts()) == {}
    assert len(got) == 12 + 5  # every message once, plus the five answered 429
    answered_429 = [r for i, r in enumerate(got) if i % 3 == 2]
    for before, after in itertools.pairwise(got):
        if before in answered_429:
            assert after.received_at - before.received_at >= 0.95
    delivered = [r for r in got if r not in answered_429]
    for channel in "abc":
        sent = [json.loads(r.body) for r in delivered]
        flags = [
            int(b["text"].split("flag")[1].split("x")[0]) for b in sent if b["channel"] == channel
        ]
        assert flags == [1, 2, 3, 4], channel


def test_410_from_a_provider_pauses_and_a_resume_delivers_the_rest(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A provider endpoint (Teams) answering 410 pauses the webhook at once, without a
    dead letter; `webhooks resume` then delivers the rest, in order."""
    receiver.respond("/teams", statuses=[200, 410], status=200)
    config = _config(
        tmp_path,
        f'[[webhooks]]\nname = "t"\nprovider = "teams"\nurl = "{receiver.url("/teams")}"\n',
    )
    ids = range(1, 6)
    run(state.ingest([(i, _slack_event(i)) for i in ids], [("t", i) for i in ids], ids[-1]))
    run(_run(config, state, lambda: _paused(state, "t"), timeout_s=30))
    pause = run(state.pause("t"))
    assert pause is not None
    assert pause.awaits_resume
    assert "410" in pause.reason
    assert run(state.dead_letter_counts()) == {}
    assert run(state.pending_counts()) == {"t": 4}
    assert run(state.resume("t", retry_now=True))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    flags = [
        int(r.body.decode().split("flag")[1].split("x")[0]) for r in receiver.requests("/teams")
    ]
    assert flags == [1, 2, 2, 3, 4, 5]
    assert run(state.dead_letter_counts()) == {}


def test_provider_429s_back_off_doubling(
    state: StateStore, run: Run[Any], tmp_path: Path, receiver: Receiver
) -> None:
    """A provider (Teams) answered 429 without Retry-After backs off as a webhook does:
    1 s, then 2 s (the 429s in a row are counted), and the 429s do not use up `retries`."""
    receiver.respond("/t", statuses=[429, 429], status=200)
    config = _config(
        tmp_path,
        f'[[webhooks]]\nname = "t"\nprovider = "teams"\nurl = "{receiver.url("/t")}"\n'
        "retry_schedule_s = [0.05]\n",
    )
    run(state.ingest([(1, _slack_event(1))], [("t", 1)], 1))
    run(_run(config, state, lambda: _nothing_owed(state), timeout_s=30))
    first, second, third = (r.received_at for r in receiver.requests("/t"))
    assert second - first >= 0.95
    assert third - second >= 1.95
    assert run(state.dead_letter_counts()) == {}

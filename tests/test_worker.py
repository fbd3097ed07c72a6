"""Delivery workers against a real local HTTP receiver: order, retries, dead letters, isolation."""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from standardwebhooks.webhooks import Webhook

from poller.app import make_session, replay_dead_letters
from poller.config import Config, parse_config
from poller.state import State
from poller.worker import Worker, delivery_id
from tests.support.receiver import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def _config(tmp_path: Path, hooks: str) -> Config:
    return parse_config(tomllib.loads(f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
{hooks}
"""), tmp_path)


def _hook(name: str, url: str, extra: str = "") -> str:
    return f'[[webhooks]]\nname = "{name}"\nurl = "{url}"\n{extra}\n'


def _event(i: int) -> str:
    return json.dumps({"id": i, "type": "feature-created", "createdBy": "me",
                       "createdAt": "2026-11-28T10:00:00.000Z", "data": {"name": f"f{i}"},
                       "featureName": f"f{i}", "project": "default", "environment": None,
                       "label": "Flag created", "summary": "**me** created"})


def _fill(state: State, hooks: list[str], ids: range) -> None:
    state.ingest([(i, _event(i)) for i in ids], [(h, i) for i in ids for h in hooks], ids[-1])


async def _drain(config: Config, state: State, timeout_s: float = 20) -> dict[str, float]:
    """Run every worker in --once mode; return when each finished (seconds from start)."""
    stop = asyncio.Event()
    finished: dict[str, float] = {}
    started = time.monotonic()
    async with make_session(config) as session:
        async def one(worker: Worker) -> None:
            await worker.run()
            finished[worker.hook.name] = time.monotonic() - started

        workers = [Worker(h, state, session, stop, once=True) for h in config.webhooks]
        await asyncio.wait_for(asyncio.gather(*(one(w) for w in workers)), timeout_s)
    return finished


def test_ordered_delivery_with_default_body_and_stable_id(tmp_path: Path,
                                                          receiver: Receiver) -> None:
    """Events arrive in id order, as Unleash's default JSON body, with a webhook-id header."""
    config = _config(tmp_path, _hook("a", receiver.url("/a")))
    state = State.open(config.state.path)
    _fill(state, ["a"], range(1, 31))
    asyncio.run(_drain(config, state))
    got = receiver.requests("/a")
    assert [json.loads(r.body)["id"] for r in got] == list(range(1, 31))
    first = json.loads(got[0].body)
    assert list(first) == ["id", "type", "createdBy", "createdAt", "data", "tags",
                           "featureName", "project", "environment"]
    assert got[0].header("webhook-id") == delivery_id(1)
    assert got[0].header("Content-Type") == "application/json"
    assert state.pending_counts() == {}


def test_one_retry_then_success(tmp_path: Path, receiver: Receiver) -> None:
    """A 500 is retried once (by default) and the retry's success counts; same webhook-id."""
    receiver.respond("/a", statuses=[500], status=200)
    config = _config(tmp_path, _hook("a", receiver.url("/a")))
    state = State.open(config.state.path)
    _fill(state, ["a"], range(1, 2))
    asyncio.run(_drain(config, state))
    got = receiver.requests("/a")
    assert len(got) == 2
    assert got[0].header("webhook-id") == got[1].header("webhook-id")
    assert state.pending_counts() == {}
    assert state.dead_letters() == []


def test_failures_end_in_dead_letters_and_order_goes_on(tmp_path: Path,
                                                        receiver: Receiver) -> None:
    """Two 500s dead-letter an event with its reason; a 404 is not retried; later events
    still go out, in order; replay redelivers and removes what succeeded."""
    receiver.respond("/a", statuses=[500, 500, 404], status=200)
    config = _config(tmp_path, _hook("a", receiver.url("/a")))
    state = State.open(config.state.path)
    _fill(state, ["a"], range(1, 5))
    asyncio.run(_drain(config, state))
    bodies = [json.loads(r.body)["id"] for r in receiver.requests("/a")]
    assert bodies == [1, 1, 2, 3, 4]
    letters = state.dead_letters("a")
    assert [(d.event_id, d.reason) for d in letters] == [
        (1, "HTTP 500 after 2 attempts"), (2, "HTTP 404 (not retried) after 1 attempt")]
    ok, failed = asyncio.run(replay_dead_letters(config, state, "a"))
    assert (ok, failed) == (2, 0)
    assert [json.loads(r.body)["id"] for r in receiver.requests("/a")][-2:] == [1, 2]
    assert state.dead_letters() == []


def test_retry_after_is_honoured(tmp_path: Path, receiver: Receiver) -> None:
    """A 429 with Retry-After: 1 delays the retry by at least a second."""
    receiver.respond("/a", statuses=[429], retry_after=1, status=200)
    config = _config(tmp_path, _hook("a", receiver.url("/a")))
    state = State.open(config.state.path)
    _fill(state, ["a"], range(1, 2))
    asyncio.run(_drain(config, state))
    first, second = receiver.requests("/a")
    assert second.received_at - first.received_at >= 1.0


def test_redirect_is_not_followed(tmp_path: Path, receiver: Receiver) -> None:
    """A 3xx is a failed delivery, not followed anywhere."""
    receiver.respond("/a", status=302)
    config = _config(tmp_path, _hook("a", receiver.url("/a")))
    state = State.open(config.state.path)
    _fill(state, ["a"], range(1, 2))
    asyncio.run(_drain(config, state))
    assert len(receiver.requests()) == 1
    assert state.dead_letters("a")[0].reason.startswith("HTTP 302 (redirects are not followed)")


def test_template_failure_dead_letters_for_that_webhook_only(tmp_path: Path,
                                                             receiver: Receiver) -> None:
    """A template that fails on an event dead-letters it for its webhook; others get it."""
    bad = "template_engine = \"jinja2\"\nbody_template = '{{ event.id / 0 }}'"
    config = _config(tmp_path, _hook("bad", receiver.url("/bad"), bad)
                     + _hook("good", receiver.url("/good")))
    state = State.open(config.state.path)
    _fill(state, ["bad", "good"], range(1, 3))
    asyncio.run(_drain(config, state))
    assert len(receiver.requests("/good")) == 2
    assert receiver.requests("/bad") == []
    assert [d.event_id for d in state.dead_letters("bad")] == [1, 2]
    assert state.dead_letters("bad")[0].reason.startswith("template failed:")


def test_hung_webhook_does_not_delay_others(tmp_path: Path, receiver: Receiver) -> None:
    """While one receiver never answers, another webhook's 50 events go through at once."""
    receiver.respond("/hang", hang=True)
    config = _config(tmp_path, _hook("hang", receiver.url("/hang"), "timeout_s = 2\nretries = 0")
                     + _hook("ok", receiver.url("/ok")))
    state = State.open(config.state.path)
    _fill(state, ["ok"], range(1, 51))
    state.ingest([(i, _event(i)) for i in (51, 52)], [("hang", 51), ("hang", 52), ("ok", 51)], 52)
    finished = asyncio.run(_drain(config, state))
    assert len(receiver.requests("/ok")) == 51
    assert finished["ok"] < 1.5, finished
    assert finished["hang"] >= 4.0, finished
    reasons = [d.reason for d in state.dead_letters("hang")]
    assert reasons == ["timed out after 2s after 1 attempt"] * 2


def test_unordered_webhook_delivers_concurrently(tmp_path: Path, receiver: Receiver) -> None:
    """max_in_flight = 4 runs deliveries side by side; all arrive once."""
    receiver.respond("/slow", delay_s=0.3)
    config = _config(tmp_path, _hook("slow", receiver.url("/slow"), "max_in_flight = 4"))
    state = State.open(config.state.path)
    _fill(state, ["slow"], range(1, 9))
    finished = asyncio.run(_drain(config, state))
    ids = sorted(json.loads(r.body)["id"] for r in receiver.requests("/slow"))
    assert ids == list(range(1, 9))
    assert finished["slow"] < 1.8, finished  # one at a time would take 2.4 s


def test_signed_delivery_verifies_with_standard_webhooks(tmp_path: Path,
                                                         receiver: Receiver) -> None:
    """With signing_secret, each delivery carries Standard Webhooks headers that the official
    library verifies, with the same webhook-id as an unsigned delivery would have."""
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # noqa: S105 - a test key
    config = _config(tmp_path, _hook("a", receiver.url("/a"), f'signing_secret = "{secret}"'))
    state = State.open(config.state.path)
    _fill(state, ["a"], range(1, 3))
    asyncio.run(_drain(config, state))
    verifier = Webhook(secret)
    for request in receiver.requests("/a"):
        headers = {name.lower(): value for name, value in request.headers}
        payload = verifier.verify(request.body, headers)
        assert payload["id"] == int(headers["webhook-id"].rsplit("-", 1)[1])
    assert state.pending_counts() == {}

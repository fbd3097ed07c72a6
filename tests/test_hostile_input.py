"""Odd but valid input from Unleash, end to end: page → ingest → state file → render →
delivery. Unleash stands in as aioresponses (no real Unleash serves these); the state file
and the receiver are real."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from aioresponses import CallbackResult, aioresponses

from poller.app import make_session
from poller.config import Config, parse_config
from poller.ingest import Ingest
from poller.source import UnleashSource
from poller.state import SqliteState
from poller.worker import make_worker
from tests.support.receiver import Receiver

SEARCH = "http://unleash.test/api/admin/search/events"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def _config(tmp_path: Path, receiver: Receiver) -> Config:
    hooks = [
        ("plain", ""),
        ("mustache", 'body_template = "{\\"name\\": \\"{{event.featureName}}\\"}"'),
        ("json", 'body_template = "{{{eventJson}}}"'),
        ("markdown", 'body_template = "{\\"text\\": \\"{{eventMarkdown}}\\"} {{eventMarkdown}}"'),
    ]
    text = """
[unleash]
url = "http://unleash.test"
token = "t"
start_from = "earliest"
[state]
path = "s.sqlite3"
"""
    for name, extra in hooks:
        text += f'[[webhooks]]\nname = "{name}"\nurl = "{receiver.url("/" + name)}"\n{extra}\n'
    return parse_config(tomllib.loads(text), tmp_path)


def _event(event_id: object, name: str) -> str:
    return (
        f'{{"id": {json.dumps(event_id)}, "type": "feature-created", "createdBy": "me", '
        f'"createdAt": "2026-11-28T10:00:00.000Z", "data": {{"name": "{name}"}}, '
        f'"featureName": "{name}", "project": "default", "environment": null}}'
    )


async def _poll_then_deliver(config: Config, page: str) -> tuple[Ingest, SqliteState]:
    state = SqliteState.open(config.state.path)
    async with make_session(config) as session:
        source = UnleashSource(session, config.unleash)
        ingest = Ingest(config, state, source, lambda hooks: None)
        with aioresponses(passthrough=["http://127.0.0.1"]) as mocked:
            mocked.get(f"{SEARCH}?limit=1", body=page, repeat=True)
            mocked.get(f"{SEARCH}?limit=50&offset=0", body=page)
            await ingest.poll()
        stop = asyncio.Event()
        workers = [make_worker(h, state, session, stop, once=True) for h in config.webhooks]
        await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), 20)
    return ingest, state


def test_a_lone_surrogate_is_stored_and_delivered_as_javascript_would(
    tmp_path: Path, receiver: Receiver
) -> None:
    """`"f21\\ud800"` (valid JSON) is taken in, survives the state file and a restart, and
    every body is what Unleash sends: a `\\ud800` escape in JSON, U+FFFD in raw text."""
    config = _config(tmp_path, receiver)
    page = '{"events": [' + _event(2, "f21\\ud800") + ", " + _event(1, "ok") + '], "total": 2}'
    _, state = asyncio.run(_poll_then_deliver(config, page))
    assert asyncio.run(state.high_water()) == 2
    assert asyncio.run(state.pending_counts()) == {}
    asyncio.run(state.close())
    asyncio.run(SqliteState.open(config.state.path).close())  # a restart reads it back

    def body(name: str) -> bytes:
        return receiver.requests("/" + name)[1].body

    assert [json.loads(r.body)["id"] for r in receiver.requests("/plain")] == [1, 2]
    assert b'"featureName":"f21\\ud800"' in body("plain")
    assert json.loads(body("plain"))["featureName"] == "f21\ud800"
    assert body("mustache") == '{"name": "f21\ufffd"}'.encode()
    assert b'\\"featureName\\":\\"f21\\\\ud800\\"' in body("json")
    quoted, raw = body("markdown").split(b"} ", 1)
    assert b"f21\\ud800" in quoted
    assert "f21\ufffd".encode() in raw


@pytest.mark.parametrize("bad_id", [2**63, 2**64 + 5, -3, True, 4.0, "5", None])
def test_an_id_out_of_range_is_refused_and_its_neighbours_flow(
    tmp_path: Path, receiver: Receiver, bad_id: object
) -> None:
    """An id SQLite or JavaScript cannot hold (or no integer at all) is refused with one
    error line naming it; the events around it are delivered and the cursor moves on."""
    config = _config(tmp_path, receiver)
    events = [_event(3, "c"), _event(bad_id, "x"), _event(2, "b"), _event(1, "a")]
    page = '{"events": [' + ", ".join(events) + '], "total": 4}'
    with structlog.testing.capture_logs() as logs:
        ingest, state = asyncio.run(_poll_then_deliver(config, page))
    assert asyncio.run(state.high_water()) == 3
    assert ingest.gaps == {}
    assert [json.loads(r.body)["id"] for r in receiver.requests("/plain")] == [1, 2, 3]
    refused = [line for line in logs if line["event"] == "poll.event_refused"]
    assert len(refused) == 1
    assert refused[0]["id"] == json.dumps(bad_id)
    assert refused[0]["log_level"] == "error"
    assert refused[0]["reason"]


def test_a_burst_read_through_pages_capped_at_100_is_taken_in_whole(tmp_path: Path) -> None:
    """A proxy that caps pages at 100 while 12,000 new events wait: every one is taken in
    (before, a short page ended the read and all but 10,150 of 20,000 were given up)."""
    config = parse_config(
        tomllib.loads("""
[unleash]
url = "http://unleash.test"
token = "t"
start_from = 10
[state]
path = "s.sqlite3"
[[webhooks]]
name = "a"
url = "http://127.0.0.1:1/a"
"""),
        tmp_path,
    )
    newest = 12_010

    def answer(url: object, **kwargs: object) -> CallbackResult:
        params = kwargs["params"]
        assert isinstance(params, dict)
        offset, limit = int(params.get("offset", 0)), min(int(params["limit"]), 100)
        ids = range(newest - offset, max(0, newest - offset - limit), -1)
        return CallbackResult(
            body="{"
            + f'"events": [{", ".join(_event(i, "f") for i in ids)}]'
            + f', "total": {newest}}}'
        )

    async def poll() -> SqliteState:
        state = SqliteState.open(config.state.path)
        async with make_session(config) as session:
            ingest = Ingest(config, state, UnleashSource(session, config.unleash), lambda h: None)
            with aioresponses() as mocked:
                mocked.get(re.compile(f"^{SEARCH}.*"), callback=answer, repeat=True)
                await ingest.poll(force=True)
        return state

    with structlog.testing.capture_logs() as logs:
        state = asyncio.run(poll())
    assert asyncio.run(state.high_water()) == newest
    pending = asyncio.run(state.next_pending("a", 20_000))
    assert [p.event_id for p in pending] == list(range(11, newest + 1))
    assert asyncio.run(state.gaps()) == []
    assert not [line for line in logs if line["event"] == "gap.too_large"]

"""poller.dispatch through the worker: a provider's several requests per event, each sent
until answered, none sent twice, against a real local HTTP server playing Slack."""

from __future__ import annotations

import asyncio
import json
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from poller.app import make_session
from poller.config import Config, parse_config
from poller.deliver import Attempt, Outcome, decide
from poller.dispatch import combine
from poller.providers import slack_app
from poller.providers.base import Answer, Failure
from poller.replay import replay_dead_letters
from poller.state import FencedError, SqliteState
from poller.worker import make_worker
from tests.support.receiver import Receiver


class FakeSlack:
    """chat.postMessage on 127.0.0.1: answers per channel from a script, then ok:true."""

    def __init__(self) -> None:
        self.script: dict[str, list[tuple[int, dict[str, object], dict[str, str]]]] = {}
        self.posts: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        channel = (await request.json())["channel"]
        self.posts.append(channel)
        queue = self.script.get(channel, [])
        status, body, headers = queue.pop(0) if queue else (200, {"ok": True}, {})
        return web.json_response(body, status=status, headers=headers)

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/api/chat.postMessage", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> FakeSlack:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        assert self._loop is not None
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as server:
        yield server


def _config(tmp_path: Path, slack: FakeSlack, extra: str = "") -> Config:
    return parse_config(
        tomllib.loads(f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
[[webhooks]]
name = "app"
provider = "slack-app"
access_token = "xoxb-1"
default_channels = ["a", "b", "c"]
url = "http://127.0.0.1:{slack.port}/api/chat.postMessage"
retry_schedule_s = [0.05, 0.05]
{extra}
"""),
        tmp_path,
    )


def _event(i: int) -> str:
    return json.dumps(
        {"id": i, "type": "feature-created", "createdBy": "me",
         "createdAt": "2026-11-28T10:00:00.000Z", "data": {}, "tags": [],
         "featureName": f"f{i}", "project": "default", "environment": None}
    )  # fmt: skip


async def _drain(config: Config, state: SqliteState) -> None:
    async with make_session(config) as session:
        workers = [
            make_worker(h, state, session, asyncio.Event(), once=True) for h in config.webhooks
        ]
        await asyncio.wait_for(asyncio.gather(*(w.run() for w in workers)), 20)


def test_a_failed_channel_alone_is_retried(tmp_path: Path, slack: FakeSlack) -> None:
    """b answers ok:false ratelimited, then 429 with Retry-After, then ok: only b is sent
    again, and c waits until b is through (a rate limit holds the whole webhook); a and c
    get one post each; the event is then done and its part records gone."""
    slack.script["b"] = [
        (200, {"ok": False, "error": "ratelimited"}, {}),
        (429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "0"}),
    ]
    config = _config(tmp_path, slack)
    state = SqliteState.open(config.state.path)
    asyncio.run(state.ingest([(1, _event(1))], [("app", 1)], 1))
    asyncio.run(_drain(config, state))
    assert slack.posts == ["a", "b", "b", "b", "c"]
    assert asyncio.run(state.pending_counts()) == {}
    assert asyncio.run(state.dead_letters()) == []
    assert asyncio.run(state.parts_sent("app", 1)) == frozenset()


def test_a_final_slack_error_dead_letters_and_replay_sends_only_that_channel(
    tmp_path: Path, slack: FakeSlack
) -> None:
    """channel_not_found is not retried: the event is dead-lettered with Slack's error for
    that channel; a replay then posts to that channel only."""
    slack.script["c"] = [(200, {"ok": False, "error": "channel_not_found"}, {})]
    config = _config(tmp_path, slack)
    state = SqliteState.open(config.state.path)
    asyncio.run(state.ingest([(1, _event(1)), (2, _event(2))], [("app", 1), ("app", 2)], 2))
    asyncio.run(_drain(config, state))
    assert slack.posts == ["a", "b", "c", "a", "b", "c"]
    [letter] = asyncio.run(state.dead_letters())
    assert letter.event_id == 1
    assert letter.reason == "channel:c: Slack error: channel_not_found after 1 attempt"
    assert asyncio.run(state.parts_sent("app", 1)) == {"channel:a", "channel:b"}
    ok, failed = asyncio.run(replay_dead_letters(config, state, None))
    assert (ok, failed) == (1, 0)
    assert slack.posts[6:] == ["c"]
    files = [config.state.path, config.state.path.with_name(config.state.path.name + "-wal")]
    assert not any(b"xoxb-1" in f.read_bytes() for f in files if f.exists())
    assert asyncio.run(state.dead_letters()) == []
    assert asyncio.run(state.parts_sent("app", 1)) == frozenset()


def test_combined_outcome_of_several_requests() -> None:
    """Delivered only when all are; retried after the longest wait while any may still
    succeed; else given up naming each failed request."""
    ok = Outcome("delivered", "HTTP 200")
    cases = [
        ([("a", ok), ("b", ok)], Outcome("delivered", "HTTP 200")),
        ([("a", ok), ("b", Outcome("retry", "HTTP 500", 2.0)), ("c", Outcome("retry", "x", 5.0))],
         Outcome("retry", "b: HTTP 500; c: x", 5.0)),
        ([("a", Outcome("give_up", "gone")), ("b", Outcome("retry", "HTTP 500", 1.0))],
         Outcome("retry", "a: gone; b: HTTP 500", 1.0)),
        ([("", Outcome("give_up", "HTTP 404"))], Outcome("give_up", "HTTP 404")),
        ([], Outcome("delivered", "nothing to send")),
    ]  # fmt: skip
    for outcomes, expected in cases:
        assert combine(outcomes) == expected


def test_a_provider_failure_is_decided_like_an_http_one() -> None:
    """Slack's ok:false verdicts: a retryable one waits at least what Retry-After asks, a
    final one gives up at once with Slack's reason."""
    retry = Attempt(200, None, "30", 0.0, "Slack error: ratelimited", failure_retryable=True)
    assert decide(retry, 1, [1.0]) == Outcome("retry", "Slack error: ratelimited", 30.0)
    final = Attempt(200, None, None, 0.0, "Slack error: channel_not_found")
    assert decide(final, 1, [1.0]) == Outcome(
        "give_up", "Slack error: channel_not_found after 1 attempt"
    )
    assert decide(retry, 2, [1.0]).kind == "give_up"  # the retries are used up


@pytest.mark.parametrize("provider", ["teams", "datadog", "new-relic"])
def test_retry_after_from_other_services_is_honoured(tmp_path: Path, provider: str) -> None:
    """A 429 with Retry-After from Teams, Datadog or New Relic delays the retry at least
    that long, although the schedule asks for 0.05 s; then the event is delivered."""
    keys = {"teams": "", "datadog": 'api_key = "k"', "new-relic": 'license_key = "k"'}
    with Receiver() as receiver:
        receiver.respond("/svc", statuses=[429], status=200, retry_after=1)
        config = parse_config(
            tomllib.loads(f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
[[webhooks]]
name = "svc"
provider = "{provider}"
url = "{receiver.url("/svc")}"
retry_schedule_s = [0.05]
{keys[provider]}
"""),
            tmp_path,
        )
        state = SqliteState.open(config.state.path)
        asyncio.run(state.ingest([(1, _event(1))], [("svc", 1)], 1))
        asyncio.run(_drain(config, state))
        first, second = receiver.requests("/svc")
    assert second.received_at - first.received_at >= 0.95
    assert asyncio.run(state.pending_counts()) == {}
    assert asyncio.run(state.dead_letters()) == []


def test_combined_outcome_keeps_pauses_and_rate_limit_flags() -> None:
    """combine() means what one webhook request would: any 410 pauses; a retry holds the
    webhook and is rate limited if any retried request was, counts only if some counts,
    and waits the longest asked for."""
    ok = Outcome("delivered", "HTTP 200")
    held = Outcome("retry", "HTTP 429", 3.0, rate_limited=True, webhook_wait=True, counted=False)
    over = Outcome("retry", "HTTP 429 (over)", 9.0, rate_limited=True, webhook_wait=True)
    err = Outcome("retry", "HTTP 500", 1.0)
    gone = Outcome("pause", "HTTP 410 Gone")
    cases = [
        ([("a", ok), ("b", gone)], Outcome("pause", "b: HTTP 410 Gone")),
        ([("a", gone), ("b", err), ("c", Outcome("give_up", "HTTP 404"))],
         Outcome("pause", "a: HTTP 410 Gone; b: HTTP 500; c: HTTP 404")),
        ([("a", ok), ("b", held)],
         Outcome("retry", "b: HTTP 429", 3.0, rate_limited=True, webhook_wait=True,
                 counted=False)),
        ([("a", held), ("b", err)],
         Outcome("retry", "a: HTTP 429; b: HTTP 500", 3.0, rate_limited=True,
                 webhook_wait=True, counted=True)),
        ([("a", held), ("b", over)],
         Outcome("retry", "a: HTTP 429; b: HTTP 429 (over)", 9.0, rate_limited=True,
                 webhook_wait=True, counted=True)),
        ([("a", Outcome("give_up", "HTTP 404")), ("b", held)],
         Outcome("retry", "a: HTTP 404; b: HTTP 429", 3.0, rate_limited=True,
                 webhook_wait=True, counted=False)),
        ([("a", Outcome("give_up", "HTTP 429 (over) after 2 attempts", rate_limited=True))],
         Outcome("give_up", "a: HTTP 429 (over) after 2 attempts", rate_limited=True)),
    ]  # fmt: skip
    for outcomes, expected in cases:
        assert combine(outcomes) == expected, outcomes


def test_slack_ratelimited_is_decided_as_a_429() -> None:
    """Slack's `ok: false, error: ratelimited` holds the whole webhook for Retry-After
    without counting toward `retries`, and backs off doubling without one."""
    failure = slack_app.judge(Answer(200, b'{"ok": false, "error": "ratelimited"}'))
    assert failure == Failure("Slack error: ratelimited", retryable=True, rate_limited=True)
    asked = Attempt(200, None, "30", 0.0, failure.reason, True, failure_rate_limited=True)
    assert decide(asked, 5, [1.0]) == Outcome(
        "retry",
        "Slack error: ratelimited (Retry-After 30)",
        30.0,
        rate_limited=True,
        webhook_wait=True,
        counted=False,
    )
    bare = Attempt(200, None, None, 0.0, failure.reason, True, failure_rate_limited=True)
    assert decide(bare, 1, [1.0], rate_limited_before=3).delay_s == 8.0
    assert decide(asked, 2, [1.0], max_rate_limit_wait_s=10.0).kind == "give_up"
    final = slack_app.judge(Answer(200, b'{"ok": false, "error": "channel_not_found"}'))
    assert final is not None
    assert not final.rate_limited


def test_slack_ratelimited_answers_do_not_dead_letter(tmp_path: Path, slack: FakeSlack) -> None:
    """Three `ratelimited` answers (Retry-After: 1) on a webhook with two retries: waited out,
    not counted, so the event is delivered to every channel."""
    limited = (200, {"ok": False, "error": "ratelimited"}, {"Retry-After": "1"})
    slack.script["b"] = [limited, limited, limited]
    config = _config(tmp_path, slack)
    state = SqliteState.open(config.state.path)
    asyncio.run(state.ingest([(1, _event(1))], [("app", 1)], 1))
    asyncio.run(_drain(config, state))
    assert asyncio.run(state.dead_letters()) == []
    assert asyncio.run(state.pending_counts()) == {}
    assert slack.posts == ["a", "b", "b", "b", "b", "c"]


def test_a_lease_running_out_mid_event_stops_before_the_next_request(
    tmp_path: Path, slack: FakeSlack
) -> None:
    """Under a lease, each of an event's requests is a delivery that starts: once the
    lease may have run out (after the first channel's post here), no further request
    goes out; the worker stops fenced, the part sent is recorded, and the rest is owed to
    whoever leads next."""
    config = _config(tmp_path, slack)
    state = SqliteState.open(config.state.path)
    asyncio.run(state.ingest([(1, _event(1))], [("app", 1)], 1))
    asked: list[int] = []

    def may_send() -> bool:
        asked.append(len(slack.posts))
        return not slack.posts  # the lease runs out once the first request is out

    async def run() -> None:
        async with make_session(config) as session:
            worker = make_worker(
                config.webhooks[0], state, session, asyncio.Event(), once=True, may_send=may_send
            )
            await asyncio.wait_for(worker.run(), 20)

    with pytest.raises(FencedError):
        asyncio.run(run())
    assert slack.posts == ["a"]
    assert asked == [0, 1]  # before the event, and before the second request
    assert asyncio.run(state.parts_sent("app", 1)) == {"channel:a"}
    assert asyncio.run(state.pending_counts()) == {"app": 1}

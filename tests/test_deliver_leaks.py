"""A receiver that answers garbage must not make the webhook URL's secret path or query
show up anywhere (issue 11, defect 6): not in the attempt's error, the log, the state file
or `dead-letters list`. Nor may what one receiver sets (a cookie) come back to it or reach
another webhook."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller.app import make_session
from poller.config import parse_config
from poller.deliver import post, request_headers
from poller.state import SqliteState
from tests.support.raw_server import RawServer
from tests.support.receiver import Receiver

REPO_ROOT = Path(__file__).resolve().parent.parent
CANARY = "Xq7Canary"
SECRET_PATH = f"/services/T0/B0/{CANARY}path?sig={CANARY}query&x=1"
GARBAGE = [
    b"HTTP/1.1 abc\r\n\r\n",  # malformed status line
    b"HTTP/1.1 200 OK\r\nBad Header\r\nContent-Length: 0\r\n\r\n",  # malformed header
    b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"garbage\r\n\r\n",
]


def garbage_server(answer: bytes | None) -> RawServer:
    """A real TCP server that reads each request and answers `answer`, which is not HTTP,
    or echoes the request line back as its status line when `answer` is None (a
    receiver that repeats our path to us)."""

    def reply(request: bytes) -> list[bytes]:
        return [answer if answer is not None else request.split(b"\r\n", 1)[0] + b"\r\n\r\n"]

    return RawServer(reply)


@pytest.fixture(params=[*GARBAGE, None], ids=[*(g[:20].decode() for g in GARBAGE), "echo"])
def garbage(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    server = garbage_server(request.param)
    yield server
    server.close()


def _toml(url: str, extra: str = "") -> str:
    return f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "state.sqlite3"
[[webhooks]]
name = "hook"
url = "{url}"
retry_schedule_s = [0.05]
{extra}
"""


def test_a_malformed_answer_gives_an_error_without_the_url_secret(
    tmp_path: Path, garbage: RawServer
) -> None:
    """post() against a real socket that answers garbage: the error names the failure
    and the host, not the path or the query."""
    config = parse_config(tomllib.loads(_toml(garbage.url(SECRET_PATH))), tmp_path)
    hook = config.webhooks[0]

    async def attempt() -> str | None:
        async with make_session(config) as session:
            return (await post(session, hook, request_headers(hook), b"{}", "id-1")).error

    error = asyncio.run(attempt())
    assert error is not None
    assert f"127.0.0.1:{garbage.port}" in error  # still says where it went wrong
    assert CANARY not in error, error
    assert "services" not in error, error


def test_no_url_secret_in_the_log_the_state_file_or_dead_letters_list(tmp_path: Path) -> None:
    """The daemon delivering to a receiver that answers a malformed status line, then
    echoes our request line: the canary in the URL's path and query appears in none of the
    log lines (retry and dead letter), the state file, or `dead-letters list`."""
    for name, answer in (("status", GARBAGE[0]), ("echo", None)):
        server = garbage_server(answer)
        try:
            work = tmp_path / name
            work.mkdir()
            config = work / "config.toml"
            config.write_text(_toml(server.url(SECRET_PATH)))
            config.chmod(0o600)
            state = SqliteState.open(work / "state.sqlite3")
            asyncio.run(
                state.ingest([(1, '{"id": 1, "type": "feature-created"}')], [("hook", 1)], 1)
            )
            asyncio.run(state.close())
            run = subprocess.run(
                [sys.executable, "-m", "poller", "run", "--once", "-c", str(config)],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            listed = subprocess.run(
                [sys.executable, "-m", "poller", "dead-letters", "list", "-c", str(config)],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
        finally:
            server.close()
        log = run.stdout + run.stderr
        assert "delivery.retry_scheduled" in log, log
        assert "delivery.dead_lettered" in log, log
        assert f"127.0.0.1:{server.port}" in listed.stdout, listed.stdout
        stored = b"".join(p.read_bytes() for p in work.glob("state.sqlite3*"))
        for where, text in (("log", log), ("dead-letters list", listed.stdout)):
            assert CANARY not in text, (where, text)
        assert CANARY.encode() not in stored


def test_a_cookie_a_receiver_sets_is_never_sent_back_nor_to_another_webhook(
    tmp_path: Path,
) -> None:
    """Unleash's fetch keeps no cookies. Neither does the session every delivery goes
    through: a receiver (or its load balancer) that sets a cookie in every answer gets
    none back, a second webhook on the same host gets none of the first one's, and
    nothing is kept, so a new cookie per answer cannot grow the daemon. On a host name:
    aiohttp's own jar ignores cookies from an IP address, which would hide the leak."""
    with Receiver() as receiver:
        receiver.respond("/a", set_cookie=True)
        receiver.respond("/b", set_cookie=True)
        base = f"http://localhost:{receiver.port}"
        text = _toml(f"{base}/a") + f'[[webhooks]]\nname = "other"\nurl = "{base}/b"\n'
        config = parse_config(tomllib.loads(text), tmp_path)

        async def deliver() -> int:
            async with make_session(config) as session:
                for hook in (*[config.webhooks[0]] * 3, config.webhooks[1]):
                    attempt = await post(session, hook, request_headers(hook), b"{}", "id-1")
                    assert attempt.status == 200, attempt
                return len(session.cookie_jar)

        kept = asyncio.run(deliver())
        requests = receiver.requests()
    assert [r.path for r in requests] == ["/a", "/a", "/a", "/b"]
    assert [r.header("Cookie") for r in requests] == [None] * 4
    assert kept == 0

"""A compressed answer we never asked for (we send no Accept-Encoding, as Unleash does not):
the status still decides, and no answer, however it inflates, costs the daemon more than
the few kB of it that are read. Against a real socket that answers fixed bytes."""

from __future__ import annotations

import asyncio
import gzip
import tomllib
import tracemalloc
import zlib
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from poller.app import make_session
from poller.config import WebhookConfig, parse_config
from poller.deliver import Attempt, post, request_headers, send
from poller.providers import slack_app
from poller.providers.base import Request
from tests.support.raw_server import RawServer


def _zeros_gzipped(mib: int) -> bytes:
    """`mib` MiB of zeros, gzip-compressed (about 1 kB per MiB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(2**20)
    return b"".join(packer.compress(zeros) for _ in range(mib)) + packer.flush()


BOMB = _zeros_gzipped(1024)  # 1 GiB once inflated; aiohttp stops at 32 MiB a chunk


Answering = Callable[[bytes, str], RawServer]


@pytest.fixture
def answering() -> Iterator[Answering]:
    """Start a real TCP server that answers every request 200 with `body` and
    `Content-Encoding: encoding`, then closes the connection."""
    servers: list[RawServer] = []

    def start(body: bytes, encoding: str) -> RawServer:
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        servers.append(RawServer(lambda _: [head + body]))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _toml(url: str) -> str:
    unleash = '[unleash]\nurl = "http://127.0.0.1:1"\ntoken = "t"\n'
    return unleash + f'[[webhooks]]\nname = "h"\nurl = "{url}"\n'


def _hook(url: str, tmp_path: Path) -> WebhookConfig:
    return parse_config(tomllib.loads(_toml(url)), tmp_path).webhooks[0]


def _peak_growth(attempt: Coroutine[Any, Any, Attempt]) -> tuple[Attempt, int]:
    """Run `attempt`; what it returned and the most memory it held at once (bytes traced
    above what was held before it started)."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        result = asyncio.run(attempt)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak - before


def _session(tmp_path: Path) -> Any:
    return make_session(parse_config(tomllib.loads(_toml("http://127.0.0.1:1/")), tmp_path))


async def _post_once(hook: WebhookConfig, tmp_path: Path) -> Attempt:
    async with _session(tmp_path) as session:
        return await post(session, hook, request_headers(hook), b'{"id":1}', "id-1")


@pytest.mark.parametrize(
    "body",
    [BOMB, b"not gzip at all", gzip.compress(b"ok")],
    ids=["inflates-to-1-GiB", "not-gzip", "plain-gzip"],
)
def test_a_2xx_answer_is_a_delivery_however_its_body_is_compressed(
    tmp_path: Path, answering: Answering, body: bytes
) -> None:
    """The status decides, as in Unleash's integration: a 200 whose gzip body inflates to a
    gigabyte, or is not gzip at all, is delivered (aiohttp's inflation failed both), and
    the most memory the attempt holds is a small part of what the answer would inflate to."""
    server = answering(body, "gzip")
    attempt, peak = _peak_growth(_post_once(_hook(server.url("/hook"), tmp_path), tmp_path))
    assert (attempt.status, attempt.error) == (200, None), attempt
    assert peak < 4 * 2**20, f"held {peak / 2**20:.1f} MiB at once"


def _slack_request(url: str) -> Request:
    return Request("#c", url, (("Content-Type", "application/json"),), b"{}")


async def _send_once(hook: WebhookConfig, tmp_path: Path) -> Attempt:
    async with _session(tmp_path) as session:
        return await send(session, hook, _slack_request(hook.url), slack_app.judge)


REFUSED = b'{"ok": false, "error": "channel_not_found"}'


@pytest.mark.parametrize(
    ("body", "encoding"),
    [
        (gzip.compress(REFUSED), "gzip"),
        (gzip.compress(REFUSED), "x-gzip"),
        (zlib.compress(REFUSED), "deflate"),
        (zlib.compress(REFUSED)[2:-4], "Deflate"),  # raw deflate, as some servers send it
    ],
    ids=["gzip", "x-gzip", "zlib-deflate", "raw-deflate"],
)
def test_a_providers_judge_reads_a_compressed_answer_inflated(
    tmp_path: Path, answering: Answering, body: bytes, encoding: str
) -> None:
    """Slack's `ok: false`, compressed although we asked for no compression, still reads
    as Slack's error: the daemon inflates the start of the answer itself."""
    server = answering(body, encoding)
    attempt = asyncio.run(_send_once(_hook(server.url("/hook"), tmp_path), tmp_path))
    assert attempt.status == 200
    assert attempt.failure == "Slack error: channel_not_found", attempt


def test_a_providers_answer_inflates_only_as_far_as_is_read(
    tmp_path: Path, answering: Answering
) -> None:
    """A 200 whose gzip body inflates to a gigabyte, to a provider's request: judged on the
    start of it (not JSON: a failure worth retrying), holding a few MiB at most."""
    server = answering(BOMB, "gzip")
    attempt, peak = _peak_growth(_send_once(_hook(server.url("/hook"), tmp_path), tmp_path))
    assert attempt.status == 200
    assert attempt.failure == "Slack answered with a body that is not JSON"
    assert attempt.failure_retryable
    assert peak < 4 * 2**20, f"held {peak / 2**20:.1f} MiB at once"


def test_an_encoding_not_inflated_reaches_the_judge_as_sent(
    tmp_path: Path, answering: Answering
) -> None:
    """`br` (or any encoding other than gzip and deflate) is passed on as it came, not
    guessed at: here the bytes are plain JSON, and the judge reads them."""
    server = answering(REFUSED, "br")
    attempt = asyncio.run(_send_once(_hook(server.url("/hook"), tmp_path), tmp_path))
    assert attempt.status == 200
    assert attempt.failure == "Slack error: channel_not_found"

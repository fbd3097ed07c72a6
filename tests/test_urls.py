"""URL redaction and proxy choice (tables), and a POST through a real proxy on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import trustme
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from yarl import URL

from poller.tls import client_ssl_context
from poller.urls import MALFORMED, proxy_for, redact_database_url, redact_url, scrub_urls

REDACT = [
    ("https://hooks.slack.com/services/T000/B000/XXXXXXXX", "https://hooks.slack.com"),
    ("https://user:pa55@example.com:8443/p?token=1#frag", "https://example.com:8443"),
    ("https://token@example.com?sig=abc", "https://example.com"),
    ("https://example.com:443/x", "https://example.com:443"),
    ("HTTPS://Example.COM/Path", "https://example.com"),
    ("http://[::1]:8080/hook", "http://[::1]:8080"),
    ("http://127.0.0.1:4242/api/admin/events", "http://127.0.0.1:4242"),
    # a password with an unescaped '/' or '?' ends the host early: show nothing of it
    ("https://user:pa/ss@example.com/", MALFORMED),
    ("https://user:pa?ss@example.com/", MALFORMED),
    ("https://example.com:99999/", MALFORMED),
    ("https://:443/", MALFORMED),
    ("example.com/services/secret", MALFORMED),
    ("", MALFORMED),
]


@pytest.mark.parametrize(("url", "expected"), REDACT)
def test_redact_url(url: str, expected: str) -> None:
    """Only scheme, host and an explicit port survive; anything unparseable shows nothing."""
    assert redact_url(url) == expected


PROXY = [
    # url, explicit proxy, trust_env, environment -> proxy
    ("https://h.example/", "http://explicit:3128", False, {}, "http://explicit:3128"),
    (
        "https://h.example/",
        "http://explicit:3128",
        True,
        {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "h.example"},
        "http://explicit:3128",
    ),
    ("https://h.example/", None, False, {"HTTPS_PROXY": "http://env:3128"}, None),
    ("https://h.example/", None, True, {}, None),
    ("https://h.example/", None, True, {"HTTPS_PROXY": "http://env:3128"}, "http://env:3128"),
    ("https://h.example/", None, True, {"https_proxy": "http://low:3128"}, "http://low:3128"),
    (
        "https://h.example/",
        None,
        True,
        {"https_proxy": "http://low:3128", "HTTPS_PROXY": "http://up:3128"},
        "http://low:3128",
    ),
    # an empty lower-case variable unsets the upper-case one, as in urllib
    ("https://h.example/", None, True, {"https_proxy": "", "HTTPS_PROXY": "http://up:3128"}, None),
    # the scheme picks the variable; there is no fallback from https to http
    ("https://h.example/", None, True, {"HTTP_PROXY": "http://env:3128"}, None),
    ("http://h.example/", None, True, {"HTTP_PROXY": "http://env:3128"}, "http://env:3128"),
    ("http://h.example/", None, True, {"ALL_PROXY": "socks5://env:1080"}, None),
    # under CGI, HTTP_PROXY may come from a client's "Proxy:" header (httpoxy)
    (
        "http://h.example/",
        None,
        True,
        {"HTTP_PROXY": "http://evil:3128", "REQUEST_METHOD": "POST"},
        None,
    ),
    (
        "http://h.example/",
        None,
        True,
        {"http_proxy": "http://env:3128", "REQUEST_METHOD": "POST"},
        "http://env:3128",
    ),
    ("https://h.example/", None, True, {"HTTPS_PROXY": "env:3128"}, "http://env:3128"),
    ("https://h.example/", None, True, {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "*"}, None),
    (
        "https://api.h.example/",
        None,
        True,
        {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "other.test, h.example"},
        None,
    ),
    (
        "https://h.example/",
        None,
        True,
        {"HTTPS_PROXY": "http://env:3128", "no_proxy": ".h.example"},
        None,
    ),
    (
        "https://noth.example/",
        None,
        True,
        {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "h.example"},
        "http://env:3128",
    ),
    (
        "https://h.example:8443/",
        None,
        True,
        {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "h.example:8443"},
        None,
    ),
    (
        "https://h.example:9443/",
        None,
        True,
        {"HTTPS_PROXY": "http://env:3128", "NO_PROXY": "h.example:8443"},
        "http://env:3128",
    ),
    ("http://[::1]:8080/", None, True, {"HTTP_PROXY": "http://env:3128", "NO_PROXY": "::1"}, None),
    (
        "http://127.0.0.1:8080/",
        None,
        True,
        {"HTTP_PROXY": "http://env:3128", "NO_PROXY": "127.0.0.1"},
        None,
    ),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """The test process's environment without any proxy variables or CGI marker."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.mark.parametrize(("url", "explicit", "trust_env", "env", "expected"), PROXY)
def test_proxy_for(
    clean_env: pytest.MonkeyPatch,
    url: str,
    explicit: str | None,
    trust_env: bool,
    env: dict[str, str],
    expected: str | None,
) -> None:
    """An explicit proxy wins; the environment counts only when trusted, urllib's way."""
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert proxy_for(url, explicit, trust_env) == expected


@dataclass
class Proxy:
    """What the test proxy saw: request lines and Proxy-Authorization values."""

    url: str = ""
    requests: list[str] = field(default_factory=list)
    proxy_authorization: list[str | None] = field(default_factory=list)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()


@asynccontextmanager
async def http_proxy(require_authorization: str | None = None) -> AsyncIterator[Proxy]:
    """A minimal HTTP proxy on 127.0.0.1: forwards absolute-URI requests and tunnels
    CONNECT, to 127.0.0.1 only (anything else gets 403); answers 407 when
    `require_authorization` is set and the Proxy-Authorization header differs."""
    proxy = Proxy()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, version = request_line.split(" ")
            headers = [line.split(":", 1) for line in header_lines if line]
            proxy.requests.append(f"{method} {target}")
            proxy.proxy_authorization.append(
                next((v.strip() for k, v in headers if k.lower() == "proxy-authorization"), None)
            )
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
            else:
                parts = urlsplit(target)
                host, port = parts.hostname or "", str(parts.port)
            if require_authorization and proxy.proxy_authorization[-1] != require_authorization:
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n"
                )
                return
            if host != "127.0.0.1":
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, upstream = await asyncio.open_connection(host, int(port))
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                kept = [
                    f"{k}:{v}"
                    for k, v in headers
                    if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")
                ]
                origin = parts.path + (f"?{parts.query}" if parts.query else "")
                upstream.write(
                    "\r\n".join(
                        [f"{method} {origin} {version}", *kept, "Connection: close", "", ""]
                    ).encode("latin-1")
                )
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        finally:
            if upstream is not None:
                await _close(upstream)
            await _close(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield proxy
    finally:
        server.close()
        await server.wait_closed()
        # Python 3.11's wait_closed does not wait for open connections' handlers.
        if handlers:
            await asyncio.wait(handlers, timeout=5)


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]


@asynccontextmanager
async def receiver(
    context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[str, list[Received]]]:
    """A real HTTP(S) server on 127.0.0.1 recording POSTs to /hook."""
    received: list[Received] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(Received(await request.read(), dict(request.headers)))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        scheme = "https" if context else "http"
        yield f"{scheme}://127.0.0.1:{runner.addresses[0][1]}/hook", received
    finally:
        await runner.cleanup()


async def _post(url: str, proxy: str | None, client_context: ssl.SSLContext | None) -> int:
    async with (
        aiohttp.ClientSession(trust_env=False) as session,
        session.post(
            url,
            data=b'{"id":1}',
            proxy=proxy,
            headers={"Content-Type": "application/json"},
            ssl=client_context if client_context is not None else True,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as response,
    ):
        return response.status


def test_post_goes_through_an_explicit_forward_proxy(clean_env: pytest.MonkeyPatch) -> None:
    """A plain-HTTP POST with proxy= is sent to the proxy as an absolute URI, with the
    proxy's credentials for the proxy only, and reaches the receiver intact."""

    async def scenario() -> None:
        async with http_proxy() as proxy, receiver() as (url, received):
            with_credentials = proxy.url.replace("http://", "http://user:pass@")
            chosen = proxy_for(url, with_credentials, trust_env=False)
            assert await _post(url, chosen, None) == 204
            assert proxy.requests == [f"POST {url}"]
            assert proxy.proxy_authorization == ["Basic dXNlcjpwYXNz"]
            assert [r.body for r in received] == [b'{"id":1}']
            assert "Proxy-Authorization" not in received[0].headers

    asyncio.run(scenario())


def test_https_post_tunnels_through_the_proxy_from_the_environment(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With trust_env, HTTPS_PROXY is used: an HTTPS POST goes through a CONNECT tunnel,
    still verifying the receiver's certificate end to end."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)

    async def scenario() -> None:
        async with http_proxy() as proxy, receiver(server_context) as (url, received):
            clean_env.setenv("HTTPS_PROXY", proxy.url)
            chosen = proxy_for(url, None, trust_env=True)
            assert chosen == proxy.url
            context = client_ssl_context(tmp_path / "ca.pem", None, None)
            assert await _post(url, chosen, context) == 204
            assert proxy.requests == [f"CONNECT {urlsplit(url).netloc}"]
            assert [r.body for r in received] == [b'{"id":1}']

    asyncio.run(scenario())


def test_no_proxy_sends_directly(clean_env: pytest.MonkeyPatch) -> None:
    """A receiver listed in NO_PROXY is reached without touching the proxy."""

    async def scenario() -> None:
        async with http_proxy() as proxy, receiver() as (url, received):
            clean_env.setenv("HTTP_PROXY", proxy.url)
            clean_env.setenv("NO_PROXY", "localhost,127.0.0.1")
            assert await _post(url, proxy_for(url, None, trust_env=True), None) == 204
            assert proxy.requests == []
            assert len(received) == 1

    asyncio.run(scenario())


def test_proxy_refusal_carries_credentials_that_redact_url_removes(
    clean_env: pytest.MonkeyPatch,
) -> None:
    """aiohttp's error for a proxy refusing CONNECT shows the proxy URL with its password;
    redact_url on the error's URL is what makes it safe to log."""

    async def scenario() -> None:
        async with http_proxy(require_authorization="Basic b3RoZXI6b3RoZXI=") as proxy:
            with_credentials = proxy.url.replace("http://", "http://user:hunter2@")
            with pytest.raises(aiohttp.ClientHttpProxyError) as raised:
                await _post("https://127.0.0.1:9/hook", with_credentials, None)
            assert raised.value.status == 407
            assert "hunter2" in str(raised.value)
            assert redact_url(str(raised.value.request_info.real_url)) == proxy.url

    asyncio.run(scenario())


SECRET_URL = "https://hooks.example.com/services/T0/B0/s3cr3tPath?sig=s3cr3tQuery"  # noqa: S105 - a fake


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"400, message='Invalid status code', url='{SECRET_URL}'",
            "400, message='Invalid status code', url='https://hooks.example.com'",
        ),
        # yarl's spelling on the wire of a configured URL with a space in it
        (
            "url='https://hooks.example.com/a%20b/s3cr3tPath?sig=s3cr3tQuery'",
            "url='https://hooks.example.com'",
        ),
        # a receiver echoing our request line back as its status line
        (
            "Invalid status code: b'POST /services/T0/B0/s3cr3tPath?sig=s3cr3tQuery HTTP/1.1'",
            "Invalid status code: b'POST /<redacted> HTTP/1.1'",
        ),
        ("only the query: sig=s3cr3tQuery", "only the query: /<redacted>"),
        # any other URL with a path, and one with credentials
        ("see http://other.example/x/y?z=1 now", "see http://other.example now"),
        (
            "proxy http://u:pw@proxy.example:3128/ said no",
            "proxy http://proxy.example:3128 said no",
        ),
        (
            "Cannot connect to host hooks.example.com:443",
            "Cannot connect to host hooks.example.com:443",
        ),
    ],
)
def test_scrub_urls(text: str, expected: str) -> None:
    """Error texts keep scheme, host and port of any URL, and lose the configured URL's
    path and query wherever and however they are spelled."""
    known = (
        "https://hooks.example.com/a b/s3cr3tPath?sig=s3cr3tQuery"
        if "a%20b" in text
        else SECRET_URL
    )
    assert scrub_urls(text, known, None) == expected


@settings(max_examples=150, deadline=None)
@given(
    before=st.text(max_size=40),
    after=st.text(max_size=40),
    path=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#%"),
        min_size=3,
        max_size=30,
    ),
    query=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="#%"),
        min_size=3,
        max_size=30,
    ),
    wire=st.booleans(),
)
def test_scrub_urls_never_leaves_the_path_or_query(
    before: str, after: str, path: str, query: str, wire: bool
) -> None:
    """Whatever surrounds it, a configured URL placed in a text (as configured or as sent
    on the wire) leaves neither its path nor its query in the scrubbed text."""
    url = f"https://hooks.example.com/{path}?{query}"
    shown = str(URL(url)) if wire else url
    scrubbed = scrub_urls(f"{before}{shown}{after}", url)
    assert f"/{path}?{query}" not in scrubbed
    assert shown not in scrubbed


REDACT_DATABASE = [
    (
        "postgresql://poller:s3cret@db.example:5433/state?sslmode=require&password=s3cret",
        "postgresql://poller:***@db.example:5433/state",
    ),
    ("postgres://poller@db.example/state", "postgres://poller@db.example/state"),
    ("postgresql://:s3cret@db.example/state", "postgresql://:***@db.example/state"),
    ("postgresql://poller:s3cret@[::1]/state", "postgresql://poller:***@[::1]/state"),
    ("postgresql:///state?host=/run/postgresql", "postgresql:///state"),
    # A password with an unescaped '/' or '@': the rest would show as host and path.
    ("postgresql://poller:se/cret@db.example/state", MALFORMED),
    ("postgresql://poller:se@c/ret@db.example/state", MALFORMED),
    ("db.example/state", MALFORMED),
]


@pytest.mark.parametrize(("url", "expected"), REDACT_DATABASE)
def test_redact_database_url(url: str, expected: str) -> None:
    """A database URL keeps user, host, port and database name; the password is masked,
    the query dropped, and a URL that cannot be split safely shows nothing."""
    assert redact_database_url(url) == expected


@settings(max_examples=150, deadline=None)
@given(
    password=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=4, max_size=30
    ),
    quoted=st.booleans(),
)
def test_redact_database_url_never_shows_the_password(password: str, quoted: bool) -> None:
    """Whatever the password holds, escaped or not, it is not in the redacted URL."""
    written = urllib.parse.quote(password, safe="") if quoted else password
    shown = redact_database_url(f"postgresql://poller:{written}@db.example:5432/state")
    assert password not in shown
    assert written not in shown

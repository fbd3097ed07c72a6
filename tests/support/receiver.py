"""A real HTTP server that records webhook deliveries, for tests and benchmarks.

It runs aiohttp on 127.0.0.1 (a free port) in a background thread with its own event
loop, so synchronous pytest tests, benchmarks and the demo can all use it:

    with Receiver() as receiver:
        receiver.respond("/flaky", statuses=[503, 503], retry_after=1)
        ... point a webhook at receiver.url("/flaky") ...
        requests = receiver.wait_for(3, path="/flaky", timeout_s=30)

Every request is recorded when it arrives (before any scripted delay), with its
monotonic receive time. Paths with no behaviour set answer 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

from aiohttp import web


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the receiver saw it."""

    path: str
    method: str
    headers: list[tuple[str, str]]
    body: bytes
    received_at: float  # time.monotonic()
    query: str = ""

    def header(self, name: str) -> str | None:
        """The first value of a header (case-insensitive), or None."""
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)

    def header_names(self) -> list[str]:
        """Header names in the order they arrived, lower-cased."""
        return [key.lower() for key, _ in self.headers]


@dataclass
class Behaviour:
    """How the receiver answers one path.

    `statuses` are used one per request in order; after the last one, `then_status`
    answers every further request. `retry_after` (seconds, or a string sent verbatim such
    as an HTTP date) adds a Retry-After header to every answer that is not 2xx. `delay_s`
    waits before answering; `hang` never answers (until the receiver stops). `body`
    replaces the text of the 2xx answers (to play a service that answers JSON).
    `set_cookie` sets a new cookie in every answer (`c1=...`, `c2=...`), as a load
    balancer's sticky session or a hostile receiver would.
    """

    statuses: list[int] = field(default_factory=list)
    then_status: int = 200
    retry_after: float | str | None = None
    delay_s: float = 0.0
    hang: bool = False
    body: str | None = None
    set_cookie: bool = False
    answered: int = 0

    def next_status(self) -> int:
        return self.statuses.pop(0) if self.statuses else self.then_status


class Receiver:
    """The recording HTTP server; start/stop it as a context manager or with start()/stop()."""

    def __init__(self, on_request: Callable[[RecordedRequest], None] | None = None) -> None:
        self._on_request = on_request
        self._requests: list[RecordedRequest] = []
        self._behaviours: dict[str, Behaviour] = {}
        self._condition = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._release_hanging: asyncio.Event | None = None
        self.port = 0

    # -- lifecycle

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._run, args=(sock,), name=f"receiver-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=30):
            raise RuntimeError("receiver did not start within 30 s")
        if self._startup_error is not None:
            raise RuntimeError("receiver failed to start") from self._startup_error

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, sock: socket.socket) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(sock))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, sock: socket.socket) -> None:
        self._stop = asyncio.Event()
        self._release_hanging = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handle_signals=False: only the main thread may install signal handlers.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=5)
        try:
            await runner.setup()
            await web.SockSite(runner, sock).start()
        except BaseException as error:
            self._startup_error = error
            sock.close()
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            self._release_hanging.set()
            await runner.cleanup()
            sock.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        recorded = RecordedRequest(
            path=request.path,
            method=request.method,
            headers=[
                (key.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
                for key, value in request.raw_headers
            ],
            body=body,
            received_at=time.monotonic(),
            query=request.query_string,
        )
        with self._condition:
            self._requests.append(recorded)
            behaviour = self._behaviours.get(request.path)
            status = behaviour.next_status() if behaviour else 200
            self._condition.notify_all()
        if self._on_request is not None:
            self._on_request(recorded)
        if behaviour is not None and behaviour.hang:
            assert self._release_hanging is not None
            await self._release_hanging.wait()
            return web.Response(status=503)
        if behaviour is not None and behaviour.delay_s > 0:
            assert self._release_hanging is not None
            # A stopping receiver should not wait out a long scripted delay.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._release_hanging.wait(), behaviour.delay_s)
        headers = {}
        if behaviour is not None and behaviour.retry_after is not None and status >= 300:
            headers["Retry-After"] = _format_retry_after(behaviour.retry_after)
        if behaviour is not None and behaviour.set_cookie:
            with self._condition:
                behaviour.answered += 1
                headers["Set-Cookie"] = f"c{behaviour.answered}={'v' * 40}; Path=/"
        text = "no" if status >= 300 else "ok" if behaviour is None else behaviour.body or "ok"
        return web.Response(status=status, headers=headers, text=text)

    # -- configuration

    def url(self, path: str = "/") -> str:
        """The absolute URL of `path` on this receiver."""
        if not path.startswith("/"):
            path = "/" + path
        return f"http://127.0.0.1:{self.port}{path}"

    def respond(
        self,
        path: str,
        *,
        status: int = 200,
        statuses: Sequence[int] = (),
        retry_after: float | str | None = None,
        delay_s: float = 0.0,
        hang: bool = False,
        body: str | None = None,
        set_cookie: bool = False,
    ) -> None:
        """Set how `path` answers: `statuses` in turn, then `status` for every request after.

        `retry_after` (seconds, or a verbatim string) adds Retry-After to non-2xx
        answers; `delay_s` waits before answering; `hang` never answers; `body` is the
        text of the 2xx answers (default "ok"); `set_cookie` sets a new cookie in each.
        """
        with self._condition:
            self._behaviours[path] = Behaviour(
                statuses=list(statuses),
                then_status=status,
                retry_after=retry_after,
                delay_s=delay_s,
                hang=hang,
                body=body,
                set_cookie=set_cookie,
            )

    def reset(self, path: str | None = None) -> None:
        """Forget recorded requests and behaviour (of one path, or of all)."""
        with self._condition:
            if path is None:
                self._requests.clear()
                self._behaviours.clear()
            else:
                self._requests = [r for r in self._requests if r.path != path]
                self._behaviours.pop(path, None)

    # -- inspection

    def requests(self, path: str | None = None) -> list[RecordedRequest]:
        """Requests received so far (to `path`, or all), in arrival order."""
        with self._condition:
            return [r for r in self._requests if path is None or r.path == path]

    def wait_for(
        self, count: int, path: str | None = None, *, timeout_s: float = 30.0
    ) -> list[RecordedRequest]:
        """Block until at least `count` requests (to `path`, or all) arrived; return them all.

        Raises TimeoutError naming how many did arrive.
        """
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while True:
                matching = [r for r in self._requests if path is None or r.path == path]
                if len(matching) >= count:
                    return matching
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"receiver got {len(matching)} of {count} requests"
                        f"{f' to {path}' if path else ''} within {timeout_s} s"
                    )
                self._condition.wait(remaining)


def _format_retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)

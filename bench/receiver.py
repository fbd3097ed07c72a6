"""A lean webhook receiver for the benchmarks: aiohttp.web in its own process.

`tests/support/receiver.py` runs in a thread of the benchmark process and keeps every
request (headers, body) under a lock; at thousands of requests a second that would share
a core and the GIL with the benchmark itself. This one keeps only (event id, receive time)
per path, in arrays, and answers 200 at once.

    python -m bench.receiver            # prints its port on the first line of stdout

- POST/PUT to any path: recorded (id from the body's `"id":N`, or -1), answered 200.
- Any path under /hang/: recorded, then never answered (the client's timeout ends it).
- GET /_bench/count?path=/p: `{"count": N}`.
- GET /_bench/stats?path=/p: `{"ids": [...], "times": [...]}` (time.monotonic(), which is
  CLOCK_MONOTONIC: the same clock in every process of this machine).
- POST /_bench/reset: forget everything.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import socket
import time
from array import array

from aiohttp import web

_ID = re.compile(rb'"id"\s*:\s*(\d+)')


class Recorder:
    def __init__(self) -> None:
        self.ids: dict[str, array[int]] = {}
        self.times: dict[str, array[float]] = {}

    def record(self, path: str, event_id: int, at: float) -> None:
        ids = self.ids.get(path)
        if ids is None:
            ids = self.ids[path] = array("q")
            self.times[path] = array("d")
        ids.append(event_id)
        self.times[path].append(at)


def make_app(recorder: Recorder) -> web.Application:
    forever = asyncio.Event()  # never set: /hang/ answers nothing

    async def deliver(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        at = time.monotonic()
        match = _ID.search(body, 0, 64)
        recorder.record(request.path, int(match.group(1)) if match else -1, at)
        if request.path.startswith("/hang/"):
            await forever.wait()
        return web.Response(text="ok")

    async def count(request: web.Request) -> web.StreamResponse:
        path = request.query.get("path", "/")
        return web.json_response({"count": len(recorder.ids.get(path, ()))})

    async def stats(request: web.Request) -> web.StreamResponse:
        path = request.query.get("path", "/")
        return web.json_response(
            {"ids": list(recorder.ids.get(path, ())), "times": list(recorder.times.get(path, ()))}
        )

    async def reset(_request: web.Request) -> web.StreamResponse:
        recorder.ids.clear()
        recorder.times.clear()
        return web.json_response({"ok": True})

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/_bench/count", count)
    app.router.add_get("/_bench/stats", stats)
    app.router.add_post("/_bench/reset", reset)
    app.router.add_route("POST", "/{tail:.*}", deliver)
    app.router.add_route("PUT", "/{tail:.*}", deliver)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    print(sock.getsockname()[1], flush=True)
    web.run_app(
        make_app(Recorder()),
        sock=sock,
        access_log=None,
        print=None,
        handle_signals=True,
        shutdown_timeout=1,
    )


if __name__ == "__main__":
    main()

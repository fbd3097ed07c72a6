"""A tiny counting HTTP proxy in its own process: forwards everything to one upstream and
records each request's method, path, query, status and upstream time.

    python -m bench.proxy UPSTREAM_URL      # prints its port on the first line of stdout

- GET /_bench/requests: the list recorded so far; POST /_bench/reset forgets it.
Bodies pass through untouched (no decompression), so ETag / If-None-Match work.
"""

from __future__ import annotations

import socket
import sys
import time

import aiohttp
from aiohttp import web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "upgrade",
    "te",
    "trailer",
    "proxy-authorization",
    "proxy-authenticate",
}


def make_app(upstream: str) -> web.Application:
    seen: list[dict[str, object]] = []
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def on_startup(app: web.Application) -> None:
        app["client"] = aiohttp.ClientSession(auto_decompress=False)

    async def on_cleanup(app: web.Application) -> None:
        await app["client"].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        body = await request.read()
        started = time.monotonic()
        async with app["client"].request(
            request.method,
            upstream + request.path_qs,
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as resp:
            payload = await resp.read()
            answer = web.Response(
                status=resp.status,
                body=payload,
                headers={k: v for k, v in resp.headers.items() if k.lower() not in HOP_BY_HOP},
            )
        seen.append(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "conditional": "If-None-Match" in request.headers,
                "status": resp.status,
                "bytes": len(payload),
                "ms": (time.monotonic() - started) * 1000,
                "at": started,
            }
        )
        return answer

    async def requests(_request: web.Request) -> web.StreamResponse:
        return web.json_response(seen)

    async def reset(_request: web.Request) -> web.StreamResponse:
        seen.clear()
        return web.json_response({"ok": True})

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_get("/_bench/requests", requests)
    app.router.add_post("/_bench/reset", reset)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    upstream = sys.argv[1].rstrip("/")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    web.run_app(make_app(upstream), sock=sock, access_log=None, print=None, shutdown_timeout=1)


if __name__ == "__main__":
    main()

"""The physical limit for ordered delivery: POST bodies one at a time, in order, over one
keep-alive aiohttp connection, doing nothing else (no state, no rendering, no logging).
With a concurrency N > 1: N such loops share the bodies (the limit for unordered delivery
with max_in_flight = N).

`--fetch` is the floor of a burst (benchmark 1): read the newest COUNT events from
Unleash's search endpoint in pages of 1000, newest first (each checked by id: the pages
must hold COUNT distinct ids), then POST them as webhook bodies in id order over one
connection; with N > 1, over N connections, N bodies in flight (the floor of a burst at
max_in_flight = N). The token comes from the environment (BENCH_UNLEASH_TOKEN), not argv.

    python -m bench.baseline_client URL BODIES_FILE [N]   # one body per line; prints JSON
    python -m bench.baseline_client --fetch UNLEASH_URL COUNT URL [N]    # prints JSON
    python -m bench.baseline_client --idle UNLEASH_URL INTERVAL WARMUP SECONDS  # prints JSON

`--idle` is the floor of an idle daemon (benchmarks 1 and 6): the same conditional
one-event probe the daemon makes (`GET /api/admin/search/events?limit=1` with the last
ETag), every INTERVAL seconds over one keep-alive connection, in a process that has
imported what the daemon cannot run without (aiohttp, structlog, sqlite3, with one
SQLite connection open) and nothing else. After WARMUP seconds it measures its own CPU
(/proc/self/schedstat) over SECONDS, then prints that, its RSS and the probes it made.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import aiohttp

UNLEASH_ONLY_FIELDS = ("label", "summary")  # added by the search endpoint, not in webhook bodies
PAGE = 1000


async def post_all(url: str, bodies: list[bytes], concurrency: int = 1) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    queue = iter(bodies)

    async def loop(session: aiohttp.ClientSession) -> None:
        for body in queue:
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"receiver answered {resp.status}")

    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(*(loop(session) for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    return {"posted": len(bodies), "elapsed_s": elapsed}


def webhook_body(event: dict[str, object]) -> bytes:
    """The event as Unleash's webhook (and the poller by default) sends it."""
    body = {k: v for k, v in event.items() if k not in UNLEASH_ONLY_FIELDS}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


async def fetch_and_post(
    unleash_url: str, token: str, count: int, url: str, concurrency: int = 1
) -> dict[str, float]:
    """Fetch the newest `count` events page by page, then POST them in id order (with
    `concurrency` > 1: that many at a time, each connection taking the next in id order)."""
    headers = {"Authorization": token, "Accept": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=2)) as session:
        started = time.monotonic()
        found: dict[int, dict[str, object]] = {}
        offset = 0
        while len(found) < count:
            params = {"limit": str(min(PAGE, count - offset)), "offset": str(offset)}
            async with session.get(
                f"{unleash_url}/api/admin/search/events", params=params, headers=headers
            ) as resp:
                page = (await resp.json())["events"]
            if not page:
                raise RuntimeError(f"the log ended after {len(found)} of {count} events")
            found.update((int(e["id"]), e) for e in page)
            offset += len(page)
        fetched = time.monotonic()
    await post_all(url, [webhook_body(found[i]) for i in sorted(found)], concurrency)
    done = time.monotonic()
    return {
        "posted": len(found),
        "started": started,
        "fetch_s": fetched - started,
        "elapsed_s": done - started,
    }


def _own() -> tuple[int, int, int]:
    """This process's CPU time (ns), VmRSS and RssAnon (kB). Not bench.lib.proc_stat:
    importing bench.lib (and the test harness it loads) would add to the floor's RSS."""
    cpu_ns = int(Path("/proc/self/schedstat").read_text().split()[0])
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return cpu_ns, int(fields["VmRSS"].split()[0]), int(fields["RssAnon"].split()[0])


async def idle_probe(
    unleash_url: str, token: str, interval_s: float, warmup_s: float, seconds: float
) -> dict[str, float]:
    """Probe like an idle daemon: a conditional GET every `interval_s`, nothing else."""
    import sqlite3  # noqa: PLC0415 - imported here: only this mode is a floor for the daemon
    import tempfile  # noqa: PLC0415

    import structlog  # noqa: F401, PLC0415 - its import is part of the daemon's floor

    with tempfile.TemporaryDirectory() as directory:
        db = sqlite3.connect(Path(directory) / "floor.sqlite3")
        db.execute("CREATE TABLE IF NOT EXISTS cursor (id INTEGER)")
        headers = {"Authorization": token, "Accept": "application/json"}
        url = f"{unleash_url}/api/admin/search/events"
        etag: str | None = None
        probes = not_modified = 0
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            loop = asyncio.get_running_loop()
            started = loop.time()
            measured_from: tuple[int, int, int] | None = None
            while (now := loop.time()) < started + warmup_s + seconds:
                if measured_from is None and now >= started + warmup_s:
                    measured_from, probes, not_modified = _own(), 0, 0
                sent = dict(headers, **({"If-None-Match": etag} if etag else {}))
                async with session.get(
                    url, params={"limit": "1"}, headers=sent, timeout=timeout
                ) as resp:
                    await resp.read()
                    probes += 1
                    if resp.status == 304:
                        not_modified += 1
                    else:
                        etag = resp.headers.get("ETag")
                await asyncio.sleep(interval_s)
        end = _own()
        db.close()
    assert measured_from is not None
    return {
        "cpu_pct": (end[0] - measured_from[0]) / 1e9 / seconds * 100,
        "rss_mb": end[1] / 1024,
        "anon_mb": end[2] / 1024,
        "probes": probes,
        "not_modified": not_modified,
    }


def main() -> None:
    if sys.argv[1] == "--idle":
        unleash_url, interval_s, warmup_s, seconds = (
            sys.argv[2],
            float(sys.argv[3]),
            float(sys.argv[4]),
            float(sys.argv[5]),
        )
        token = os.environ["BENCH_UNLEASH_TOKEN"]
        result = asyncio.run(idle_probe(unleash_url, token, interval_s, warmup_s, seconds))
        print(json.dumps(result))
        return
    if sys.argv[1] == "--fetch":
        unleash_url, count, url = sys.argv[2], int(sys.argv[3]), sys.argv[4]
        concurrency = int(sys.argv[5]) if len(sys.argv) > 5 else 1
        token = os.environ["BENCH_UNLEASH_TOKEN"]
        summary = asyncio.run(fetch_and_post(unleash_url, token, count, url, concurrency))
        print(json.dumps(summary))
        return
    url, path = sys.argv[1], Path(sys.argv[2])
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    bodies = path.read_bytes().splitlines()
    print(json.dumps(asyncio.run(post_all(url, bodies, concurrency))))


if __name__ == "__main__":
    main()

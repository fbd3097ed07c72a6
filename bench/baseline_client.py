"""The physical limit for ordered delivery: POST bodies one at a time, in order, over one
keep-alive aiohttp connection, doing nothing else (no state, no rendering, no logging).
With a concurrency N > 1: N such loops share the bodies (the limit for unordered delivery
with max_in_flight = N).

    python -m bench.baseline_client URL BODIES_FILE [N]   # one body per line; prints JSON
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp


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


def main() -> None:
    url, path = sys.argv[1], Path(sys.argv[2])
    concurrency = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    bodies = path.read_bytes().splitlines()
    print(json.dumps(asyncio.run(post_all(url, bodies, concurrency))))


if __name__ == "__main__":
    main()

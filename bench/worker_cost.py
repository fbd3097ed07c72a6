"""The delivery worker's own CPU work per event, with the network taken out.

One ordered webhook with the default body drains an outbox of `--events` rows in a state
file, with `deliver.post` replaced by a stub that answers 200 after one loop turn: what is
left is rendering, the group-committed marks, the outbox reads and the worker's
bookkeeping, the work a real run does on top of aiohttp. `--profile` prints cProfile's top
functions.
No Unleash and no receiver are needed.

    .venv/bin/python -m bench.worker_cost [--events 20000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import tempfile
import time
import tomllib
from pathlib import Path

import poller.worker as worker_module
from multidict import CIMultiDict
from poller import log
from poller.app import make_session
from poller.config import Config, WebhookConfig, parse_config
from poller.deliver import Attempt
from poller.state import SqliteState
from poller.worker import make_worker


def _event(i: int) -> str:
    """A feature-updated event about as large as the ones the other benchmarks insert."""
    return json.dumps(
        {
            "id": i,
            "type": "feature-updated",
            "createdBy": "admin",
            "createdAt": "2026-11-28T10:00:00.000Z",
            "createdByUserId": 1,
            "data": {
                "name": f"flag-{i}",
                "description": "x" * 60,
                "type": "release",
                "project": "default",
                "stale": False,
            },
            "preData": None,
            "tags": [],
            "featureName": f"flag-{i}",
            "project": "default",
            "environment": "production",
            "label": "Flag updated",
            "summary": "**admin** updated",
        },
        separators=(",", ":"),
    )


async def _answer_at_once(
    session: object, hook: WebhookConfig, headers: CIMultiDict[str], body: bytes, delivery_id: str
) -> Attempt:
    # One loop turn, as a request on the wire gives: the group commit of marks started
    # while it is out runs then (never yielding, it would wait for the next outbox read).
    await asyncio.sleep(0)
    return Attempt(200, None, None, 0.0)


async def _drain(config: Config, state: SqliteState) -> float:
    async with make_session(config) as session:
        worker = make_worker(config.webhooks[0], state, session, asyncio.Event(), once=True)
        started = time.perf_counter()
        await worker.run()
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    log.configure("info")
    worker_module.post = _answer_at_once  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as work:
        config = parse_config(
            tomllib.loads(
                '[unleash]\nurl = "http://127.0.0.1:1"\ntoken = "t"\n[state]\n'
                'path = "s.sqlite3"\n[[webhooks]]\nname = "a"\nurl = "http://127.0.0.1:9/"\n'
            ),
            Path(work),
        )
        state = SqliteState.open(config.state.path)
        ids = range(1, args.events + 1)
        asyncio.run(
            state.ingest([(i, _event(i)) for i in ids], [("a", i) for i in ids], args.events)
        )
        if args.profile:
            profiler = cProfile.Profile()
            elapsed = profiler.runcall(asyncio.run, _drain(config, state))
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        else:
            elapsed = asyncio.run(_drain(config, state))
        left = sum((asyncio.run(state.pending_counts())).values())
        asyncio.run(state.close())
    print(
        f"worker's own work: {elapsed / args.events * 1e6:.1f} us per event over "
        f"{args.events:,} events ({left} left in the outbox)"
    )


if __name__ == "__main__":
    main()

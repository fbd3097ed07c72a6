"""The delivery worker's own CPU work per event, with the network taken out.

One ordered webhook with the default body drains an outbox of `--events` rows in a state
file, with `deliver.post` replaced by a stub that answers 200 after one loop turn: what is
left is rendering, the group-committed marks, the outbox reads and the worker's bookkeeping, the
work a real run does on top of aiohttp. `--profile` prints cProfile's top functions.
No Unleash and no receiver are needed. `--backend postgresql` drains a PostgreSQL state
instead (a fresh schema in a database of its own on the local cluster): the difference is
what the PostgreSQL store costs the worker, round trips included (the server runs on the
same machine, so its time is in the figure as the waits on it).

    .venv/bin/python -m bench.worker_cost [--events 20000] [--profile]
        [--backend sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import pstats
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import poller.worker as worker_module
from multidict import CIMultiDict
from poller import log
from poller.app import make_session
from poller.config import Config, WebhookConfig, parse_config
from poller.deliver import Attempt
from poller.state import StateStore, open_state
from poller.worker import make_worker

from bench.lib import postgres_states


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


async def _drain(config: Config, state: StateStore) -> float:
    async with make_session(config) as session:
        worker = make_worker(config.webhooks[0], state, session, asyncio.Event(), once=True)
        started = time.perf_counter()
        await worker.run()
        return time.perf_counter() - started


async def _filled(config: Config, events: int) -> StateStore:
    state = await open_state(config.state)
    if state.leadership is not None:  # its writes are fenced until it leads
        led, lease = await state.leadership.try_lead("bench", 600)
        assert led, lease
    ids = range(1, events + 1)
    await state.ingest([(i, _event(i)) for i in ids], [("a", i) for i in ids], events)
    return state


@contextlib.contextmanager
def _state_table(backend: str) -> Iterator[str]:
    if backend == "sqlite":
        yield 'path = "s.sqlite3"'
        return
    with postgres_states("bench_worker_cost") as states:
        url = states.url()
        states.state("worker_cost")
        yield f'url = "{url}"\nschema = "worker_cost"'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    args = parser.parse_args()
    log.configure("info")
    worker_module.post = _answer_at_once  # type: ignore[attr-defined]
    with tempfile.TemporaryDirectory() as work, _state_table(args.backend) as table:
        config = parse_config(
            tomllib.loads(
                '[unleash]\nurl = "http://127.0.0.1:1"\ntoken = "t"\n[state]\n'
                f'{table}\n[[webhooks]]\nname = "a"\nurl = "http://127.0.0.1:9/"\n'
            ),
            Path(work),
        )
        with asyncio.Runner() as runner:
            state = runner.run(_filled(config, args.events))
            if args.profile:
                profiler = cProfile.Profile()
                elapsed = profiler.runcall(runner.run, _drain(config, state))
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
                stats = pstats.Stats(profiler)
                _print_state_calls(stats, args.events)
            else:
                elapsed = runner.run(_drain(config, state))
            left = sum(runner.run(state.pending_counts()).values())
            runner.run(state.close())
    print(
        f"worker's own work ({args.backend}): {elapsed / args.events * 1e6:.1f} us per event "
        f"over {args.events:,} events ({left} left in the outbox)"
    )


def _print_state_calls(stats: pstats.Stats, events: int) -> None:
    """The store's methods the worker called, per event. cProfile counts every resumption
    of a coroutine as a call and its time only while it runs (waits excluded)."""
    print("state methods per event (cProfile calls = resumptions; us inside, waits excluded):")
    rows = stats.stats  # type: ignore[attr-defined]
    for (file, _, func), row in sorted(rows.items(), key=lambda kv: -kv[1][3]):
        if "/poller/state/" in file and func[0] != "<":
            print(f"  {row[1] / events:7.3f}  {row[3] / events * 1e6:8.1f}  {func}")


if __name__ == "__main__":
    main()

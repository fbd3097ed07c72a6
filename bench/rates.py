"""Delivery-rate runs shared by ordered_rate.py and unordered_rate.py: one Unleash with a
backlog, one lean receiver, and a sequence of senders measured against the same events."""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import resource
import statistics
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.support.unleash import UnleashServer

from bench.baseline_client import webhook_body
from bench.lib import (
    PYTHON,
    REPO_ROOT,
    Daemon,
    LeanReceiver,
    Report,
    arguments,
    delivery,
    insert_events,
    last_event_id,
    proc_stat,
    rate,
    say,
    unleash,
    workdir,
    write_config,
)


@dataclass
class RateRun:
    name: str
    received: int
    rate: float  # receiver-side: (n - 1) / (last receipt - first receipt)
    wall_s: float  # the sender process from start to exit
    cpu_s: float | None
    max_rss_kb: int | None
    lost: int
    out_of_order: int
    duplicates: int
    receiver_cpu_s: float = 0.0  # the lean receiver's CPU time during this run
    transactions: int | None = None  # PostgreSQL state: transactions in its database
    state_server_cpu_s: float | None = None  # PostgreSQL state: its server processes' CPU
    warnings: dict[str, int] | None = None  # the daemon's warning/error log events, counted


@dataclass
class Backlog:
    before: int
    first: int
    last: int

    @property
    def ids(self) -> range:
        return range(self.first, self.last + 1)


def make_backlog(server: UnleashServer, count: int) -> Backlog:
    before = last_event_id(server.db)
    first, last = insert_events(server.db, count)
    say(f"backlog: {count} events, ids {first}..{last}")
    return Backlog(before, first, last)


def bodies_file(server: UnleashServer, backlog: Backlog, path: Path) -> Path:
    """The backlog's events as Unleash's webhook (and the poller by default) sends them."""
    events = server.admin().all_events(after_id=backlog.before)
    lines = [webhook_body(e).decode() for e in events if backlog.first <= e["id"] <= backlog.last]
    path.write_text("\n".join(lines) + "\n")
    return path


def _measure(
    receiver: LeanReceiver,
    path: str,
    name: str,
    backlog: Backlog,
    wall_s: float,
    cpu_s: float | None,
    max_rss_kb: int | None,
) -> RateRun:
    ids, times = receiver.stats(path)
    result = delivery(ids, backlog.ids)
    return RateRun(
        name,
        len(ids),
        rate(times),
        wall_s,
        cpu_s,
        max_rss_kb,
        result.lost,
        result.out_of_order,
        result.duplicates,
    )


def run_baseline(
    receiver: LeanReceiver, bodies: Path, backlog: Backlog, concurrency: int = 1, tag: str = ""
) -> RateRun:
    path = f"/baseline-{concurrency}{tag}"
    receiver_cpu = proc_stat(receiver.pid).cpu_ns
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    completed = subprocess.run(
        [PYTHON, "-m", "bench.baseline_client", receiver.url(path), str(bodies), str(concurrency)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    summary = json.loads(completed.stdout)
    name = "baseline" if concurrency == 1 else f"baseline x{concurrency}"
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    run = _measure(receiver, path, name, backlog, summary["elapsed_s"], cpu_s, None)
    run.receiver_cpu_s = (proc_stat(receiver.pid).cpu_ns - receiver_cpu) / 1e9
    say(f"{name}: {run.rate:,.0f}/s")
    return run


def run_poller(
    server: UnleashServer,
    receiver: LeanReceiver,
    work: Path,
    backlog: Backlog,
    name: str,
    hook: dict[str, object],
    prefix: tuple[str, ...] = (),
    state: dict[str, object] | None = None,
) -> RateRun:
    """`run --once` from the id before the backlog: fetch, take in, deliver, exit.
    `state` is the config's [state] table (default: a fresh SQLite file)."""
    path = f"/{name}"
    config_path = work / f"{name}.toml"
    write_config(
        config_path,
        server,
        [{"name": name, "url": receiver.url(path), **hook}],
        start_from=backlog.before,
        state=state,
    )
    receiver_cpu = proc_stat(receiver.pid).cpu_ns
    daemon = Daemon(config_path, once=True, prefix=prefix)
    done = daemon.wait()
    receiver_cpu_s = (proc_stat(receiver.pid).cpu_ns - receiver_cpu) / 1e9
    if done.code != 0:
        raise RuntimeError(f"poller exited {done.code}; log {daemon.log_path}")
    run = _measure(
        receiver, path, f"poller {name}", backlog, done.wall_s, done.cpu_s, done.max_rss_kb
    )
    run.receiver_cpu_s = receiver_cpu_s
    run.warnings = dict(
        collections.Counter(
            str(entry.get("event"))
            for entry in daemon.log_events()
            if entry.get("level") in ("warning", "error", "critical")
        )
    )
    noted = f", log: {run.warnings}" if run.warnings else ""
    order = f", lost/out of order/dup {run.lost}/{run.out_of_order}/{run.duplicates}"
    say(f"{name}: {run.rate:,.0f}/s, wall {done.wall_s:.1f} s{order}{noted}")
    return run


def median_run(runs: list[RateRun]) -> RateRun:
    """The run with the median rate (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r.rate)[len(runs) // 2]


def report_run(report: Report, run: RateRun, count: int) -> None:
    report.add(f"{run.name}: rate at receiver", run.rate, "ev/s")
    report.add(f"{run.name}: wall (start to exit)", run.wall_s, "s")
    if run.cpu_s is not None:
        report.add(f"{run.name}: CPU time / event", run.cpu_s / count * 1e6, "us")
    report.add(f"{run.name}: receiver CPU time / event", run.receiver_cpu_s / count * 1e6, "us")
    report.add(
        f"{run.name}: lost / out of order / dup",
        f"{run.lost} / {run.out_of_order} / {run.duplicates}",
    )
    if run.transactions is not None:
        report.add(f"{run.name}: state transactions / event", run.transactions / count)
    if run.state_server_cpu_s is not None:
        report.add(
            f"{run.name}: PostgreSQL server CPU time / event",
            run.state_server_cpu_s / count * 1e6,
            "us",
        )


def rate_arguments(description: str) -> argparse.ArgumentParser:
    parser = arguments(description)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    return parser


@dataclass
class RateBench:
    """One Unleash with a backlog and one lean receiver, for runs against the same events."""

    server: UnleashServer
    receiver: LeanReceiver
    work: Path
    backlog: Backlog
    bodies: Path

    def baseline(self, concurrency: int = 1, tag: str = "") -> RateRun:
        return run_baseline(self.receiver, self.bodies, self.backlog, concurrency, tag)

    def poller(
        self, name: str, hook: dict[str, object], state: dict[str, object] | None = None
    ) -> RateRun:
        return run_poller(
            self.server, self.receiver, self.work, self.backlog, name, hook, state=state
        )


@contextlib.contextmanager
def rate_bench(name: str, events: int, keep: bool) -> Iterator[RateBench]:
    with workdir(name, keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        backlog = make_backlog(server, events)
        bodies = bodies_file(server, backlog, work / "bodies.jsonl")
        yield RateBench(server, receiver, work, backlog, bodies)


def median_rate(runs: list[RateRun]) -> float:
    return statistics.median(r.rate for r in runs)


def add_rounds(report: Report, label: str, runs: list[RateRun]) -> None:
    report.add(f"{label} rates, each round", " ".join(f"{r.rate:.0f}" for r in runs), "ev/s")
    if any(r.lost or r.out_of_order or r.duplicates for r in runs):
        report.add(
            f"{label} lost/out of order/dup, each round",
            " ".join(f"{r.lost}/{r.out_of_order}/{r.duplicates}" for r in runs),
        )
    for r in runs:
        if r.warnings:
            report.note(f"{r.name} logged {r.warnings}")

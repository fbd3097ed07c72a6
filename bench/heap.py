"""Where the idle daemon's memory goes after bursts: its live heap, and the allocator's.

One real Unleash and one lean receiver. A daemon at default settings (ordered) is started
through bench/heapstats.py, which adds one thing: on SIGUSR1 it writes CPython's allocator
statistics. 5 s after its first look at the log, and again 30 s after the last delivery of
`--bursts` bursts of `--events` events: its RSS (RssAnon) and, from pymalloc, the arenas
it holds, the bytes in live small objects and the bytes in pools with nothing in them;
also its CPU time between the two looks. pymalloc returns an arena (1 MiB) to the OS only
when every object in it is freed, so a burst's peak can leave arenas that are almost empty
and held by a few objects that outlived it. Then the same again, alone, with
PYTHONMALLOC=malloc (every object from glibc's malloc, which malloc_trim can hand back
page by page), for comparison.

    .venv/bin/python -m bench.heap [--events 5000] [--bursts 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.unleash import UnleashServer

from bench.burst import POLLER_TYPES, insert_burst, wait_settled
from bench.lib import (
    REPO_ROOT,
    Daemon,
    LeanReceiver,
    ProcStat,
    Report,
    arguments,
    proc_stat,
    say,
    unleash,
    workdir,
    write_config,
)

WRAPPER = REPO_ROOT / "bench" / "heapstats.py"
_FIGURES = {
    "arenas": r"# arenas allocated current\s*=\s*([\d,]+)",
    "live": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
    "free_blocks": r"# bytes in available blocks\s*=\s*([\d,]+)",
    "empty_pools": r"\d+ unused pools \* \d+ bytes\s*=\s*([\d,]+)",
}


@dataclass
class Look:
    proc: ProcStat
    pymalloc: dict[str, int]  # empty when pymalloc is not the allocator


def pymalloc_figures(text: str) -> dict[str, int]:
    """The figures of one `sys._debugmallocstats()` report that this benchmark shows."""
    found = {}
    for name, pattern in _FIGURES.items():
        if match := re.search(pattern, text):
            found[name] = int(match.group(1).replace(",", ""))
    return found


def look(daemon: Daemon, stats: Path) -> Look:
    """The daemon's RSS, and its allocator statistics (asked for with SIGUSR1)."""
    before = stats.read_text().count("==== end") if stats.exists() else 0
    os.kill(daemon.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        text = stats.read_text() if stats.exists() else ""
        if text.count("==== end") > before:
            report = text.split("==== stats")[-1]
            return Look(proc_stat(daemon.pid), pymalloc_figures(report))
        time.sleep(0.05)
    raise RuntimeError(f"the daemon wrote no allocator statistics to {stats}")


def one_daemon(
    server: UnleashServer,
    receiver: LeanReceiver,
    work: Path,
    args: argparse.Namespace,
    allocator: str,
) -> tuple[Look, Look]:
    """A daemon with `allocator` ("pymalloc", or "malloc" for PYTHONMALLOC=malloc): its look
    before the bursts and its look 30 s after the last delivery."""
    path = f"/{allocator}"
    config = write_config(
        work / f"{allocator}.toml",
        server,
        [{"name": allocator, "url": receiver.url(path)}],
        start_from="latest",
    )
    stats = work / f"{allocator}.stats"
    env = {"BENCH_HEAPSTATS_OUT": str(stats)}
    if allocator == "malloc":
        env["PYTHONMALLOC"] = "malloc"
    daemon = Daemon(config, main=(str(WRAPPER),), env=env)
    try:
        daemon.wait_log("cursor.initialised")
        time.sleep(5.0)
        first = look(daemon, stats)
        last_receipt = time.monotonic()
        for n in range(args.bursts):
            kind = POLLER_TYPES[n % len(POLLER_TYPES)]
            ids, _, _ = insert_burst(server, args.events, kind)
            wait_settled(receiver, path, ids, 300)
            _, receipts = receiver.stats(path)
            last_receipt = max(receipts)
            time.sleep(3.0)
        time.sleep(max(0.0, last_receipt + 30.0 - time.monotonic()))
        return first, look(daemon, stats)
    finally:
        daemon.stop()


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--bursts", type=int, default=3)
    args = parser.parse_args()
    report = Report("heap")
    looks = {}
    with workdir("heap", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        for allocator in ("pymalloc", "malloc"):
            say(f"daemon with {allocator}: idle, {args.bursts} bursts of {args.events}, idle")
            looks[allocator] = one_daemon(server, receiver, work, args, allocator)
    mb = 1024 * 1024
    print(f"\nheap: idle daemon before and 30 s after {args.bursts} bursts of {args.events:,}")
    for allocator, (first, last) in looks.items():
        for when, seen in (("before", first), ("after", last)):
            label = f"{allocator}, {when}: RSS (RssAnon)"
            shown = f"{seen.proc.rss_kb / 1024:.1f} ({seen.proc.anon_kb / 1024:.1f})"
            report.add(label, shown, "MB")
            figures = seen.pymalloc
            if {"arenas", "live", "empty_pools", "free_blocks"} <= figures.keys():
                report.add("  pymalloc arenas held (1 MiB each)", figures["arenas"])
                report.add("  bytes in live small objects", figures["live"] / mb, "MB")
                report.add("  bytes in empty pools", figures["empty_pools"] / mb, "MB")
                report.add("  free bytes in used pools", figures["free_blocks"] / mb, "MB")
        growth = (last.proc.rss_kb - first.proc.rss_kb) / 1024
        report.add(f"{allocator}: RSS growth across the bursts", growth, "MB")
        cpu_s = (last.proc.cpu_ns - first.proc.cpu_ns) / 1e9
        report.add(f"{allocator}: CPU for the bursts (and 30 s idle)", cpu_s, "s")
    report.save(args.json)


if __name__ == "__main__":
    main()

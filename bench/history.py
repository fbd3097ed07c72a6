"""Benchmark 7 — first start over a long history (start_from = "earliest").

One real Unleash and one lean receiver. The history is built in two steps so that memory
can be compared across history sizes in the same run:
  a) 10,000 events; `python -m poller run --once` from "earliest" with a fresh state;
  b) 90,000 more (100,000 in all); the same again with a fresh state.
Each run: wall time to exit, time until the catch-up was taken in (`cursor.advanced`),
peak RSS (ru_maxrss from wait4, which equals the process's final VmHWM), and what its
log showed while it worked: the info lines, and the longest stretch with no log line.
Targets: peak RSS does not grow with history (b <= a + 10 %); progress is logged
(no stretch without a log line longer than 15 s: a line every 10 s, plus slack).

    .venv/bin/python -m bench.history [--small 10000] [--large 100000] [--json out.json]
"""

from __future__ import annotations

import collections
import datetime as dt
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

from tests.support.unleash import UnleashServer

from bench.lib import (
    Daemon,
    LeanReceiver,
    Report,
    arguments,
    delivery,
    insert_events,
    say,
    unleash,
    workdir,
    write_config,
)

# The daemon promises a progress line every 10 s while it works; 5 s of slack for the
# page or delivery batch in flight when the 10 s come round.
MAX_SILENCE_S = 15.0


@dataclass
class HistoryRun:
    events: int
    wall_s: float
    taken_in_s: float
    max_rss_kb: int
    lost: int
    out_of_order: int
    log_lines: int
    log_kinds: dict[str, int]
    longest_silence_s: float


def _when(entry: dict[str, object]) -> float:
    stamp = str(entry.get("timestamp", "")).replace("Z", "+00:00")
    return dt.datetime.fromisoformat(stamp).timestamp()


def run_from_earliest(
    server: UnleashServer, receiver: LeanReceiver, work: Path, name: str, events: int
) -> HistoryRun:
    path = f"/{name}"
    config = write_config(
        work / f"{name}.toml",
        server,
        [{"name": name, "url": receiver.url(path)}],
        start_from="earliest",
    )
    started = time.time()
    daemon = Daemon(config, once=True)
    done = daemon.wait(timeout_s=3600)
    ended = time.time()
    if done.code != 0:
        raise RuntimeError(f"{name}: poller exited {done.code}; log {daemon.log_path}")
    entries = [e for e in daemon.log_events() if "timestamp" in e]
    moments = [started, *(_when(e) for e in entries), ended]
    silence = max(b - a for a, b in itertools.pairwise(moments))
    advanced = [e for e in entries if e.get("event") == "cursor.advanced"]
    taken_in = (_when(advanced[-1]) - started) if advanced else float("nan")
    ids, _ = receiver.stats(path)
    every_id = [int(i) for i in server.db.psql("SELECT id FROM events ORDER BY id;")]
    result = delivery(ids, every_id)
    kinds = collections.Counter(str(e.get("event")) for e in entries)
    say(
        f"{name}: {events} events in {done.wall_s:.1f} s, peak RSS {done.max_rss_kb / 1024:.1f} "
        f"MB, longest log silence {silence:.1f} s"
    )
    return HistoryRun(
        events,
        done.wall_s,
        taken_in,
        done.max_rss_kb,
        result.lost,
        result.out_of_order,
        len(entries),
        dict(kinds),
        silence,
    )


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    args = parser.parse_args()
    report = Report("7 history")
    runs: list[HistoryRun] = []
    with workdir("history", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        insert_events(server.db, args.small)
        total = int(server.db.psql("SELECT count(*) FROM events;")[0])
        runs.append(run_from_earliest(server, receiver, work, "small", total))
        insert_events(server.db, args.large - args.small)
        total = int(server.db.psql("SELECT count(*) FROM events;")[0])
        runs.append(run_from_earliest(server, receiver, work, "large", total))
    print(f"\n7. first start from earliest over {args.small:,} and {args.large:,} events")
    for run in runs:
        tag = f"{run.events:,} events"
        report.add(f"{tag}: wall time (start to exit)", run.wall_s, "s")
        report.add(f"{tag}: taken in (cursor.advanced)", run.taken_in_s, "s")
        report.add(f"{tag}: events/s end to end", run.events / run.wall_s, "ev/s")
        report.add(f"{tag}: peak RSS (VmHWM)", run.max_rss_kb / 1024, "MB")
        report.add(f"{tag}: lost / out of order", f"{run.lost} / {run.out_of_order}")
        report.add(f"{tag}: log lines while it ran", run.log_lines)
        report.note(
            f"{tag}: log events: "
            + ", ".join(f"{k} x{v}" for k, v in sorted(run.log_kinds.items()))
        )
        report.add(
            f"{tag}: longest silence in the log",
            run.longest_silence_s,
            "s",
            f"<= {MAX_SILENCE_S:g} s",
            run.longest_silence_s <= MAX_SILENCE_S,
        )
    small, large = runs
    growth = large.max_rss_kb / small.max_rss_kb
    report.add("peak RSS large / small", growth, "x", "<= 1.1", growth <= 1.1)
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

"""Benchmark 1 — a 5,000-event burst: unleash-poller against Unleash's own webhook integration.

One real Unleash, one lean receiver. Unleash's own webhook integration is created through
the admin API and posts to /unleash (it caches integrations for up to 60 s, so probe
events are inserted until one reaches it); it is subscribed to one event type only.

Default mode, `--mode alone`: alternating rounds, each side alone on the same Unleash and a
burst of the same size, never two at once. Each round: Unleash's own webhook delivers a
burst of its type (no daemon running); then a fresh daemon at default settings (ordered)
delivers a burst of another type, which the integration ignores; then the floor: a bare
aiohttp client (bench/baseline_client.py --fetch) reads that burst's pages from Unleash and
POSTs the bodies in id order over one connection, timed from its start; then a fresh daemon
with `max_in_flight = 8` delivers another burst, and the floor again over that one with
8 POSTs in flight over 8 connections (the order of the two daemons swaps every round).
Each daemon is started, has taken its first look at the log, and only then is its burst
inserted; its time is from the insert's commit to its last receipt. Printed: medians and
each round, ordered / floor and max_in_flight = 8 / Unleash's own (ratios of the
medians), and each daemon against its floor (the best any client could do). Then one
more daemon at default settings idles for `--idle-s` seconds (its CPU and RSS before any
burst), delivers three bursts, and idles again: its RSS 30 s after the last delivery, and
its CPU over the next `--idle-s` seconds.

`--mode concurrent` (the old benchmark): both deliver the same bursts at the same time,
which is what an operator sees while both run; Unleash's Node process then serves the
daemon's page reads late while it fires its own POSTs, so it measures the contention.

    .venv/bin/python -m bench.burst [--events 5000] [--rounds 3] [--idle-s 30] [--json out.json]
    .venv/bin/python -m bench.burst --mode concurrent [--events 5000] [--bursts 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.unleash import UnleashServer

from bench.lib import (
    Daemon,
    LeanReceiver,
    Report,
    arguments,
    baseline_client,
    delivery,
    idle_floor,
    last_event_id,
    proc_stat,
    say,
    unleash,
    workdir,
    write_config,
)

PROBE_TYPE = "feature-updated"  # the integration is subscribed to this type only
ALONE_TYPE = "feature-metadata-updated"
POLLER_TYPES = ("feature-metadata-updated", "feature-stale-on", "feature-stale-off")
SETTLE_S = 15.0  # no new receipt for this long: that side is done


def wait_for_integration(server: UnleashServer, receiver: LeanReceiver) -> float:
    """Insert a probe event every 5 s until Unleash's integration delivers one."""
    started = time.monotonic()
    while time.monotonic() - started < 180:
        server.db.insert_events(1, type=PROBE_TYPE)
        if receiver.wait_for(["/unleash"], 1, 5.0):
            time.sleep(2.0)  # let the other probes land before the burst
            return time.monotonic() - started
    raise RuntimeError("Unleash's webhook integration delivered no probe within 180 s")


def wait_settled(receiver: LeanReceiver, path: str, ids: range, timeout_s: float) -> None:
    """Until every id arrived, or nothing new arrived for SETTLE_S (a side that lost some)."""
    deadline = time.monotonic() + timeout_s
    last_count, last_change = -1, time.monotonic()
    while time.monotonic() < deadline:
        count = receiver.count(path)
        if count >= len(ids):
            got = delivery(receiver.stats(path)[0], ids)
            if got.lost == 0:
                return
        if count != last_count:
            last_count, last_change = count, time.monotonic()
        elif time.monotonic() - last_change > SETTLE_S:
            return
        time.sleep(0.1)


def burst_figures(
    receiver: LeanReceiver, path: str, ids: range, committed_at: float
) -> tuple[float, int, int, int]:
    """(seconds to the last receipt, lost, out of order, duplicates)."""
    received, times = receiver.stats(path)
    in_burst = [(i, t) for i, t in zip(received, times, strict=True) if i in ids]
    got = delivery([i for i, _ in in_burst], ids)
    last = max((t for _, t in in_burst), default=float("nan"))
    return last - committed_at, got.lost, got.out_of_order, got.duplicates


def insert_burst(server: UnleashServer, count: int, type_: str) -> tuple[range, float, float]:
    """The burst's ids, and its commit time on the monotonic and on the wall clock."""
    before = time.monotonic()
    ids = server.db.insert_events(count, type=type_)
    committed_at, wall = time.monotonic(), time.time()
    say(f"inserted {count} events (ids {ids[0]}..{ids[-1]}) in {committed_at - before:.2f} s")
    return range(ids[0], ids[-1] + 1), committed_at, wall


def taken_in_s(daemon: Daemon, ids: range, committed_wall: float, *, first: bool = False) -> float:
    """From the commit to the daemon's `cursor.advanced` past the burst (its log's clock),
    or with `first`, to the first one into it (a burst read oldest page first is taken in
    a page at a time, delivering from the first)."""
    reach = ids[0] if first else ids[-1]
    for entry in daemon.log_events():
        if entry.get("event") == "cursor.advanced" and int(entry.get("to", 0)) >= reach:
            stamp = str(entry["timestamp"]).replace("Z", "+00:00")
            return dt.datetime.fromisoformat(stamp).timestamp() - committed_wall
    return float("nan")


def first_receipt_s(receiver: LeanReceiver, path: str, ids: range, committed_at: float) -> float:
    received, times = receiver.stats(path)
    return min((t for i, t in zip(received, times, strict=True) if i in ids), default=math.nan) - (
        committed_at
    )


def run_concurrent(args: argparse.Namespace) -> None:
    """Both sides deliver the same bursts at the same time (the old benchmark)."""
    report = Report("1 burst (concurrent)")
    with workdir("burst", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        admin = server.admin()
        admin.create_webhook(receiver.url("/unleash"), events=[PROBE_TYPE])
        waited = wait_for_integration(server, receiver)
        say(f"Unleash's integration delivers (after {waited:.0f} s of probes)")
        config = write_config(
            work / "poller.toml",
            server,
            [{"name": "burst", "url": receiver.url("/poller")}],
            start_from="latest",
        )
        daemon = Daemon(config)
        polled: list[tuple[float, int, int, int]] = []
        own: list[tuple[float, int, int, int]] = []
        taken_in: list[float] = []
        rng = random.Random(7)
        try:
            daemon.wait_log("cursor.initialised")
            time.sleep(2.0)  # past its first probe: the burst is what it finds next
            if last_event_id(server.db) != daemon.wait_log("cursor.initialised")["high_water"]:
                raise RuntimeError("an event slipped in between start-up and the burst")

            for n in range(args.bursts):
                ids, committed_at, wall = insert_burst(server, args.events, PROBE_TYPE)
                for path in ("/poller", "/unleash"):
                    wait_settled(receiver, path, ids, 300)
                polled.append(burst_figures(receiver, "/poller", ids, committed_at))
                own.append(burst_figures(receiver, "/unleash", ids, committed_at))
                taken_in.append(taken_in_s(daemon, ids, wall))
                say(
                    f"burst {n + 1}: Unleash {own[-1][0]:.2f} s, poller {polled[-1][0]:.2f} s "
                    f"(taken in after {taken_in[-1]:.2f} s)"
                )
                time.sleep(rng.uniform(3.0, 4.0))  # no fixed phase to either side's loop

            alone_ids, alone_at, alone_wall = insert_burst(server, args.events, ALONE_TYPE)
            wait_settled(receiver, "/poller", alone_ids, 300)
            alone = burst_figures(receiver, "/poller", alone_ids, alone_at)
            alone_taken_in = taken_in_s(daemon, alone_ids, alone_wall)
        finally:
            daemon.stop()
    print(
        f"\n1. {args.bursts} bursts of {args.events:,} events, each inserted in one "
        "statement (medians; each burst listed)"
    )
    own_s = statistics.median(o[0] for o in own)
    polled_s = statistics.median(p[0] for p in polled)
    report.add("Unleash's own integration: insert -> last receipt", own_s, "s")
    report.add("  each burst", " ".join(f"{o[0]:.2f}" for o in own), "s")
    report.add("unleash-poller (same bursts, same time): ditto", polled_s, "s")
    report.add("  each burst", " ".join(f"{p[0]:.2f}" for p in polled), "s")
    report.add(
        "  of which insert -> taken in (cursor.advanced)",
        " ".join(f"{t:.2f}" for t in taken_in),
        "s",
    )
    ratio = polled_s / own_s
    report.add("poller / Unleash's own (medians)", ratio, "x", "<= 0.25", ratio <= 0.25)
    report.add("Unleash's own: out of order, each burst", " ".join(str(o[2]) for o in own))
    poller_disorder = sum(p[2] for p in polled)
    report.add(
        "unleash-poller: out of order, all bursts", poller_disorder, "", "0", poller_disorder == 0
    )
    report.add(
        "Unleash's own: lost / duplicates, all bursts",
        f"{sum(o[1] for o in own)} / {sum(o[3] for o in own)}",
    )
    poller_lost = sum(p[1] for p in polled)
    report.add(
        "unleash-poller: lost / duplicates, all bursts",
        f"{poller_lost} / {sum(p[3] for p in polled)}",
        "",
        "0 lost",
        poller_lost == 0,
    )
    report.add("unleash-poller alone (last burst): insert -> last", alone[0], "s")
    report.add("  of which insert -> taken in (cursor.advanced)", alone_taken_in, "s")
    report.add("unleash-poller alone: lost / out of order", f"{alone[1]} / {alone[2]}")
    report.save(args.json)
    say("done")


@dataclass
class Side:
    """One side's bursts: (seconds to the last receipt, lost, out of order, duplicates)."""

    name: str
    runs: list[tuple[float, int, int, int]]
    taken_in: list[float]
    # insert -> first cursor.advanced into the burst, insert -> first receipt
    starts: list[tuple[float, float]] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        """Over the bursts that arrived at all (a side that lost one has no time for it)."""
        times = [r[0] for r in self.runs if math.isfinite(r[0])]
        return statistics.median(times) if times else math.nan

    def each(self) -> str:
        return " ".join(f"{r[0]:.2f}" if math.isfinite(r[0]) else "none" for r in self.runs)


def poller_burst(
    server: UnleashServer,
    receiver: LeanReceiver,
    work: Path,
    name: str,
    hook: dict[str, object],
    count: int,
    type_: str,
) -> tuple[tuple[float, int, int, int], float, tuple[float, float]]:
    """A fresh daemon; once it has taken its first look at the log, one burst. Returns
    its figures, insert -> taken in, and (insert -> first taken in, -> first receipt)."""
    path = f"/{name}"
    config = write_config(
        work / f"{name}.toml",
        server,
        [{"name": "burst", "url": receiver.url(path), **hook}],
        start_from="latest",
    )
    daemon = Daemon(config)
    try:
        high = daemon.wait_log("cursor.initialised")["high_water"]
        time.sleep(2.0)  # past its first polls: the burst is what it finds next
        if last_event_id(server.db) != high:
            raise RuntimeError("an event slipped in between start-up and the burst")
        ids, committed_at, wall = insert_burst(server, count, type_)
        wait_settled(receiver, path, ids, 300)
        figures = burst_figures(receiver, path, ids, committed_at)
        taken_in = taken_in_s(daemon, ids, wall)
        starts = (
            taken_in_s(daemon, ids, wall, first=True),
            first_receipt_s(receiver, path, ids, committed_at),
        )
    finally:
        daemon.stop()
    say(
        f"{name}: {figures[0]:.2f} s (taken in after {taken_in:.2f} s; first page after "
        f"{starts[0]:.2f} s, first receipt after {starts[1]:.2f} s)"
    )
    return figures, taken_in, starts


def floor_burst(
    server: UnleashServer, receiver: LeanReceiver, name: str, ids: range, in_flight: int = 1
) -> tuple[float, float]:
    """The bare client over the newest `len(ids)` events (the burst just delivered), with
    `in_flight` POSTs at a time: (seconds from its start to the last receipt, of which
    reading the pages)."""
    path = f"/{name}"
    summary = baseline_client(
        server, "--fetch", server.url, str(len(ids)), receiver.url(path), str(in_flight)
    )
    received, times = receiver.stats(path)
    got = delivery(received, ids)
    if got.lost or (in_flight == 1 and got.out_of_order):
        raise RuntimeError(f"the floor client lost {got.lost}, {got.out_of_order} out of order")
    elapsed = max(times) - float(summary["started"])
    say(f"{name}: {elapsed:.2f} s (pages read in {summary['fetch_s']:.2f} s)")
    return elapsed, float(summary["fetch_s"])


def idle_after_bursts(
    server: UnleashServer,
    receiver: LeanReceiver,
    work: Path,
    count: int,
    bursts: int,
    idle_s: float,
) -> dict[str, float]:
    """One daemon at default settings idles for `idle_s` (RSS and CPU before any burst),
    delivers `bursts` bursts, then idles: RSS 30 s after the last delivery, CPU over the
    `idle_s` after that. The idle floor (a bare probe loop, `idle_floor`) runs alone
    before the daemon starts and again after it stops; its figures are the mean of both."""
    floors = [idle_floor(server, idle_s)]
    say(f"idle floor: {floors[0]['cpu_pct']:.3f} % CPU, {floors[0]['rss_mb']:.1f} MB")
    path = "/idle"
    config = write_config(
        work / "idle.toml",
        server,
        [{"name": "idle", "url": receiver.url(path)}],
        start_from="latest",
    )
    daemon = Daemon(config)
    rng = random.Random(11)
    try:
        daemon.wait_log("cursor.initialised")
        time.sleep(5.0)
        fresh = proc_stat(daemon.pid)
        time.sleep(idle_s)  # the same daemon idle before any burst, for comparison
        before = proc_stat(daemon.pid)
        times: list[float] = []
        after_each: list[float] = []  # RSS 3-4 s after each burst: growth or a warm-up?
        for n in range(bursts):
            ids, committed_at, _ = insert_burst(server, count, POLLER_TYPES[n % len(POLLER_TYPES)])
            wait_settled(receiver, path, ids, 300)
            times.append(burst_figures(receiver, path, ids, committed_at)[0])
            time.sleep(rng.uniform(3.0, 4.0))
            after_each.append(proc_stat(daemon.pid).rss_kb / 1024)
        _, receipts = receiver.stats(path)
        last = max(receipts)
        time.sleep(max(0.0, last + 30.0 - time.monotonic()))
        at_30 = proc_stat(daemon.pid)
        time.sleep(idle_s)
        end = proc_stat(daemon.pid)
    finally:
        daemon.stop()
    say(f"idle daemon: bursts {' '.join(f'{t:.2f}' for t in times)} s")
    say(f"idle daemon: RSS after each burst {' '.join(f'{r:.1f}' for r in after_each)} MB")
    floors.append(idle_floor(server, idle_s))
    say(f"idle floor: {floors[1]['cpu_pct']:.3f} % CPU, {floors[1]['rss_mb']:.1f} MB")
    return {
        "floor_cpu_pct": statistics.mean(f["cpu_pct"] for f in floors),
        "floor_rss_mb": statistics.mean(f["rss_mb"] for f in floors),
        "floor_anon_mb": statistics.mean(f["anon_mb"] for f in floors),
        "rss_mb": at_30.rss_kb / 1024,
        "anon_mb": at_30.anon_kb / 1024,
        "file_mb": at_30.file_kb / 1024,
        "hwm_mb": end.hwm_kb / 1024,
        "rss_end_mb": end.rss_kb / 1024,
        "cpu_pct": (end.cpu_ns - at_30.cpu_ns) / 1e9 / idle_s * 100,
        "fresh_rss_mb": before.rss_kb / 1024,
        "first_burst_rss_mb": after_each[0],
        "fresh_anon_mb": before.anon_kb / 1024,
        "fresh_cpu_pct": (before.cpu_ns - fresh.cpu_ns) / 1e9 / idle_s * 100,
        "burst_cpu_s": (at_30.cpu_ns - before.cpu_ns) / 1e9,
        "median_burst_s": statistics.median(times),
    }


def run_alone(args: argparse.Namespace) -> None:
    """Alternating rounds, each side alone (see the module docstring)."""
    report = Report("1 burst")
    own = Side("Unleash's own", [], [])
    ordered = Side("ordered", [], [])
    wide = Side("max_in_flight = 8", [], [])
    floor: list[tuple[float, float]] = []
    wide_floor: list[tuple[float, float]] = []
    loads: list[float] = []
    rng = random.Random(7)
    with workdir("burst", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        if args.rounds:
            server.admin().create_webhook(receiver.url("/unleash"), events=[PROBE_TYPE])
            waited = wait_for_integration(server, receiver)
            say(f"Unleash's integration delivers (after {waited:.0f} s of probes)")
        for n in range(args.rounds):
            loads.append(os.getloadavg()[0])
            ids, committed_at, _ = insert_burst(server, args.events, PROBE_TYPE)
            wait_settled(receiver, "/unleash", ids, 300)
            own.runs.append(burst_figures(receiver, "/unleash", ids, committed_at))
            say(f"round {n + 1}: Unleash's own {own.runs[-1][0]:.2f} s")
            time.sleep(rng.uniform(3.0, 4.0))  # its announcer has nothing left to do
            plan: list[tuple[str, Side, dict[str, object]]] = [
                ("ordered", ordered, {}),
                ("wide", wide, {"max_in_flight": 8}),
            ]
            for name, side, hook in plan if n % 2 == 0 else plan[::-1]:
                type_ = POLLER_TYPES[0]
                figures, taken_in, starts = poller_burst(
                    server, receiver, work, f"{name}-{n}", hook, args.events, type_
                )
                side.runs.append(figures)
                side.taken_in.append(taken_in)
                side.starts.append(starts)
                # Then the floor over the burst this side was given, as many in flight.
                last = last_event_id(server.db)
                in_flight = int(str(hook.get("max_in_flight", 1)))
                (floor if name == "ordered" else wide_floor).append(
                    floor_burst(
                        server,
                        receiver,
                        f"floor-{name}-{n}",
                        range(last - args.events + 1, last + 1),
                        in_flight,
                    )
                )
            loads.append(os.getloadavg()[0])
        idle = idle_after_bursts(server, receiver, work, args.events, 3, args.idle_s)
        loads.append(os.getloadavg()[0])
    print(
        f"\n1. {args.rounds} alternating rounds of {args.events:,}-event bursts, each side "
        f"alone (medians; each round listed); load average {min(loads):.1f}-{max(loads):.1f}"
    )
    if args.rounds:
        report_rounds(report, own, ordered, wide, floor, wide_floor)
    report_idle(report, idle, args.idle_s)
    report.save(args.json)
    say("done")


def report_rounds(
    report: Report,
    own: Side,
    ordered: Side,
    wide: Side,
    floor: list[tuple[float, float]],
    wide_floor: list[tuple[float, float]],
) -> None:
    floor_s = statistics.median(f[0] for f in floor)
    wide_floor_s = statistics.median(f[0] for f in wide_floor)
    for side in (own, ordered, wide):
        report.add(f"{side.name}: insert -> last receipt", side.median_s, "s")
        report.add("  each round", side.each(), "s")
    report.add("floor (bare client: read the pages, POST in order)", floor_s, "s")
    report.add("  each round", " ".join(f"{f[0]:.2f}" for f in floor), "s")
    report.add("  of which reading the pages", " ".join(f"{f[1]:.2f}" for f in floor), "s")
    report.add(
        "floor, 8 in flight (bare client: read the pages, POST 8 at a time)", wide_floor_s, "s"
    )
    report.add("  each round", " ".join(f"{f[0]:.2f}" for f in wide_floor), "s")
    for side in (ordered, wide):
        report.add(
            f"{side.name}: insert -> taken in (cursor.advanced)",
            " ".join(f"{t:.2f}" for t in side.taken_in),
            "s",
        )
        report.add(
            "  insert -> first page taken in / first receipt",
            " ".join(f"{t:.2f}/{r:.2f}" for t, r in side.starts),
            "s",
        )
    ratio = ordered.median_s / floor_s
    report.add("ordered / floor (medians)", ratio, "x", "<= 1.10", ratio <= 1.10)
    report.add(
        "  each round",
        " ".join(f"{o[0] / f[0]:.2f}" for o, f in zip(ordered.runs, floor, strict=True)),
        "x",
    )
    ratio = wide.median_s / own.median_s
    report.add("max_in_flight = 8 / Unleash's own (medians)", ratio, "x", "<= 0.15", ratio <= 0.15)
    report.add(
        "max_in_flight = 8 / floor, 8 in flight (medians)", wide.median_s / wide_floor_s, "x"
    )
    report.add("floor, 8 in flight / Unleash's own (medians)", wide_floor_s / own.median_s, "x")
    ratio = ordered.median_s / own.median_s
    report.add("ordered / Unleash's own (medians)", ratio, "x")
    report.add("Unleash's own: out of order, each round", " ".join(str(o[2]) for o in own.runs))
    disorder = sum(p[2] for p in ordered.runs)
    report.add("ordered: out of order, all rounds", disorder, "", "0", disorder == 0)
    for side in (own, ordered, wide):
        lost = sum(r[1] for r in side.runs)
        report.add(
            f"{side.name}: lost / duplicates, all rounds",
            f"{lost} / {sum(r[3] for r in side.runs)}",
            "",
            "0 lost",
            lost == 0,
        )


def report_idle(report: Report, idle: dict[str, float], idle_s: float) -> None:
    print(f"\n   after three bursts (ordered, default settings), idle for {idle_s:.0f} s")
    rss = idle["rss_mb"]
    report.add("idle RSS 30 s after the last delivery", rss, "MB", "<= 40 MB", rss <= 40)
    report.add(
        "  of which RssAnon / RssFile", f"{idle['anon_mb']:.1f} / {idle['file_mb']:.1f}", "MB"
    )
    report.add(
        f"  RSS after {idle_s:.0f} s more / peak (VmHWM)",
        f"{idle['rss_end_mb']:.1f} / {idle['hwm_mb']:.1f}",
        "MB",
    )
    report.add(
        "  before any burst: RSS (RssAnon)",
        f"{idle['fresh_rss_mb']:.1f} ({idle['fresh_anon_mb']:.1f})",
        "MB",
    )
    report.add("  after the first burst (3-4 s after it)", idle["first_burst_rss_mb"], "MB")
    report.add(
        "  growth from the first burst to 30 s after the third",
        rss - idle["first_burst_rss_mb"],
        "MB",
    )
    cpu = idle["cpu_pct"]
    report.add("idle CPU after the bursts", cpu, "% core", "<= 0.25 %", cpu <= 0.25)
    report.add("  before any burst", idle["fresh_cpu_pct"], "% core")
    floor_cpu, floor_rss = idle["floor_cpu_pct"], idle["floor_rss_mb"]
    report.add("idle floor (bare probe loop, alone): CPU", floor_cpu, "% core")
    report.add("  RSS (RssAnon)", f"{floor_rss:.1f} ({idle['floor_anon_mb']:.1f})", "MB")
    report.add("idle CPU after the bursts / floor", cpu / floor_cpu if floor_cpu else 0.0, "x")
    report.add("idle RSS after the bursts - floor", rss - floor_rss, "MB")
    report.add("CPU for the three bursts", idle["burst_cpu_s"], "s")
    report.add("  median burst time of that daemon", idle["median_burst_s"], "s")


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("alone", "concurrent"), default="alone")
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="alone: alternating rounds (0: only the idle daemon)"
    )
    parser.add_argument("--idle-s", type=float, default=30.0, help="alone: idle CPU window")
    parser.add_argument(
        "--bursts", type=int, default=3, help="concurrent: bursts both sides deliver at once"
    )
    args = parser.parse_args()
    if args.mode == "alone":
        run_alone(args)
    else:
        run_concurrent(args)


if __name__ == "__main__":
    main()

"""Benchmark 1 — a 5,000-event burst: unleash-poller beside Unleash's own webhook integration.

One real Unleash, one lean receiver. Unleash's own webhook integration is created through
the admin API and posts to /unleash (it caches integrations for up to 60 s, so probe
events are inserted until one reaches it). The daemon (`python -m poller run`, default
settings, start_from = latest) posts to /poller. Then 5,000 events are inserted in ONE
statement and both deliver the same burst at the same time; each time is from the
insert's commit to that side's last receipt. That is repeated (`--bursts`, default 3) and
medians are compared: whether the daemon's poll reaches Unleash before or after Unleash's
own once-a-second announcer starts its 5,000 POSTs (which keep Node busy, so the search
pages are served late) swings a single burst between ~2.5 s and ~8 s.

A last burst of another event type, which the integration is not subscribed to, times
the daemon alone (nothing else competing for the 2 cores).
Target: poller time <= 0.25 x Unleash's; no loss; poller in id order.

    .venv/bin/python -m bench.burst [--events 5000] [--bursts 3] [--json out.json]
"""

from __future__ import annotations

import datetime as dt
import random
import statistics
import time

from tests.support.unleash import UnleashServer

from bench.lib import (
    Daemon,
    LeanReceiver,
    Report,
    arguments,
    delivery,
    last_event_id,
    say,
    unleash,
    workdir,
    write_config,
)

PROBE_TYPE = "feature-updated"  # the integration is subscribed to this type only
ALONE_TYPE = "feature-metadata-updated"
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


def taken_in_s(daemon: Daemon, ids: range, committed_wall: float) -> float:
    """From the commit to the daemon's `cursor.advanced` past the burst (its log's clock)."""
    for entry in daemon.log_events():
        if entry.get("event") == "cursor.advanced" and int(entry.get("to", 0)) >= ids[-1]:
            stamp = str(entry["timestamp"]).replace("Z", "+00:00")
            return dt.datetime.fromisoformat(stamp).timestamp() - committed_wall
    return float("nan")


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument(
        "--bursts", type=int, default=3, help="bursts both sides deliver (the figure is the median)"
    )
    args = parser.parse_args()
    report = Report("1 burst")
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


if __name__ == "__main__":
    main()

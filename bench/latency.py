"""Benchmark 5 — latency from insert to receipt, beside Unleash's own integration.

One real Unleash, one lean receiver, Unleash's own webhook integration (posting to
/unleash, probed until it delivers) and the daemon at default settings (poll_interval_s
= 0.4 unless `--poll-interval-s` sets another, posting to /poller). 200 single events
are inserted one at a time through a long-lived psql session; after each, the script
waits until both sides have received it, then sleeps a random 0.1-1.1 s so inserts do
not fall in step with either side's loop. Latency = receipt (receiver's monotonic
clock) - commit (the insert's answer; the same clock).
Target: poller p50 <= 0.5 x Unleash's p50.

    .venv/bin/python -m bench.latency [--events 200] [--json out.json]
"""

from __future__ import annotations

import random
import time

from bench.burst import PROBE_TYPE, wait_for_integration
from bench.lib import (
    Daemon,
    Inserter,
    LeanReceiver,
    Report,
    add_poll_interval,
    arguments,
    percentile,
    poll_interval_setting,
    say,
    unleash,
    workdir,
    write_config,
)


def wait_for_id(
    receiver: LeanReceiver, paths: list[str], seen: dict[str, int], timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    for path in paths:
        while receiver.count(path) <= seen[path] and time.monotonic() < deadline:
            time.sleep(0.01)
        seen[path] = receiver.count(path)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    add_poll_interval(parser)
    args = parser.parse_args()
    extra = poll_interval_setting(args)
    report = Report("5 latency")
    rng = random.Random(7)
    inserted: dict[int, float] = {}
    with workdir("latency", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        server.admin().create_webhook(receiver.url("/unleash"), events=[PROBE_TYPE])
        wait_for_integration(server, receiver)
        config = write_config(
            work / "poller.toml",
            server,
            [{"name": "latency", "url": receiver.url("/poller")}],
            start_from="latest",
            unleash_extra=extra,
        )
        daemon = Daemon(config)
        inserter = Inserter(server.db)
        try:
            daemon.wait_log("cursor.initialised")
            time.sleep(1.5)
            paths = ["/poller", "/unleash"]
            seen = {p: receiver.count(p) for p in paths}
            for n in range(args.events):
                event_id, at = inserter.insert(PROBE_TYPE)
                inserted[event_id] = at
                wait_for_id(receiver, paths, seen, 10.0)
                time.sleep(rng.uniform(0.1, 1.1))
                if (n + 1) % 50 == 0:
                    say(f"{n + 1}/{args.events} events")
            time.sleep(2.0)
        finally:
            inserter.close()
            daemon.stop()
        latencies: dict[str, list[float]] = {}
        missing: dict[str, int] = {}
        for path in ("/poller", "/unleash"):
            ids, times = receiver.stats(path)
            first_receipt: dict[int, float] = {}
            for event_id, received_at in zip(ids, times, strict=True):
                first_receipt.setdefault(event_id, received_at)
            latencies[path] = [
                first_receipt[i] - t for i, t in inserted.items() if i in first_receipt
            ]
            missing[path] = sum(1 for i in inserted if i not in first_receipt)
    print(f"\n5. latency, insert -> receipt, {args.events} single events")
    for path, label in (("/unleash", "Unleash's own"), ("/poller", "unleash-poller")):
        values = latencies[path]
        report.add(f"{label}: p50", percentile(values, 50) * 1000, "ms")
        report.add(f"{label}: p99", percentile(values, 99) * 1000, "ms")
        report.add(
            f"{label}: min / max", f"{min(values) * 1000:.0f} / {max(values) * 1000:.0f}", "ms"
        )
        report.add(f"{label}: not received", missing[path])
    ratio = percentile(latencies["/poller"], 50) / percentile(latencies["/unleash"], 50)
    report.add("poller p50 / Unleash's p50", ratio, "x", "<= 0.5", ratio <= 0.5)
    if extra:
        report.note(f"poll_interval_s = {args.poll_interval_s} set in the config")
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

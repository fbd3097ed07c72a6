"""Benchmark 4 — fan-out and isolation: 10 webhooks, one of which never answers.

One Unleash with a backlog (3,000 events by default), one lean receiver. The daemon runs
twice from the id before the backlog, each time with a fresh state file and 10 webhooks
at default settings (ordered, timeout_s = 10):
  a) all ten healthy;
  b) nine healthy, and the tenth pointed at /hang/..., which reads the request and never
     answers, so each of its attempts runs to its 10 s timeout.
`--once` would wait for the hung webhook, so the daemon runs until the healthy webhooks
have every event, then gets SIGTERM. The figure is the healthy webhooks' combined
deliveries per second at the receiver (first to last receipt across them).
Runs a and b alternate for `--rounds` rounds and medians are compared, so a neighbour's
burst of work on the machine skews one round, not the figure.
Target: b >= 90 % of a.

    .venv/bin/python -m bench.fanout [--events 3000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import statistics
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
    last_event_id,
    rate,
    say,
    unleash,
    workdir,
    write_config,
)

HOOKS = 10


@dataclass
class Fanout:
    combined: float  # healthy webhooks' deliveries per second, first to last receipt
    per_hook: float
    lost: int
    out_of_order: int


def run_once(
    server: UnleashServer,
    receiver: LeanReceiver,
    work: Path,
    name: str,
    hung: bool,
    before: int,
    ids: range,
) -> Fanout:
    paths = [f"/{name}/{i}" for i in range(HOOKS)]
    if hung:
        paths[-1] = f"/hang/{name}"
    healthy = [p for p in paths if not p.startswith("/hang/")]
    hooks = [{"name": f"hook{i}", "url": receiver.url(p)} for i, p in enumerate(paths)]
    daemon = Daemon(write_config(work / f"{name}.toml", server, hooks, start_from=before))
    try:
        if not receiver.wait_for(healthy, len(ids), 600, poll_s=0.2):
            raise RuntimeError(f"{name}: healthy webhooks did not get every event")
    finally:
        daemon.stop()
    times: list[float] = []
    lost = out_of_order = 0
    for path in healthy:
        got, at = receiver.stats(path)
        times += at
        result = delivery(got, ids)
        lost += result.lost
        out_of_order += result.out_of_order
    combined = rate(times)
    say(
        f"{name}: {combined:,.0f} deliveries/s over {len(healthy)} webhooks"
        + (f"; the hung one was tried {receiver.count(paths[-1])} times" if hung else "")
    )
    return Fanout(combined, combined / len(healthy), lost, out_of_order)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report = Report("4 fan-out")
    results: dict[str, list[Fanout]] = {"healthy": [], "one-hung": []}
    with workdir("fanout", args.keep) as work, unleash(work) as server, LeanReceiver() as receiver:
        before = last_event_id(server.db)
        first, last = insert_events(server.db, args.events)
        ids = range(first, last + 1)
        for round_ in range(1, args.rounds + 1):
            for run, hung in (("healthy", False), ("one-hung", True)):
                results[run].append(
                    run_once(server, receiver, work, f"{run}-{round_}", hung, before, ids)
                )
    print(
        f"\n4. fan-out: {HOOKS} webhooks x {args.events:,} events, "
        f"median of {args.rounds} alternating rounds"
    )
    medians: dict[str, float] = {}
    for run, rounds in results.items():
        medians[run] = statistics.median(r.combined for r in rounds)
        report.add(f"{run}: healthy webhooks combined (median)", medians[run], "ev/s")
        report.add(f"{run}: each round", " ".join(f"{r.combined:.0f}" for r in rounds), "ev/s")
        report.add(
            f"{run}: per healthy webhook (median)",
            statistics.median(r.per_hook for r in rounds),
            "ev/s",
        )
        report.add(
            f"{run}: lost / out of order",
            f"{sum(r.lost for r in rounds)} / {sum(r.out_of_order for r in rounds)}",
        )
    ratio = medians["one-hung"] / medians["healthy"]
    report.add(
        "nine beside a hung one / all ten healthy", ratio * 100, "%", ">= 90 %", ratio >= 0.9
    )
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

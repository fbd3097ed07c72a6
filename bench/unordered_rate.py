"""Benchmark 3 — unordered delivery rate (max_in_flight = 8) against ordered, same run.

One Unleash with a 20,000-event backlog and one lean receiver. `python -m poller run
--once` from the id before the backlog, each time with a fresh state file, alternating
for `--rounds` rounds: one webhook at default settings (ordered), then the same with
`max_in_flight = 8`. Medians are compared, so a neighbour's burst of work on the machine
skews one round, not the figure. Beside them, the baseline client with 8 loops sharing
the same bodies: what aiohttp and this receiver can do with 8 in flight at all here.
Target: unordered rate >= 2 x ordered rate (both measured at the receiver).

    .venv/bin/python -m bench.unordered_rate [--events 20000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import statistics

from bench.lib import LeanReceiver, Report, arguments, say, unleash, workdir
from bench.rates import (
    RateRun,
    bodies_file,
    make_backlog,
    median_run,
    report_run,
    run_baseline,
    run_poller,
)


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report = Report("3 unordered rate")
    ordered: list[RateRun] = []
    unordered: list[RateRun] = []
    with workdir("unordered", args.keep) as work, unleash(work) as server, \
            LeanReceiver() as receiver:
        backlog = make_backlog(server, args.events)
        bodies = bodies_file(server, backlog, work / "bodies.jsonl")
        baseline = run_baseline(receiver, bodies, backlog, args.max_in_flight)
        for round_ in range(1, args.rounds + 1):
            ordered.append(run_poller(server, receiver, work, backlog, f"ordered-{round_}", {}))
            unordered.append(run_poller(server, receiver, work, backlog,
                                        f"unordered-{round_}",
                                        {"max_in_flight": args.max_in_flight}))
    print(f"\n3. unordered rate (max_in_flight = {args.max_in_flight}), "
          f"{args.events:,} events, median of {args.rounds} alternating rounds")
    report_run(report, baseline, args.events)
    report_run(report, median_run(ordered), args.events)
    report_run(report, median_run(unordered), args.events)
    report.add("ordered rates, each round", " ".join(f"{r.rate:.0f}" for r in ordered), "ev/s")
    report.add("unordered rates, each round", " ".join(f"{r.rate:.0f}" for r in unordered),
               "ev/s")
    ratio = statistics.median(r.rate for r in unordered) / statistics.median(
        r.rate for r in ordered)
    report.add("unordered / ordered (medians)", ratio, "x", ">= 2 x", ratio >= 2)
    report.add(f"baseline x{args.max_in_flight} / ordered (median)",
               baseline.rate / statistics.median(r.rate for r in ordered), "x")
    lost = sum(r.lost for r in unordered)
    report.add("unordered: all delivered", "yes" if lost == 0 else "NO", met=lost == 0)
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

"""Benchmark 2 — ordered delivery rate, one webhook, 20,000-event backlog.

In one run, against the same lean receiver and the same events, alternating for
`--rounds` rounds (medians compared, so a neighbour's burst of work on the machine skews
one round, not the figure):
  a) bench/baseline_client.py: the same bodies POSTed one at a time over one keep-alive
     connection (the physical limit of in-order delivery here);
  b) `python -m poller run --once` with `start_from` = the id before the backlog and a
     fresh state file, one webhook at default settings (max_in_flight = 1: in order).
Target: b's rate at the receiver >= 90 % of a's.

    .venv/bin/python -m bench.ordered_rate [--events 20000] [--rounds 3] [--json out.json]
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
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    report = Report("2 ordered rate")
    baselines: list[RateRun] = []
    ordered: list[RateRun] = []
    with workdir("ordered", args.keep) as work, unleash(work) as server, \
            LeanReceiver() as receiver:
        backlog = make_backlog(server, args.events)
        bodies = bodies_file(server, backlog, work / "bodies.jsonl")
        for round_ in range(1, args.rounds + 1):
            baselines.append(run_baseline(receiver, bodies, backlog, tag=f"-{round_}"))
            ordered.append(run_poller(server, receiver, work, backlog, f"ordered-{round_}", {}))
    print(f"\n2. ordered rate, {args.events:,} events, one webhook, "
          f"median of {args.rounds} alternating rounds")
    report_run(report, median_run(baselines), args.events)
    report_run(report, median_run(ordered), args.events)
    report.add("baseline rates, each round", " ".join(f"{r.rate:.0f}" for r in baselines),
               "ev/s")
    report.add("ordered rates, each round", " ".join(f"{r.rate:.0f}" for r in ordered), "ev/s")
    ratio = statistics.median(r.rate for r in ordered) / statistics.median(
        r.rate for r in baselines)
    report.add("ordered / baseline (medians)", ratio * 100, "%", ">= 90 %", ratio >= 0.9)
    in_order = all(r.lost == 0 and r.out_of_order == 0 for r in ordered)
    report.add("ordered: all delivered, in id order", "yes" if in_order else "NO", met=in_order)
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

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

from bench.lib import Report, say
from bench.rates import (
    RateRun,
    add_rounds,
    median_rate,
    median_run,
    rate_arguments,
    rate_bench,
    report_run,
)


def main() -> None:
    args = rate_arguments(__doc__.splitlines()[0]).parse_args()
    report = Report("2 ordered rate")
    baselines: list[RateRun] = []
    ordered: list[RateRun] = []
    with rate_bench("ordered", args.events, args.keep) as bench:
        for round_ in range(1, args.rounds + 1):
            baselines.append(bench.baseline(tag=f"-{round_}"))
            ordered.append(bench.poller(f"ordered-{round_}", {}))
    print(
        f"\n2. ordered rate, {args.events:,} events, one webhook, "
        f"median of {args.rounds} alternating rounds"
    )
    report_run(report, median_run(baselines), args.events)
    report_run(report, median_run(ordered), args.events)
    add_rounds(report, "baseline", baselines)
    add_rounds(report, "ordered", ordered)
    ratio = median_rate(ordered) / median_rate(baselines)
    report.add("ordered / baseline (medians)", ratio * 100, "%", ">= 90 %", ratio >= 0.9)
    in_order = all(r.lost == 0 and r.out_of_order == 0 for r in ordered)
    report.add("ordered: all delivered, in id order", "yes" if in_order else "NO", met=in_order)
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

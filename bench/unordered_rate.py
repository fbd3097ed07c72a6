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
    parser = rate_arguments(__doc__.splitlines()[0])
    parser.add_argument("--max-in-flight", type=int, default=8)
    args = parser.parse_args()
    report = Report("3 unordered rate")
    ordered: list[RateRun] = []
    unordered: list[RateRun] = []
    with rate_bench("unordered", args.events, args.keep) as bench:
        baseline = bench.baseline(args.max_in_flight)
        for round_ in range(1, args.rounds + 1):
            ordered.append(bench.poller(f"ordered-{round_}", {}))
            unordered.append(
                bench.poller(f"unordered-{round_}", {"max_in_flight": args.max_in_flight})
            )
    print(
        f"\n3. unordered rate (max_in_flight = {args.max_in_flight}), "
        f"{args.events:,} events, median of {args.rounds} alternating rounds"
    )
    report_run(report, baseline, args.events)
    report_run(report, median_run(ordered), args.events)
    report_run(report, median_run(unordered), args.events)
    add_rounds(report, "ordered", ordered)
    add_rounds(report, "unordered", unordered)
    ratio = median_rate(unordered) / median_rate(ordered)
    report.add("unordered / ordered (medians)", ratio, "x", ">= 2 x", ratio >= 2)
    report.add(
        f"baseline x{args.max_in_flight} / ordered (median)",
        baseline.rate / median_rate(ordered),
        "x",
    )
    lost = sum(r.lost for r in unordered)
    report.add("unordered: all delivered", "yes" if lost == 0 else "NO", met=lost == 0)
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

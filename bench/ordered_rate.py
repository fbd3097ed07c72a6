"""Benchmark 2 — ordered delivery rate, one webhook, 20,000-event backlog.

In one run, against the same lean receiver and the same events, alternating for
`--rounds` rounds (medians compared, so a neighbour's burst of work on the machine skews
one round, not the figure), each side alone:
  a) bench/baseline_client.py: the same bodies POSTed one at a time over one keep-alive
     connection (the physical limit of in-order delivery here);
  b) `python -m poller run --once` with `start_from` = the id before the backlog and a
     fresh state, one webhook at default settings (max_in_flight = 1: in order).
`--backend` picks b's state: a fresh SQLite file (`sqlite`, the default), a fresh schema
in a database of its own on the local PostgreSQL cluster (`postgresql`), or both in each
round (`both`; their order swaps every round).
Targets: b's rate at the receiver >= 90 % of a's (SQLite); PostgreSQL >= 80 % of SQLite.

    .venv/bin/python -m bench.ordered_rate [--events 20000] [--rounds 3]
        [--backend sqlite|postgresql|both] [--json out.json]
"""

from __future__ import annotations

import contextlib

from bench.lib import BackendCpu, PostgresStates, Report, postgres_states, say
from bench.rates import (
    RateBench,
    RateRun,
    add_rounds,
    median_rate,
    median_run,
    rate_arguments,
    rate_bench,
    report_run,
)

BACKENDS = {"sqlite": ("sqlite",), "postgresql": ("postgresql",), "both": ("sqlite", "postgresql")}
STATE_DATABASE = "bench_ordered_state"


def _ordered(bench: RateBench, states: PostgresStates | None, backend: str, round_: int) -> RateRun:
    if backend == "sqlite":
        return bench.poller(f"ordered-{round_}", {})
    assert states is not None
    name = f"ordered-pg-{round_}"
    state = states.state(name.replace("-", "_"))
    before = states.transactions(bench.server.db)
    with BackendCpu(states.db) as server:
        run = bench.poller(name, {}, state=state)
    run.transactions = states.transactions(bench.server.db) - before
    run.state_server_cpu_s = server.cpu_s
    return run


def main() -> None:
    parser = rate_arguments(__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=tuple(BACKENDS),
        default="sqlite",
        help="the daemon's state: SQLite, PostgreSQL, or both in every round",
    )
    args = parser.parse_args()
    backends = BACKENDS[args.backend]
    report = Report("2 ordered rate")
    baselines: list[RateRun] = []
    ordered: dict[str, list[RateRun]] = {backend: [] for backend in backends}
    with contextlib.ExitStack() as stack:
        bench = stack.enter_context(rate_bench("ordered", args.events, args.keep))
        states = (
            stack.enter_context(postgres_states(STATE_DATABASE))
            if "postgresql" in backends
            else None
        )
        for round_ in range(1, args.rounds + 1):
            baselines.append(bench.baseline(tag=f"-{round_}"))
            for backend in backends if round_ % 2 else backends[::-1]:
                ordered[backend].append(_ordered(bench, states, backend, round_))
    print(
        f"\n2. ordered rate, {args.events:,} events, one webhook, "
        f"median of {args.rounds} alternating rounds, state: {', '.join(backends)}"
    )
    report_run(report, median_run(baselines), args.events)
    for runs in ordered.values():
        report_run(report, median_run(runs), args.events)
    add_rounds(report, "baseline", baselines)
    for backend, runs in ordered.items():
        add_rounds(report, "ordered" if backend == "sqlite" else f"ordered ({backend})", runs)
    for backend, runs in ordered.items():
        ratio = median_rate(runs) / median_rate(baselines)
        if backend == "sqlite":
            report.add("ordered / baseline (medians)", ratio * 100, "%", ">= 90 %", ratio >= 0.9)
        else:
            report.add(f"ordered ({backend}) / baseline (medians)", ratio * 100, "%")
    if len(ordered) == 2:
        ratio = median_rate(ordered["postgresql"]) / median_rate(ordered["sqlite"])
        report.add(
            "ordered: PostgreSQL / SQLite (medians)", ratio * 100, "%", ">= 80 %", ratio >= 0.8
        )
    for backend, runs in ordered.items():
        in_order = all(r.lost == 0 and r.out_of_order == 0 for r in runs)
        label = "ordered" if backend == "sqlite" else f"ordered ({backend})"
        report.add(
            f"{label}: all delivered, in id order", "yes" if in_order else "NO", met=in_order
        )
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

"""Benchmark — ordered delivery rate with the PostgreSQL state against the SQLite state.

One Unleash with a backlog, one lean receiver, one webhook at default settings
(max_in_flight = 1: in order), `run --once` from the id before the backlog; alternating
rounds of the daemon on a fresh SQLite file and on a fresh schema of a local PostgreSQL
database (made for the run, dropped after it). Medians compared.
Target (issue 13): the PostgreSQL rate >= 80 % of the SQLite rate.

    .venv/bin/python -m bench.state_rate [--events 20000] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import os
import urllib.parse

from tests.support.unleash import drop_database, ensure_postgres

from bench.lib import Daemon, Report, say, write_config
from bench.rates import RateBench, RateRun, _measure, add_rounds, median_rate, rate_arguments
from bench.rates import rate_bench as backlog_bench


def run(bench: RateBench, name: str, state: str | None) -> RateRun:
    """One `run --once`; `state` replaces the [state] table's lines (None: SQLite)."""
    path = f"/{name}"
    config = bench.work / f"{name}.toml"
    write_config(
        config,
        bench.server,
        [{"name": name, "url": bench.receiver.url(path)}],
        start_from=bench.backlog.before,
    )
    if state is not None:
        head, _, tail = config.read_text().partition("[state]\n")
        config.write_text(head + "[state]\n" + state + "\n" + tail.split("\n", 1)[1])
    daemon = Daemon(config, once=True)
    done = daemon.wait()
    if done.code != 0:
        raise RuntimeError(f"poller exited {done.code}; log {daemon.log_path}")
    result = _measure(
        bench.receiver, path, name, bench.backlog, done.wall_s, done.cpu_s, done.max_rss_kb
    )
    say(f"{name}: {result.rate:,.0f}/s, wall {done.wall_s:.1f} s, CPU {done.cpu_s:.1f} s")
    return result


def main() -> None:
    args = rate_arguments(__doc__.splitlines()[0]).parse_args()
    report = Report("state rate")
    db = ensure_postgres(f"poller_bench_state_{os.getpid()}")
    password = urllib.parse.quote(db.password, safe="")
    url = f"postgresql://{db.user}:{password}@{db.host}:{db.port}/{db.name}"
    sqlite: list[RateRun] = []
    postgres: list[RateRun] = []
    try:
        with backlog_bench("state-rate", args.events, args.keep) as bench:
            for round_ in range(1, args.rounds + 1):
                sqlite.append(run(bench, f"sqlite-{round_}", None))
                state = f'url = "{url}"\nschema = "bench_{round_}"'
                postgres.append(run(bench, f"postgresql-{round_}", state))
    finally:
        drop_database(db)
    print(f"\nordered rate by state backend, {args.events:,} events, {args.rounds} rounds")
    add_rounds(report, "sqlite", sqlite)
    add_rounds(report, "postgresql", postgres)
    for runs in (sqlite, postgres):
        cpu = sorted(r.cpu_s or 0.0 for r in runs)[len(runs) // 2]
        report.add(f"{runs[0].name[:-2]}: CPU time / event (median)", cpu / args.events * 1e6, "us")
    ratio = median_rate(postgres) / median_rate(sqlite)
    report.add("postgresql / sqlite (medians)", ratio * 100, "%", ">= 80 %", ratio >= 0.8)
    in_order = all(r.lost == 0 and r.out_of_order == 0 for r in sqlite + postgres)
    report.add("all delivered, in id order", "yes" if in_order else "NO", met=in_order)
    report.save(args.json)
    say("done")


if __name__ == "__main__":
    main()

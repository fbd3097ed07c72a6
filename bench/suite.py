"""Run every benchmark (each in its own process, each on a fresh Unleash) and print a
summary table of the figures that have a target. `bench/run_all` calls this.

    bench/run_all [--only 1,2,7] [--quick] [--markdown results.md]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.lib import PYTHON, REPO_ROOT, machine

# (number, module, full-size arguments, quick arguments)
BENCHMARKS: list[tuple[str, str, list[str], list[str]]] = [
    ("1", "bench.burst", [], ["--events", "2000", "--rounds", "1", "--idle-s", "10"]),
    ("2", "bench.ordered_rate", [], ["--events", "5000", "--rounds", "1"]),
    ("3", "bench.unordered_rate", [], ["--events", "5000", "--rounds", "1"]),
    ("4", "bench.fanout", [], ["--events", "1000", "--rounds", "1"]),
    ("5", "bench.latency", [], ["--events", "40"]),
    ("6", "bench.idle", [], ["--seconds", "20"]),
    ("7", "bench.history", [], ["--small", "2000", "--large", "10000"]),
    ("8", "bench.heap", [], ["--events", "2000", "--bursts", "1"]),
]


def _value(value: object, unit: str) -> str:
    if isinstance(value, float):
        text = f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    else:
        text = str(value)
    return f"{text} {unit}".strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated benchmark numbers (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--markdown", type=Path, help="also write the summary table here")
    args = parser.parse_args()
    chosen = set(args.only.split(",")) if args.only else None
    info = machine()
    print(
        f"machine: {info['nproc']} cores, {info['cpu']}, {info['memory']}, Python {info['python']}",
        flush=True,
    )
    rows: list[dict[str, object]] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-results-") as tmp:
        for number, module, full, quick in BENCHMARKS:
            if chosen is not None and number not in chosen:
                continue
            out = Path(tmp) / f"{number}.json"
            started = time.monotonic()
            load = Path("/proc/loadavg").read_text().split()[:3]
            # Other work on the machine skews every figure: say how busy it was.
            print(
                f"\n==> {number}: python -m {module}   (load average {' '.join(load)})", flush=True
            )
            completed = subprocess.run(
                [PYTHON, "-m", module, *(quick if args.quick else full), "--json", str(out)],
                cwd=REPO_ROOT,
                check=False,
            )
            print(f"==> {number} took {time.monotonic() - started:.0f} s", flush=True)
            if completed.returncode != 0 or not out.exists():
                failed.append(f"{number} ({module}, exit {completed.returncode})")
                continue
            rows += json.loads(out.read_text())["rows"]
    lines = ["| benchmark | figure | value | target | met |", "|---|---|---|---|---|"]
    for row in rows:
        if not row["target"]:
            continue
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]  # type: ignore[index]
        lines.append(
            f"| {row['bench']} | {row['figure']} | "
            f"{_value(row['value'], str(row['unit']))} | {row['target']} | {met} |"
        )
    table = "\n".join(lines)
    print("\nSummary (figures with a target)\n" + table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

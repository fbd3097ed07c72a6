"""Profile the daemon with py-spy on benchmark 2 (ordered backlog) or 1 (a burst).

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile ordered [--events 20000] [--out DIR]
    .venv/bin/python -m bench.profile unordered [--events 20000] [--out DIR]
    .venv/bin/python -m bench.profile burst   [--events 5000]  [--out DIR]
    .venv/bin/python -m bench.profile idle    [--out DIR]     # polls every 10 ms, 20 s
    .venv/bin/python -m bench.profile ordered --cprofile sqlite|postgresql [--events N]

`ordered` / `unordered` (max_in_flight = 8): `run --once` over a backlog, started under
`py-spy record`. `burst`: the
daemon at default settings, py-spy attached after start-up, then one burst inserted
(without Unleash's own integration, so the daemon's own work is what is sampled).
Writes collapsed stacks (raw.txt) and a speedscope file to DIR, and prints the top
functions by own time and by inclusive time (share of the samples on CPU).
"""

from __future__ import annotations

import collections
import contextlib
import pstats
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.lib import (
    POLLER_DIR,
    PYTHON,
    Daemon,
    LeanReceiver,
    arguments,
    bytecode_written,
    last_event_id,
    postgres_states,
    say,
    unleash,
    workdir,
    write_config,
)
from bench.rates import make_backlog

RATE_HZ = "250"
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:]*)(?::\d+)?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def summarise(raw: Path, top: int = 25) -> str:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += count
        if frames:
            own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    lines = [f"{total} samples on CPU", "", "own time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in own.most_common(top)]
    lines += ["", "inclusive time:"]
    lines += [f"  {n / total:6.1%}  {f}" for f, n in inclusive.most_common(top + 15)]
    return "\n".join(lines)


def profile_backlog(out: Path, events: int, hook: dict[str, object]) -> None:
    with (
        workdir("profile-ordered", False) as work,
        unleash(work) as server,
        LeanReceiver() as receiver,
    ):
        backlog = make_backlog(server, events)
        config = write_config(
            work / "ordered.toml",
            server,
            [{"name": "ordered", "url": receiver.url("/backlog"), **hook}],
            start_from=backlog.before,
        )
        for fmt, name in (("raw", "raw.txt"), ("speedscope", "ordered.speedscope.json")):
            # A fresh state file per recording: each one delivers the whole backlog.
            config.with_suffix(".sqlite3").unlink(missing_ok=True)
            daemon = Daemon(
                config,
                once=True,
                prefix=[py_spy(), "record", "-r", RATE_HZ, "-f", fmt, "-o", str(out / name), "--"],
            )
            done = daemon.wait()
            say(
                f"{fmt}: exit {done.code} in {done.wall_s:.1f} s; "
                f"receiver has {receiver.count('/backlog')}"
            )


def cprofile_backlog(out: Path, events: int, backend: str) -> None:
    """`run --once` over a backlog under cProfile (no py-spy needed), on a SQLite or a
    PostgreSQL state; prints the top functions and the state's calls per delivery."""
    with contextlib.ExitStack() as stack:
        work = stack.enter_context(workdir("cprofile-ordered", False))
        server = stack.enter_context(unleash(work))
        receiver = stack.enter_context(LeanReceiver())
        backlog = make_backlog(server, events)
        state = None
        if backend == "postgresql":
            states = stack.enter_context(postgres_states("bench_profile_state"))
            state = states.state("profiled")
        config = write_config(
            work / "ordered.toml",
            server,
            [{"name": "ordered", "url": receiver.url("/backlog")}],
            start_from=backlog.before,
            state=state,
        )
        stats_path = out / f"ordered-{backend}.prof"
        started = time.monotonic()
        bytecode_written()
        argv = [PYTHON, "-m", "cProfile", "-o", str(stats_path), "-m", "poller"]
        subprocess.run(
            [*argv, "run", "-c", str(config), "--once"],
            cwd=POLLER_DIR,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=True,
        )
        delivered = receiver.count("/backlog")
        say(f"{backend}: {delivered} delivered in {time.monotonic() - started:.1f} s")
    print(cprofile_summary(stats_path, delivered))


def cprofile_summary(path: Path, delivered: int, top: int = 30) -> str:
    """Top functions by own and by inclusive time, and the calls per delivered event of
    the state's methods and of the database driver (each driver call is a round trip)."""
    stats = pstats.Stats(str(path))
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in rows.values())

    def name(key: tuple[str, int, str]) -> str:
        file, line, func = key
        for marker in ("site-packages/", "/lib/python3.11/", str(POLLER_DIR) + "/"):
            if marker in file:
                file = file.split(marker, 1)[1]
        return f"{func} ({file}:{line})"

    lines = [f"{total:.2f} s of own time in all; {delivered} events delivered", "", "own time:"]
    by_own = sorted(rows.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    lines += [
        f"  {row[2] / total:6.1%}  {row[2] * 1e6 / delivered:8.1f} us/event  {name(k)}"
        for k, row in by_own
    ]
    lines += ["", "inclusive time:"]
    by_cum = sorted(rows.items(), key=lambda kv: kv[1][3], reverse=True)[: top + 15]
    lines += [
        f"  {row[3] / total:6.1%}  {row[3] * 1e6 / delivered:8.1f} us/event  {name(k)}"
        for k, row in by_cum
    ]
    lines += ["", "calls per delivered event (state and driver):"]
    for key, row in sorted(rows.items(), key=lambda kv: kv[1][1], reverse=True):
        file = key[0]
        if "/poller/state/" in file or "/psycopg/" in file or "sqlite3" in key[2]:
            per = row[1] / delivered
            if per >= 0.05:
                lines.append(f"  {per:7.2f}  {row[3] * 1e6 / delivered:8.1f} us/event  {name(key)}")
    return "\n".join(lines)


def profile_burst(out: Path, events: int) -> None:
    with (
        workdir("profile-burst", False) as work,
        unleash(work) as server,
        LeanReceiver() as receiver,
    ):
        config = write_config(
            work / "burst.toml",
            server,
            [{"name": "burst", "url": receiver.url("/burst")}],
            start_from="latest",
        )
        daemon = Daemon(config)
        try:
            daemon.wait_log("cursor.initialised")
            time.sleep(1.5)
            recorders = [
                subprocess.Popen(
                    [
                        py_spy(),
                        "record",
                        "-r",
                        RATE_HZ,
                        "-f",
                        fmt,
                        "-o",
                        str(out / name),
                        "--pid",
                        str(daemon.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for fmt, name in (("raw", "raw.txt"), ("speedscope", "burst.speedscope.json"))
            ]
            time.sleep(1.0)
            before = last_event_id(server.db)
            server.db.insert_events(events)
            inserted_at = time.monotonic()
            receiver.wait_for(["/burst"], events, 300)
            say(
                f"burst delivered {time.monotonic() - inserted_at:.2f} s after the insert "
                f"(events after id {before})"
            )
            for recorder in recorders:
                recorder.send_signal(signal.SIGINT)
            for recorder in recorders:
                recorder.wait(timeout=60)
        finally:
            daemon.stop()
            shutil.copy(daemon.log_path, out / "burst-daemon.log")


def profile_idle(out: Path, seconds: int) -> None:
    """An idle Unleash polled every 10 ms: the same work as a default idle poll, a hundred
    times as often, so a short recording holds enough samples of it."""
    with (
        workdir("profile-idle", False) as work,
        unleash(work) as server,
        LeanReceiver() as receiver,
    ):
        config = write_config(
            work / "idle.toml",
            server,
            [{"name": "idle", "url": receiver.url("/idle")}],
            start_from="latest",
            unleash_extra={"poll_interval_s": 0.01},
        )
        daemon = Daemon(config)
        try:
            daemon.wait_log("cursor.initialised")
            time.sleep(1.0)
            for fmt, name in (("raw", "raw.txt"), ("speedscope", "idle.speedscope.json")):
                subprocess.run(
                    [
                        py_spy(),
                        "record",
                        "-r",
                        RATE_HZ,
                        "-f",
                        fmt,
                        "-o",
                        str(out / name),
                        "-d",
                        str(seconds),
                        "--pid",
                        str(daemon.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=True,
                )
        finally:
            daemon.stop()


def main() -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("which", choices=("ordered", "unordered", "burst", "idle"))
    parser.add_argument("--events", type=int)
    parser.add_argument("--out", type=Path, default=Path("bench-profile"))
    parser.add_argument(
        "--cprofile",
        choices=("sqlite", "postgresql"),
        help="ordered only: profile with cProfile (no py-spy) on this state backend",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.which == "ordered" and args.cprofile:
        cprofile_backlog(args.out, args.events or 20_000, args.cprofile)
        return
    if args.which == "ordered":
        profile_backlog(args.out, args.events or 20_000, {})
    elif args.which == "unordered":
        profile_backlog(args.out, args.events or 20_000, {"max_in_flight": 8})
    elif args.which == "idle":
        profile_idle(args.out, 20)
    else:
        profile_burst(args.out, args.events or 5000)
    print(summarise(args.out / "raw.txt"))


if __name__ == "__main__":
    main()

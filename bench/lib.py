"""Shared pieces of the benchmarks: a real Unleash, the lean receiver, the daemon under
measurement, /proc readings, order/loss arithmetic and the result rows run_all collects."""

from __future__ import annotations

import argparse
import compileall
import contextlib
import functools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from tests.support.unleash import (  # noqa: E402
    PostgresDatabase,
    UnleashServer,
    drop_database,
    ensure_postgres,
    missing_tools,
)

PYTHON = sys.executable
# `python -m poller` runs from here: set BENCH_POLLER_DIR to a directory holding another
# poller/ package (a patched copy, another checkout) to measure that one instead.
POLLER_DIR = Path(os.environ.get("BENCH_POLLER_DIR", REPO_ROOT)).resolve()
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --------------------------------------------------------------------------- results


@dataclass
class Row:
    """One printed figure; run_all turns the rows of every benchmark into its table."""

    bench: str
    figure: str
    value: float | str
    unit: str = ""
    target: str = ""
    met: bool | None = None


@dataclass
class Report:
    bench: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(
        self,
        figure: str,
        value: float | str,
        unit: str = "",
        target: str = "",
        met: bool | None = None,
    ) -> None:
        row = Row(self.bench, figure, value, unit, target, met)
        self.rows.append(row)
        shown = f"{value:,.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
        verdict = "" if met is None else ("  MET" if met else "  NOT MET")
        aim = f"   (target {target})" if target else ""
        print(f"  {figure:<52} {shown:>14} {unit:<8}{aim}{verdict}", flush=True)

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  note: {text}", flush=True)

    def save(self, path: Path | None) -> None:
        if path is not None:
            path.write_text(
                json.dumps(
                    {
                        "bench": self.bench,
                        "rows": [asdict(r) for r in self.rows],
                        "notes": self.notes,
                    },
                    indent=1,
                )
            )


def arguments(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", type=Path, help="also write the figures here (for run_all)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (configs, logs, state files)"
    )
    return parser


def add_poll_interval(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--poll-interval-s",
        type=float,
        help="set the daemon's unleash.poll_interval_s (default: its default)",
    )


def poll_interval_setting(args: argparse.Namespace) -> dict[str, float]:
    """The config setting `--poll-interval-s` asks for: none means the daemon's default."""
    return {} if args.poll_interval_s is None else {"poll_interval_s": args.poll_interval_s}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def workdir(name: str, keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    try:
        yield path
    finally:
        if keep:
            say(f"kept {path}")
        else:
            subprocess.run(["rm", "-rf", str(path)], check=False)


def machine() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- Unleash


@contextlib.contextmanager
def unleash(log_dir: Path) -> Iterator[UnleashServer]:
    """A real Unleash 8.2.0 on a fresh PostgreSQL database (dropped afterwards)."""
    missing = missing_tools()
    if missing:
        raise SystemExit(f"benchmarks need a real Unleash; missing: {', '.join(missing)}")
    started = time.monotonic()
    with UnleashServer(log_dir=log_dir) as server:
        say(f"unleash {server.version} up at {server.url} in {time.monotonic() - started:.1f} s")
        yield server


def last_event_id(db: PostgresDatabase) -> int:
    return int(db.psql("SELECT coalesce(max(id), 0) FROM events;")[0])


def insert_events(db: PostgresDatabase, count: int, *, chunk: int = 50_000) -> tuple[int, int]:
    """Insert `count` events (one statement per `chunk`); returns (first id, last id)."""
    first = last = 0
    done = 0
    while done < count:
        ids = db.insert_events(min(chunk, count - done))
        first = first or ids[0]
        last = ids[-1]
        done += len(ids)
    return first, last


class Inserter:
    """One long-lived psql session, so inserting one event costs no process start.
    `insert()` returns (event id, monotonic time when the commit was answered)."""

    def __init__(self, db: PostgresDatabase) -> None:
        command = db._psql_command({})
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=db._psql_env(),
        )

    def insert(self, type_: str = "feature-updated") -> tuple[int, float]:
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(
            "INSERT INTO events (type, created_by, created_by_user_id, data, tags, project) "
            f"VALUES ('{type_}', 'bench', -1337, '{{}}', '[]', 'default') RETURNING id;\n"
        )
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        # psql prints a row only after the server's ReadyForQuery: the autocommit is done.
        return int(line.strip()), time.monotonic()

    def close(self) -> None:
        if self._process.stdin is not None:
            self._process.stdin.close()
        self._process.wait(timeout=10)


# --------------------------------------------------------------------------- PG state


@dataclass
class PostgresStates:
    """A database of its own on the local cluster for the daemon's PostgreSQL state (not
    Unleash's); every run gets a fresh schema in it, as every SQLite run gets a new file."""

    db: PostgresDatabase

    def url(self) -> str:
        db = self.db
        password = urllib.parse.quote(db.password, safe="")
        return f"postgresql://{db.user}:{password}@{db.host}:{db.port}/{db.name}"

    def state(self, schema: str) -> dict[str, object]:
        """The [state] table of a config on the fresh schema `schema`."""
        self.db.psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE;")
        return {"url": self.url(), "schema": schema}

    def transactions(self, observer: PostgresDatabase) -> int:
        """Transactions committed or rolled back in the state database so far, read from
        another database (`observer`) so the reading adds none. A backend reports its
        counts at the latest when it ends: this waits until the daemon's have ended."""
        deadline = time.monotonic() + 10
        while True:
            busy, count = observer.psql(
                "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = :'db'), "
                "(SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = :'db');",
                db=self.db.name,
            )[0].split("|")
            if int(busy) == 0 or time.monotonic() > deadline:
                return int(count)
            time.sleep(0.05)


class BackendCpu:
    """The CPU time of the PostgreSQL server processes serving one database (the daemon's
    state connections), sampled from /proc every 20 ms while a run lasts: a backend's
    last reading before it exits is kept, so at most its final 20 ms are missed. Only the
    postmaster's children are looked at, so the sampling itself costs little."""

    def __init__(self, db: PostgresDatabase) -> None:
        self._marker = f" {db.name} ".encode()
        self._postmaster = _postmaster_pid(db.port)
        self._seen: dict[int, int] = {}  # pid -> CPU ticks at its last reading
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def cpu_s(self) -> float:
        return sum(self._seen.values()) / CLK_TCK

    def _sample(self) -> None:
        children = f"/proc/{self._postmaster}/task/{self._postmaster}/children"
        while not self._stop.wait(0.02):
            with open(children) as listed:
                pids = [int(p) for p in listed.read().split()]
            for pid in pids:
                try:
                    if pid not in self._seen:
                        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                            if self._marker not in cmdline.read():
                                continue
                    with open(f"/proc/{pid}/stat") as stat:
                        fields = stat.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # exited meanwhile
                self._seen[pid] = int(fields[11]) + int(fields[12])


def _postmaster_pid(port: int) -> int:
    """The postmaster of the local cluster on `port` (Debian's pg_lsclusters layout)."""
    listed = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    ).stdout
    for line in listed.splitlines():
        version, name, cluster_port, *_ = line.split()
        if int(cluster_port) == port:
            pid_file = Path(f"/var/run/postgresql/{version}-{name}.pid")
            return int(pid_file.read_text().split()[0])
    raise RuntimeError(f"no local PostgreSQL cluster on port {port}")


@contextlib.contextmanager
def postgres_states(name: str) -> Iterator[PostgresStates]:
    db = ensure_postgres(name)
    try:
        yield PostgresStates(db)
    finally:
        drop_database(db)


# --------------------------------------------------------------------------- receiver


class LeanReceiver:
    """bench/receiver.py in its own process."""

    def __init__(self) -> None:
        self._process: subprocess.Popen[str] | None = None
        self.port = 0

    def __enter__(self) -> Self:
        self._process = subprocess.Popen(
            [PYTHON, "-m", "bench.receiver"], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        self.port = int(self._process.stdout.readline())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _get(self, what: str, path: str) -> Any:
        query = urllib.parse.urlencode({"path": path})
        with urllib.request.urlopen(self.url(f"/_bench/{what}?{query}"), timeout=30) as resp:  # noqa: S310
            return json.loads(resp.read())

    def count(self, path: str) -> int:
        return int(self._get("count", path)["count"])

    def stats(self, path: str) -> tuple[list[int], list[float]]:
        data = self._get("stats", path)
        return data["ids"], data["times"]

    def wait_for(
        self, paths: Sequence[str], count: int, timeout_s: float, *, poll_s: float = 0.05
    ) -> bool:
        """Until every path has `count` requests; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(self.count(p) >= count for p in paths):
                return True
            time.sleep(poll_s)
        return False


# --------------------------------------------------------------------------- the daemon


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(type(value).__name__)


def write_config(
    path: Path,
    server: UnleashServer,
    webhooks: Sequence[Mapping[str, object]],
    *,
    start_from: str | int,
    unleash_url: str | None = None,
    top: Mapping[str, object] | None = None,
    unleash_extra: Mapping[str, object] | None = None,
    state: Mapping[str, object] | None = None,
) -> Path:
    """A poller config that sets only what it is given: everything else stays default.
    `state` replaces the [state] table (default: a SQLite file beside the config)."""
    lines = [f"{k} = {_toml(v)}" for k, v in (top or {}).items()]
    lines += [
        "[unleash]",
        f"url = {_toml(unleash_url or server.url)}",
        f"token = {_toml(server.admin_token)}",
        f"start_from = {_toml(start_from)}",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in (unleash_extra or {}).items()]
    state = state or {"path": str(path.with_suffix(".sqlite3"))}
    lines += ["", "[state]", *(f"{k} = {_toml(v)}" for k, v in state.items())]
    for hook in webhooks:
        lines += ["", "[[webhooks]]", *(f"{k} = {_toml(v)}" for k, v in hook.items())]
    path.touch(mode=0o600)
    path.chmod(0o600)  # the daemon refuses a config with a token that others can read
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class ProcStat:
    cpu_s: float  # utime + stime, clock ticks
    cpu_ns: int  # /proc/PID/schedstat: time on a CPU, nanoseconds
    rss_kb: int
    hwm_kb: int
    anon_kb: int = 0  # RssAnon: the process's own heap and stacks
    file_kb: int = 0  # RssFile: mapped files (shared libraries, extension modules)


# The daemon's default `poll_interval_s` (poller/config.py). Stated here, not imported: a
# benchmark may run another tree's daemon (BENCH_POLLER_DIR).
DEFAULT_POLL_INTERVAL_S = 0.4


def baseline_client(server: UnleashServer, *args: str) -> dict[str, Any]:
    """Run `python -m bench.baseline_client ARGS` with the server's token in its
    environment; its JSON summary."""
    completed = subprocess.run(
        [PYTHON, "-m", "bench.baseline_client", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_UNLEASH_TOKEN": server.admin_token},
    )
    summary: dict[str, Any] = json.loads(completed.stdout)
    return summary


def idle_floor(
    server: UnleashServer,
    seconds: float,
    interval_s: float = DEFAULT_POLL_INTERVAL_S,
    warmup_s: float = 5.0,
) -> dict[str, float]:
    """The floor of an idle daemon, measured alone (see bench/baseline_client.py --idle):
    a bare aiohttp probe loop at the daemon's interval. Its CPU % over `seconds`, its RSS
    and RssAnon (MB) and the probes it made."""
    return baseline_client(
        server, "--idle", server.url, str(interval_s), str(warmup_s), str(seconds)
    )


def proc_stat(pid: int) -> ProcStat:
    with open(f"/proc/{pid}/stat") as stat:
        # The command name may hold spaces; fields after it are fixed.
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])
    with open(f"/proc/{pid}/schedstat") as sched:
        cpu_ns = int(sched.read().split()[0])
    fields_kb: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                fields_kb[key] = int(rest.split()[0])
    return ProcStat(
        (utime + stime) / CLK_TCK,
        cpu_ns,
        fields_kb.get("VmRSS", 0),
        fields_kb.get("VmHWM", 0),
        fields_kb.get("RssAnon", 0),
        fields_kb.get("RssFile", 0),
    )


@dataclass
class Exit:
    code: int
    wall_s: float
    cpu_s: float
    max_rss_kb: int


@functools.cache
def bytecode_written(tree: Path = POLLER_DIR) -> Path:
    """Write the bytecode of the daemon's package under `tree`, once per benchmark process.

    `pip install` compiles a package's modules when it installs them, so an installed
    daemon starts from bytecode. A daemon run from a source tree with
    PYTHONDONTWRITEBYTECODE set (this machine sets it) compiles every module at every
    start instead: 1.8 MB more peak RSS here, and 0.4 MB more idle RSS (bench/README.md,
    "Bytecode"). Writing the bytecode first measures the daemon an operator runs.
    """
    package = tree / "poller"
    if not compileall.compile_dir(package, quiet=1):
        raise RuntimeError(f"could not write the bytecode of {package}")
    return package


class Daemon:
    """`python -m poller run -c CONFIG [--once]` as a child process, logs to a file."""

    def __init__(
        self,
        config: Path,
        *,
        once: bool = False,
        prefix: Sequence[str] = (),
        main: Sequence[str] = ("-m", "poller"),
        env: Mapping[str, str] | None = None,
    ) -> None:
        """`main` replaces `-m poller` (a script that runs the daemon, say); `env` is added
        to this process's environment."""
        bytecode_written()
        self.config = config
        self.log_path = config.with_suffix(".log")
        self._log = self.log_path.open("wb")
        argv = [*prefix, PYTHON, *main, "run", "-c", str(config)]
        if once:
            argv.append("--once")
        self.started = time.monotonic()
        self._process = subprocess.Popen(
            argv,
            cwd=POLLER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
        )
        self.pid = self._process.pid
        self.exit: Exit | None = None

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                parsed = json.loads(line)
                if isinstance(parsed, dict):
                    events.append(parsed)
        return events

    def wait_log(self, event: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry in self.log_events():
                if entry.get("event") == event:
                    return entry
            if not self.running():
                break
            time.sleep(0.05)
        raise RuntimeError(
            f"daemon did not log {event!r}; log {self.log_path}:\n"
            + self.log_path.read_text(errors="replace")[-3000:]
        )

    def running(self) -> bool:
        """Without reaping it (wait4 in `wait` must get its resource usage)."""
        if self.exit is not None:
            return False
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        return info is None

    def wait(self, timeout_s: float = 3600.0) -> Exit:
        """Reap the child with wait4, for its own peak RSS and CPU time."""
        if self.exit is not None:
            return self.exit
        deadline = time.monotonic() + timeout_s
        while True:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == self.pid:
                break
            if time.monotonic() > deadline:
                self._process.kill()
                pid, status, usage = os.wait4(self.pid, 0)
                break
            time.sleep(0.02)
        self._process.returncode = os.waitstatus_to_exitcode(status)
        self._log.close()
        self.exit = Exit(
            self._process.returncode,
            time.monotonic() - self.started,
            usage.ru_utime + usage.ru_stime,
            usage.ru_maxrss,
        )
        return self.exit

    def stop(self, timeout_s: float = 60.0) -> Exit:
        if self.running():
            self._process.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)


# --------------------------------------------------------------------------- arithmetic


@dataclass
class Delivery:
    received: int
    distinct: int
    lost: int
    duplicates: int
    out_of_order: int  # received after an event with a higher id


def delivery(ids: Sequence[int], expected: range | Sequence[int]) -> Delivery:
    wanted = set(expected)
    got = [i for i in ids if i in wanted]
    seen: set[int] = set()
    duplicates = out_of_order = 0
    highest = -1
    for event_id in got:
        if event_id in seen:
            duplicates += 1
        seen.add(event_id)
        if event_id < highest:
            out_of_order += 1
        highest = max(highest, event_id)
    return Delivery(len(got), len(seen), len(wanted - seen), duplicates, out_of_order)


def rate(times: Sequence[float]) -> float:
    """Deliveries per second between the first and the last receipt."""
    if len(times) < 2:
        return 0.0
    span = max(times) - min(times)
    return (len(times) - 1) / span if span > 0 else float("inf")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[int(q) - 1]


def fmt_kb(kb: int) -> str:
    return f"{kb / 1024:.1f} MB"

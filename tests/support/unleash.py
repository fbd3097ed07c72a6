"""A real Unleash server for tests: PostgreSQL, the pinned npm package, an admin API client.

Everything listens on 127.0.0.1. Each `UnleashServer` gets a fresh database (dropped when it
stops), a free port, a random admin token and a log file that survives it for debugging.
Raw SQL goes through the `psql` command-line client so the tests need no database driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parents[2]
UNLEASH_DIR = REPO_ROOT / "tests" / "unleash"
DEFAULT_VERSION = "8.2.0"
SUPPORTED_VERSIONS = ("5.12.8", "6.10.1", "7.6.5", "8.2.0")

TEST_ROLE = "unleash_poller_test"
# A throwaway role on a loopback-only cluster that exists for the tests; not a secret.
TEST_ROLE_PASSWORD = "unleash-poller-test"  # noqa: S105

ENABLE_HINT = (
    "install Node.js 20+ (node, npm) and PostgreSQL 15 (pg_ctlcluster, psql), or run `bash .ci/run`"
)

# Unleash's system user: what its own batch writers put in created_by_user_id.
SYSTEM_USER_ID = -1337


class HarnessError(RuntimeError):
    """The harness could not bring up or talk to a dependency (PostgreSQL, npm, Unleash)."""


def missing_tools() -> list[str]:
    """Names of the programs the real-Unleash harness needs that are not on PATH."""
    needed = ("node", "npm", "psql", "pg_ctlcluster", "pg_lsclusters")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if "node" not in missing:
        completed = subprocess.run(
            ["node", "--version"], capture_output=True, text=True, check=False
        )
        match = re.match(r"v(\d+)\.", completed.stdout.strip())
        if match is None or int(match.group(1)) < 20:
            missing.append(f"node >= 20 (found {completed.stdout.strip() or 'nothing'})")
    return missing


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class Cluster:
    version: str
    name: str
    port: int
    online: bool


def _clusters() -> list[Cluster]:
    completed = subprocess.run(
        ["pg_lsclusters", "--no-header"], capture_output=True, text=True, check=True
    )
    clusters = []
    for line in completed.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            clusters.append(Cluster(parts[0], parts[1], int(parts[2]), parts[3] == "online"))
    return clusters


def _as_postgres(args: Sequence[str], *, stdin: str | None = None) -> str:
    """Run a command as the `postgres` OS user (peer authentication on the local socket)."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *args]
    elif os.environ.get("USER") == "postgres":
        command = list(args)
    else:
        command = ["sudo", "-n", "-u", "postgres", "--", *args]
    completed = subprocess.run(
        command, input=stdin, capture_output=True, text=True, check=False, cwd="/"
    )
    if completed.returncode != 0:
        raise HarnessError(
            f"{' '.join(command)} exited {completed.returncode}: {completed.stderr.strip()}"
        )
    return completed.stdout


def _start_cluster(cluster: Cluster) -> None:
    completed = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster.version, cluster.name, "start"],
        capture_output=True,
        text=True,
        check=False,
    )
    # Exit 2 means "already running", which a concurrent starter may have caused.
    if completed.returncode not in (0, 2):
        raise HarnessError(
            f"pg_ctlcluster {cluster.version} {cluster.name} start exited "
            f"{completed.returncode}: {completed.stderr.strip()}"
        )


def ensure_postgres(database: str) -> PostgresDatabase:
    """Start the local cluster if it is down; create the test role and a fresh `database`.

    Prefers cluster 15/main. The database is dropped first if it exists, so it is empty.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", database):
        raise ValueError(f"database name {database!r} is not a plain lower-case identifier")
    clusters = _clusters()
    if not clusters:
        raise HarnessError("pg_lsclusters lists no PostgreSQL cluster; install postgresql-15")
    cluster = next((c for c in clusters if (c.version, c.name) == ("15", "main")), clusters[0])
    if not cluster.online:
        _start_cluster(cluster)
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(cluster.port), "-d", "postgres"]
    _as_postgres(
        [*psql, "-f", "-"],
        stdin=f"""
DO $$ BEGIN
    CREATE ROLE {TEST_ROLE} LOGIN PASSWORD '{TEST_ROLE_PASSWORD}';
EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL;  -- made by a parallel run
END $$;
DROP DATABASE IF EXISTS {database} WITH (FORCE);
CREATE DATABASE {database} OWNER {TEST_ROLE};
""",
    )
    return PostgresDatabase(
        host="127.0.0.1",
        port=cluster.port,
        user=TEST_ROLE,
        password=TEST_ROLE_PASSWORD,
        name=database,
    )


def drop_database(db: PostgresDatabase) -> None:
    """Drop a database made by `ensure_postgres` (connections are closed by force)."""
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(db.port), "-d", "postgres"]
    _as_postgres([*psql, "-c", f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)"])


def restart_cluster(db: PostgresDatabase) -> float:
    """Restart the whole cluster `db` lives on (every database on it, Unleash's too) with
    `pg_ctlcluster restart` (fast shutdown: open connections are cut), as an operator's
    restart would; returns once it accepts connections again, with the seconds it took."""
    cluster = next((c for c in _clusters() if c.port == db.port), None)
    if cluster is None:
        raise HarnessError(f"pg_lsclusters lists no cluster on port {db.port}")
    started = time.monotonic()
    _as_postgres(
        ["pg_ctlcluster", "--skip-systemctl-redirect", cluster.version, cluster.name, "restart"]
    )
    return time.monotonic() - started


@dataclass(frozen=True)
class PostgresDatabase:
    """Connection parameters of one test database, and raw SQL through `psql`."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    name: str

    def _psql_command(self, variables: Mapping[str, object]) -> list[str]:
        command = [
            "psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", self.user, "-d", self.name,
        ]  # fmt: skip
        for key, value in variables.items():
            command += ["-v", f"{key}={value}"]
        return [*command, "-f", "-"]

    def _psql_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10"}

    def psql(self, sql: str, **variables: object) -> list[str]:
        """Run SQL (psql syntax: values bound as `:'name'`) and return the output rows.

        Rows come back unaligned, `|`-separated, one string per row.
        """
        completed = subprocess.run(
            self._psql_command(variables),
            input=sql,
            capture_output=True,
            text=True,
            check=False,
            env=self._psql_env(),
        )
        if completed.returncode != 0:
            raise HarnessError(f"psql exited {completed.returncode}: {completed.stderr.strip()}")
        return [line for line in completed.stdout.splitlines() if line]

    def event_columns(self) -> list[str]:
        """The columns of Unleash's `events` table in this database."""
        return self.psql(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'events' "
            "ORDER BY ordinal_position;"
        )

    def insert_events(
        self,
        count: int,
        *,
        type: str = "feature-updated",
        project: str | None = "default",
        environment: str | None = None,
        feature_name: str | None = None,
        created_by: str = "unleash-poller-tests",
        created_by_user_id: int = SYSTEM_USER_ID,
        data: Mapping[str, Any] | None = None,
        pre_data: Mapping[str, Any] | None = None,
        tags: Sequence[Mapping[str, str]] = (),
    ) -> list[int]:
        """Insert `count` events in ONE `INSERT ... SELECT generate_series` statement.

        That is how Unleash's own batch writers (bulk imports, bulk archive) land many rows
        in one transaction with one `created_at`. Each row's data is `data` plus
        `{"batchIndex": i}` (1-based), so rows stay distinguishable. Returns the new ids.
        """
        if count < 1:
            raise ValueError("count must be at least 1")
        values = {
            "type": type,
            "created_by": created_by,
            "created_by_user_id": created_by_user_id,
            "data": json.dumps(dict(data or {})),
            "tags": json.dumps([dict(tag) for tag in tags]),
            "count": count,
        }
        optional = {
            "pre_data": None if pre_data is None else json.dumps(dict(pre_data)),
            "feature_name": feature_name,
            "project": project,
            "environment": environment,
        }
        values.update({key: value for key, value in optional.items() if value is not None})
        nullable = {
            key: "NULL" if value is None else f":'{key}'" for key, value in optional.items()
        }
        sql = (
            "INSERT INTO events (type, created_by, created_by_user_id, data, pre_data, tags,"
            " feature_name, project, environment)\n"
            "SELECT :'type', :'created_by', :created_by_user_id,"
            " (:'data')::jsonb || jsonb_build_object('batchIndex', batch.index),"
            f" ({nullable['pre_data']})::jsonb, (:'tags')::json,"
            f" {nullable['feature_name']}, {nullable['project']}, {nullable['environment']}\n"
            "FROM generate_series(1, :count) AS batch(index)\n"
            "ORDER BY batch.index\n"
            "RETURNING id;"
        )
        return sorted(int(row) for row in self.psql(sql, **values))

    def open_transaction_inserting_event(
        self,
        *,
        type: str = "feature-updated",
        project: str | None = "default",
        environment: str | None = None,
        feature_name: str | None = None,
        created_by: str = "unleash-poller-tests",
        data: Mapping[str, Any] | None = None,
    ) -> OpenTransaction:
        """Insert one event in a transaction that stays open until `commit()`/`rollback()`.

        Its id is taken from the sequence now, so events inserted meanwhile get higher ids
        yet become visible first: the out-of-order commit a cursor on `max(id)` gets wrong.
        """
        return OpenTransaction(
            self,
            type=type,
            project=project,
            environment=environment,
            feature_name=feature_name,
            created_by=created_by,
            data=dict(data or {}),
        )


class OpenTransaction:
    """A `psql` process holding `BEGIN; INSERT INTO events ...` uncommitted (see above)."""

    def __init__(
        self,
        db: PostgresDatabase,
        *,
        type: str,
        project: str | None,
        environment: str | None,
        feature_name: str | None,
        created_by: str,
        data: dict[str, Any],
    ) -> None:
        optional = {"project": project, "environment": environment, "feature_name": feature_name}
        variables: dict[str, object] = {
            "type": type,
            "created_by": created_by,
            "created_by_user_id": SYSTEM_USER_ID,
            "data": json.dumps(data),
        }
        variables.update({key: value for key, value in optional.items() if value is not None})
        nullable = {
            key: "NULL" if value is None else f":'{key}'" for key, value in optional.items()
        }
        sql = (
            "BEGIN;\n"
            "INSERT INTO events (type, created_by, created_by_user_id, data, tags,"
            " feature_name, project, environment)\n"
            "VALUES (:'type', :'created_by', :created_by_user_id, (:'data')::jsonb, '[]',"
            f" {nullable['feature_name']}, {nullable['project']}, {nullable['environment']})\n"
            "RETURNING id;\n"
        )
        self._process = subprocess.Popen(
            db._psql_command(variables),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=db._psql_env(),
        )
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._process.stdin.write(sql)
        self._process.stdin.flush()
        line = self._process.stdout.readline().strip()
        if not line.isdigit():
            self._finish("ROLLBACK;\n")
            raise HarnessError(f"psql did not return an event id: {line!r}")
        self.id = int(line)
        self._done = False

    def commit(self) -> None:
        """Commit: the event becomes visible (with an id lower than later events)."""
        self._finish("COMMIT;\n")

    def rollback(self) -> None:
        """Roll back: the event's id is never used."""
        self._finish("ROLLBACK;\n")

    def _finish(self, statement: str) -> None:
        assert self._process.stdin is not None
        self._done = True
        _, stderr = self._process.communicate(statement, timeout=30)
        if self._process.returncode != 0:
            raise HarnessError(f"psql exited {self._process.returncode}: {stderr.strip()}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self.rollback()


# --------------------------------------------------------------------------- npm + node


def unleash_package_dir(version: str) -> Path:
    """tests/unleash/<version>, with its package.json and package-lock.json."""
    path = UNLEASH_DIR / version
    if not (path / "package-lock.json").is_file():
        known = ", ".join(sorted(p.name for p in UNLEASH_DIR.iterdir() if p.is_dir()))
        raise HarnessError(f"no pinned Unleash {version} in {UNLEASH_DIR} (have: {known})")
    return path


def ensure_node_modules(version: str) -> Path:
    """`npm ci` the pinned Unleash `version` unless its node_modules is already there."""
    path = unleash_package_dir(version)
    if not (path / "node_modules" / "unleash-server" / "package.json").is_file():
        # --ignore-scripts: Unleash needs none, and some (analytics) would call the internet.
        completed = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--ignore-scripts"],
            cwd=path,
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise HarnessError(
                f"npm ci in {path} exited {completed.returncode}:\n{completed.stderr[-4000:]}"
            )
    return path


class UnleashServer:
    """One real Unleash process on 127.0.0.1 with a fresh database; a context manager.

    `url`, `admin_token`, `version`, `db` (a `PostgresDatabase`), `log_path`, and after
    start `startup_s` (seconds from spawning node to `GET /health` answering 200).
    """

    def __init__(
        self,
        version: str = DEFAULT_VERSION,
        *,
        port: int | None = None,
        log_dir: Path | None = None,
        startup_timeout_s: float = 300.0,
        keep_database: bool = False,
        default_unleash_url: bool = False,
    ) -> None:
        self.version = version
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # True: started without UNLEASH_URL, like a plain default install (its ui-config
        # and its integrations' links then say http://localhost:4242).
        self.default_unleash_url = default_unleash_url
        self.admin_token = f"*:*.{secrets.token_hex(24)}"
        self.startup_timeout_s = startup_timeout_s
        self.keep_database = keep_database
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix="unleash-poller-tests-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"unleash-{version}-{self.port}.log"
        self.db_name = f"unleash_{version.replace('.', '_')}_{os.getpid()}_{secrets.token_hex(3)}"
        self.startup_s: float | None = None
        self._db: PostgresDatabase | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._listening = threading.Event()

    @property
    def db(self) -> PostgresDatabase:
        if self._db is None:
            raise HarnessError("UnleashServer has not been started")
        return self._db

    def admin(self) -> AdminClient:
        """An admin API client authenticated with this server's admin token."""
        return AdminClient(self.url, self.admin_token, self.version, diagnose=self.describe)

    def describe(self) -> str:
        """Whether the process still runs (or how it ended), and the end of its log."""
        process = self._process
        if process is None:
            state = "is stopped"
        elif (code := process.poll()) is None:
            state = f"is still running (pid {process.pid})"
        else:
            state = f"exited with {code}"
        return f"Unleash {self.version} {state}; log {self.log_path}:\n{self.log_tail()}"

    def start(self) -> None:
        package_dir = ensure_node_modules(self.version)
        # One start script for every version; it loads the version's own node_modules.
        script = package_dir.parent / "server.mjs"
        self._db = ensure_postgres(self.db_name)
        env = {
            **os.environ,
            "TEST_UNLEASH_DB_NAME": self._db.name,
            "TEST_UNLEASH_DB_USER": self._db.user,
            "TEST_UNLEASH_DB_PASSWORD": self._db.password,
            "TEST_UNLEASH_DB_HOST": self._db.host,
            "TEST_UNLEASH_DB_PORT": str(self._db.port),
            "TEST_UNLEASH_PORT": str(self.port),
            "TEST_UNLEASH_ADMIN_TOKEN": self.admin_token,
            "TEST_UNLEASH_URL": "" if self.default_unleash_url else self.url,
            "NODE_ENV": "production",
        }
        started = time.monotonic()
        self._process = subprocess.Popen(
            ["node", str(script)],
            cwd=package_dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in a terminal reaches pytest, not Unleash directly
        )
        self._reader = threading.Thread(
            target=self._copy_log, name=f"unleash-{self.version}-log", daemon=True
        )
        self._reader.start()
        # The reader sets the event on the "listening" line and also at EOF (process died).
        if not self._listening.wait(self.startup_timeout_s):
            self.stop()
            raise HarnessError(
                f"Unleash {self.version} did not start within {self.startup_timeout_s:.0f} s; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        if self._process.poll() is not None:
            code = self._process.wait()
            self.stop()
            raise HarnessError(
                f"Unleash {self.version} exited {code} while starting; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )
        self._check_health()
        self.startup_s = time.monotonic() - started

    def _copy_log(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        with self.log_path.open("wb") as log:
            for line in self._process.stdout:
                log.write(line)
                log.flush()
                if b" listening on " in line:
                    self._listening.set()
        self._listening.set()

    def _check_health(self) -> None:
        # Unleash prints "listening" once its HTTP server is bound, after migrations, so
        # /health answers at once; a short bounded retry covers a slow first request.
        last_error = ""
        for attempt in range(5):
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=10) as response:  # noqa: S310
                    if response.status == 200:
                        return
                    last_error = f"status {response.status}"
            except (urllib.error.URLError, OSError) as error:
                last_error = str(error)
            time.sleep(0.2 * (attempt + 1))
        self.stop()
        raise HarnessError(f"Unleash {self.version} /health failed: {last_error}")

    def log_tail(self, lines: int = 40) -> str:
        """The last lines Unleash printed (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (Unleash closes its server and pool), SIGKILL after 30 s; drop the db."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            if self._reader is not None:
                self._reader.join(timeout=10)
            if process.stdout is not None:
                process.stdout.close()
        if self._db is not None and not self.keep_database:
            with contextlib.suppress(HarnessError):
                drop_database(self._db)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------- admin API


class AdminApiError(HarnessError):
    """The admin API answered with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> {status}: {body[:2000]}")
        self.status = status
        self.body = body


class AdminClient:
    """Synchronous client for the parts of Unleash's admin API the tests drive.

    Works on 5.12.8, 6.10.1, 7.6.5 and 8.2.0; where the versions differ, the method
    says how. Every call raises `AdminApiError` on a status it did not expect.
    """

    def __init__(
        self,
        url: str,
        token: str,
        version: str,
        *,
        diagnose: Callable[[], str] | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = token
        self.version = version
        self.major = int(version.split(".", 1)[0])
        # Says what became of the server when it cannot be reached (UnleashServer.describe).
        self._diagnose = diagnose

    def __repr__(self) -> str:
        return f"AdminClient({self.url!r}, version={self.version!r})"

    # -- plumbing

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        expect: Sequence[int] = (200, 201, 202, 204),
    ) -> Any:
        """Send one request; return the decoded JSON body (None when empty)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(  # noqa: S310 - our own loopback URL
            f"{self.url}{path}", data=data, method=method
        )
        request.add_header("Authorization", self._token)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, raw = error.code, error.read()
        except (urllib.error.URLError, OSError) as error:
            if self._diagnose is None:
                raise
            raise HarnessError(f"{method} {path}: {error}; {self._diagnose()}") from error
        if status not in expect:
            raise AdminApiError(method, path, status, raw.decode(errors="replace"))
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw.decode(errors="replace")

    @staticmethod
    def _q(value: str) -> str:
        return urllib.parse.quote(value, safe="")

    def _feature_path(self, project: str, feature: str) -> str:
        return f"/api/admin/projects/{self._q(project)}/features/{self._q(feature)}"

    # -- projects

    def create_project(self, project_id: str, *, description: str = "") -> str | None:
        """Create a project; None where this Unleash does not allow it (open source)."""
        try:
            self.request(
                "POST",
                "/api/admin/projects",
                {"id": project_id, "name": project_id, "description": description},
            )
        except AdminApiError as error:
            if error.status in (401, 403, 404, 405):
                return None
            raise
        return project_id

    # -- feature flags

    def create_feature(
        self,
        name: str,
        *,
        project: str = "default",
        description: str = "",
        type: str = "release",
    ) -> dict[str, Any]:
        """Create a feature flag (event `feature-created`)."""
        result: dict[str, Any] = self.request(
            "POST",
            f"/api/admin/projects/{self._q(project)}/features",
            {"name": name, "description": description, "type": type},
        )
        return result

    def get_feature(self, name: str, *, project: str = "default") -> dict[str, Any]:
        result: dict[str, Any] = self.request("GET", self._feature_path(project, name))
        return result

    def update_feature(
        self,
        name: str,
        *,
        project: str = "default",
        description: str | None = None,
        type: str | None = None,
    ) -> None:
        """Change description and/or type (event `feature-metadata-updated`)."""
        current = self.get_feature(name, project=project)
        self.request(
            "PUT",
            self._feature_path(project, name),
            {
                "name": name,
                "description": current.get("description") if description is None else description,
                "type": current.get("type") if type is None else type,
            },
        )

    def set_environment_enabled(
        self, name: str, environment: str, enabled: bool, *, project: str = "default"
    ) -> None:
        """Turn a flag on/off in an environment (`feature-environment-enabled`/`-disabled`).

        Unleash 5+ adds a default strategy when a flag without one is turned on, which
        logs a `feature-strategy-add` event before the enable event.
        """
        action = "on" if enabled else "off"
        self.request(
            "POST",
            f"{self._feature_path(project, name)}/environments/{self._q(environment)}/{action}",
        )

    def add_flexible_rollout(
        self,
        name: str,
        environment: str,
        *,
        rollout: int = 50,
        project: str = "default",
        stickiness: str = "default",
    ) -> str:
        """Add a flexibleRollout strategy (event `feature-strategy-add`); returns its id."""
        result = self.request(
            "POST",
            f"{self._feature_path(project, name)}/environments/{self._q(environment)}/strategies",
            self._flexible_rollout(name, rollout, stickiness),
        )
        return str(result["id"])

    def update_flexible_rollout(
        self,
        name: str,
        environment: str,
        strategy_id: str,
        *,
        rollout: int,
        project: str = "default",
        stickiness: str = "default",
    ) -> None:
        """Change a flexibleRollout's percentage (event `feature-strategy-update`)."""
        self.request(
            "PUT",
            f"{self._feature_path(project, name)}/environments/{self._q(environment)}"
            f"/strategies/{self._q(strategy_id)}",
            self._flexible_rollout(name, rollout, stickiness),
        )

    def delete_strategy(
        self, name: str, environment: str, strategy_id: str, *, project: str = "default"
    ) -> None:
        """Remove a strategy (event `feature-strategy-remove`)."""
        self.request(
            "DELETE",
            f"{self._feature_path(project, name)}/environments/{self._q(environment)}"
            f"/strategies/{self._q(strategy_id)}",
        )

    @staticmethod
    def _flexible_rollout(name: str, rollout: int, stickiness: str) -> dict[str, Any]:
        return {
            "name": "flexibleRollout",
            "constraints": [],
            "parameters": {"rollout": str(rollout), "stickiness": stickiness, "groupId": name},
        }

    def ensure_tag_type(self, tag_type: str, *, description: str = "") -> None:
        """Create a tag type unless it exists (`simple` always does)."""
        existing = self.request("GET", "/api/admin/tag-types")
        if any(t["name"] == tag_type for t in existing["tagTypes"]):
            return
        self.request("POST", "/api/admin/tag-types", {"name": tag_type, "description": description})

    def tag_feature(self, name: str, value: str, *, tag_type: str = "simple") -> None:
        """Tag a flag (event `feature-tagged`); the tag type must exist."""
        self.request(
            "POST", f"/api/admin/features/{self._q(name)}/tags", {"type": tag_type, "value": value}
        )

    def untag_feature(self, name: str, value: str, *, tag_type: str = "simple") -> None:
        """Remove a tag from a flag (event `feature-untagged`)."""
        self.request(
            "DELETE",
            f"/api/admin/features/{self._q(name)}/tags/{self._q(tag_type)}/{self._q(value)}",
        )

    def set_stale(self, name: str, stale: bool = True, *, project: str = "default") -> None:
        """Mark a flag stale or not (event `feature-stale-on`/`-off`)."""
        self.request(
            "POST",
            f"/api/admin/projects/{self._q(project)}/stale",
            {"features": [name], "stale": stale},
        )

    def archive_feature(self, name: str, *, project: str = "default") -> None:
        """Archive a flag (event `feature-archived`)."""
        self.request("DELETE", self._feature_path(project, name))

    def revive_feature(self, name: str) -> None:
        """Bring an archived flag back (event `feature-revived`)."""
        self.request("POST", f"/api/admin/archive/revive/{self._q(name)}")

    # -- segments

    def create_segment(
        self,
        name: str,
        *,
        values: Sequence[str] = ("a@example.com",),
        context_name: str = "userId",
        description: str = "",
        project: str | None = None,
    ) -> int:
        """Create a segment with one IN constraint (event `segment-created`); returns its id."""
        result = self.request(
            "POST",
            "/api/admin/segments",
            self._segment(name, values, context_name, description, project),
        )
        return int(result["id"])

    def update_segment(
        self,
        segment_id: int,
        name: str,
        *,
        values: Sequence[str],
        context_name: str = "userId",
        description: str = "",
        project: str | None = None,
    ) -> None:
        """Replace a segment's constraint values (event `segment-updated`)."""
        self.request(
            "PUT",
            f"/api/admin/segments/{segment_id}",
            self._segment(name, values, context_name, description, project),
        )

    @staticmethod
    def _segment(
        name: str,
        values: Sequence[str],
        context_name: str,
        description: str,
        project: str | None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "name": name,
            "description": description,
            "constraints": [
                {
                    "contextName": context_name,
                    "operator": "IN",
                    "values": list(values),
                    "caseInsensitive": False,
                    "inverted": False,
                }
            ],
        }
        if project is not None:
            body["project"] = project
        return body

    # -- API tokens

    def create_api_token(
        self, token_name: str, *, environment: str = "development", projects: Sequence[str] = ("*",)
    ) -> dict[str, Any]:
        """Create a `client` token (event `api-token-created`, not about any feature).

        On 5.12.8-8.2.0 that event has no featureName, `project` "*" (or the token's one
        project) and the token's environment; for events with neither project nor
        environment, use segments, tag types or webhook integrations.
        """
        result: dict[str, Any] = self.request(
            "POST",
            "/api/admin/api-tokens",
            {
                "tokenName": token_name,
                "type": "client",
                "environment": environment,
                "projects": list(projects),
            },
        )
        return result

    # -- Unleash's own webhook integration

    def webhook_event_types(self) -> list[str]:
        """Event types the webhook integration offers in this version."""
        providers = self.request("GET", "/api/admin/addons")["providers"]
        webhook = next(p for p in providers if p["name"] == "webhook")
        return list(webhook["events"])

    def create_webhook(
        self,
        url: str,
        *,
        events: Sequence[str],
        body_template: str | None = None,
        content_type: str | None = None,
        authorization: str | None = None,
        custom_headers: Mapping[str, str] | None = None,
        projects: Sequence[str] = ("*",),
        environments: Sequence[str] = ("*",),
        description: str = "",
        enabled: bool = True,
    ) -> int:
        """Create Unleash's own webhook integration (event `addon-config-created`)."""
        result = self.request(
            "POST",
            "/api/admin/addons",
            self._webhook(
                url, events, body_template, content_type, authorization, custom_headers,
                projects, environments, description, enabled,
            ),
        )  # fmt: skip
        return int(result["id"])

    def update_webhook(
        self,
        addon_id: int,
        url: str,
        *,
        events: Sequence[str],
        body_template: str | None = None,
        content_type: str | None = None,
        authorization: str | None = None,
        custom_headers: Mapping[str, str] | None = None,
        projects: Sequence[str] = ("*",),
        environments: Sequence[str] = ("*",),
        description: str = "",
        enabled: bool = True,
    ) -> None:
        """Replace a webhook integration's settings (event `addon-config-updated`)."""
        self.request(
            "PUT",
            f"/api/admin/addons/{addon_id}",
            self._webhook(
                url, events, body_template, content_type, authorization, custom_headers,
                projects, environments, description, enabled,
            ),
        )  # fmt: skip

    def delete_webhook(self, addon_id: int) -> None:
        """Delete a webhook integration (event `addon-config-deleted`).

        Beware: Unleash 8.2.0 exits (an uncaught foreign-key error) when a delivery of that
        integration is still in flight. Where deliveries may be running, leave it in place
        (tests use a fresh receiver path each) rather than delete it.
        """
        self.request("DELETE", f"/api/admin/addons/{addon_id}")

    @staticmethod
    def _webhook(
        url: str,
        events: Sequence[str],
        body_template: str | None,
        content_type: str | None,
        authorization: str | None,
        custom_headers: Mapping[str, str] | None,
        projects: Sequence[str],
        environments: Sequence[str],
        description: str,
        enabled: bool,
    ) -> dict[str, Any]:
        parameters = {"url": url}
        if body_template is not None:
            parameters["bodyTemplate"] = body_template
        if content_type is not None:
            parameters["contentType"] = content_type
        if authorization is not None:
            parameters["authorization"] = authorization
        if custom_headers is not None:
            parameters["customHeaders"] = json.dumps(dict(custom_headers))
        return {
            "provider": "webhook",
            "description": description,
            "enabled": enabled,
            "parameters": parameters,
            "events": list(events),
            "projects": list(projects),
            "environments": list(environments),
        }

    # -- the event log

    def legacy_events(self) -> list[dict[str, Any]]:
        """`GET /api/admin/events`: the newest 100 events, newest first."""
        events: list[dict[str, Any]] = self.request("GET", "/api/admin/events")["events"]
        return events

    @property
    def search_page_limit(self) -> int:
        """The largest page the event search serves: 100 on 5.x, 1000 on 6+."""
        return 100 if self.major < 6 else 1000

    def search_events(self, *, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """One page of the event search, newest first (with `label`/`summary` on 6+).

        5.x has only `POST /api/admin/events/search` (limit <= 100); 6+ has
        `GET /api/admin/search/events` (limit <= 1000).
        """
        return self._search_page(limit, offset)[0]

    def _search_page(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        if self.major < 6:
            body = self.request(
                "POST", "/api/admin/events/search", {"limit": limit, "offset": offset}
            )
            return body["events"], int(body["totalEvents"])
        query = urllib.parse.urlencode({"limit": limit, "offset": offset})
        body = self.request("GET", f"/api/admin/search/events?{query}")
        return body["events"], int(body["total"])

    def all_events(self, *, after_id: int = 0) -> list[dict[str, Any]]:
        """Every event with an id above `after_id`, sorted by id.

        Reads pages newest first until a page holds nothing above `after_id` (or the log
        ends). 5.x and 6.x sort pages by `created_at` only, so events of one transaction
        can repeat or go missing across an offset page boundary: reading the whole log
        (`after_id=0`) raises `HarnessError` when the pages do not add up to the total.
        """
        found: dict[int, dict[str, Any]] = {}
        offset = 0
        while True:
            page, total = self._search_page(self.search_page_limit, offset)
            found.update((e["id"], e) for e in page)
            offset += len(page)
            if len(page) < self.search_page_limit:
                break
            if after_id and all(e["id"] <= after_id for e in page):
                break
        if not after_id and len(found) != total:
            raise HarnessError(
                f"Unleash {self.version}: paging the event search returned {len(found)} "
                f"distinct events of {total} (created_at ties across a page boundary)"
            )
        return [found[event_id] for event_id in sorted(found) if event_id > after_id]

    def latest_event_id(self) -> int:
        """The highest event id visible now (0 on an empty log)."""
        page = self.search_events(limit=50)
        return max((e["id"] for e in page), default=0)

"""Shared fixtures: a real Unleash server, a real HTTP receiver, poller configs and CLI runs.

`unleash` is parametrised by the environment variable UNLEASH_VERSIONS (comma-separated
versions that exist under tests/unleash/, default 8.2.0). Without Node.js or PostgreSQL the
tests that need them are skipped, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import run_poller
from tests.support.daemon import Daemon, DaemonFactory
from tests.support.receiver import Receiver
from tests.support.unleash import (
    DEFAULT_VERSION,
    ENABLE_HINT,
    AdminClient,
    UnleashServer,
    missing_tools,
)

# `pg_database` and `pg_state`: PostgreSQL for state tests (a schema per test); `state`,
# `state_kind` and `run`: a store on either backend, on the test's event loop.
pytest_plugins = ("tests.support.pgstate", "tests.support.stores")


def _unleash_versions() -> list[str]:
    raw = os.environ.get("UNLEASH_VERSIONS", "").strip() or DEFAULT_VERSION
    return [version.strip() for version in raw.split(",") if version.strip()]


def require_real_unleash_harness() -> None:
    """Skip (or, under CI=true, fail) when node, npm or PostgreSQL are missing."""
    missing = missing_tools()
    if not missing:
        return
    message = (
        f"needs a real Unleash server; missing: {', '.join(missing)}. To enable: {ENABLE_HINT}"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session", params=_unleash_versions(), ids=lambda v: f"unleash-{v}")
def unleash(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[UnleashServer]:
    """A real Unleash server (one per version in UNLEASH_VERSIONS) on a fresh database."""
    require_real_unleash_harness()
    version: str = request.param
    log_dir = tmp_path_factory.mktemp(f"unleash-{version}-logs", numbered=True)
    with UnleashServer(version, log_dir=log_dir) as server:
        sys.stderr.write(
            f"\nunleash {version}: {server.url} up in {server.startup_s:.1f} s, "
            f"log {server.log_path}\n"
        )
        yield server


@pytest.fixture(scope="session")
def admin(unleash: UnleashServer) -> AdminClient:
    """An admin API client for the session's Unleash server."""
    return unleash.admin()


@pytest.fixture(scope="session")
def receiver() -> Iterator[Receiver]:
    """A real HTTP server on 127.0.0.1 that records every request (use a path per test)."""
    with Receiver() as server:
        yield server


def _toml_value(value: object) -> str:
    # JSON string escapes (\", \\, \n, \uXXXX) are all valid in TOML basic strings.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # Raw non-ASCII: TOML has no surrogate-pair escapes for an emoji; DEL must be escaped.
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, Mapping):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    if isinstance(value, Sequence):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def render_poller_config(
    *,
    unleash_url: str,
    token: str,
    state_path: Path | None = None,
    webhooks: Sequence[Mapping[str, object]],
    start_from: str | int = "latest",
    poll_interval_s: float = 1.0,
    extra_unleash: Mapping[str, object] | None = None,
    state: Mapping[str, object] | None = None,
    tables: Mapping[str, Mapping[str, object]] | None = None,
) -> str:
    """The poller's TOML config; each webhook is a mapping of its keys (name, url, ...).

    `state` replaces the [state] table (`path = state_path`), say with a PostgreSQL `url`;
    `tables` adds others after the webhooks (`{"metrics": {"listen": ...}}`).
    """
    lines = [
        "[unleash]",
        f"url = {_toml_value(unleash_url)}",
        f"token = {_toml_value(token)}",
        f"poll_interval_s = {_toml_value(poll_interval_s)}",
        f"start_from = {_toml_value(start_from)}",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in (extra_unleash or {}).items()]
    lines += ["", "[state]"]
    if state is None:
        if state_path is None:
            raise ValueError("give state_path (SQLite) or a state table")
        lines += [f"path = {_toml_value(str(state_path))}"]
    else:
        lines += [f"{key} = {_toml_value(value)}" for key, value in state.items()]
    for webhook in webhooks:
        lines += ["", "[[webhooks]]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in webhook.items()]
    for name, table in (tables or {}).items():
        lines += ["", f"[{name}]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


PollerConfigFactory = Callable[..., Path]


@pytest.fixture
def poller_config(tmp_path: Path, unleash: UnleashServer) -> PollerConfigFactory:
    """Write a poller config for the session's Unleash into tmp_path; returns its path.

    Call it with `webhooks=[{...}, ...]` and optionally `start_from`, `poll_interval_s`,
    `token`, `name` (file name), `extra_unleash` and `state` (a [state] table, say on
    PostgreSQL). Without `state` the state file is tmp_path/state.sqlite3.
    """

    def write(
        *,
        webhooks: Sequence[Mapping[str, object]],
        start_from: str | int = "latest",
        poll_interval_s: float = 1.0,
        token: str | None = None,
        name: str = "poller.toml",
        extra_unleash: Mapping[str, object] | None = None,
        state: Mapping[str, object] | None = None,
    ) -> Path:
        path = tmp_path / name
        # The file holds the token inline: the daemon refuses to run if others can read it.
        path.touch(mode=0o600)
        path.write_text(
            render_poller_config(
                unleash_url=unleash.url,
                token=token or unleash.admin_token,
                state_path=tmp_path / "state.sqlite3",
                webhooks=webhooks,
                start_from=start_from,
                poll_interval_s=poll_interval_s,
                extra_unleash=extra_unleash,
                state=state,
            )
        )
        return path

    return write


PollerCli = Callable[..., "subprocess.CompletedProcess[str]"]


@pytest.fixture
def poller_cli() -> PollerCli:
    """Run `python -m poller ARGS...` as a subprocess from the repository root.

    `poller_cli("run", "-c", path, "--once", expect_exit=0)` fails the test (showing the
    output) when the exit code differs; pass `expect_exit=None` to check it yourself.
    """

    def run(
        *args: str | Path, expect_exit: int | None = 0, timeout_s: float = 180.0
    ) -> subprocess.CompletedProcess[str]:
        completed = run_poller(*args, timeout_s=timeout_s)
        if expect_exit is not None and completed.returncode != expect_exit:
            pytest.fail(
                f"python -m poller {' '.join(map(str, args))} exited {completed.returncode} "
                f"(expected {expect_exit})\n--- stdout\n{completed.stdout[-6000:]}"
                f"\n--- stderr\n{completed.stderr[-6000:]}",
                pytrace=False,
            )
        return completed

    return run


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Start daemons (`spawn(config, crash_at=..., file_size_limit=...)`); with
    `ready=True`, return once it has found Unleash's API. Any still running when the test
    ends is killed. Logs are tmp_path/daemon-N.log."""
    started: list[Daemon] = []

    def start(config: Path, *, ready: bool = False, **options: Any) -> Daemon:
        daemon = Daemon(config, tmp_path / f"daemon-{len(started) + 1}.log", **options)
        started.append(daemon)
        if ready:
            daemon.wait_log("unleash.api_detected")
        return daemon

    yield start
    for daemon in started:
        daemon.close()

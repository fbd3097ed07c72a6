"""Command line: arguments → config → app. Nothing else lives here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from poller import __version__, log
from poller.app import EX_IOERR, EX_TEMPFAIL, EX_UNAVAILABLE, App, ask_server_profile
from poller.backoff import backoff_s
from poller.config import (
    EX_CONFIG,
    TOKEN_ENV,
    Config,
    ConfigError,
    Secret,
    StateConfig,
    apply_server_profile,
    check_private,
    load_config,
)
from poller.lease import holder_name
from poller.providers.base import BuildError, Configured, shown
from poller.render import RenderError, ServerProfile, parse_version
from poller.schedule import Pause
from poller.source import UnleashError
from poller.state import (
    LeaseView,
    StateError,
    StateLockedError,
    StateStore,
    StateUnavailableError,
    open_state,
)
from poller.urls import redact_database_url

# The commands an operator runs by hand (import, redeliver, dead-letters replay, state copy)
# import their modules when they run, so the daemon (`run`) does not hold them in memory.

EX_USAGE = 64
EX_REFUSED = 2  # as argparse's usage errors: the command was not run, nothing changed
EX_DATAERR = 65
DEFAULT_CONFIG = Path("/etc/unleash-poller/config.toml")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unleash-poller",
        description="Deliver an Unleash server's events to webhooks, in order, at least once.",
    )
    parser.add_argument("--version", action="version", version=f"unleash-poller {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "-c",
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"TOML config file (default {DEFAULT_CONFIG})",
        )
        return sub

    run = command("run", "poll Unleash and deliver until stopped (SIGTERM/SIGINT drain)")
    run.add_argument(
        "--once",
        action="store_true",
        help="poll until caught up, deliver everything due (retries included), save and exit",
    )
    command("check", "validate the config; print one line per problem")
    render = command("render", "print the body a webhook would receive for an event")
    render.add_argument("--webhook", required=True, help="webhook name")
    render.add_argument(
        "--event",
        required=True,
        type=Path,
        help="event JSON file, as the Unleash admin API returns it",
    )
    render.add_argument(
        "--unleash-version",
        type=_version_argument,
        help="render as for this Unleash version (escaping, context) without asking the "
        "server; default: ask it (GET /api/admin/ui-config)",
    )
    render.add_argument(
        "--unleash-url",
        help="the server's UNLEASH_URL for links when not asking it (default: unleash.url); "
        "public_url in the config still wins",
    )
    status = command("status", "cursor, pending and dead letters per webhook (no daemon needed)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    cursor = command("cursor", "move the cursor by hand (the daemon must be stopped)")
    cursor.add_argument("action", choices=("set",))
    cursor.add_argument(
        "event_id", type=int, help="deliver events with an id greater than this from now on"
    )
    dead = command("dead-letters", "list or replay deliveries that failed for good")
    dead.add_argument("action", choices=("list", "replay"))
    dead.add_argument("--webhook", help="only this webhook")
    imp = commands.add_parser(
        "import",
        help="write a config from the integrations configured in Unleash",
        description="Write a config with one webhook per integration configured in Unleash "
        "(GET /api/admin/addons, or its addons table with --database).",
    )
    imp.add_argument("--unleash", required=True, metavar="URL", help="the Unleash server")
    imp.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding an admin token (default: ${TOKEN_ENV}); written into the config",
    )
    imp.add_argument(
        "-o", "--output", type=Path, default=Path("config.toml"), help="config file to write"
    )
    imp.add_argument(
        "--state",
        type=Path,
        default=Path("/var/lib/unleash-poller/state.sqlite3"),
        help="state file for the new config (and for --cut-over's start cursor)",
    )
    imp.add_argument(
        "--database",
        metavar="postgresql://...",
        help="read Unleash's addons table instead of its API: real secret values, written "
        "to 0600 files beside the config",
    )
    imp.add_argument(
        "--cut-over",
        action="store_true",
        help="also switch over: record the highest event id, disable the integrations in "
        "Unleash, start the state file's cursor at that id",
    )
    hooks = command("webhooks", "pause or resume a webhook (daemon running or stopped)")
    hooks.add_argument("action", choices=("pause", "resume"))
    hooks.add_argument("name", help="webhook name")
    attempts = command("attempts", "the attempt log: every delivery attempt, newest last")
    attempts.add_argument("--webhook", help="only this webhook")
    attempts.add_argument("--event", type=int, help="only this event id")
    attempts.add_argument("--last", type=int, default=50, help="this many (default 50)")
    attempts.add_argument("--json", action="store_true", help="one JSON object per line")
    again = command("redeliver", "re-read events from Unleash's history and queue them again")
    again.add_argument("--webhook", required=True, help="webhook name")
    again.add_argument("--from-id", type=int, help="first event id (inclusive)")
    again.add_argument("--to-id", type=int, help="last event id (inclusive; default newest)")
    again.add_argument("--since", help="ISO 8601 time (inclusive; UTC without a zone)")
    again.add_argument("--until", help="ISO 8601 time (inclusive; default now)")
    _add_state_command(commands)
    return parser


def _add_state_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    state = commands.add_parser(
        "state", help="move the state to another store", description="Move the state."
    )
    state_actions = state.add_subparsers(dest="action", required=True, metavar="ACTION")
    copy = state_actions.add_parser(
        "copy",
        help="copy the configured state into an empty store (the daemon must be stopped)",
        description="Copy the configured state (cursor, gaps, outbox, dead letters, pauses, "
        "notes, sent parts, attempt log) into an empty PostgreSQL state or SQLite file, in "
        "one transaction, and check the copy. Every daemon on the state must be stopped.",
    )
    copy.add_argument(
        "-c",
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"TOML config file (default {DEFAULT_CONFIG}); its [state] is the source",
    )
    target = copy.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--to",
        type=_database_url,
        metavar="postgresql://...",
        help="the PostgreSQL database to copy into (a password is better kept in "
        "PGPASSWORD or ~/.pgpass than on the command line)",
    )
    target.add_argument("--to-file", type=Path, metavar="PATH", help="a SQLite file to copy into")
    copy.add_argument(
        "--schema",
        type=_schema_name,
        help="schema in the target database (default: the config's state.schema)",
    )


def _database_url(text: str) -> Secret:
    if urlsplit(text).scheme not in ("postgresql", "postgres"):
        raise argparse.ArgumentTypeError(f"{redact_database_url(text)} is not a postgresql:// URL")
    return Secret(text)


def _schema_name(text: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a lower-case SQL identifier (letters, digits, _; at most 63)"
        )
    return text


def _version_argument(text: str) -> str:
    if parse_version(text) is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version like 8.2.0")
    return text


def _load(path: Path) -> Config:
    return load_config(path)


async def _open_exclusive(config: Config, *, create: bool = True) -> StateStore:
    """The state for a command that must run with no daemon on it (it moves the cursor or
    delivers by itself): SQLite's file lock, or on a shared state the lease, taken for the
    command's length. Raises StateLockedError while a daemon holds either."""
    state = await open_state(config.state, create=create, lock=True)
    if state.leadership is None:
        return state
    try:
        leading, view = await state.leadership.try_lead(
            holder_name(config.state.node_name) + "/cli", config.state.lease_ttl_s
        )
    except BaseException:
        await state.close()
        raise
    if not leading:
        await state.close()
        raise StateLockedError(
            f"{state.where}: a daemon ({view.holder}) leads on this state; "
            "stop every daemon on it first"
        )
    return state


async def _close(state: StateStore, config: Config) -> None:
    """Close a state; a lease taken by _open_exclusive is given back first."""
    if state.leadership is not None:
        with contextlib.suppress(StateError):
            await state.leadership.resign(holder_name(config.state.node_name) + "/cli")
    await state.close()


def _cmd_run(config: Config, once: bool) -> int:
    if problem := check_private(config):
        print(problem, file=sys.stderr)
        return EX_CONFIG
    log.configure(config.log_level)
    return asyncio.run(_run(config, once))


async def _open_for_daemon(config: Config, once: bool) -> StateStore:
    """Open the state; a PostgreSQL that cannot be reached yet (down, restarting) is asked
    again with back-off, with one log line, rather than failing the start. Only a state
    unusable for good (StateError) ends the run (exit 74). --once asks once."""
    failures = 0
    while True:
        try:
            return await open_state(config.state)
        except StateUnavailableError as exc:
            if once:
                raise
            failures += 1
            delay = backoff_s(failures, 1.0, 30.0, random.random())  # noqa: S311 - jitter
            if failures == 1:
                log.get().error(
                    "state.unreachable",
                    error=str(exc),
                    retry_in_s=round(delay, 2),
                    detail="nothing is polled or delivered until the state answers; "
                    "asked again with back-off",
                )
            await asyncio.sleep(delay)


async def _run(config: Config, once: bool) -> int:
    try:
        state = await _open_for_daemon(config, once)
    except StateUnavailableError as exc:  # only --once gives up: a daemon waits it out
        print(f"unleash-poller: {exc}; nothing was done, try again later", file=sys.stderr)
        return EX_TEMPFAIL
    try:
        return await App(config, state).run(once=once)
    except sqlite3.DatabaseError as exc:
        # Disk full, read-only file system, permissions or the file damaged under us: stop where we
        # are. Nothing is lost: the cursor never moved past what was written.
        log.get().critical("state.write_failed", error=str(exc), path=str(config.state.path))
        print(
            f"unleash-poller: {config.state.path}: state file failed ({exc}); stopped "
            "without losing anything: fix the cause (disk space, permissions) and start again",
            file=sys.stderr,
        )
        return EX_IOERR
    finally:
        await state.close()


def _cmd_check(config: Config) -> int:
    hooks = ", ".join(f"{h.name} ({h.renderer.describe})" for h in config.webhooks)
    print(f"{config.source_path}: OK — {len(config.webhooks)} webhook(s): {hooks}")
    return 0


def _render_profile(config: Config, version: str | None, url: str | None) -> ServerProfile:
    """The server to render for: as given on the command line, else as it says it is."""
    if version is not None or url is not None:
        return ServerProfile(version, (url or config.unleash.url).rstrip("/"), "command line")
    try:
        profile = asyncio.run(ask_server_profile(config))
    except UnleashError as exc:
        profile, why = None, str(exc)
    else:
        why = "its ui-config did not say"
    if profile is None:
        print(
            f"unleash-poller: could not ask Unleash what it is ({why}); rendering as for "
            f"8.x with links to {config.unleash.url} (--unleash-version and --unleash-url "
            "choose)",
            file=sys.stderr,
        )
        return ServerProfile(None, config.unleash.url, "unleash.url")
    return profile


def _cmd_render(  # noqa: PLR0911 - one exit per kind of bad input
    config: Config, webhook: str, event_path: Path, version: str | None, url: str | None
) -> int:
    try:
        config.webhook(webhook)
    except KeyError as exc:
        print(f"unleash-poller: {exc.args[0]}", file=sys.stderr)
        return EX_USAGE
    config = apply_server_profile(config, _render_profile(config, version, url))
    hook = config.webhook(webhook)
    try:
        event = json.loads(event_path.read_text(encoding="utf-8"))
    except OSError as exc:
        print(f"unleash-poller: {event_path}: cannot read: {exc.strerror}", file=sys.stderr)
        return EX_DATAERR
    except ValueError as exc:
        print(f"unleash-poller: {event_path}: not valid JSON: {exc}", file=sys.stderr)
        return EX_DATAERR
    if not isinstance(event, dict):
        print(f"unleash-poller: {event_path}: must hold one event (a JSON object)", file=sys.stderr)
        return EX_DATAERR
    if hook.provider is not None:
        return _render_requests(hook.provider, webhook, event)
    try:
        body = hook.renderer.render(event)
    except RenderError as exc:
        print(f"unleash-poller: webhook {webhook!r}: {exc}", file=sys.stderr)
        return EX_DATAERR
    sys.stdout.buffer.write(body)
    sys.stdout.buffer.flush()
    return 0


def _render_requests(provider: Configured, webhook: str, event: dict[str, object]) -> int:
    """Every request the provider would send for the event, secrets masked."""
    try:
        requests = provider.requests(event)
    except BuildError as exc:
        print(f"unleash-poller: webhook {webhook!r}: {exc}", file=sys.stderr)
        return EX_DATAERR
    if not requests:
        print(f"webhook {webhook!r} ({provider.provider.name}) sends nothing for this event")
        return 0
    out = sys.stdout.buffer
    for number, request in enumerate(requests, 1):
        part = f" ({request.part})" if request.part else ""
        out.write(f"--- request {number} of {len(requests)}{part}\n".encode())
        out.write(shown(request) + b"\n")
    out.flush()
    return 0


async def _cmd_status(config: Config, as_json: bool) -> int:
    state = await open_state(config.state, create=False, lock=False)
    try:
        pending, dead = await state.pending_counts(), await state.dead_letter_counts()
        pauses = await state.pauses()
        oldest = await state.oldest_pending()
        gaps = await state.gaps()
        now = time.time()
        hooks = sorted({h.name for h in config.webhooks} | set(pending) | set(dead))
        cursor = await state.high_water()
        lease = await state.leadership.lease() if state.leadership is not None else None
        per_hook: dict[str, dict[str, object]] = {
            name: {
                "pending": pending.get(name, 0),
                "dead_letters": dead.get(name, 0),
                "oldest_pending_age_s": round(now - oldest[name], 1) if name in oldest else None,
                "configured": any(h.name == name for h in config.webhooks),
                "paused": None
                if name not in pauses
                else {
                    "reason": pauses[name].reason,
                    "since": _utc(pauses[name].since),
                    "probing": not pauses[name].awaits_resume,
                },
            }
            for name in hooks
        }
    finally:
        await state.close()
    role = _role(config, lease)
    if as_json:
        print(
            json.dumps(
                {
                    "backend": config.state.backend,
                    "where": state.where,
                    "role": role,
                    "lease": None if lease is None else dataclasses.asdict(lease),
                    "cursor": cursor,
                    "gaps": [g.id for g in gaps],
                    "webhooks": per_hook,
                },
                indent=2,
            )
        )
        return 0
    if lease is not None:
        held = (
            f"held by {lease.holder}, epoch {lease.epoch}, "
            + (f"{lease.expires_in_s:.1f}s left" if lease.expires_in_s > 0 else "expired")
            if lease.holder
            else f"free (epoch {lease.epoch})"
        )
        print(f"state: {state.where}; this node: {role}; lease {held}")
    print(
        f"cursor: {cursor}   gaps: {len(gaps)}"
        + (f" (ids {', '.join(str(g.id) for g in gaps[:10])})" if gaps else "")
    )
    for name, row in per_hook.items():
        age = row["oldest_pending_age_s"]
        note = "" if row["configured"] else "   (not in config)"
        paused = pauses.get(name)
        print(
            f"  {name}: "
            + (f"paused since {_utc(paused.since)} ({paused.reason}); " if paused else "")
            + f"pending {row['pending']}, dead letters {row['dead_letters']}"
            + (f", oldest pending {age}s" if age is not None else "")
            + note
        )
    return 0


def _role(config: Config, lease: LeaseView | None) -> str:
    """This host's part: "single" on SQLite; "leader" when the lease's holder is this
    node (by node_name) and still valid, else "standby"."""
    if lease is None:
        return "single"
    node = holder_name(config.state.node_name).rsplit(":", 1)[0]
    if lease.holder is None or lease.expires_in_s <= 0:
        return "standby"
    # A daemon's holder is exactly "<node>:<pid>"; a command's ("<node>:<pid>/cli", while
    # `cursor set` or `state copy` holds the lease) is not this node's daemon leading.
    daemon = re.fullmatch(re.escape(node) + r":\d+", lease.holder) is not None
    return "leader" if daemon else "standby"


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


async def _cmd_dead_letters(config: Config, action: str, webhook: str | None) -> int:
    if webhook is not None:
        try:
            config.webhook(webhook)
        except KeyError as exc:
            print(f"unleash-poller: {exc.args[0]}", file=sys.stderr)
            return EX_USAGE
    if action == "list":
        state = await open_state(config.state, create=False, lock=False)
        try:
            after = -1
            while letters := await state.dead_letters(webhook, after=after):
                for d in letters:
                    failed = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.failed_at))
                    event = json.loads(d.body)
                    print(
                        f"{d.webhook}\t{d.event_id}\t{event.get('type')}\t{failed}\t"
                        f"attempts={d.attempts}\t{d.reason}"
                    )
                after = letters[-1].event_id
        finally:
            await state.close()
        return 0
    return await _replay(config, webhook)


async def _replay(config: Config, webhook: str | None) -> int:
    from poller.replay import replay_dead_letters  # noqa: PLC0415 - see the imports

    try:
        state = await _open_exclusive(config, create=False)
    except StateLockedError:
        # The daemon is running: hand the letters back to it, so it keeps id order.
        state = await open_state(config.state, create=False, lock=False)
        try:
            moved = await state.requeue_dead_letters(webhook)
        finally:
            await state.close()
        print(f"daemon is running: {moved} dead letter(s) moved back to its outbox")
        return 0
    log.configure(config.log_level)

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"\rreplayed {done}/{total}", end="", file=sys.stderr, flush=True)

    try:
        ok, failed = await replay_dead_letters(config, state, webhook, progress)
    finally:
        await _close(state, config)
    print(f"\nreplay: {ok} delivered, {failed} still failing", file=sys.stderr)
    return 0 if failed == 0 else 1


def _known_webhook(config: Config, name: str | None) -> bool:
    """Whether `name` (if given) is configured; prints the one line that says not."""
    if name is None:
        return True
    try:
        config.webhook(name)
    except KeyError as exc:
        print(f"unleash-poller: {exc.args[0]}", file=sys.stderr)
        return False
    return True


async def _open_beside_daemon(config: Config) -> StateStore:
    """The state for a command that writes beside a running daemon or without one (the
    latter also upgrades an old SQLite file). Its writes are the kind a daemon allows."""
    if config.state.url is not None:
        return await open_state(config.state, create=True, lock=False)
    try:
        return await open_state(config.state, create=True, lock=True)
    except StateLockedError:
        return await open_state(config.state, create=False, lock=False)


async def _cmd_webhooks(config: Config, action: str, name: str) -> int:
    if not _known_webhook(config, name):
        return EX_USAGE
    state = await _open_beside_daemon(config)
    try:
        if action == "pause":
            await state.set_pause(
                name, Pause("paused by hand", time.time(), awaits_resume=True, probe_at=math.inf)
            )
            print(f"{name}: paused; its events stay pending until `webhooks resume {name}`")
        else:
            was = await state.resume(name, retry_now=True)
            pending = (await state.pending_counts()).get(name, 0)
            print(
                f"{name}: resumed; {pending} pending event(s) are delivered now"
                if was
                else f"{name}: was not paused ({pending} pending)"
            )
    finally:
        await state.close()
    return 0


async def _cmd_attempts(
    config: Config, webhook: str | None, event_id: int | None, last: int, as_json: bool
) -> int:
    if not _known_webhook(config, webhook):
        return EX_USAGE
    if last <= 0:
        print("unleash-poller: --last must be at least 1", file=sys.stderr)
        return EX_USAGE
    state = await open_state(config.state, create=False, lock=False)
    try:
        records = await state.attempt_log(webhook, event_id, last)
    finally:
        await state.close()
    for r in records:
        when = (
            time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r.at)) + f".{int(r.at % 1 * 1000):03d}Z"
        )
        if as_json:
            print(json.dumps({**dataclasses.asdict(r), "at": when}))
            continue
        result = f"HTTP {r.status}" if r.status is not None else (r.error or "no response")
        latency = "-" if r.latency_ms is None else f"{r.latency_ms:.1f}ms"
        print(f"{when}\t{r.webhook}\t{r.event_id}\t#{r.attempt}\t{result}\t{latency}\t{r.outcome}")
    return 0


async def _cmd_redeliver(config: Config, args: argparse.Namespace) -> int:
    from poller.redeliver import (  # noqa: PLC0415 - see the imports
        Range,
        RangeError,
        parse_time,
        redeliver_from,
    )

    if not _known_webhook(config, args.webhook):
        return EX_USAGE
    try:
        wanted = Range(
            args.from_id,
            args.to_id,
            None if args.since is None else parse_time(args.since, "--since"),
            None if args.until is None else parse_time(args.until, "--until"),
        )
    except RangeError as exc:
        print(f"unleash-poller: redeliver: {exc}", file=sys.stderr)
        return EX_USAGE
    log.configure(config.log_level)
    state = await _open_beside_daemon(config)
    shown = [0.0]

    def progress(read: int, doing: str) -> None:
        now = time.monotonic()
        if now - shown[0] >= 1.0:
            shown[0] = now
            print(f"\rread {read} event(s): {doing}", end="", file=sys.stderr, flush=True)

    try:
        result = await redeliver_from(config, state, config.webhook(args.webhook), wanted, progress)
    except RangeError as exc:
        print(f"\nunleash-poller: redeliver: {exc}", file=sys.stderr)
        return EX_DATAERR
    except UnleashError as exc:
        print(f"\nunleash-poller: redeliver: Unleash: {exc}", file=sys.stderr)
        return EX_UNAVAILABLE
    finally:
        await state.close()
    print(f"\nredeliver: {result.method}", file=sys.stderr)
    extra = f", {result.already_pending} already pending" if result.already_pending else ""
    print(f"{result.queued} queued, {result.filtered_out} filtered out{extra}")
    return 0


async def _cmd_cursor(config: Config, event_id: int) -> int:
    if event_id < 0:
        print("unleash-poller: event id must be >= 0", file=sys.stderr)
        return EX_USAGE
    try:
        state = await _open_exclusive(config)
    except StateLockedError:
        print(
            "unleash-poller: stop the daemon first (systemctl stop unleash-poller); "
            "the cursor cannot move under a running daemon",
            file=sys.stderr,
        )
        return EX_IOERR
    try:
        old = await state.high_water()
        await state.set_cursor(event_id)
    finally:
        await _close(state, config)
    print(f"cursor moved from {old} to {event_id}; events with a greater id will be delivered")
    return 0


def _where(state: StateConfig) -> str:
    """A state as messages name it before it is open (never with a password)."""
    if state.url is None:
        return str(state.path)
    return f"{redact_database_url(state.url.reveal())} (schema {state.schema})"


async def _cmd_state_copy(config: Config, args: argparse.Namespace) -> int:
    """Copy the configured state into an empty one; both are held exclusively meanwhile
    (SQLite's lock, PostgreSQL's lease), so no daemon changes either while it runs."""
    from poller.state.copy import TargetNotEmptyError, copy_state  # noqa: PLC0415 - see the imports

    if args.to is not None:
        to_state = dataclasses.replace(
            config.state, url=args.to, schema=args.schema or config.state.schema
        )
    else:
        to_state = dataclasses.replace(config.state, path=args.to_file.absolute(), url=None)
        if config.state.url is None and to_state.path.resolve() == config.state.path.resolve():
            print(f"unleash-poller: state copy: {to_state.path} is the source", file=sys.stderr)
            return EX_REFUSED
    try:
        source = await _open_exclusive(config, create=False)
    except StateLockedError:
        print(
            f"unleash-poller: state copy: {_where(config.state)}: a daemon is running on "
            "this state; stop it first (systemctl stop unleash-poller)",
            file=sys.stderr,
        )
        return EX_REFUSED
    try:
        target_config = dataclasses.replace(config, state=to_state)
        try:
            target = await _open_exclusive(target_config)
        except StateLockedError:
            print(
                f"unleash-poller: state copy: {_where(to_state)}: a daemon is running on the "
                "target; stop it, it must not start there before the copy is done",
                file=sys.stderr,
            )
            return EX_REFUSED
        try:
            summary = await copy_state(source, target)
        except TargetNotEmptyError as exc:
            print(f"unleash-poller: state copy: {exc}", file=sys.stderr)
            return EX_REFUSED
        except sqlite3.DatabaseError as exc:
            print(
                f"unleash-poller: state copy: {target.where}: writing failed ({exc}); "
                "nothing was copied",
                file=sys.stderr,
            )
            return EX_IOERR
        finally:
            await _close(target, target_config)
    finally:
        await _close(source, config)
    print(summary.line(source.where, target.where))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from poller.importer import (  # noqa: PLC0415 - see the imports
        ImporterError,
        ImportOptions,
        import_summary,
        run_import,
    )

    token = None
    if args.token_file is not None:
        try:
            token = Secret(args.token_file.read_text(encoding="utf-8").strip())
        except OSError as exc:
            print(
                f"unleash-poller: {args.token_file}: cannot read: {exc.strerror}", file=sys.stderr
            )
            return EX_USAGE
    elif os.environ.get(TOKEN_ENV):
        token = Secret(os.environ[TOKEN_ENV])
    else:
        print(f"unleash-poller: import needs --token-file or ${TOKEN_ENV}", file=sys.stderr)
        return EX_USAGE
    options = ImportOptions(
        unleash_url=args.unleash,
        token=token,
        token_file=args.token_file.resolve() if args.token_file else None,
        output=args.output,
        state_path=args.state.resolve(),
        database=args.database,
        cut_over=args.cut_over,
    )
    try:
        result = asyncio.run(run_import(options))
    except ImporterError as exc:
        print(f"unleash-poller: import: {exc}", file=sys.stderr)
        return exc.exit_code
    for line in import_summary(result):
        print(line)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "import":
        return _cmd_import(args)
    try:
        config = _load(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EX_CONFIG
    commands = {
        "run": lambda: _cmd_run(config, args.once),
        "check": lambda: _cmd_check(config),
        "render": lambda: _cmd_render(
            config, args.webhook, args.event, args.unleash_version, args.unleash_url
        ),
        "status": lambda: asyncio.run(_cmd_status(config, args.json)),
        "dead-letters": lambda: asyncio.run(_cmd_dead_letters(config, args.action, args.webhook)),
        "cursor": lambda: asyncio.run(_cmd_cursor(config, args.event_id)),
        "webhooks": lambda: asyncio.run(_cmd_webhooks(config, args.action, args.name)),
        "attempts": lambda: asyncio.run(
            _cmd_attempts(config, args.webhook, args.event, args.last, args.json)
        ),
        "redeliver": lambda: asyncio.run(_cmd_redeliver(config, args)),
        "state": lambda: asyncio.run(_cmd_state_copy(config, args)),
    }
    try:
        return commands[args.command]()
    except StateError as exc:
        print(f"unleash-poller: {exc}", file=sys.stderr)
        return EX_IOERR
    except KeyboardInterrupt:
        return 130

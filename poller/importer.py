"""`unleash-poller import`: Unleash's own integrations → a poller config, and the cut-over.

Reading is split from writing so each part is tested without a server: `parse_addons` and
`addon_from_row` turn what Unleash holds into `Integration`s; `plan_webhook` maps one of
them to our keys (camelCase → snake_case, masked secrets → `*_file`); `render_config`
writes the TOML. `run_import` does the I/O: the admin API or the `addons` table, the
files, and with `cut_over` the switch (highest event id, integrations disabled, cursor).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp

from poller.config import Secret, UnleashConfig
from poller.render import ServerProfile
from poller.source import UnleashError, UnleashSource, read_capped, read_server_profile
from poller.state import SqliteState, StateError, StateLockedError
from poller.urls import scrub_urls

# What Unleash's admin API answers in place of a sensitive parameter's value.
MASKED = "*****"
Kind = Literal["text", "secret", "headers", "list"]

# Per Unleash provider: its parameter names → our key and what kind of value it is. The
# secret ones are the parameters Unleash 8.2.0's definitions mark sensitive (except
# customHeaders, which is a table in our config; see README "import").
PARAMETERS: dict[str, dict[str, tuple[str, Kind]]] = {
    "webhook": {
        "url": ("url", "secret"),
        "contentType": ("content_type", "text"),
        "authorization": ("authorization", "secret"),
        "customHeaders": ("headers", "headers"),
        "bodyTemplate": ("body_template", "text"),
    },
    "slack-app": {
        "accessToken": ("access_token", "secret"),
        "defaultChannels": ("default_channels", "list"),
    },
    "slack": {
        "url": ("url", "secret"),
        "username": ("username", "text"),
        "emojiIcon": ("emoji_icon", "text"),
        "defaultChannel": ("default_channel", "text"),
        "customHeaders": ("headers", "headers"),
    },
    "teams": {"url": ("url", "secret"), "customHeaders": ("headers", "headers")},
    "teamsworkflow": {"url": ("url", "secret"), "customHeaders": ("headers", "headers")},
    "datadog": {
        "url": ("url", "text"),
        "apiKey": ("api_key", "secret"),
        "sourceTypeName": ("source_type_name", "text"),
        "customHeaders": ("headers", "headers"),
        "bodyTemplate": ("body_template", "text"),
    },
    "new-relic": {
        "url": ("url", "text"),
        "licenseKey": ("license_key", "secret"),
        "customHeaders": ("headers", "headers"),
        "bodyTemplate": ("body_template", "text"),
    },
}


EX_DATAERR = 65  # what Unleash holds cannot be imported (an unknown provider, ...)
EX_UNAVAILABLE = 69  # Unleash (or its database) could not be read or changed
EX_CANTCREAT = 73  # an output file cannot be written


class ImporterError(Exception):
    """The import cannot go on; the message is one line saying where and what."""

    def __init__(self, message: str, exit_code: int = EX_DATAERR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Integration:
    """One of Unleash's integrations ("addons"), as its API or its table holds it."""

    id: int
    provider: str
    description: str
    enabled: bool
    parameters: Mapping[str, object] = field(repr=False)  # may hold real secrets
    events: tuple[str, ...]
    projects: tuple[str, ...]
    environments: tuple[str, ...]


def _strings(value: object, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ImporterError(f"{where}: must be a list of strings, not {value!r:.60}")
    return tuple(value)


def addon_from_row(row: Mapping[str, object], where: str = "addon") -> Integration:
    """One integration from the API's JSON or a row of the `addons` table."""
    addon_id = row.get("id")
    if not isinstance(addon_id, int) or isinstance(addon_id, bool):
        raise ImporterError(f"{where}: has no integer id")
    where = f"integration {addon_id}"
    provider = row.get("provider")
    if not isinstance(provider, str) or not provider:
        raise ImporterError(f"{where}: has no provider")
    parameters = row.get("parameters", {})
    parameters = {} if parameters is None else parameters
    if not isinstance(parameters, dict):
        raise ImporterError(f"{where}: parameters is not an object")
    description = row.get("description")
    return Integration(
        id=addon_id,
        provider=provider,
        description=description if isinstance(description, str) else "",
        enabled=row.get("enabled") is True,
        parameters=parameters,
        events=_strings(row.get("events"), f"{where}.events"),
        projects=_strings(row.get("projects"), f"{where}.projects"),
        environments=_strings(row.get("environments"), f"{where}.environments"),
    )


def parse_addons(body: bytes) -> list[Integration]:
    """`GET /api/admin/addons` → its integrations, in id order."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ImporterError("GET /api/admin/addons: the answer is not JSON") from None
    addons = data.get("addons") if isinstance(data, dict) else None
    if not isinstance(addons, list):
        raise ImporterError("GET /api/admin/addons: the answer has no 'addons' list")
    integrations = []
    for index, row in enumerate(addons):
        if not isinstance(row, dict):
            raise ImporterError(f"GET /api/admin/addons: addons[{index}] is not an object")
        integrations.append(addon_from_row(row, f"addons[{index}]"))
    return sorted(integrations, key=lambda i: i.id)


# --------------------------------------------------------------------------- mapping


@dataclass(frozen=True)
class SecretFile:
    """A file the config reads a secret from: written by the import (`value` known, from
    the database) or left for the operator to fill (`value` None, masked by the API)."""

    path: Path
    place: str  # e.g. 'webhook-3 url' (what it holds, for the listing)
    value: Secret | None = field(repr=False)


@dataclass(frozen=True)
class WebhookPlan:
    integration: Integration
    name: str
    keys: tuple[tuple[str, object], ...]  # our keys, in the order they are written
    secret_files: tuple[SecretFile, ...]
    notes: tuple[str, ...]  # comment lines above the table (left-out parameters, ...)

    @property
    def active(self) -> bool:
        """Written as a live [[webhooks]] table (else commented out)."""
        return self.integration.enabled and bool(self.integration.events)


def _headers(value: object) -> dict[str, str] | None:
    """customHeaders is a JSON object in a string; Unleash ignores one it cannot parse."""
    if isinstance(value, dict):
        parsed: object = value
    elif isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            return None
    else:
        return None
    if not isinstance(parsed, dict):
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in parsed.items()}


def _all(values: tuple[str, ...]) -> bool:
    return not values or "*" in values


def plan_webhook(integration: Integration, secrets_dir: Path) -> WebhookPlan:
    """Our [[webhooks]] table for one Unleash integration."""
    mapping = PARAMETERS.get(integration.provider)
    if mapping is None:
        raise ImporterError(
            f"integration {integration.id}: unknown provider {integration.provider!r} "
            f"(known: {', '.join(PARAMETERS)})"
        )
    name = f"{integration.provider}-{integration.id}"
    keys: list[tuple[str, object]] = [("name", name), ("provider", integration.provider)]
    if integration.events:
        keys.append(("events", list(integration.events)))
    if not _all(integration.projects):
        keys.append(("projects", list(integration.projects)))
    if not _all(integration.environments):
        keys.append(("environments", list(integration.environments)))
    files: list[SecretFile] = []
    notes: list[str] = []
    for parameter, value in integration.parameters.items():
        if parameter not in mapping:
            notes.append(
                f"parameter {parameter!r} is not known for {integration.provider}; left out"
            )
        elif value is not None and value != "":  # Unleash treats empty as not set
            key, kind = mapping[parameter]
            if kind == "secret":
                path = secrets_dir / f"{name}.{key}"
                known = None if value == MASKED else Secret(str(value))
                files.append(SecretFile(path, f"{name} {key}", known))
                keys.append((f"{key}_file", str(path)))
            else:
                mapped, note = _plain_value(kind, value)
                keys += [(key, mapped)] if mapped is not None else []
                notes += [note] if note else []
    if not integration.events:
        notes.append("its event list is empty, so Unleash sends it nothing; left commented out")
    if not integration.enabled:
        notes.append("disabled in Unleash; uncomment to use it")
    return WebhookPlan(integration, name, tuple(keys), tuple(files), tuple(notes))


def _plain_value(kind: Kind, value: object) -> tuple[object | None, str | None]:
    """A parameter that is not a secret → (our value or None, a note for the comment)."""
    if kind == "headers":
        if value == MASKED:
            return None, (
                "headers: Unleash's API masks customHeaders; copy them here by hand "
                '(as headers = { Name = "value" }) or import with --database'
            )
        headers = _headers(value)
        if headers is None:
            return None, "customHeaders is not a JSON object (Unleash ignores it); left out"
        return (headers or None), None
    if kind == "list":
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        return (items or None), None
    return str(value), None


# --------------------------------------------------------------------------- TOML


def toml_value(value: object) -> str:
    """A TOML value for a string, a list of strings or a table of strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # JSON's escapes are TOML's; TOML also forbids a raw DEL, and \ud800-style escapes
        # of a lone surrogate, which JSON would write (so it becomes U+FFFD, as Node sends).
        text = value.encode("utf-8", "replace").decode("utf-8") if _has_surrogate(value) else value
        return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{toml_value(str(k))} = {toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= char <= "\udfff" for char in text)


def _comment(text: str) -> str:
    return "# " + re.sub(r"[\r\n]+", " ", text)


@dataclass(frozen=True)
class ConfigPlan:
    unleash_url: str
    token_file: Path | None
    state_path: Path
    start_from: int | None
    webhooks: tuple[WebhookPlan, ...]
    source: str  # where the integrations were read from
    server: ServerProfile | None = None


def render_config(plan: ConfigPlan) -> str:
    """The config file's text: live tables for enabled integrations, comments for the rest."""
    lines = [
        f"# Written by `unleash-poller import` from {plan.source}.",
        "# One [[webhooks]] table per Unleash integration; disabled ones are comments.",
    ]
    if plan.server is not None and plan.server.version:
        lines.append(
            f"# Unleash {plan.server.version} (its unleashUrl: {plan.server.unleash_url})."
        )
    lines += ["", "[unleash]", f"url = {toml_value(plan.unleash_url)}"]
    if plan.token_file is not None:
        lines.append(f"token_file = {toml_value(str(plan.token_file))}")
    else:
        lines.append("# token: set token_file, token_env, $UNLEASH_POLLER_TOKEN or the credential")
    if plan.start_from is not None:
        lines.append(
            f"# --cut-over: {plan.start_from} was the highest event id when Unleash's own "
            "integrations were disabled"
        )
        lines.append(f"start_from = {plan.start_from}")
    lines += ["", "[state]", f"path = {toml_value(str(plan.state_path))}"]
    for hook in plan.webhooks:
        integration = hook.integration
        lines.append("")
        title = f"Unleash integration {integration.id} ({integration.provider})"
        if integration.description:
            title += f": {integration.description}"
        lines.append(_comment(title))
        lines += [_comment(note) for note in hook.notes]
        table = ["[[webhooks]]"] + [f"{key} = {toml_value(value)}" for key, value in hook.keys]
        lines += table if hook.active else [f"# {line}" for line in table]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class ImportOptions:
    unleash_url: str
    token: Secret | None
    token_file: Path | None
    output: Path
    state_path: Path
    database: str | None = None
    cut_over: bool = False
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ImportResult:
    config_path: Path
    webhooks: tuple[WebhookPlan, ...]
    to_fill: tuple[SecretFile, ...]  # masked by the API: the operator writes these
    written: tuple[SecretFile, ...]  # real values from the database, written 0600
    start_from: int | None = None
    disabled: tuple[int, ...] = ()  # integration ids disabled by --cut-over
    notes: tuple[str, ...] = ()


def _unleash_config(options: ImportOptions) -> UnleashConfig:
    return UnleashConfig(
        url=options.unleash_url.rstrip("/"),
        token=options.token or Secret(""),
        public_url=None,
        timeout_s=options.timeout_s,
    )


async def _api(
    session: aiohttp.ClientSession, config: UnleashConfig, method: str, path: str, body: object
) -> bytes:
    """One admin API call; any failure is one line."""
    try:
        async with session.request(
            method,
            config.url + path,
            json=body,
            headers={"Authorization": config.token.reveal(), "Accept": "application/json"},
            allow_redirects=False,
        ) as resp:
            data = await read_capped(resp, config.max_page_bytes)
            status = resp.status
    except UnleashError as exc:  # an answer over the limit: not read further
        raise ImporterError(f"{method} {config.url}{path}: {exc}", EX_UNAVAILABLE) from None
    except TimeoutError:
        raise ImporterError(
            f"{method} {config.url}{path}: no answer in {config.timeout_s:g}s", EX_UNAVAILABLE
        ) from None
    except aiohttp.ClientError as exc:
        # aiohttp's text names URLs in full (a proxy's 407: with its user info).
        where = f"{method} {config.url}{path}"
        raise ImporterError(f"{where}: {scrub_urls(str(exc))}", EX_UNAVAILABLE) from None
    if status in (401, 403):
        raise ImporterError(
            f"{method} {config.url}{path}: {status} — the token is missing, wrong or not an "
            "admin token",
            EX_UNAVAILABLE,
        )
    if not 200 <= status < 300:
        raise ImporterError(
            f"{method} {config.url}{path}: unexpected status {status}", EX_UNAVAILABLE
        )
    return data


def read_addons_table(dsn: str) -> list[Integration]:
    """Unleash's `addons` table: the real (unmasked) parameter values."""
    try:
        import psycopg  # noqa: PLC0415 - an optional dependency, needed only here
    except ImportError:
        raise ImporterError(
            "--database needs psycopg: pip install 'unleash-poller[postgres]'"
        ) from None
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT id, provider, description, enabled, parameters, events, projects,"
                " environments FROM addons ORDER BY id"
            )
            columns = [c.name for c in cursor.description or ()]
            rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    except psycopg.Error as exc:
        # The DSN may hold a password: name the database by host/name only.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImporterError(
            f"--database: cannot read the addons table: {first}", EX_UNAVAILABLE
        ) from None
    return [addon_from_row(row) for row in rows]


async def _highest_event_id(source: UnleashSource) -> int:
    await source.detect()
    page = await source.read(0, 100)
    return max((int(e["id"]) for e in page.events), default=0)  # type: ignore[call-overload]


def _disable_body(integration: Integration) -> dict[str, object]:
    """The PUT that disables an integration. Masked values are sent back as masked:
    Unleash then keeps what it holds, so nothing is lost if the import is undone."""
    return {
        "provider": integration.provider,
        "description": integration.description,
        "enabled": False,
        "parameters": dict(integration.parameters),
        "events": list(integration.events),
        "projects": list(integration.projects),
        "environments": list(integration.environments),
    }


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(fd, 0o600)
        file.write(text)


async def run_import(options: ImportOptions) -> ImportResult:
    """Read the integrations, write the config (and, from the database, the secret files);
    with `cut_over`, record the highest event id, disable the integrations in Unleash and
    set the state file's cursor to that id. Raises ImporterError with one line."""
    config = _unleash_config(options)
    secrets_dir = options.output.parent.resolve() / "secrets"
    timeout = aiohttp.ClientTimeout(total=options.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        source = UnleashSource(session, config)
        try:
            server = await read_server_profile(source)
        except UnleashError as exc:
            raise ImporterError(
                f"cannot read Unleash at {config.url}: {exc}", EX_UNAVAILABLE
            ) from None
        if options.database:
            integrations = await asyncio.to_thread(read_addons_table, options.database)
            where = "Unleash's addons table (real values)"
        else:
            body = await _api(session, config, "GET", "/api/admin/addons", None)
            integrations = parse_addons(body)
            where = f"{config.url}/api/admin/addons (secrets masked)"
        # Every integration is mapped before anything changes: a bad one stops the import.
        plans = tuple(plan_webhook(i, secrets_dir) for i in integrations)
        if not plans:
            raise ImporterError(f"{config.url}: Unleash has no integrations to import")
        start_from = None
        if options.cut_over:
            try:
                start_from = await _highest_event_id(source)
            except UnleashError as exc:
                raise ImporterError(
                    f"--cut-over: cannot read the event log: {exc}", EX_UNAVAILABLE
                ) from None
        text = render_config(
            ConfigPlan(
                config.url,
                options.token_file,
                options.state_path,
                start_from,
                plans,
                where,
                server,
            )
        )
        written = _write_outputs(options.output, text, plans)
        disabled: list[int] = []
        if options.cut_over:
            assert start_from is not None
            to_disable = [h.integration for h in plans if h.integration.enabled]
            for integration in to_disable:
                path = f"/api/admin/addons/{integration.id}"
                try:
                    await _api(session, config, "PUT", path, _disable_body(integration))
                except ImporterError as exc:
                    raise ImporterError(
                        _cut_over_halfway(exc, to_disable, disabled, options.output, start_from),
                        exc.exit_code,
                    ) from None
                disabled.append(integration.id)
            await _set_start_cursor(options.state_path, start_from)
    to_fill = tuple(
        f for hook in plans if hook.active for f in hook.secret_files if f.value is None
    )
    return ImportResult(options.output, plans, to_fill, written, start_from, tuple(disabled))


def _cut_over_halfway(
    error: ImporterError,
    to_disable: Sequence[Integration],
    disabled: Sequence[int],
    config_path: Path,
    start_from: int,
) -> str:
    """What a cut-over that failed partway left behind, and how to finish it by hand."""

    def named(integrations: Iterable[Integration]) -> str:
        return ", ".join(f"{i.provider} #{i.id}" for i in integrations) or "none"

    done = [i for i in to_disable if i.id in disabled]
    left = [i for i in to_disable if i.id not in disabled]
    return (
        f"--cut-over stopped halfway: {error}. Disabled in Unleash: {named(done)}; still "
        f"enabled: {named(left)}; the state file's cursor was NOT set. To finish by hand: "
        f"disable those still enabled in Unleash, then run "
        f"`unleash-poller cursor set -c {config_path} {start_from}` before starting the poller"
    )


def _write_outputs(output: Path, text: str, plans: Sequence[WebhookPlan]) -> tuple[SecretFile, ...]:
    written = []
    target = output
    try:
        for hook in plans:
            if not hook.active:
                continue  # a disabled integration's secrets stay in Unleash
            for secret in hook.secret_files:
                target = secret.path
                if secret.value is not None:
                    _write_private(secret.path, secret.value.reveal())
                    written.append(secret)
                else:
                    secret.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target = output
        # Headers read from the database may hold credentials: the file is private.
        _write_private(output, text)
    except OSError as exc:
        raise ImporterError(f"{target}: cannot write: {exc.strerror}", EX_CANTCREAT) from None
    return tuple(written)


async def _set_start_cursor(path: Path, event_id: int) -> None:
    """The new state file starts after `event_id` (an existing one is moved there)."""
    try:
        state = SqliteState.open(path, create=True, lock=True)
    except StateLockedError:
        raise ImporterError(
            f"--cut-over: {path} is in use by a running daemon; the integrations are "
            f"disabled: stop it and run `unleash-poller cursor set -c CONFIG {event_id}`",
            EX_CANTCREAT,
        ) from None
    except (StateError, OSError) as exc:
        raise ImporterError(
            f"--cut-over: {path}: {exc}; the integrations are disabled: run "
            f"`unleash-poller cursor set -c CONFIG {event_id}` once it is fixed",
            EX_CANTCREAT,
        ) from None
    try:
        await state.set_cursor(event_id)
    finally:
        await state.close()


def import_summary(result: ImportResult) -> list[str]:
    """What `import` prints: what was written, the files to fill, what the cut-over did."""
    live = [h for h in result.webhooks if h.active]
    lines = [
        f"wrote {result.config_path}: {len(live)} webhook(s) "
        + ", ".join(f"{h.name}" for h in live)
        + (
            f"; {len(result.webhooks) - len(live)} left as comments"
            if len(live) < len(result.webhooks)
            else ""
        )
    ]
    if result.written:
        lines.append(f"wrote {len(result.written)} secret file(s) (mode 0600):")
        lines += [f"  {f.path}  ({f.place})" for f in result.written]
    if result.to_fill:
        lines.append(
            "Unleash's API masks these secrets; write each value into its file, then run "
            f"`unleash-poller check -c {result.config_path}`:"
        )
        lines += [f"  {f.path}  ({f.place})" for f in result.to_fill]
    lines += [f"note: {h.name}: {n}" for h in live for n in h.notes if n.startswith("headers")]
    if result.start_from is not None:
        lines.append(
            f"cut-over: highest event id was {result.start_from}; disabled integration(s) "
            f"{', '.join(map(str, result.disabled)) or 'none'} in Unleash; the state file "
            f"starts after {result.start_from}. Unleash keeps using its cached integrations "
            "for up to 60 s: events in that window may arrive twice, none is lost."
        )
    return lines

"""TOML configuration → frozen, fully validated dataclasses.

Every problem is collected (not just the first) and named by its place, e.g.
``webhooks[1].url: must be an http(s) URL``, so an operator fixes a file in one pass.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlsplit

from poller import mustache
from poller.backoff import backoff_s
from poller.filters import tag_pattern_problem
from poller.providers import PROVIDERS, WEBHOOK
from poller.providers import names as provider_names
from poller.providers.base import Configured, Param, Provider, Settings
from poller.render import (
    DEFAULT_MAX_BODY_BYTES,
    BadTemplateError,
    Escape,
    Renderer,
    RenderError,
    ServerProfile,
    build_renderer,
    offline_profile,
)
from poller.signing import Signer, SigningSecretError
from poller.tls import TlsConfigError, client_ssl_context
from poller.urls import proxy_for

EX_CONFIG = 78
TOKEN_ENV = "UNLEASH_POLLER_TOKEN"  # noqa: S105 - a variable name, not a secret

StartFrom = Literal["latest", "earliest"] | int
Engine = Literal["mustache", "jinja2"]


class Secret:
    """A string that never shows itself in a repr, a str() or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class UnleashConfig:
    url: str
    token: Secret
    # None: links follow the `unleashUrl` the server reports (GET /api/admin/ui-config).
    public_url: str | None
    # An idle poll is one conditional request (~1 ms of CPU): 0.4 s keeps the daemon under
    # 0.3 % of a core while its median latency is under half of Unleash's own integration's.
    poll_interval_s: float = 0.4
    start_from: StartFrom = "latest"
    timeout_s: float = 10.0
    page_size: int = 1000
    gap_grace_s: float = 300.0
    backoff_max_s: float = 60.0
    max_page_bytes: int = 32 * 1024 * 1024
    # The cheap probe trusts a 304; a proxy that answers 304 to every probe would hide new
    # events for good, so the log is also read without it at least this often.
    full_read_interval_s: float = 60.0
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    proxy: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class WebhookConfig:
    name: str
    url: str
    renderer: Renderer
    events: tuple[str, ...] | None = None
    projects: tuple[str, ...] | None = None
    environments: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    content_type: str = "application/json"
    authorization: Secret | None = None
    headers: tuple[tuple[str, str], ...] = ()
    retries: int = 1
    retry_schedule_s: tuple[float, ...] = ()
    timeout_s: float = 10.0
    max_in_flight: int = 1
    # Delivery controls (see poller.schedule).
    max_per_second: float | None = None
    max_rate_limit_wait_s: float = 3600.0
    pause_after_failures: int = 5
    probe_interval_s: float = 60.0
    attempt_log_size: int = 1000
    signer: Signer | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    proxy: str | None = field(default=None, repr=False)  # may carry proxy credentials
    # What the renderer is built from, so it can be rebuilt for the server's profile.
    body_template: str | None = None
    template_engine: Engine = "mustache"
    escape: Escape | None = None  # None: follows the server's version
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Set for a webhook with a `provider` other than "webhook": it builds the requests
    # (and `renderer` is unused); None is the poller's own webhook.
    provider: Configured | None = None

    @property
    def ordered(self) -> bool:
        return self.max_in_flight == 1

    @functools.cached_property
    def retry_delays(self) -> tuple[float, ...]:
        """Delay before each retry: the explicit schedule, or `retries` short waits (worked
        out once: it is read after every delivery)."""
        if self.retry_schedule_s:
            return self.retry_schedule_s
        return tuple(backoff_s(i, 1.0, 30.0) for i in range(self.retries))


@dataclass(frozen=True)
class StateConfig:
    """Where the state lives: a SQLite file (`path`, the default), or PostgreSQL (`url`)
    shared by several daemons, one of which leads under a lease."""

    path: Path
    url: Secret | None = None  # postgresql://…; may carry the password
    schema: str = "unleash_poller"
    lease_ttl_s: float = 15.0
    node_name: str | None = None  # names this host in the lease; default: the host name

    @property
    def backend(self) -> str:
        return "sqlite" if self.url is None else "postgresql"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "host:port"; None serves no HTTP at all


@dataclass(frozen=True)
class Config:
    unleash: UnleashConfig
    state: StateConfig
    webhooks: tuple[WebhookConfig, ...]
    log_level: str = "info"
    drain_timeout_s: float = 10.0
    trust_env: bool = False
    metrics: MetricsConfig = MetricsConfig()
    # Places of secrets written into the file itself (the file must then be private).
    inline_secrets: tuple[str, ...] = ()
    source_path: Path | None = field(default=None, compare=False)
    # The server the renderers were built for (offline_profile until Unleash is asked).
    server: ServerProfile | None = field(default=None, compare=False)

    def webhook(self, name: str) -> WebhookConfig:
        for hook in self.webhooks:
            if hook.name == name:
                return hook
        known = ", ".join(h.name for h in self.webhooks) or "none"
        raise KeyError(f"no webhook named {name!r} (configured: {known})")


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


T = TypeVar("T")


class _Checker:
    """Collects problems while reading a TOML table, each tagged with its place."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, place: str, message: str) -> None:
        problem = f"{place}: {message}"
        # One line per problem, whatever a key or a value in it holds.
        self.problems.append(problem if problem.isprintable() else _escaped(problem))

    def table(self, data: object, place: str, allowed: set[str]) -> Mapping[str, object]:
        if not isinstance(data, dict):
            self.fail(place, "must be a table")
            return {}
        for key in sorted(set(data) - allowed):
            self.fail(f"{place}.{key}" if place else key, "unknown key")
        return data

    def get(
        self,
        table: Mapping[str, object],
        place: str,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: T,
        check: Callable[[T], str | None] | None = None,
        /,
    ) -> T:
        if key not in table:
            return default
        value = table[key]
        where = f"{place}.{key}" if place else key
        # bool is an int in Python; a TOML `true` where a number belongs is a mistake.
        if isinstance(value, bool) and kind is not bool:
            self.fail(where, f"must be {_kind_name(kind)}, not a boolean")
            return default
        if not isinstance(value, kind):
            self.fail(where, f"must be {_kind_name(kind)}, not {_toml_type(value)}")
            return default
        if kind == (int, float) or kind is float:
            value = float(value)  # type: ignore[arg-type]
        if check is not None and (problem := check(value)):  # type: ignore[arg-type]
            self.fail(where, problem)
            return default
        return value  # type: ignore[return-value]

    def string_list(
        self, table: Mapping[str, object], place: str, key: str
    ) -> tuple[str, ...] | None:
        if key not in table:
            return None
        value = table[key]
        where = f"{place}.{key}"
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(where, "must be a list of non-empty strings")
            return None
        if not value:
            self.fail(where, 'must not be empty (omit it, or use ["*"], to mean all)')
            return None
        return None if "*" in value else tuple(value)


def _escaped(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }
    if isinstance(kind, tuple):
        return "a number" if set(kind) == {int, float} else " or ".join(names[k] for k in kind)
    return names.get(kind, kind.__name__)


def _toml_type(value: object) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "a boolean",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


def _positive(value: float) -> str | None:
    return None if value > 0 and math.isfinite(value) else "must be greater than 0"


def _rate(value: float) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return "must be a number of deliveries per second greater than 0 (e.g. 1 or 0.5)"
    return None


def _rate_limit_wait(value: float) -> str | None:
    # Retry-After is read up to an hour (deliver.RETRY_AFTER_MAX_S): a longer bound could
    # not tell a receiver's "two hours" from "one".
    if not math.isfinite(value) or not 0 < value <= 3600:
        return "must be greater than 0 and at most 3600 (the longest Retry-After honoured)"
    return None


def _at_least(low: int) -> Callable[[int], str | None]:
    return lambda v: None if v >= low else f"must be at least {low}"


def _between(low: int, high: int) -> Callable[[int], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low} and {high}"


def _listen(value: str) -> str | None:
    try:
        parse_listen(value)
    except ValueError as exc:
        return str(exc)
    return None


def _http_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http(s) URL"
    return None


_LISTEN = re.compile(r"(?:\[(?P<v6>[^\[\]]+)\]|(?P<host>[^:\[\]]*)):(?P<port>[0-9]{1,5})")


def parse_listen(listen: str) -> tuple[str, int]:
    """ "host:port", "[v6]:port" or ":port" (all addresses) → (host, port)."""
    match = _LISTEN.fullmatch(listen)
    port = int(match["port"]) if match else -1
    if not match or not 0 <= port <= 65535:
        raise ValueError('must be "host:port" (e.g. "127.0.0.1:9464" or "[::1]:9464")')
    return match["v6"] or match["host"] or "", port


# Each is used with fullmatch: `$` would also match before a final newline.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# An HTTP field value (RFC 9110): visible characters, spaces and tabs; no control
# characters (aiohttp refuses CR, LF and NUL with an exception, receivers the others), and
# no lone surrogate (which an environment variable can hold), since it cannot be encoded.
_HEADER_VALUE = re.compile("[\t\x20-\x7e\x80-\ud7ff\ue000-\U0010ffff]*")
SECRET_FILE_MAX_BYTES = 64 * 1024
CONFIG_FILE_MAX_BYTES = 16 * 1024 * 1024  # templates included
_LOG_LEVELS = ("debug", "info", "warning", "error")

_TLS_KEYS = {"ca_file", "client_cert_file", "client_key_file"}
_SIGNATURE_HEADERS = {"webhook-id", "webhook-timestamp", "webhook-signature"}
_UNLEASH_KEYS = _TLS_KEYS | {
    "url",
    "token",
    "token_file",
    "token_env",
    "public_url",
    "poll_interval_s",
    "start_from",
    "timeout_s",
    "page_size",
    "gap_grace_s",
    "backoff_max_s",
    "max_page_bytes",
    "full_read_interval_s",
}
_WEBHOOK_KEYS = _TLS_KEYS | {
    "name",
    "provider",
    "url",
    "url_file",
    "url_env",
    "events",
    "projects",
    "environments",
    "tags",
    "content_type",
    "authorization",
    "authorization_file",
    "authorization_env",
    "headers",
    "body_template",
    "template_engine",
    "escape",
    "retries",
    "retry_schedule_s",
    "timeout_s",
    "max_in_flight",
    "signing_secret",
    "signing_secret_file",
    "signing_secret_env",
    "signing_secrets",
    "max_per_second",
    "max_rate_limit_wait_s",
    "pause_after_failures",
    "probe_interval_s",
    "attempt_log_size",
    "proxy",
    "max_body_bytes",
}


def _read_secret_file(check: _Checker, place: str, path_text: str, base: Path) -> Secret | None:
    path = Path(path_text) if Path(path_text).is_absolute() else base / path_text
    try:
        data = read_small_file(path, SECRET_FILE_MAX_BYTES)
    except SmallFileError as exc:
        check.fail(place, str(exc))
        return None
    try:
        text = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        check.fail(place, f"{path} is not UTF-8 text")
        return None
    if not text:
        check.fail(place, f"{path} is empty")
        return None
    return Secret(text)


class SmallFileError(Exception):
    """A file that read_small_file refuses: `reason` says why, in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read {path}: {reason}")
        self.path = path
        self.reason = reason


def read_small_file(path: Path, max_bytes: int) -> bytes:
    """The bytes of `path`, a regular file of at most `max_bytes`. Opened without blocking,
    so that a FIFO is refused instead of waited on, and read no further than the cap, so
    that /dev/zero is refused instead of filling memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise SmallFileError(path, exc.strerror or type(exc).__name__) from None
    except ValueError:  # a NUL in the path
        raise SmallFileError(path, "not a valid path") from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise SmallFileError(path, os.strerror(errno.EISDIR))
        if not stat.S_ISREG(mode):
            raise SmallFileError(path, "not a regular file")
        try:
            data = file.read(max_bytes + 1)
        except OSError as exc:
            raise SmallFileError(path, exc.strerror or type(exc).__name__) from None
    if len(data) > max_bytes:
        raise SmallFileError(path, f"larger than {max_bytes // 1024} KiB")
    return data


def _credentials_file(name: str) -> Path | None:
    """systemd's LoadCredential= puts secrets under $CREDENTIALS_DIRECTORY."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def _tls(
    check: _Checker, table: Mapping[str, object], place: str, base: Path
) -> ssl.SSLContext | None:
    """Built once at load: aiohttp pools connections per SSL context."""
    paths: dict[str, Path | None] = {}
    for key in sorted(_TLS_KEYS):
        text = check.get(table, place, key, str, "")
        paths[key] = (Path(text) if Path(text).is_absolute() else base / text) if text else None
    try:
        return client_ssl_context(
            paths["ca_file"], paths["client_cert_file"], paths["client_key_file"]
        )
    except TlsConfigError as exc:
        check.fail(f"{place}.{exc.field}", str(exc))
        return None


def _signer(check: _Checker, table: Mapping[str, object], place: str, base: Path) -> Signer | None:
    """One key (`signing_secret`, `_file`, `_env`) or several (`signing_secrets`, or a
    `signing_secret_file` with one per line): every delivery is signed with each, so
    receivers can move from one key to the next (see the README's rotation steps)."""
    if "signing_secrets" in table:
        if any(k in table for k in ("signing_secret", "signing_secret_file", "signing_secret_env")):
            check.fail(
                f"{place}.signing_secrets", "give signing_secrets or signing_secret, not both"
            )
            return None
        raw = table["signing_secrets"]
        if not isinstance(raw, list) or not raw or not all(isinstance(v, str) and v for v in raw):
            check.fail(f"{place}.signing_secrets", "must be a non-empty list of non-empty strings")
            return None
        secrets: list[str] = list(raw)
        where = f"{place}.signing_secrets"
    else:
        secret = _secret(check, table, place, "signing_secret", base)
        if secret is None:
            return None
        secrets = split_secret_lines(secret.reveal())
        where = f"{place}.signing_secret"
    try:
        return Signer(*secrets)
    except SigningSecretError as exc:
        check.fail(where, str(exc))
        return None


def split_secret_lines(text: str) -> list[str]:
    """The secrets in a secret file's text: one per line, blank lines skipped, each
    stripped (an editor's trailing space must not change a key)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def _secret(
    check: _Checker, table: Mapping[str, object], place: str, key: str, base: Path
) -> Secret | None:
    """A secret written inline (`key`), read from a file (`key_file`) or from an
    environment variable (`key_env`); at most one of them."""
    given = [k for k in (key, f"{key}_file", f"{key}_env") if k in table]
    if len(given) > 1:
        check.fail(f"{place}.{key}", f"give only one of {', '.join(given)}")
        return None
    for given_key in (f"{key}_file", f"{key}_env"):
        if table.get(given_key) == "":
            # Not "no secret": a file or variable was meant and its name is missing.
            check.fail(f"{place}.{given_key}", "must not be empty")
            return None
    if f"{key}_file" in table:
        path = check.get(table, place, f"{key}_file", str, "")
        return _read_secret_file(check, f"{place}.{key}_file", path, base) if path else None
    if f"{key}_env" in table:
        name = check.get(table, place, f"{key}_env", str, "")
        value = os.environ.get(name, "") if name else ""
        if name and not value:
            check.fail(f"{place}.{key}_env", f"environment variable {name} is not set or empty")
        return Secret(value) if value else None
    value = check.get(table, place, key, str, "")
    return Secret(value) if value else None


def _postgres_url(url: str) -> str | None:
    """What is wrong with a PostgreSQL URL, or None. Never echoes it: it may hold a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return "must be a postgresql:// URL"
    if any(c in url for c in "\r\n\x00"):
        return "must not contain control characters"
    return None


def _sql_identifier(value: str) -> str | None:
    if re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", value):
        return None
    return "must be a lower-case SQL identifier (letters, digits, _; at most 63)"


def _unleash(check: _Checker, data: object, base: Path, trust_env: bool) -> UnleashConfig | None:
    table = check.table(data, "unleash", _UNLEASH_KEYS)
    url = check.get(table, "unleash", "url", str, "", _http_url)
    if "url" not in table:
        check.fail("unleash.url", "is required")
    token = _unleash_token(check, table, base)
    start_from = _start_from(check, table)
    page_size = check.get(table, "unleash", "page_size", int, 1000, _between(10, 1000))
    unleash = UnleashConfig(
        url=url.rstrip("/"),
        token=token or Secret(""),
        public_url=check.get(table, "unleash", "public_url", str, "", _http_url).rstrip("/")
        or None,
        poll_interval_s=check.get(
            table, "unleash", "poll_interval_s", (int, float), 0.4, _positive
        ),
        start_from=start_from,
        timeout_s=check.get(table, "unleash", "timeout_s", (int, float), 10.0, _positive),
        page_size=page_size,
        gap_grace_s=check.get(table, "unleash", "gap_grace_s", (int, float), 300.0, _positive),
        backoff_max_s=check.get(table, "unleash", "backoff_max_s", (int, float), 60.0, _positive),
        max_page_bytes=check.get(
            table, "unleash", "max_page_bytes", int, 32 * 1024 * 1024, _between(64 * 1024, 1024**3)
        ),
        full_read_interval_s=check.get(
            table, "unleash", "full_read_interval_s", (int, float), 60.0, _positive
        ),
        ssl_context=_tls(check, table, "unleash", base),
        proxy=proxy_for(url, None, trust_env) if url else None,
    )
    return unleash if token else None


def _unleash_token(check: _Checker, table: Mapping[str, object], base: Path) -> Secret | None:
    """The token, checked: it is sent as the Authorization header."""
    token = _unleash_token_from(check, table, base)
    if token is not None and not _HEADER_VALUE.fullmatch(token.reveal()):
        # Never the value: it is a secret.
        check.fail("unleash.token", "must be one line without control characters")
        return None
    return token


def _unleash_token_from(check: _Checker, table: Mapping[str, object], base: Path) -> Secret | None:
    if secret := _secret(check, table, "unleash", "token", base):
        return secret
    if table.get("token") == "":
        check.fail("unleash.token", "is empty")
        return None
    if any(k in table for k in ("token", "token_file", "token_env")):
        return None  # given, but unreadable or of the wrong type: already reported
    if env := os.environ.get(TOKEN_ENV):
        return Secret(env)
    if credential := _credentials_file("unleash-token"):
        return _read_secret_file(check, "unleash.token", str(credential), base)
    check.fail(
        "unleash.token",
        f"is required (token, token_file, token_env, ${TOKEN_ENV}, "
        "or the systemd credential 'unleash-token')",
    )
    return None


def _start_from(check: _Checker, table: Mapping[str, object]) -> StartFrom:
    value = table.get("start_from", "latest")
    if value == "latest" or value == "earliest":  # noqa: PLR1714 - narrows the Literal
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    check.fail("unleash.start_from", 'must be "latest", "earliest" or an event id (>= 0)')
    return "latest"


def _headers(
    check: _Checker, table: Mapping[str, object], place: str
) -> tuple[tuple[str, str], ...]:
    raw = table.get("headers", {})
    if not isinstance(raw, dict):
        check.fail(f"{place}.headers", "must be a table of header names to strings")
        return ()
    result = []
    for name, value in raw.items():
        if not _HEADER.fullmatch(name):
            check.fail(f"{place}.headers.{name}", "is not a valid HTTP header name")
        elif not isinstance(value, str) or not _HEADER_VALUE.fullmatch(value):
            check.fail(f"{place}.headers.{name}", "must be a string without control characters")
        else:
            result.append((name, value))
    return tuple(result)


def _webhook(
    check: _Checker,
    data: object,
    index: int,
    base: Path,
    profile: ServerProfile,
    trust_env: bool,
) -> WebhookConfig | None:
    place = f"webhooks[{index}]"
    if isinstance(data, dict) and data.get("provider") in PROVIDERS:
        return _provider_webhook(check, data, place, base, profile, trust_env)
    table = check.table(data, place, _WEBHOOK_KEYS)
    problems_before = len(check.problems)
    name = check.get(
        table,
        place,
        "name",
        str,
        "",
        lambda v: (
            None
            if _NAME.fullmatch(v)
            else "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        ),
    )
    if "name" not in table:
        check.fail(f"{place}.name", "is required")
    url = _webhook_url(check, table, place, base)
    check.get(table, place, "provider", str, WEBHOOK, _known_provider)
    engine = check.get(
        table,
        place,
        "template_engine",
        str,
        "mustache",
        lambda v: None if v in ("mustache", "jinja2") else 'must be "mustache" or "jinja2"',
    )
    escape = check.get(
        table,
        place,
        "escape",
        str,
        "",
        lambda v: (
            None if v in ("unleash", "none", "json") else 'must be "unleash", "none" or "json"'
        ),
    )
    template = check.get(table, place, "body_template", str, "")
    authorization = _authorization(check, table, place, base)
    retry_schedule = _retry_schedule(check, table, place)
    signer = _signer(check, table, place, base)
    headers = _headers(check, table, place)
    if signer is not None:
        for header, _ in headers:
            if header.lower() in _SIGNATURE_HEADERS:
                check.fail(f"{place}.headers.{header}", "is set by signing_secret; remove it")
    proxy = check.get(table, place, "proxy", str, "", _http_url)
    ssl_context = _tls(check, table, place, base)
    hook_fields = {
        "events": check.string_list(table, place, "events"),
        "projects": check.string_list(table, place, "projects"),
        "environments": check.string_list(table, place, "environments"),
        "tags": _tags(check, table, place),
        "content_type": check.get(
            table,
            place,
            "content_type",
            str,
            "application/json",
            lambda v: (
                None
                if v and _HEADER_VALUE.fullmatch(v)
                else "must be non-empty, without control characters"
            ),
        ),
        "headers": headers,
        "retries": check.get(table, place, "retries", int, 1, _between(0, 100)),
        "timeout_s": check.get(table, place, "timeout_s", (int, float), 10.0, _positive),
        "max_in_flight": check.get(table, place, "max_in_flight", int, 1, _between(1, 256)),
        **_delivery_controls(check, table, place),
    }
    max_body = check.get(
        table,
        place,
        "max_body_bytes",
        int,
        DEFAULT_MAX_BODY_BYTES,
        _between(1024, 256 * 1024 * 1024),
    )
    spec: dict[str, object] = {
        "body_template": template or None,
        "template_engine": engine,
        "escape": escape or None,
        "max_body_bytes": max_body,
    }
    try:
        renderer = build_renderer(
            template or None,
            engine,  # type: ignore[arg-type]
            escape or profile.escape()[0],  # type: ignore[arg-type]
            profile.unleash_url,
            max_body,
            event_markdown=profile.event_markdown,
        )
    except BadTemplateError as exc:
        check.fail(f"{place}.body_template", str(exc))
        return None
    if len(check.problems) > problems_before:
        return None
    return WebhookConfig(
        name=name,
        url=url,
        renderer=renderer,
        authorization=authorization,
        retry_schedule_s=retry_schedule,
        signer=signer,
        ssl_context=ssl_context,
        proxy=proxy_for(url, proxy or None, trust_env),
        **hook_fields,  # type: ignore[arg-type]
        **spec,  # type: ignore[arg-type]
    )


def _renderer_for(hook: WebhookConfig, profile: ServerProfile) -> Renderer:
    return build_renderer(
        hook.body_template,
        hook.template_engine,
        hook.escape or profile.escape()[0],
        profile.unleash_url,
        hook.max_body_bytes,
        event_markdown=profile.event_markdown,
    )


def link_profile(unleash: UnleashConfig, profile: ServerProfile) -> ServerProfile:
    """An explicit public_url wins over the unleashUrl the server reported."""
    if unleash.public_url:
        return dataclasses.replace(profile, unleash_url=unleash.public_url, source="public_url")
    return profile


def apply_server_profile(config: Config, profile: ServerProfile) -> Config:
    """The config with every renderer rebuilt for this server (its version's escaping and
    context, its unleashUrl for links unless public_url is set). Done once per detection
    or reload, never per event; templates compiled at load compile again here."""
    profile = link_profile(config.unleash, profile)
    hooks = tuple(_for_profile(hook, profile) for hook in config.webhooks)
    return dataclasses.replace(config, webhooks=hooks, server=profile)


def _for_profile(hook: WebhookConfig, profile: ServerProfile) -> WebhookConfig:
    if hook.provider is not None:
        # A provider's messages link where eventMarkdown's do, and its templates (Datadog's
        # body_template) escape as a webhook's do by default; it has no renderer.
        linked = dataclasses.replace(
            hook.provider,
            link_base=profile.unleash_url,
            settings=hook.provider.settings.with_escape(profile.escape()[0]),
        )
        return dataclasses.replace(hook, provider=linked)
    return dataclasses.replace(hook, renderer=_renderer_for(hook, profile))


def _webhook_url(check: _Checker, table: Mapping[str, object], place: str, base: Path) -> str:
    """Inline, or from url_file / url_env: an incoming-webhook URL is a credential (Unleash
    masks it in its API)."""
    if not any(k in table for k in ("url", "url_file", "url_env")):
        check.fail(f"{place}.url", "is required")
        return ""
    secret = _secret(check, table, place, "url", base)
    url = secret.reveal() if secret else ""
    if "url" not in table and url and (problem := _http_url(url)):
        check.fail(
            f"{place}.url", f"(from {'url_file' if 'url_file' in table else 'url_env'}) {problem}"
        )
        return ""
    if "url" in table and isinstance(table["url"], str) and (problem := _http_url(url)):
        check.fail(f"{place}.url", problem)
        return ""
    return url


def _tags(check: _Checker, table: Mapping[str, object], place: str) -> tuple[str, ...] | None:
    if "tags" not in table:
        return None
    raw = table["tags"]
    if not isinstance(raw, list) or not raw or not all(isinstance(v, str) for v in raw):
        check.fail(f"{place}.tags", 'must be a non-empty list of "type:value" strings')
        return None
    for i, pattern in enumerate(raw):
        if problem := tag_pattern_problem(pattern):
            check.fail(f"{place}.tags[{i}]", problem)
    return tuple(raw)


def _delivery_controls(
    check: _Checker, table: Mapping[str, object], place: str
) -> dict[str, object]:
    """Rate limit, 429 bound, pause and attempt-log settings: any webhook's, any provider's."""
    return {
        # 0.0 stands for "not given" (a given 0 is refused by _rate): no limit.
        "max_per_second": check.get(table, place, "max_per_second", (int, float), 0.0, _rate)
        or None,
        "max_rate_limit_wait_s": check.get(
            table, place, "max_rate_limit_wait_s", (int, float), 3600.0, _rate_limit_wait
        ),
        "pause_after_failures": check.get(
            table, place, "pause_after_failures", int, 5, _between(0, 1_000_000)
        ),
        "probe_interval_s": check.get(
            table, place, "probe_interval_s", (int, float), 60.0, _positive
        ),
        "attempt_log_size": check.get(
            table, place, "attempt_log_size", int, 1000, _between(0, 1_000_000)
        ),
    }


_CONTROL_KEYS = {
    "max_per_second",
    "max_rate_limit_wait_s",
    "pause_after_failures",
    "probe_interval_s",
    "attempt_log_size",
}


# What every webhook has, whichever provider speaks for it.
_SHARED_KEYS = (
    _TLS_KEYS
    | _CONTROL_KEYS
    | {
        "name",
        "provider",
        "events",
        "projects",
        "environments",
        "retries",
        "retry_schedule_s",
        "timeout_s",
        "max_in_flight",
        "proxy",
        "tags",
    }
)


def _provider_keys(provider: Provider) -> set[str]:
    keys = set(provider.params)
    for key in provider.secret_keys:
        keys |= {f"{key}_file", f"{key}_env"}
    return keys


def _provider_webhook(
    check: _Checker,
    table: Mapping[str, object],
    place: str,
    base: Path,
    profile: ServerProfile,
    trust_env: bool,
) -> WebhookConfig | None:
    """A webhook whose requests a provider builds (Slack, Teams, Datadog, New Relic)."""
    provider = PROVIDERS[str(table["provider"])]
    problems_before = len(check.problems)
    own = _provider_keys(provider)
    for key in sorted(set(table) - _SHARED_KEYS - own):
        why = f"does not belong to provider {provider.name!r}"
        known = key in _WEBHOOK_KEYS or any(key in _provider_keys(p) for p in PROVIDERS.values())
        check.fail(f"{place}.{key}", why if known else f"unknown key ({why})")
    values: dict[str, object] = {}
    for key, param in provider.params.items():
        value = _provider_value(check, table, place, key, param, provider.name, base)
        if value is not None:
            values[key] = value
    hook_name = check.get(table, place, "name", str, "", _name_problem)
    if "name" not in table:
        check.fail(f"{place}.name", "is required")
    template = values.get("body_template")
    if isinstance(template, str) and len(template) > 1:
        try:
            mustache.compile_template(template)
        except mustache.TemplateError as exc:
            check.fail(f"{place}.body_template", f"invalid Mustache: {exc}")
    retry_schedule = _retry_schedule(check, table, place)
    proxy = check.get(table, place, "proxy", str, "", _http_url)
    ssl_context = _tls(check, table, place, base)
    events = check.string_list(table, place, "events")
    hook_fields = {
        "events": events if "events" in table else provider.default_events,
        "projects": check.string_list(table, place, "projects"),
        "environments": check.string_list(table, place, "environments"),
        "tags": _tags(check, table, place),
        "retries": check.get(table, place, "retries", int, 1, _between(0, 100)),
        "timeout_s": check.get(table, place, "timeout_s", (int, float), 10.0, _positive),
        "max_in_flight": check.get(table, place, "max_in_flight", int, 1, _between(1, 256)),
        **_delivery_controls(check, table, place),
    }
    if len(check.problems) > problems_before:
        return None
    url = str(values.get("url") or provider.params["url"].default or "")
    return WebhookConfig(
        name=hook_name,
        url=url,
        renderer=Renderer(f"provider {provider.name}", _no_body(provider.name)),
        retry_schedule_s=retry_schedule,
        ssl_context=ssl_context,
        proxy=proxy_for(url, proxy or None, trust_env),
        provider=Configured(provider, Settings(values, profile.escape()[0]), profile.unleash_url),
        **hook_fields,  # type: ignore[arg-type]
    )


def _known_provider(name: str) -> str | None:
    if name == WEBHOOK or name in PROVIDERS:
        return None
    return f"unknown provider {name!r}; one of: {', '.join(provider_names())}"


def _no_body(provider: str) -> Callable[[Mapping[str, object]], str]:
    def refuse(_event: Mapping[str, object]) -> str:
        raise RenderError(f"provider {provider!r} builds its own requests")

    return refuse


def _name_problem(value: str) -> str | None:
    if _NAME.match(value):
        return None
    return "must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


def _provider_value(  # noqa: PLR0911 - one return per kind of value
    check: _Checker,
    table: Mapping[str, object],
    place: str,
    key: str,
    param: Param,
    provider: str,
    base: Path,
) -> object:
    """One provider setting, checked; None when absent (or wrong: then reported)."""
    given = any(k in table for k in (key, f"{key}_file", f"{key}_env"))
    if not given:
        if param.required:
            check.fail(f"{place}.{key}", f"is required by provider {provider!r}")
        return None
    if param.kind == "headers":
        return _headers(check, table, place)
    if param.kind == "string_list":
        raw = table[key]
        if not isinstance(raw, list) or not all(isinstance(v, str) and v for v in raw):
            check.fail(f"{place}.{key}", "must be a list of non-empty strings")
            return None
        return tuple(raw)
    problems_before = len(check.problems)
    if param.secret:
        secret = _secret(check, table, place, key, base)
        text = secret.reveal() if secret is not None else None
        if text is not None and ("\n" in text or "\r" in text):
            check.fail(f"{place}.{key}", "must be a single line")
            return None
    else:
        text = check.get(table, place, key, str, "") or None
    if text is None:
        if key in table and param.required and len(check.problems) == problems_before:
            check.fail(f"{place}.{key}", "must not be empty")
        return None
    if param.kind == "url" and (problem := _http_url(text)):
        check.fail(f"{place}.{key}", problem)
        return None
    return text


def _authorization(
    check: _Checker, table: Mapping[str, object], place: str, base: Path
) -> Secret | None:
    secret = _secret(check, table, place, "authorization", base)
    if secret is not None and not _HEADER_VALUE.fullmatch(secret.reveal()):
        # Never the value: it is a secret.
        check.fail(f"{place}.authorization", "must be one line without control characters")
        return None
    # Unleash sends no Authorization header for an empty value; so do we.
    return secret


def _retry_schedule(check: _Checker, table: Mapping[str, object], place: str) -> tuple[float, ...]:
    if "retry_schedule_s" not in table:
        return ()
    raw = table["retry_schedule_s"]
    items: list[object] = raw if isinstance(raw, list) else []
    delays = [float(v) for v in items if isinstance(v, int | float) and not isinstance(v, bool)]
    if not delays or len(delays) != len(items) or not all(0 < d <= 7 * 86400 for d in delays):
        check.fail(
            f"{place}.retry_schedule_s",
            "must be a non-empty list of delays in seconds (each > 0 and <= 604800)",
        )
        return ()
    if "retries" in table:
        check.fail(f"{place}.retry_schedule_s", "give retries or retry_schedule_s, not both")
    return tuple(delays)


def parse_config(data: Mapping[str, object], base: Path, source: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    check = _Checker()
    top = check.table(
        data,
        "",
        {"unleash", "state", "webhooks", "log_level", "drain_timeout_s", "trust_env", "metrics"},
    )
    if "unleash" not in top:
        check.fail("unleash", "section is required")
    # HTTPS_PROXY / NO_PROXY from the environment apply only when asked for.
    trust_env = check.get(top, "", "trust_env", bool, False)
    unleash = _unleash(check, top.get("unleash", {}), base, trust_env)
    state_table = check.table(
        top.get("state", {}),
        "state",
        {"path", "url", "url_file", "url_env", "schema", "lease_ttl_s", "node_name"},
    )
    state_path = check.get(
        state_table, "state", "path", str, "/var/lib/unleash-poller/state.sqlite3"
    )
    state_url = _secret(check, state_table, "state", "url", base)
    if state_url is not None:
        problem = _postgres_url(state_url.reveal())
        if problem:
            check.fail("state.url", problem)
        if "path" in state_table:
            check.fail("state.path", "give either path (SQLite) or url (PostgreSQL), not both")
    state_schema = check.get(state_table, "state", "schema", str, "unleash_poller", _sql_identifier)
    node_name = check.get(
        state_table,
        "state",
        "node_name",
        str,
        "",
        lambda v: (
            None
            if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", v)
            else "must be 1-63 letters, digits, '.', '_' or '-'"
        ),
    )
    lease_ttl = check.get(
        state_table,
        "state",
        "lease_ttl_s",
        (int, float),
        15.0,
        lambda v: None if 3 <= v <= 600 else "must be between 3 and 600",
    )
    raw_hooks = top.get("webhooks", [])
    if not isinstance(raw_hooks, list) or not raw_hooks:
        check.fail("webhooks", "must list at least one [[webhooks]] table")
        raw_hooks = []
    profile = link_profile(unleash, offline_profile(unleash.url)) if unleash else None
    hooks = [
        _webhook(check, raw, i, base, profile or offline_profile(""), trust_env)
        for i, raw in enumerate(raw_hooks)
    ]
    seen: dict[str, int] = {}
    for i, hook in enumerate(hooks):
        if hook is None:
            continue
        if hook.name in seen:
            check.fail(
                f"webhooks[{i}].name",
                f"duplicate name {hook.name!r} (also webhooks[{seen[hook.name]}])",
            )
        seen.setdefault(hook.name, i)
    log_level = check.get(
        top,
        "",
        "log_level",
        str,
        "info",
        lambda v: None if v in _LOG_LEVELS else f"must be one of {', '.join(_LOG_LEVELS)}",
    )
    drain = check.get(top, "", "drain_timeout_s", (int, float), 10.0, _positive)
    metrics_table = check.table(top.get("metrics", {}), "metrics", {"listen"})
    listen = check.get(metrics_table, "metrics", "listen", str, "", _listen)
    if check.problems or unleash is None:
        raise ConfigError(check.problems)
    path = Path(state_path)
    return Config(
        unleash=unleash,
        state=StateConfig(
            path if path.is_absolute() else base / path,
            url=state_url,
            schema=state_schema,
            lease_ttl_s=float(lease_ttl),
            node_name=node_name or None,
        ),
        webhooks=tuple(h for h in hooks if h is not None),
        log_level=log_level,
        drain_timeout_s=drain,
        trust_env=trust_env,
        metrics=MetricsConfig(listen or None),
        inline_secrets=_inline_secrets(top),
        source_path=source,
        server=profile,
    )


def _inline_secrets(top: Mapping[str, object]) -> tuple[str, ...]:
    places = []
    unleash = top.get("unleash")
    if isinstance(unleash, dict) and unleash.get("token"):
        places.append("unleash.token")
    hooks = top.get("webhooks")
    for i, hook in enumerate(hooks if isinstance(hooks, list) else []):
        if isinstance(hook, dict):
            provider = PROVIDERS.get(str(hook.get("provider", WEBHOOK)))
            secrets = provider.secret_keys if provider else {"authorization", "signing_secret"}
            # signing_secrets (key rotation) holds secrets whatever the provider.
            secrets = {*secrets, "signing_secrets"}
            places.extend(f"webhooks[{i}].{key}" for key in sorted(secrets) if hook.get(key))
    return tuple(places)


def check_private(config: Config) -> str | None:
    """A config file holding secrets must not be readable by other users. Returns the
    problem, or None."""
    path = config.source_path
    if path is None or not config.inline_secrets:
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o044 == 0:
        return None
    return (
        f"{path}: holds secrets ({', '.join(config.inline_secrets)}) but is readable by "
        f"other users (mode {mode:04o}); run `chmod 600 {path}` or move the secrets to "
        "*_file keys, $UNLEASH_POLLER_TOKEN or the systemd credential"
    )


def load_config(path: Path) -> Config:
    """Read and validate a TOML config file."""
    try:
        raw = read_small_file(path, CONFIG_FILE_MAX_BYTES)
    except SmallFileError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.reason}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None
    return parse_config(data, path.parent.resolve(), path)

"""What a driver error means to the daemon, said in one line without the password.

`where_of` names the store as every message does (the URL with its secrets masked, and
the schema); `Diagnosis` turns a psycopg error into StateError (exit), StateUnavailableError
(wait and retry) or FencedError (stand by), with any spelling of the password taken out.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors

from poller.config import StateConfig
from poller.state.base import FencedError, StateError, StateUnavailableError

FENCED = "UP001"  # the SQLSTATE fence() raises
# SQLSTATEs that mean "try again later", beyond the connection errors (class 08, 57P0x,
# which psycopg raises as OperationalError): a deadlock or serialization failure, a lock
# wait that timed out, a server that became a read-only standby (failover).
_TRANSIENT = frozenset({"40001", "40P01", "55P03", "25006", "57014"})
# Connection failures that waiting will not cure: say so and exit, not retry forever.
_PERMANENT_CONNECT = (
    "password authentication failed",
    "authentication failed",
    "does not exist",
    "permission denied",
    "no pg_hba.conf entry",
    "invalid",
    "certificate",
)
# Query parameters of the URL that hold a secret: the server password, and the passphrase
# of the client's TLS key.
_PASSWORD_KEYS = frozenset({"password", "sslpassword"})


def where_of(config: StateConfig) -> str:
    """The store as messages name it: the URL with its password masked, and the schema."""
    assert config.url is not None
    return f"{_redacted(config.url.reveal())} (schema {config.schema})"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, _, host = netloc.rpartition("@")
        user = user_info.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in user_info else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = [
            (key, "***" if key in _PASSWORD_KEYS else value)
            for key, value in parse_qsl(query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _secrets_of(url: str) -> list[str]:
    """The password as it may appear in a driver's message: raw, encoded or decoded."""
    parts = urlsplit(url)
    found = [parts.password or ""]
    found += [value for key, value in parse_qsl(parts.query) if key in _PASSWORD_KEYS]
    spelled = {v for s in found if s for v in (s, unquote(s), quote(s, safe=""))}
    return sorted(spelled, key=len, reverse=True)


class Diagnosis:
    """Driver errors of one store, as the daemon's errors."""

    def __init__(self, config: StateConfig) -> None:
        assert config.url is not None
        self.where = where_of(config)
        self.schema = config.schema
        self._secrets = _secrets_of(config.url.reveal())

    def first_line(self, exc: BaseException) -> str:
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def connect_error(self, exc: psycopg.Error) -> StateError:
        text = self.first_line(exc)
        lowered = text.lower()
        if "connect privilege" in str(exc).lower() or "permission denied for database" in lowered:
            return StateError(
                f"{self.where}: cannot connect: {text}; grant the role CONNECT on the database"
            )
        if isinstance(exc, psycopg.ProgrammingError) or any(
            marker in lowered for marker in _PERMANENT_CONNECT
        ):
            return StateError(f"{self.where}: cannot connect: {text}")
        return StateUnavailableError(f"{self.where}: cannot connect: {text}")

    def translate(self, exc: psycopg.Error) -> BaseException:
        """What a driver error means to the daemon; errors it cannot mean anything for
        (an integrity error: a bug) are raised as they are."""
        text = self.first_line(exc)
        if exc.sqlstate == FENCED:
            return FencedError(
                f"{self.where}: another daemon took the lease over ({text}); "
                "this one writes nothing more and stands by"
            )
        if isinstance(exc, errors.InsufficientPrivilege):
            return StateError(
                f"{self.where}: {text}; the role needs USAGE on schema {self.schema} "
                "and to own its tables"
            )
        if isinstance(exc, errors.UndefinedTable | errors.UndefinedFunction):
            return StateError(
                f"{self.where}: the state's tables are gone ({text}); was the schema "
                "dropped while the daemon ran?"
            )
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
            exc.sqlstate in _TRANSIENT
        ):
            return StateUnavailableError(f"{self.where}: PostgreSQL unavailable: {text}")
        return exc

"""What every provider shares: the settings it is given, the requests it makes, and how
an answer it got is judged.

A provider is pure: from an event, its settings and the base URL for links into Unleash
it builds the requests Unleash's integration of that name would send. Sending them,
retrying and recording what was done are the worker's job, the same for every provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from poller.jsvalues import encode_utf8, json_stringify

Event = Mapping[str, object]
ParamKind = Literal["string", "url", "string_list", "headers"]


@dataclass(frozen=True)
class Param:
    """One config key of a provider. A `secret` one (what Unleash masks in its API) is
    also accepted as `<key>_file` and `<key>_env`, and `render` masks it; `default` is
    what Unleash uses when the key is not given."""

    kind: ParamKind
    required: bool = False
    default: str | None = None
    secret: bool = False


TemplateEscape = Literal["unleash", "none", "json"]


class Settings:
    """A provider's validated settings. Secrets are plain strings here (the provider puts
    them in headers), so this never shows its values in a repr. `template_escape` is how
    `{{ }}` in a provider's template escapes: not a key of its own but the polled server's
    (its version's) default, set from the server profile as a webhook's `escape` is."""

    __slots__ = ("_values", "template_escape")

    def __init__(
        self, values: Mapping[str, object], template_escape: TemplateEscape = "unleash"
    ) -> None:
        self._values = dict(values)
        self.template_escape: TemplateEscape = template_escape

    def with_escape(self, template_escape: TemplateEscape) -> Settings:
        """The same settings, escaping templates as this server's version does."""
        return Settings(self._values, template_escape)

    def text(self, key: str) -> str | None:
        value = self._values.get(key)
        return value if isinstance(value, str) else None

    def strings(self, key: str) -> tuple[str, ...]:
        value = self._values.get(key)
        return tuple(value) if isinstance(value, tuple) else ()

    def headers(self) -> tuple[tuple[str, str], ...]:
        value = self._values.get("headers")
        return value if isinstance(value, tuple) else ()

    def __repr__(self) -> str:
        return f"Settings({sorted(self._values)})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Settings)
            and other._values == self._values
            and other.template_escape == self.template_escape
        )

    def __hash__(self) -> int:
        return hash((tuple(sorted(self._values)), self.template_escape))


@dataclass(frozen=True)
class Request:
    """One HTTP request a provider makes for an event.

    `part` names it among the event's requests (a Slack channel), so a request that was
    answered 2xx is not sent again when its siblings are retried. `shown_body` is what
    `render` prints when the wire body is not readable (New Relic's gzip)."""

    part: str
    url: str
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    body: bytes = field(repr=False)
    secret_headers: frozenset[str] = frozenset()  # lower-cased names masked by `render`
    secret_url: bool = False  # the URL itself is a credential (an incoming webhook's)
    method: str = "POST"
    shown_body: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Answer:
    """What the receiver said: its status and (the start of) its body."""

    status: int
    body: bytes


@dataclass(frozen=True)
class Failure:
    """A provider's reading of an answer that HTTP alone would call a success (Slack's
    200 with `ok: false`): why it failed and whether asking again can help.
    `rate_limited`: the service says we sent too fast (Slack's `ratelimited`), which is
    decided as a 429 is: a hold of the whole webhook, not a counted retry."""

    reason: str
    retryable: bool
    rate_limited: bool = False


class BuildError(ValueError):
    """The provider cannot make a request for this event (Unleash sends none either)."""


Judge = Callable[[Answer], Failure | None]


def http_only(_answer: Answer) -> None:
    """For services whose HTTP status says it all."""
    return None


@dataclass(frozen=True)
class Provider:
    name: str
    params: Mapping[str, Param] = field(repr=False)
    # The event types Unleash's integration of this name offers (its definition's
    # `events`): what a webhook with this provider and no `events` receives.
    default_events: tuple[str, ...] = field(repr=False)
    build: Callable[[Event, Settings, str], list[Request]] = field(repr=False)
    judge: Judge = field(default=http_only, repr=False)

    @property
    def secret_keys(self) -> frozenset[str]:
        return frozenset(k for k, p in self.params.items() if p.secret)


@dataclass(frozen=True)
class Configured:
    """A provider with the settings one webhook gives it. `link_base` is the Unleash URL
    that links point into (what `eventMarkdown` links to), handed in from the config."""

    provider: Provider
    settings: Settings
    link_base: str

    def requests(self, event: Event) -> list[Request]:
        """Raises BuildError for an event the provider makes no request for."""
        return self.provider.build(event, self.settings, self.link_base)


def merged_headers(
    own: Sequence[tuple[str, str]], extra: Sequence[tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    """`{...own, ...extra}` as JavaScript merges objects: a key spelled the same is
    replaced in place, one differing only in case is kept beside it."""
    merged = dict(own)
    merged.update(dict(extra))
    return tuple(merged.items())


def json_body(value: object) -> bytes:
    """`JSON.stringify(value)` as UTF-8, the way Node encodes a string body."""
    return encode_utf8(json_stringify(value))


def js_substring(text: str, length: int) -> str:
    """`text.substring(0, length)`: JavaScript counts UTF-16 code units, so an emoji at
    the cut is split into a lone surrogate, as Unleash sends it."""
    units = text.encode("utf-16-le", "surrogatepass")
    if len(units) <= 2 * length:
        return text
    return units[: 2 * length].decode("utf-16-le", "surrogatepass")


MASK = "***"


def shown(request: Request) -> bytes:
    """What `render` prints for one request: the method and URL, the headers with the
    secrets masked, a blank line, and the body (decompressed when it is gzip)."""
    from poller.urls import redact_url  # noqa: PLC0415 - keeps this module free of I/O helpers

    url = redact_url(request.url) + "/" + MASK if request.secret_url else request.url
    lines = [f"{request.method} {url}"]
    for name, value in request.headers:
        lines.append(f"{name}: {MASK if name.lower() in request.secret_headers else value}")
    head = "\n".join(lines).encode() + b"\n\n"
    return head + (request.shown_body if request.shown_body is not None else request.body)

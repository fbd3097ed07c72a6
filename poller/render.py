"""Request bodies: Unleash's default JSON, mustache.js-exact Mustache, or sandboxed Jinja2.

The Mustache path reproduces Unleash 8.2.0's webhook integration byte for byte: the same
context (`event`, `eventJson`, `eventMarkdown`), the same escaping, JavaScript's way of
printing values, and Unleash's trick of splicing `eventMarkdown` in after rendering,
JSON-escaped when it lands inside a double-quoted string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from poller import mustache
from poller.jsvalues import JSDate, encode_utf8, json_stringify

if TYPE_CHECKING:
    from poller.jinja import RenderThreads

# Jinja2 and the eventMarkdown formatter are imported only by a configuration that uses
# them: the daemon's resident memory is part of what it promises.

Event = Mapping[str, object]

# The order Unleash's event store builds an event in, which is the order JSON.stringify
# writes it. The search endpoint's `label`/`summary` are not part of that object.
EVENT_FIELDS = (
    "id",
    "type",
    "createdBy",
    "createdAt",
    "createdByUserId",
    "data",
    "preData",
    "tags",
    "featureName",
    "project",
    "environment",
)
GROUP_FIELDS = ("groupType", "groupId")
# Set by the source on an event whose JSON it could not parse (nested too deeply): every
# webhook dead-letters it with this reason instead of the whole stream stalling on it.
UNREADABLE = "_unleash_poller_unreadable"
_CONTEXT_NAMES = frozenset({"event", "eventJson", "eventMarkdown"})
# Unleash renders eventMarkdown as this placeholder, then splices the text in.
_MARKDOWN_PLACEHOLDER = "\0UNLEASH_EVENT_MARKDOWN\0"


Escape = Literal["unleash", "none", "json"]
# Unleash's own default UNLEASH_URL: what its integrations link to when none was given.
UNLEASH_DEFAULT_URL = "http://localhost:4242"
_VERSION = re.compile(r"\s*v?(\d{1,6})\.(\d{1,6})\.(\d{1,6})")


def parse_version(text: object) -> tuple[int, int, int] | None:
    """ "8.2.0", "v7.6.5", "6.3.0+enterprise" → (major, minor, patch); anything else → None."""
    if not isinstance(text, str):
        return None
    match = _VERSION.match(text)
    if match is None:
        return None
    return int(match[1]), int(match[2]), int(match[3])


@dataclass(frozen=True)
class ServerProfile:
    """What the Unleash server being polled decides about rendering: its version (escaping,
    template context) and its `unleashUrl` (the base of every link its integrations write).
    `version` None: not known (not asked yet, or offline)."""

    version: str | None
    unleash_url: str
    source: str = "ui-config"  # where unleash_url came from, for the log line

    @property
    def event_markdown(self) -> bool:
        """Whether a webhook template sees `eventMarkdown`: 5.x's webhook has none (it
        renders empty there); 6.x and later fill it in. Unknown versions: as 8.x."""
        parsed = parse_version(self.version)
        return parsed is None or parsed >= (6, 0, 0)

    def escape(self) -> tuple[Escape, str]:
        """The default `escape` for this server, and why (for the start-up log line)."""
        parsed = parse_version(self.version)
        if parsed is None:
            return "unleash", "server version unknown: mustache.js HTML escaping, as 8.0.3+"
        if parsed >= (8, 0, 3):
            return "unleash", f"Unleash {self.version} HTML-escapes {{{{ }}}} (8.0.3 and later)"
        if parsed >= (6, 0, 0):
            return "none", f"Unleash {self.version} does not escape {{{{ }}}} (6.0 to 8.0.2)"
        return "unleash", f"Unleash {self.version} HTML-escapes {{{{ }}}} (5.x webhook)"


def saved_profile_text(profile: ServerProfile) -> str:
    """The profile as the state file keeps it, for the next start (see parse_saved_profile)."""
    return json.dumps({"version": profile.version, "unleash_url": profile.unleash_url})


def parse_saved_profile(text: str | None) -> ServerProfile | None:
    """The profile a previous run read from ui-config, as saved_profile_text wrote it;
    None when there is none or it is not in that shape (the state file was edited)."""
    if text is None:
        return None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    version, url = data.get("version"), data.get("unleash_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    if version is not None and not isinstance(version, str):
        return None
    return ServerProfile(version, url, source="ui-config, as last read (saved in the state)")


def offline_profile(url: str) -> ServerProfile:
    """Before the server was asked (config check, an offline `render`): links to the URL
    the poller was given, 8.x escaping and context."""
    return ServerProfile(None, url, source="unleash.url (server not asked)")


class BadTemplateError(ValueError):
    """A body template that cannot be compiled; the message says where and what."""


class RenderError(Exception):
    """A template that failed on one event; the event is dead-lettered for that webhook."""


class RenderStoppedError(RenderError):
    """A render stopped at its time or memory budget. Both are shared with the rest of the
    process (other renders hold the GIL and grow its memory), so an innocent render can
    be stopped too: the event is retried on the webhook's schedule, and dead-lettered
    with this reason only when the retries run out."""


def unleash_event(event: Event) -> dict[str, object]:
    """The event as Unleash holds it in memory, in its field order."""
    canonical: dict[str, object] = {}
    for name in EVENT_FIELDS:
        if name in event:
            canonical[name] = event[name]
        elif name == "tags":
            canonical[name] = []
    for name in GROUP_FIELDS:
        # Unleash writes `row.group_type || undefined`: empty and null vanish.
        if event.get(name):
            canonical[name] = event[name]
    return canonical


def _template_event(canonical: dict[str, object]) -> dict[str, object]:
    """What mustache.js sees: createdAt is a JavaScript Date, not the API's string."""
    created = canonical.get("createdAt")
    if isinstance(created, str):
        try:
            return {**canonical, "createdAt": JSDate.from_iso(created)}
        except ValueError:
            return canonical
    return canonical


def _ends_inside_double_quotes(text: str, in_string: bool) -> bool:
    """Whether a "…" string is open at the end of `text`, given whether one was open at
    its start; backslash escapes honoured."""
    escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            in_string = not in_string
    return in_string


def _splice_markdown(rendered: str, markdown: str, max_chars: int) -> str:
    if _MARKDOWN_PLACEHOLDER not in rendered:
        return rendered
    quoted = json_stringify(markdown)[1:-1]
    parts = rendered.split(_MARKDOWN_PLACEHOLDER)
    # Refused before splicing: each short placeholder may become a long text.
    size = len(rendered) + (len(parts) - 1) * (
        max(len(quoted), len(markdown)) - len(_MARKDOWN_PLACEHOLDER)
    )
    if size > max_chars:
        raise RenderError(f"template output passed {max_chars} characters; stopped")
    out = [parts[0]]
    # One pass over the text: the quote state carries from one part to the next (a
    # backslash before a placeholder escapes only its NUL, which is no quote).
    in_string = _ends_inside_double_quotes(parts[0], False)
    for part in parts[1:]:
        out.append(quoted if in_string else markdown)
        out.append(part)
        in_string = _ends_inside_double_quotes(_MARKDOWN_PLACEHOLDER + part, in_string)
    return "".join(out)


DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
# How long one render may take. Jinja2 renders run off the event loop and are stopped at
# this deadline wherever they stand.
RENDER_TIME_BUDGET_S = 2.0
JINJA_TIME_BUDGET_S = RENDER_TIME_BUDGET_S  # the name before both engines had one
# Mustache renders run on the event loop (pure Python, tens of microseconds for a usual
# event) and check their deadline between the items of a section: while one runs, nothing
# else in the process does (other webhooks, polling, /healthz, the systemd watchdog). A
# large legitimate render (a 110 kB event, 10,000 section items, a 42 kB body) takes about
# 20-30 ms on a loaded 2-core machine; 0.25 s leaves ten times that and bounds the stall.
MUSTACHE_TIME_BUDGET_S = 0.25


def _render_memory_bytes(max_body_bytes: int) -> int:
    """How much a Jinja2 render may grow the process: room for its output several times
    over (parts, join, encoding) and for the event's context."""
    return 64 * 2**20 + 16 * max_body_bytes


@dataclass(frozen=True)
class Renderer:
    """Turns an event (as the admin API returns it) into the bytes one webhook receives.

    A renderer with `threads` runs its renders there, off the event loop and stopped at
    their deadline (Jinja2); the others render where they are called."""

    describe: str
    _render: Callable[[Event], str]
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    threads: RenderThreads | None = field(default=None, repr=False, compare=False)

    @property
    def off_loop(self) -> bool:
        """Whether a render must be awaited (render_async) rather than called on the loop."""
        return self.threads is not None

    def render(self, event: Event) -> bytes:
        """The body for `event`; on a render thread for a Jinja2 template, the caller
        waiting at most RENDER_TIME_BUDGET_S."""
        if self.threads is not None:
            body: bytes = self.threads.run(self._body, event)
            return body
        return self._body(event)

    async def render_async(self, event: Event) -> bytes:
        """The body for `event`, the event loop free to run other work meanwhile when the
        render runs off the loop."""
        if self.threads is not None:
            body: bytes = await self.threads.run_async(self._body, event)
            return body
        return self._body(event)

    def _body(self, event: Event) -> bytes:
        unreadable = event.get(UNREADABLE)
        if unreadable:
            raise RenderError(f"event could not be read from Unleash: {unreadable}")
        try:
            # Node's encoder: a lone surrogate becomes U+FFFD, as Unleash would send it.
            body = encode_utf8(self._render(event))
        except RenderError:
            raise
        except mustache.LimitError as exc:
            raise RenderError(str(exc)) from None
        except (RecursionError, ValueError, TypeError, ArithmeticError, LookupError) as exc:
            raise RenderError(f"template failed: {type(exc).__name__}: {exc}") from None
        except MemoryError:
            raise RenderError("template failed: it needed more memory than there is") from None
        if len(body) > self.max_body_bytes:
            raise RenderError(
                f"rendered body is {len(body)} bytes, over max_body_bytes ({self.max_body_bytes})"
            )
        return body


def _default_body(event: Event) -> str:
    return json_stringify(unleash_event(event))


def _mustache_renderer(
    source: str, escape: str, public_url: str, max_chars: int, event_markdown: bool
) -> Callable[[Event], str]:
    try:
        template = mustache.compile_template(source)
    except mustache.TemplateError as exc:
        raise BadTemplateError(f"invalid Mustache: {exc}") from None
    escape_fn = {
        "unleash": mustache.escape_html,
        "none": mustache.escape_none,
        "json": mustache.escape_json,
    }[escape]
    wants_json = "eventJson" in source
    wants_markdown = event_markdown and "eventMarkdown" in source
    markdown_of = _markdown_formatter(source if event_markdown else "", public_url)
    splice = escape == "unleash" and wants_markdown

    def render(event: Event) -> str:
        canonical = unleash_event(event)
        markdown = markdown_of(canonical)
        view = {
            "event": _template_event(canonical),
            "eventJson": json_stringify(json_stringify(canonical)) if wants_json else "",
            "eventMarkdown": _MARKDOWN_PLACEHOLDER if splice else markdown,
        }
        rendered = template.render(view, escape_fn, max_chars, MUSTACHE_TIME_BUDGET_S)
        return _splice_markdown(rendered, markdown, max_chars) if splice else rendered

    return render


def _markdown_formatter(source: str, public_url: str) -> Callable[[Event], str]:
    """Unleash's eventMarkdown, if the template mentions it (it is not cheap)."""
    if "eventMarkdown" not in source:
        return lambda _event: ""
    from poller.markdown import format_event_markdown  # noqa: PLC0415 - see imports

    return lambda event: format_event_markdown(event, public_url)


def _jinja_renderer(
    source: str, public_url: str, max_chars: int, event_markdown: bool
) -> Callable[[Event], str]:
    import jinja2  # noqa: PLC0415 - see imports
    import jinja2.meta  # noqa: PLC0415

    from poller.jinja import BoundedSandbox, TemplateLimitError  # noqa: PLC0415 - see imports

    env = BoundedSandbox(max_chars)
    try:
        parsed = env.parse(source)
        template = env.from_string(source)
        unknown = jinja2.meta.find_undeclared_variables(parsed) - _CONTEXT_NAMES
    except jinja2.TemplateSyntaxError as exc:
        raise BadTemplateError(f"invalid Jinja2 at line {exc.lineno}: {exc.message}") from None
    except (RecursionError, SyntaxError):
        # Jinja2's parser recurses per nesting level, and Python refuses the code it
        # generates for blocks nested more than 20 deep (IndentationError is one of these).
        raise BadTemplateError("Jinja2 template nested too deeply") from None
    if unknown:
        raise BadTemplateError(
            f"unknown name(s) {', '.join(sorted(unknown))}; a template can use "
            "event, eventJson and eventMarkdown"
        )
    markdown_of = _markdown_formatter(source if event_markdown else "", public_url)

    def render(event: Event) -> str:
        canonical = unleash_event(event)
        chunks = template.generate(
            event=canonical,
            eventJson=json_stringify(json_stringify(canonical)),
            eventMarkdown=markdown_of(canonical),
        )
        try:
            return _bounded(chunks, max_chars)
        except RenderError:
            raise
        except TemplateLimitError as exc:
            raise RenderError(str(exc)) from None
        except MemoryError:
            raise  # reported by the renderer, as for Mustache
        except Exception as exc:  # noqa: BLE001 - see below
            # A Jinja2 template is a program, and its filters run on whatever the event
            # holds: `{{ event|wordwrap }}` raises AttributeError, a sandbox refusal is a
            # TemplateError. Whatever it raises is that template's failure on that event.
            raise RenderError(f"template failed: {type(exc).__name__}: {exc}") from None

    return render


def _bounded(chunks: Iterator[str], max_chars: int) -> str:
    """Collect a template's output, stopping as soon as it passes the body size limit
    (the time limit is the render thread's)."""
    out: list[str] = []
    size = 0
    for chunk in chunks:
        out.append(chunk)
        size += len(chunk)
        if size > max_chars:
            raise RenderError(f"template output passed {max_chars} characters; stopped")
    return "".join(out)


def build_renderer(
    template: str | None,
    engine: Literal["mustache", "jinja2"] = "mustache",
    escape: Escape = "unleash",
    public_url: str = UNLEASH_DEFAULT_URL,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    event_markdown: bool = True,
) -> Renderer:
    """Compile a webhook's body template once; raise BadTemplateError if it cannot be.
    `public_url` is the base of eventMarkdown's links; `event_markdown` False renders it
    empty, as Unleash 5.x's webhook does."""
    # Unleash treats an empty template as no template.
    if not template:
        return Renderer("default JSON", _default_body, max_body_bytes)
    if engine == "jinja2":
        from poller.jinja import RenderThreads  # noqa: PLC0415 - see imports

        return Renderer(
            "jinja2",
            _jinja_renderer(template, public_url, max_body_bytes, event_markdown),
            max_body_bytes,
            RenderThreads(
                RENDER_TIME_BUDGET_S, _render_memory_bytes(max_body_bytes), RenderStoppedError
            ),
        )
    return Renderer(
        f"mustache (escape={escape})",
        _mustache_renderer(template, escape, public_url, max_body_bytes, event_markdown),
        max_body_bytes,
    )

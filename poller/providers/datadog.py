"""`datadog`: Unleash's Datadog integration, one event to the Events API.

`body_template` (Mustache, with `event` in its context) replaces only the `text` field;
the rest of the body stays. Its `{{ }}` escape as the polled server's do (mustache.js's
HTML escaping from 8.0.3, none on 6.0 to 8.0.2: the server profile's default `escape`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from poller import mustache
from poller.jsvalues import to_js_string
from poller.providers import _common
from poller.providers.base import (
    BuildError,
    Event,
    Param,
    Provider,
    Request,
    Settings,
    TemplateEscape,
    json_body,
    merged_headers,
)
from poller.render import MUSTACHE_TIME_BUDGET_S

DEFAULT_URL = "https://api.datadoghq.com/api/v1/events"
EVENTS = (
    "feature-created", "feature-updated", "feature-archived", "feature-revived",
    "feature-stale-on", "feature-stale-off", "feature-environment-enabled",
    "feature-environment-disabled", "feature-strategy-remove", "feature-strategy-update",
    "feature-strategy-add", "feature-metadata-updated", "feature-project-change",
    "feature-environment-variants-updated", "feature-potentially-stale-on",
)  # fmt: skip


_ESCAPES: dict[TemplateEscape, mustache.Escape] = {
    "unleash": mustache.escape_html,
    "none": mustache.escape_none,
    "json": mustache.escape_json,
}


def compile_body_template(
    source: str, escape: TemplateEscape = "unleash"
) -> Callable[[Event], str]:
    """Compile once at config load; raises mustache.TemplateError for a bad template."""
    template = mustache.compile_template(source)
    escape_fn = _ESCAPES[escape]

    def render(event: Event) -> str:
        try:
            # On the event loop, as the webhook's Mustache: bounded the same way.
            return template.render(
                {"event": _common.held(event)},
                escape_fn,
                budget_s=MUSTACHE_TIME_BUDGET_S,
            )
        except mustache.RenderError as exc:
            raise BuildError(f"body_template failed: {exc}") from None

    return render


def _text(event: Event, settings: Settings, link_base: str) -> str:
    source = settings.text("body_template")
    # Unleash uses a template only when it is longer than one character.
    if source is not None and len(source) > 1:
        return _compiled(source, settings.template_escape)(event)
    return f"%%% \n {_common.message(event, link_base)[0]} \n %%% "


_CACHE: dict[tuple[str, TemplateEscape], Callable[[Event], str]] = {}


def _compiled(source: str, escape: TemplateEscape) -> Callable[[Event], str]:
    key = (source, escape)
    if key not in _CACHE:
        try:
            _CACHE[key] = compile_body_template(source, escape)
        except mustache.TemplateError as exc:
            raise BuildError(f"body_template: invalid Mustache: {exc}") from None
    return _CACHE[key]


def build(event: Event, settings: Settings, link_base: str) -> list[Request]:
    tags = event.get("tags")
    body: dict[str, object] = {
        "text": _text(event, settings, link_base),
        "title": "Unleash notification update",
        "tags": [
            f"{to_js_string(_field(tag, 'type'))}:{to_js_string(_field(tag, 'value'))}"
            for tag in (tags if isinstance(tags, list) else [])
        ],
    }
    if source_type := settings.text("source_type_name"):
        body["source_type_name"] = source_type
    extra = settings.headers()
    own = (("Content-Type", _common.JSON), ("DD-API-KEY", settings.text("api_key") or ""))
    return [
        Request(
            part="",
            url=settings.text("url") or DEFAULT_URL,
            headers=merged_headers(own, extra),
            body=json_body(body),
            secret_headers=frozenset({"dd-api-key", *(k.lower() for k, _ in extra)}),
        )
    ]


def _field(tag: object, name: str) -> object:
    return tag.get(name) if isinstance(tag, Mapping) else None


PROVIDER = Provider(
    name="datadog",
    params={
        "api_key": Param("string", required=True, secret=True),
        "url": Param("url", default=DEFAULT_URL),
        "source_type_name": Param("string"),
        "body_template": Param("string"),
        "headers": Param("headers"),
    },
    default_events=EVENTS,
    build=build,
)

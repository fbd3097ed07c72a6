"""Pieces several providers build their requests from, as Unleash's addons do."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from poller.jsvalues import JSDate
from poller.markdown import UnformattableEventError, format_event
from poller.providers.base import BuildError, Event
from poller.render import EVENT_FIELDS, GROUP_FIELDS

JSON = "application/json"


def message(event: Event, link_base: str, *, slack_links: bool = False) -> tuple[str, str | None]:
    """The formatter's text and "Open in Unleash" link; an event Unleash's formatter
    throws on gets no request (Unleash sends none)."""
    try:
        return format_event(event, link_base, slack_links=slack_links)
    except UnformattableEventError as exc:
        raise BuildError(f"Unleash cannot format this event: {exc}") from None


def held(event: Event) -> dict[str, object]:
    """The event as Unleash's store hands it to an integration: every column present
    (null when absent), tags a list, `createdAt` a Date, falsy group columns dropped."""
    out: dict[str, object] = {name: event.get(name) for name in EVENT_FIELDS}
    if not out["tags"]:
        out["tags"] = []
    created = out["createdAt"]
    if isinstance(created, str):
        with contextlib.suppress(ValueError):
            out["createdAt"] = JSDate.from_iso(created)
    out.update({name: event[name] for name in GROUP_FIELDS if event.get(name)})
    return out


def tags_of_type(event: Event, tag_type: str) -> list[str]:
    """`tags.filter((t) => t.type === type).map((t) => t.value)`."""
    tags = event.get("tags")
    if not isinstance(tags, list):
        return []
    return [
        tag.get("value")  # type: ignore[misc]
        for tag in tags
        if isinstance(tag, Mapping) and tag.get("type") == tag_type
    ]

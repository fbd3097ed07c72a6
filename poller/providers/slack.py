"""`slack`: Unleash's legacy Slack integration (an incoming webhook), one POST per channel.

As `slack.js`: the channels are the event's `slack` tags (not de-duplicated), or the
default channel when it has none; each gets `username`, `icon_emoji`, the text cut at
3,000 characters, `#channel` and an "Open in Unleash" button.
"""

from __future__ import annotations

from poller.jsvalues import to_js_string
from poller.providers import _common
from poller.providers.base import (
    Event,
    Param,
    Provider,
    Request,
    Settings,
    js_substring,
    json_body,
    merged_headers,
)

MAX_TEXT = 3000
EVENTS = (
    "feature-created", "feature-updated", "feature-archived", "feature-revived",
    "feature-stale-on", "feature-stale-off", "feature-environment-enabled",
    "feature-environment-disabled", "feature-strategy-remove", "feature-strategy-update",
    "feature-strategy-add", "feature-metadata-updated", "feature-variants-updated",
    "feature-project-change", "feature-potentially-stale-on",
    "release-plan-progressions-paused", "release-plan-progressions-resumed",
)  # fmt: skip


def build(event: Event, settings: Settings, link_base: str) -> list[Request]:
    tagged: list[object] = list(_common.tags_of_type(event, "slack"))
    # Unleash pushes the default channel even when it is unset ("#undefined").
    channels = tagged or [settings.text("default_channel")]
    formatted, url = _common.message(event, link_base, slack_links=True)
    text = js_substring(formatted, MAX_TEXT)
    headers = merged_headers((("Content-Type", _common.JSON),), settings.headers())
    requests = []
    for index, channel in enumerate(channels):
        name = "undefined" if channel is None else to_js_string(channel)
        button: dict[str, object] = {
            "name": "featureToggle",
            "text": "Open in Unleash",
            "type": "button",
            "value": "featureToggle",
            "style": "primary",
        }
        if url is not None:
            button["url"] = url  # JSON.stringify leaves out an undefined url
        body = {
            "username": settings.text("username") or "Unleash",
            "icon_emoji": settings.text("emoji_icon") or ":unleash:",
            "text": text,
            "channel": f"#{name}",
            "attachments": [{"actions": [button]}],
        }
        requests.append(
            Request(
                part=f"{index}:#{name}",
                url=settings.text("url") or "",
                headers=headers,
                body=json_body(body),
                secret_headers=frozenset(k.lower() for k, _ in settings.headers()),
                secret_url=True,
            )
        )
    return requests


PROVIDER = Provider(
    name="slack",
    params={
        "url": Param("url", required=True, secret=True),
        "default_channel": Param("string", required=True),
        "username": Param("string", default="Unleash"),
        "emoji_icon": Param("string", default=":unleash:"),
        "headers": Param("headers"),
    },
    default_events=EVENTS,
    build=build,
)

"""`teamsworkflow`: Unleash's Microsoft Teams integration through a Workflow (an Adaptive
Card in a message), as `teams-workflow.js` sends it."""

from __future__ import annotations

from poller.providers import _common, teams
from poller.providers.base import (
    Event,
    Param,
    Provider,
    Request,
    Settings,
    json_body,
    merged_headers,
)

EVENTS = teams.EVENTS  # the two definitions offer the same list


def message(event: Event, link_base: str) -> dict[str, object]:
    text, url = _common.message(event, link_base)
    action: dict[str, object] = {"type": "Action.OpenUrl", "title": "Go to feature"}
    if url is not None:
        action["url"] = url
    return {
        "type": "message",
        "attachments": [
            {
                "contentType": "application/vnd.microsoft.card.adaptive",
                "content": {
                    "type": "AdaptiveCard",
                    "body": [
                        {
                            "type": "Container",
                            "items": [
                                {
                                    "type": "TextBlock",
                                    "text": "Unleash update notification",
                                    "style": "heading",
                                },
                                {"type": "TextBlock", "text": text, "wrap": True},
                                {
                                    "type": "FactSet",
                                    "facts": [
                                        {"title": "User:", "value": event.get("createdBy")},
                                        {"title": "Action:", "value": event.get("type")},
                                    ],
                                },
                            ],
                        }
                    ],
                    "actions": [action],
                    "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                    "version": "1.5",
                },
            }
        ],
    }


def build(event: Event, settings: Settings, link_base: str) -> list[Request]:
    extra = settings.headers()
    return [
        Request(
            part="",
            url=settings.text("url") or "",
            headers=merged_headers((("Content-Type", _common.JSON),), extra),
            body=json_body(message(event, link_base)),
            secret_headers=frozenset(k.lower() for k, _ in extra),
            secret_url=True,
        )
    ]


PROVIDER = Provider(
    name="teamsworkflow",
    params={"url": Param("url", required=True, secret=True), "headers": Param("headers")},
    default_events=EVENTS,
    build=build,
)

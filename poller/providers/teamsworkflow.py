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
    return teams.post_json(settings, message(event, link_base))


PROVIDER = Provider(
    name="teamsworkflow",
    params={"url": Param("url", required=True, secret=True), "headers": Param("headers")},
    default_events=EVENTS,
    build=build,
)

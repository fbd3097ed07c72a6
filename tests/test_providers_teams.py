"""poller.providers.teams and teamsworkflow: Unleash's two Microsoft Teams integrations."""

from __future__ import annotations

import json

from poller.providers import teams, teamsworkflow
from tests.providers_support import LINK, event, settings

FEATURE = f"{LINK}/projects/default/features/flag-a"
TEXT = f"*ana* created *[flag-a]({FEATURE})* in project *[default]({LINK}/projects/default)*"


def test_message_card_as_teams_js() -> None:
    """themeColor, summary, one section with the text and facts, an OpenUri action."""
    [request] = teams.build(event(), settings(url="https://x.webhook.office.com/a"), LINK)
    assert json.loads(request.body) == {
        "themeColor": "0076D7",
        "summary": "Message",
        "sections": [
            {
                "activityTitle": TEXT,
                "activitySubtitle": "Unleash notification update",
                "facts": [
                    {"name": "User", "value": "ana"},
                    {"name": "Action", "value": "feature-created"},
                ],
            }
        ],
        "potentialAction": [
            {"@type": "OpenUri", "name": "Go to feature",
             "targets": [{"os": "default", "uri": FEATURE}]}
        ],
    }  # fmt: skip
    assert request.headers == (("Content-Type", "application/json"),)


def test_adaptive_card_as_teams_workflow_js() -> None:
    """A message with one Adaptive Card 1.5 attachment, its keys in Unleash's order."""
    [request] = teamsworkflow.build(
        event(), settings(url="https://x.logic.azure.com/a", headers=(("X-A", "1"),)), LINK
    )
    content = json.loads(request.body)["attachments"][0]["content"]
    assert list(content) == ["type", "body", "actions", "$schema", "version"]
    assert content["body"][0]["items"][1] == {"type": "TextBlock", "text": TEXT, "wrap": True}
    assert content["actions"] == [
        {"type": "Action.OpenUrl", "title": "Go to feature", "url": FEATURE}
    ]
    assert request.headers == (("Content-Type", "application/json"), ("X-A", "1"))
    assert request.secret_headers == {"x-a"}

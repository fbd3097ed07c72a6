"""poller.providers.slack: Unleash's legacy Slack (incoming webhook) integration."""

from __future__ import annotations

import json

from poller.providers import slack
from tests.providers_support import LINK, event, settings


def test_one_post_per_tagged_channel_or_the_default_one() -> None:
    """Tagged channels (not de-duplicated, as slack.js) or else default_channel, with '#'."""
    base = settings(url="https://hooks.slack.com/services/T/B/x", default_channel="general")
    assert [json.loads(r.body)["channel"] for r in slack.build(event(), base, LINK)] == ["#general"]
    tags = [{"type": "slack", "value": "a"}, {"type": "slack", "value": "a"}]
    got = slack.build(event(tags=tags), base, LINK)
    assert [json.loads(r.body)["channel"] for r in got] == ["#a", "#a"]
    assert len({r.part for r in got}) == 2  # each post is retried on its own


def test_body_and_headers_as_slack_js() -> None:
    """username, icon_emoji, text, channel, attachments; custom headers merged last."""
    hook = settings(
        url="https://hooks.slack.com/services/T/B/x",
        default_channel="general",
        username="Bot",
        headers=(("X-A", "1"), ("Content-Type", "text/x")),
    )
    [request] = slack.build(event(), hook, LINK)
    body = json.loads(request.body)
    assert list(body) == ["username", "icon_emoji", "text", "channel", "attachments"]
    assert body["username"] == "Bot"
    assert body["icon_emoji"] == ":unleash:"
    assert body["text"].startswith(f"*ana* created *<{LINK}/projects/default/features/flag-a|")
    assert body["attachments"][0]["actions"][0]["url"] == f"{LINK}/projects/default/features/flag-a"
    assert request.headers == (("Content-Type", "text/x"), ("X-A", "1"))
    assert request.secret_url

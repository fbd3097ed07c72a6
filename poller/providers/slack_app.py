"""`slack-app`: Unleash's Slack App integration, one `chat.postMessage` per channel.

Unleash calls `@slack/web-api`'s `chat.postMessage` with `channel`, `text`, `blocks` and
`unfurl_links: false`; we send exactly those arguments as a JSON body with the bot token
as a Bearer token. Channels are the event's `slack` tags plus `default_channels`,
de-duplicated in that order.
"""

from __future__ import annotations

import json

from poller.jsvalues import to_js_string
from poller.providers import _common
from poller.providers.base import (
    Answer,
    Event,
    Failure,
    Param,
    Provider,
    Request,
    Settings,
    js_substring,
    json_body,
)

MAX_TEXT = 3000
# Slack's answers to sending too fast: decided as an HTTP 429 is (see deliver.decide).
RATE_LIMIT_ERRORS = frozenset({"ratelimited", "rate_limited"})
# Slack's error codes that are worth asking again for; every other one is final.
RETRYABLE_ERRORS = frozenset(
    {
        "ratelimited",
        "rate_limited",
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
        "team_added_to_org",
    }
)

EVENTS = (
    "addon-config-created", "addon-config-deleted", "addon-config-updated",
    "api-token-created", "api-token-deleted", "change-added", "change-discarded",
    "change-edited", "change-request-applied", "change-request-approval-added",
    "change-request-approved", "change-request-cancelled", "change-request-created",
    "change-request-discarded", "change-request-rejected", "change-request-sent-to-review",
    "change-request-scheduled", "change-request-scheduled-application-success",
    "change-request-scheduled-application-failure", "change-request-schedule-suspended",
    "release-plan-progressions-paused", "release-plan-progressions-resumed",
    "context-field-created", "context-field-deleted", "context-field-updated",
    "feature-archived", "feature-created", "feature-deleted", "feature-environment-disabled",
    "feature-environment-enabled", "feature-environment-variants-updated",
    "feature-metadata-updated", "feature-potentially-stale-on", "feature-project-change",
    "feature-revived", "feature-stale-off", "feature-stale-on", "feature-strategy-add",
    "feature-strategy-remove", "feature-strategy-update", "feature-tagged",
    "feature-untagged", "group-created", "group-deleted", "group-updated", "banner-created",
    "banner-updated", "banner-deleted", "project-created", "project-archived",
    "project-deleted", "segment-created", "segment-deleted", "segment-updated",
    "service-account-created", "service-account-deleted", "service-account-updated",
    "user-created", "user-deleted", "user-updated", "user-access-request-registered",
    "user-access-request-approved", "user-access-request-rejected",
)  # fmt: skip


def channels(event: Event, settings: Settings) -> list[str]:
    """Tagged channels, then the default ones, each once (JavaScript's `new Set`)."""
    found: list[str] = []
    for channel in [*_common.tags_of_type(event, "slack"), *settings.strings("default_channels")]:
        if channel not in found:
            found.append(channel)
    return found


def build(event: Event, settings: Settings, link_base: str) -> list[Request]:
    targets = channels(event, settings)
    if not targets:
        return []  # Unleash registers a failure and sends nothing
    formatted, url = _common.message(event, link_base, slack_links=True)
    text = js_substring(formatted, MAX_TEXT)
    blocks: list[dict[str, object]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}}
    ]
    if url:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "url": url,
                        "text": {"type": "plain_text", "text": "Open in Unleash"},
                        "value": "featureToggle",
                        "style": "primary",
                    }
                ],
            }
        )
    token = settings.text("access_token") or ""
    headers = (
        ("Content-Type", "application/json; charset=utf-8"),
        ("Authorization", f"Bearer {token}"),
    )
    return [
        Request(
            part=f"channel:{to_js_string(channel)}",
            url=settings.text("url") or DEFAULT_URL,
            headers=headers,
            body=json_body(
                {"channel": channel, "text": text, "blocks": blocks, "unfurl_links": False}
            ),
            secret_headers=frozenset({"authorization"}),
        )
        for channel in targets
    ]


def judge(answer: Answer) -> Failure | None:
    """Slack's Web API answers 200 with `{"ok": false, "error": "..."}` on a failure."""
    if not 200 <= answer.status < 300:
        return None  # the HTTP status decides (429 with Retry-After, 5xx...)
    try:
        reply = json.loads(answer.body)
    except ValueError:
        return Failure("Slack answered with a body that is not JSON", retryable=True)
    if not isinstance(reply, dict) or reply.get("ok") is True:
        return None
    error = reply.get("error")
    code = error if isinstance(error, str) and error else "unknown error"
    return Failure(
        f"Slack error: {code[:200]}",
        retryable=code in RETRYABLE_ERRORS,
        rate_limited=code in RATE_LIMIT_ERRORS,
    )


DEFAULT_URL = "https://slack.com/api/chat.postMessage"

PROVIDER = Provider(
    name="slack-app",
    params={
        "access_token": Param("string", required=True, secret=True),
        "default_channels": Param("string_list"),
        "url": Param("url", default=DEFAULT_URL),
    },
    default_events=EVENTS,
    build=build,
    judge=judge,
)

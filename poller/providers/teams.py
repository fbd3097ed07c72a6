"""`teams`: Unleash's legacy Microsoft Teams integration (an Office 365 MessageCard)."""

from __future__ import annotations

from poller.providers import _common
from poller.providers.base import (
    Event,
    Param,
    Provider,
    Request,
    Settings,
    json_body,
    merged_headers,
)

EVENTS = (
    "feature-created", "feature-updated", "feature-archived", "feature-revived",
    "feature-stale-on", "feature-stale-off", "feature-environment-enabled",
    "feature-environment-disabled", "feature-strategy-remove", "feature-strategy-update",
    "feature-strategy-add", "feature-metadata-updated", "feature-variants-updated",
    "feature-project-change", "feature-potentially-stale-on", "change-added",
    "change-discarded", "change-edited", "change-request-applied",
    "change-request-approval-added", "change-request-approved", "change-request-cancelled",
    "change-request-created", "change-request-discarded", "change-request-rejected",
    "change-request-sent-to-review", "change-request-scheduled",
    "change-request-scheduled-application-success",
    "change-request-scheduled-application-failure", "change-request-schedule-suspended",
    "release-plan-progressions-paused", "release-plan-progressions-resumed",
)  # fmt: skip


def card(event: Event, link_base: str) -> dict[str, object]:
    text, url = _common.message(event, link_base)
    target: dict[str, object] = {"os": "default"}
    if url is not None:
        target["uri"] = url
    return {
        "themeColor": "0076D7",
        "summary": "Message",
        "sections": [
            {
                "activityTitle": text,
                "activitySubtitle": "Unleash notification update",
                "facts": [
                    {"name": "User", "value": event.get("createdBy")},
                    {"name": "Action", "value": event.get("type")},
                ],
            }
        ],
        "potentialAction": [{"@type": "OpenUri", "name": "Go to feature", "targets": [target]}],
    }


def post_json(settings: Settings, payload: object) -> list[Request]:
    """One JSON POST to the (secret) webhook url, custom headers merged last: how both
    Teams integrations send."""
    extra = settings.headers()
    return [
        Request(
            part="",
            url=settings.text("url") or "",
            headers=merged_headers((("Content-Type", _common.JSON),), extra),
            body=json_body(payload),
            secret_headers=frozenset(k.lower() for k, _ in extra),
            secret_url=True,
        )
    ]


def build(event: Event, settings: Settings, link_base: str) -> list[Request]:
    return post_json(settings, card(event, link_base))


PROVIDER = Provider(
    name="teams",
    params={"url": Param("url", required=True, secret=True), "headers": Param("headers")},
    default_events=EVENTS,
    build=build,
)

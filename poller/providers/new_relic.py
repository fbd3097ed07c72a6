"""`new-relic`: Unleash's New Relic integration, an `UnleashServiceEvent` to the Event API.

The body is gzip-compressed JSON with `Api-Key` and `Content-Encoding: gzip`. Unleash
renders its `bodyTemplate` and then does not use it, so we have no such key.
"""

from __future__ import annotations

import gzip
from collections.abc import Mapping

from poller.jsvalues import JSDate, encode_utf8, json_stringify
from poller.providers import _common
from poller.providers.base import Event, Param, Provider, Request, Settings, merged_headers

EVENTS = (
    "feature-created", "feature-updated", "feature-archived", "feature-revived",
    "feature-stale-on", "feature-stale-off", "feature-environment-enabled",
    "feature-environment-disabled", "feature-strategy-remove", "feature-strategy-update",
    "feature-strategy-add", "feature-metadata-updated", "feature-project-change",
    "feature-environment-variants-updated", "feature-potentially-stale-on",
)  # fmt: skip


def service_event(event: Event) -> dict[str, object]:
    """`{eventType, unleashEventType, ..., createdAt: ms, ...event.data}`: the data's keys
    replace those of the same name in place and the others follow (a JavaScript spread)."""
    row = _common.held(event)
    created = row["createdAt"]
    body: dict[str, object] = {
        "eventType": "UnleashServiceEvent",
        "unleashEventType": row["type"],
        "featureName": row["featureName"],
        "environment": row["environment"],
        "createdBy": row["createdBy"],
        "createdByUserId": row["createdByUserId"],
        "createdAt": created.epoch_ms if isinstance(created, JSDate) else created,
    }
    data = row["data"]
    if isinstance(data, Mapping):
        body.update(data)
    elif isinstance(data, list):
        body.update({str(i): v for i, v in enumerate(data)})
    elif isinstance(data, str):
        body.update({str(i): c for i, c in enumerate(data)})
    return body


def build(event: Event, settings: Settings, _link_base: str) -> list[Request]:
    text = encode_utf8(json_stringify(service_event(event)))
    extra = settings.headers()
    own = (
        ("Api-Key", settings.text("license_key") or ""),
        ("Content-Type", _common.JSON),
        ("Content-Encoding", "gzip"),
    )
    return [
        Request(
            part="",
            url=settings.text("url") or "",
            headers=merged_headers(own, extra),
            # mtime=0: the same event gives the same bytes on every attempt.
            body=gzip.compress(text, mtime=0),
            secret_headers=frozenset({"api-key", *(k.lower() for k, _ in extra)}),
            shown_body=text,
        )
    ]


PROVIDER = Provider(
    name="new-relic",
    params={
        "license_key": Param("string", required=True, secret=True),
        "url": Param("url", required=True),
        "headers": Param("headers"),
    },
    default_events=EVENTS,
    build=build,
)

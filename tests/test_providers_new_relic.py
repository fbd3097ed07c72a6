"""poller.providers.new_relic: Unleash's New Relic integration."""

from __future__ import annotations

import gzip
import json

from poller.providers import new_relic
from tests.providers_support import LINK, event, settings


def test_gzip_body_with_license_key() -> None:
    """An UnleashServiceEvent, gzip-compressed, with Api-Key and Content-Encoding: gzip."""
    hook = settings(
        license_key="nr-1", url="https://insights-collector.newrelic.com/v1/accounts/1/events"
    )
    [request] = new_relic.build(event(), hook, LINK)
    assert request.headers == (
        ("Api-Key", "nr-1"),
        ("Content-Type", "application/json"),
        ("Content-Encoding", "gzip"),
    )
    assert gzip.decompress(request.body) == request.shown_body
    assert json.loads(request.body and gzip.decompress(request.body)) == {
        "eventType": "UnleashServiceEvent",
        "unleashEventType": "feature-created",
        "featureName": "flag-a",
        "environment": None,
        "createdBy": "ana",
        "createdByUserId": 3,
        "createdAt": 1767323045678,
        "name": "flag-a",
        "description": 'd "q" <&>',
    }
    assert new_relic.build(event(), hook, LINK)[0].body == request.body  # same bytes again


def test_data_spread_over_the_fields_in_javascript_key_order() -> None:
    """event.data's keys replace same-named fields in place, new ones follow, and
    JSON.stringify writes integer-like keys first."""
    spread = event(data={"eventType": "spoofed", "z": 1, "5": "five"})
    [request] = new_relic.build(spread, settings(license_key="k", url="https://x"), LINK)
    assert request.shown_body is not None
    pairs = json.loads(request.shown_body, object_pairs_hook=list)
    assert [key for key, _ in pairs] == [
        "5", "eventType", "unleashEventType", "featureName", "environment", "createdBy",
        "createdByUserId", "createdAt", "z",
    ]  # fmt: skip
    assert dict(pairs)["eventType"] == "spoofed"

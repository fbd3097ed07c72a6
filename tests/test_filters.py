"""Per-webhook filters behave as Unleash's integration filters do, plus `*` globs for types."""

from __future__ import annotations

import pytest

from poller.filters import EventFilter

EVENT = {
    "id": 1,
    "type": "feature-environment-enabled",
    "project": "web",
    "environment": "production",
}

CASES = [
    (EventFilter(), EVENT, True),
    (EventFilter(events=("feature-environment-enabled",)), EVENT, True),
    (EventFilter(events=("feature-created",)), EVENT, False),
    (EventFilter(events=("feature-environment-*",)), EVENT, True),
    (EventFilter(events=("feature-*-disabled",)), EVENT, False),
    (EventFilter(events=("FEATURE-ENVIRONMENT-ENABLED",)), EVENT, False),
    (EventFilter(events=("feature",)), EVENT, False),
    (EventFilter(projects=("web",)), EVENT, True),
    (EventFilter(projects=("api",)), EVENT, False),
    (EventFilter(environments=("production",)), EVENT, True),
    (EventFilter(environments=("development",)), EVENT, False),
    # No project / environment on the event: passes those filters, as in Unleash.
    (EventFilter(projects=("api",)), {"id": 2, "type": "api-token-created"}, True),
    (
        EventFilter(environments=("development",)),
        {"id": 3, "type": "feature-created", "project": "web", "environment": None},
        True,
    ),
    (EventFilter(events=("feature-*",)), {"id": 4, "type": None}, False),
]


@pytest.mark.parametrize(("flt", "event", "expected"), CASES)
def test_filter(flt: EventFilter, event: dict[str, object], expected: bool) -> None:
    """Types match exactly or by glob; project/environment filters skip events without them."""
    assert flt.matches(event) is expected

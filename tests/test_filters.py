"""Per-webhook filters behave as Unleash's integration filters do, plus `*` globs for types."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from poller.filters import EventFilter, tag_pattern_problem

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


TAGGED = {
    "id": 5,
    "type": "feature-created",
    "tags": [{"type": "team", "value": "payments"}, {"type": "slack", "value": "#alerts"}],
}
UNTAGGED = {"id": 6, "type": "feature-created", "tags": []}

TAG_CASES = [
    (("team:payments",), TAGGED, True),
    (("team:pay",), TAGGED, False),  # exact, not a prefix
    (("team:pay*",), TAGGED, True),
    (("slack:*",), TAGGED, True),
    (("*:#alerts",), TAGGED, True),
    (("*:*",), TAGGED, True),
    (("Team:payments",), TAGGED, False),  # case matters, as in Unleash
    (("team:marketing", "slack:#alerts"), TAGGED, True),  # any pattern
    (("team:marketing", "simple:x"), TAGGED, False),
    (("*:*",), UNTAGGED, False),  # no tags: nothing matches
    (("*:*",), {"id": 7, "type": "feature-created"}, False),
    (("team:?ayments",), TAGGED, False),  # only * is special
    (("team:[p]ayments",), TAGGED, False),
    (("a:b?c",), {"id": 8, "type": "x", "tags": [{"type": "a", "value": "b?c"}]}, True),
    (("a:b:*",), {"id": 9, "type": "x", "tags": [{"type": "a", "value": "b:c"}]}, True),
    (("team:*",), {"id": 10, "type": "x", "tags": [{"type": "team"}, "junk"]}, False),
]


@pytest.mark.parametrize(("patterns", "event", "expected"), TAG_CASES)
def test_tag_filter(patterns: tuple[str, ...], event: dict[str, object], expected: bool) -> None:
    """A tag filter passes an event when any of its type:value tags matches any pattern."""
    assert EventFilter(tags=patterns).matches(event) is expected


def test_tag_filter_combines_with_the_other_filters() -> None:
    """The tags filter is one more condition: a matching tag does not override the type."""
    flt = EventFilter(events=("feature-archived",), tags=("team:payments",))
    assert flt.matches(TAGGED) is False
    assert EventFilter(events=("feature-*",), tags=("team:payments",)).matches(TAGGED)


_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(kind=_TEXT, value=_TEXT)
def test_exact_tag_pattern_matches_only_itself(kind: str, value: str) -> None:
    """Any tag, written as an exact pattern (without *), matches that tag and not a longer one."""
    assume("*" not in kind + value)
    event = {"id": 1, "type": "x", "tags": [{"type": kind, "value": value}]}
    longer = {"id": 1, "type": "x", "tags": [{"type": kind, "value": value + "x"}]}
    assert EventFilter(tags=(f"{kind}:{value}",)).matches(event)
    assert not EventFilter(tags=(f"{kind}:{value}",)).matches(longer)
    assert EventFilter(tags=(f"{kind}:*",)).matches(event)


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [("team:payments", True), ("slack:*", True), ("team", False), (":x", False), ("x:", False)],
)
def test_tag_pattern_problem(pattern: str, ok: bool) -> None:
    """A tag pattern must be type:value with both sides non-empty."""
    assert (tag_pattern_problem(pattern) is None) is ok


@pytest.mark.parametrize(
    ("flt", "everything"),
    [
        (EventFilter(), True),
        (EventFilter(events=("feature-*",)), False),
        (EventFilter(projects=("web",)), False),
        (EventFilter(environments=("production",)), False),
        (EventFilter(tags=("team:*",)), False),
    ],
)
def test_matches_everything_only_without_any_filter(flt: EventFilter, everything: bool) -> None:
    """A filter says it matches every event exactly when it filters on nothing."""
    assert flt.matches_everything is everything

"""Any event Unleash (or something posing as it) can send renders to bytes or a
RenderError (a dead letter with the reason), never another exception: the default body,
Mustache with eventJson and eventMarkdown, and Jinja2, as properties."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poller.markdown import _ACTION_SOURCES
from poller.render import Renderer, RenderError, build_renderer
from tests.test_source_props import INTEGERS, JSON, TEXT

PROPS = settings(max_examples=200, deadline=None)

RENDERERS = {
    "default": build_renderer(None),
    "mustache": build_renderer(
        '{"j": {{{eventJson}}}, "m": "{{eventMarkdown}}", "n": "{{event.featureName}}", '
        '"d": "{{event.data.name}}", "t": "{{#event.tags}}{{value}},{{/event.tags}}", '
        '"c": "{{event.createdAt}}", "p": "{{event.preData}}"} {{eventMarkdown}}'
    ),
    "mustache-json": build_renderer("{{event.data}} {{event.project}}", escape="json"),
    "jinja2": build_renderer(
        "{{ event | tojson }} {{ event.featureName }} {{ event.data }}", engine="jinja2"
    ),
}
# Every type the markdown formatter has a sentence for (each reads different fields).
TYPES = st.sampled_from(sorted(_ACTION_SOURCES))
EVENTS = st.fixed_dictionaries(
    {"id": st.integers(min_value=0, max_value=2**53 - 1), "type": st.one_of(TYPES, TEXT)},
    optional={
        "createdBy": st.one_of(TEXT, JSON),
        "createdAt": st.one_of(st.just("2026-11-28T10:00:00.000Z"), TEXT, JSON),
        "createdByUserId": st.one_of(INTEGERS, JSON),
        "data": JSON,
        "preData": JSON,
        "tags": st.one_of(
            st.lists(st.fixed_dictionaries({"type": TEXT, "value": TEXT}), max_size=3), JSON
        ),
        "featureName": st.one_of(TEXT, JSON),
        "project": st.one_of(TEXT, JSON),
        "environment": st.one_of(TEXT, JSON),
        "groupType": JSON,
        "groupId": JSON,
        "label": JSON,
        "summary": JSON,
    },
)


@pytest.mark.parametrize("name", sorted(RENDERERS))
@PROPS
@given(event=EVENTS)
@example(event={"id": 1, "type": "feature-created", "featureName": "f21\ud800"})
@example(event={"id": 1, "type": "feature-created", "createdAt": "+275760-09-13T00:00:00.001Z"})
def test_any_event_renders_or_is_a_render_error(name: str, event: dict[str, object]) -> None:
    """Whatever its fields hold, an event gives a valid UTF-8 body or a RenderError."""
    renderer: Renderer = RENDERERS[name]
    try:
        body = renderer.render(event)
    except RenderError as exc:
        body, problem = b"", str(exc)
    else:
        problem = None
    if problem is not None:
        assert problem
        return
    body.decode("utf-8")
    if name == "default":
        assert json.loads(body)["id"] == event["id"]

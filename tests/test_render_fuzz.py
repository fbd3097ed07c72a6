"""Property tests for both template engines under size and time bounds (issue 11): any
template source and any event give a body within max_body_bytes, or a named template or
render error; never another exception, never longer than the time budget."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from poller.render import RENDER_TIME_BUDGET_S, BadTemplateError, RenderError, build_renderer

MAX_BODY = 4096
# The budget, plus what one refused C call or the thread hand-off may add on a busy machine.
TIME_BOUND_S = RENDER_TIME_BUDGET_S + 1.5

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
events = st.fixed_dictionaries(
    {
        "id": st.integers(min_value=1, max_value=2**53),
        "type": st.sampled_from(["feature-created", "feature-updated", "x"]) | st.text(max_size=10),
        "tags": st.lists(
            st.fixed_dictionaries({"type": st.text(max_size=8), "value": st.text(max_size=8)}),
            max_size=30,
        ),
        "data": json_values,
    },
    optional={
        "createdAt": st.sampled_from(["2026-11-28T13:05:31.123Z", "not a date"]),
        "createdBy": st.text(max_size=20),
        "featureName": st.text(max_size=20) | st.none(),
        "project": st.text(max_size=10) | st.none(),
        "environment": st.text(max_size=10) | st.none(),
        "preData": json_values,
    },
)

MUSTACHE_PIECES = [
    "{{", "}}", "{{{", "}}}", "{{#", "{{^", "{{/", "{{&", "{{!", "{{>", "{{=<% %>=}}", "<%", "%>",
    "event", "eventJson", "eventMarkdown", "event.tags", "event.data", "event.id", ".", "value",
    "length", "0", "tags", "data", "\n", " ", '"', "x", "\\",
    "{{#event.tags}}", "{{/event.tags}}", "{{{eventJson}}}", "{{eventMarkdown}}",
]  # fmt: skip
JINJA_PIECES = [
    "{{", "}}", "{%", "%}", "{#", "#}", " for ", " in ", " endfor ", " if ", " endif ",
    " set ", " endset ", " macro ", " endmacro ", " filter ", " endfilter ", "range(", ")",
    "100000", "99999999", "event", "eventJson", "eventMarkdown", ".tags", ".data", ".id", "|",
    "tojson", "join", "replace", "center", "indent", "format", "length", "string", "list",
    "*", "**", "+", "~", "%", "(", ",", "'x'", '"{:>9}"', "namespace(", "=", "ns", "t", "i",
    "{% for i in range(100000) %}", "{% endfor %}", "{{ eventJson }}",
    "{% set ns = namespace(s='x') %}",
    "{% set ns.s = ns.s ~ ns.s %}", "{% set ns.s = ns.s * 2 %}", "\n", " ", "x",
    "2**2047", "[2**2047]", "700000",
]  # fmt: skip


def _sources(pieces: list[str]) -> st.SearchStrategy[str]:
    """Token soup: mostly templates that do not compile, some that do oddly."""
    return st.lists(st.sampled_from(pieces) | st.text(max_size=4), max_size=25).map("".join)


MUSTACHE_NAMES = [
    "event", "event.tags", "eventJson", "eventMarkdown", ".", "value", "type", "event.data",
    "event.id", "event.tags.length", "tags", "data", "missing",
]  # fmt: skip


def _mustache_grammar() -> st.SearchStrategy[str]:
    """Templates that compile: text, variables, and sections nested in any way over the
    event's lists (where a template's work multiplies)."""
    name = st.sampled_from(MUSTACHE_NAMES)
    leaf = (
        st.sampled_from(["x", "\n", '"', " ", "\\"])
        | name.map(lambda n: "{{" + n + "}}")
        | name.map(lambda n: "{{{" + n + "}}}")
    )

    def section(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        return st.tuples(st.sampled_from("#^"), name, st.lists(inner, max_size=4)).map(
            lambda t: "{{" + t[0] + t[1] + "}}" + "".join(t[2]) + "{{/" + t[1] + "}}"
        )

    return st.lists(st.recursive(leaf, section, max_leaves=12), max_size=6).map("".join)


JINJA_EXPRESSIONS = ["event", "eventJson", "eventMarkdown", "event.tags", "event.data",
                     "event.id", "t", "i", "ns.s", "'x'", "range(100000)", "range(1000)",
                     "event.tags|length", "99999999", "7", "2**2047", "[2**2047]",
                     "700000"]  # fmt: skip
JINJA_FILTERS = ["tojson", "string", "list", "length", "join(eventJson)", "replace('', eventJson)",
                 "center(99999999)", "indent(99999999)", "upper", "first", "wordwrap(1)",
                 "format(1)", "map('string')|join"]  # fmt: skip


def _jinja_grammar() -> st.SearchStrategy[str]:
    """Templates that compile: loops over long ranges, growing namespaces, buffered blocks,
    and the operators and filters that build big values."""
    expression = st.recursive(
        st.sampled_from(JINJA_EXPRESSIONS),
        lambda inner: (
            st.tuples(inner, st.sampled_from(["*", "**", "+", "~", "%"]), inner).map(
                lambda t: f"({t[0]} {t[1]} {t[2]})"
            )
            | st.tuples(inner, st.sampled_from(JINJA_FILTERS)).map(lambda t: f"({t[0]}|{t[1]})")
        ),
        max_leaves=4,
    )
    leaf = st.sampled_from(["x", "\n", " "]) | expression.map(lambda e: "{{ " + e + " }}")

    def block(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        body = st.lists(inner, max_size=3).map("".join)
        return (
            st.tuples(st.sampled_from(["t", "i"]), expression, body).map(
                lambda t: f"{{% for {t[0]} in {t[1]} %}}{t[2]}{{% endfor %}}"
            )
            | st.tuples(expression, body).map(lambda t: f"{{% if {t[0]} %}}{t[1]}{{% endif %}}")
            | expression.map(lambda e: f"{{% set ns.s = {e} %}}")
            | body.map(lambda b: f"{{% set b %}}{b}{{% endset %}}{{{{ b }}}}")
            | body.map(lambda b: f"{{% filter upper %}}{b}{{% endfilter %}}")
        )

    statements = st.lists(st.recursive(leaf, block, max_leaves=8), max_size=5).map("".join)
    return statements.map(lambda s: "{% set ns = namespace(s='x') %}" + s)


def _render_within_bounds(source: str, engine: str, event: dict[str, object]) -> None:
    try:
        renderer = build_renderer(source, engine=engine, max_body_bytes=MAX_BODY)  # type: ignore[arg-type]
    except BadTemplateError as exc:
        message = str(exc)
        assert message, "a template error names what is wrong"
        return
    started = time.monotonic()
    try:
        body = renderer.render(event)
    except RenderError as exc:
        message = str(exc)
        assert message, "a render error names what is wrong"
    else:
        assert len(body) <= MAX_BODY
    took = time.monotonic() - started
    assert took < TIME_BOUND_S, (took, source)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_sources(MUSTACHE_PIECES), event=events)
def test_any_mustache_template_on_any_event_is_a_bounded_body_or_a_named_error(
    source: str, event: dict[str, object]
) -> None:
    """Mustache: any source, any event → bytes within max_body_bytes, BadTemplateError or
    RenderError, within the time bound."""
    _render_within_bounds(source, "mustache", event)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_sources(JINJA_PIECES), event=events)
def test_any_jinja_template_on_any_event_is_a_bounded_body_or_a_named_error(
    source: str, event: dict[str, object]
) -> None:
    """Jinja2: any source, any event → bytes within max_body_bytes, BadTemplateError or
    RenderError, within the time bound."""
    _render_within_bounds(source, "jinja2", event)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_mustache_grammar(), event=events)
def test_any_nesting_of_mustache_sections_is_bounded(source: str, event: dict[str, object]) -> None:
    """Mustache templates that compile, with sections nested over the event's lists:
    bounded body or RenderError, within the time bound."""
    _render_within_bounds(source, "mustache", event)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(source=_jinja_grammar(), event=events)
def test_any_jinja_program_is_bounded(source: str, event: dict[str, object]) -> None:
    """Jinja2 templates that compile, with loops, growing values and buffered blocks:
    bounded body or a named error, within the time bound."""
    _render_within_bounds(source, "jinja2", event)

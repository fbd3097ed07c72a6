"""Bodies: Unleash's default JSON, the Mustache context and escape modes, Jinja2, limits.

Byte-for-byte agreement with Unleash itself is proven against a real server in
tests/test_e2e_daemon.py; these tests pin the rules on fixed inputs.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.render import (
    UNREADABLE,
    BadTemplateError,
    RenderError,
    ServerProfile,
    build_renderer,
    parse_saved_profile,
    parse_version,
    saved_profile_text,
)

EVENT = {
    "id": 42,
    "type": "feature-created",
    "createdBy": "ann@example.com",
    "createdAt": "2026-11-28T13:05:31.123Z",
    "createdByUserId": 3,
    "data": {"name": "checkout", "description": 'q" <t> & /s =e', "enabled": True, "weight": 1.0},
    "preData": None,
    "tags": [{"type": "simple", "value": "a"}],
    "featureName": "checkout",
    "project": "web",
    "environment": None,
    "label": "Flag created",
    "summary": "**ann** created **checkout**",
}


def _render(template: str | None, **kwargs: object) -> str:
    return build_renderer(template, **kwargs).render(EVENT).decode()  # type: ignore[arg-type]


def test_default_body_is_unleash_event_json() -> None:
    """No template: compact JSON in Unleash's field order, without label/summary, 1 not 1.0."""
    body = _render(None)
    assert list(json.loads(body)) == [
        "id",
        "type",
        "createdBy",
        "createdAt",
        "createdByUserId",
        "data",
        "preData",
        "tags",
        "featureName",
        "project",
        "environment",
    ]
    assert '"weight":1}' in body
    assert body.startswith('{"id":42,"type":"feature-created","createdBy":"ann@example.com",')
    assert build_renderer("").describe == "default JSON"


@pytest.mark.parametrize(
    ("escape", "expected"),
    [
        ("unleash", "q&quot; &lt;t&gt; &amp; &#x2F;s &#x3D;e"),
        ("none", 'q" <t> & /s =e'),
        ("json", 'q\\" <t> & /s =e'),
    ],
)
def test_escape_modes(escape: str, expected: str) -> None:
    """`{{ }}` escapes as mustache.js (unleash), not at all (none), or for JSON (json)."""
    assert _render("{{event.data.description}}", escape=escape) == expected


def test_javascript_values_and_event_json() -> None:
    """Values print the JavaScript way; eventJson is the event JSON as a JSON string."""
    body = _render(
        "{{event.data.enabled}} {{event.data.weight}} {{event.data}} "
        "{{event.environment}}|{{{eventJson}}}"
    )
    shown, event_json = body.split("|", 1)
    assert shown == "true 1 [object Object] "
    assert json.loads(json.loads(event_json)) == json.loads(_render(None))


def test_created_at_is_a_javascript_date() -> None:
    """{{event.createdAt}} prints as Unleash's in-memory Date does (in UTC)."""
    assert (
        _render("{{event.createdAt}}")
        == "Sat Nov 28 2026 13:05:31 GMT+0000 (Coordinated Universal Time)"
    )


def test_event_markdown_is_json_escaped_inside_quotes_only() -> None:
    """eventMarkdown is spliced in JSON-escaped inside "…" and raw elsewhere, never
    HTML-escaped, as Unleash 8.2.0 does."""
    event = {**EVENT, "createdBy": 'a "quoted" <user>'}
    renderer = build_renderer('{"text": "{{eventMarkdown}}"} {{eventMarkdown}}')
    body = renderer.render(event).decode()
    quoted, raw = body.split("} ", 1)
    assert '\\"quoted\\" <user>' in quoted
    assert '"quoted" <user>' in raw
    assert json.loads(quoted + "}")["text"] == raw


def test_jinja2_sandbox_and_tojson() -> None:
    """Jinja2 gets the same context and a JSON (not HTML) tojson; the sandbox blocks
    attribute tricks."""
    body = _render(
        '{"flag": {{ event.featureName | tojson }}, "tags": {{ event.tags | tojson }}, '
        '"d": {{ event.data.description | tojson }}}',
        engine="jinja2",
    )
    assert json.loads(body) == {
        "flag": "checkout",
        "tags": [{"type": "simple", "value": "a"}],
        "d": 'q" <t> & /s =e',
    }
    assert "\\u003c" not in body
    with pytest.raises(RenderError, match="template failed: SecurityError"):
        _render("{{ event.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", engine="jinja2")


def test_jinja2_runaway_loop_is_stopped() -> None:
    """A template loop that would produce endless output is cut off, not run to the end."""
    loop = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    with pytest.raises(RenderError, match=r"template (output passed|ran longer)"):
        _render(loop, engine="jinja2", max_body_bytes=1_000_000)


def test_body_over_the_limit_is_refused() -> None:
    """A rendered body larger than max_body_bytes is an error for that event."""
    big = {**EVENT, "data": {"description": "x" * 5000}}
    with pytest.raises(RenderError, match=r"rendered body is \d+ bytes, over max_body_bytes"):
        build_renderer(None, max_body_bytes=2048).render(big)


def test_unreadable_event_fails_with_its_reason() -> None:
    """An event the source could not parse fails to render, giving the reason."""
    event = {"id": 7, "type": "unreadable", UNREADABLE: "its JSON is nested too deeply"}
    with pytest.raises(RenderError, match="could not be read from Unleash: its JSON is nested"):
        build_renderer(None).render(event)


@pytest.mark.parametrize(
    ("template", "engine", "message"),
    [
        ("{{#a}}", "mustache", 'invalid Mustache: Unclosed section "a"'),
        ("{{ a", "mustache", "invalid Mustache: Unclosed tag"),
        ("{% for %}", "jinja2", "invalid Jinja2 at line 1"),
        ("{{ os.system }}", "jinja2", "unknown name(s) os"),
    ],
)
def test_bad_templates_are_config_errors(template: str, engine: str, message: str) -> None:
    """A template that cannot compile is refused at load with a clear message."""
    with pytest.raises(BadTemplateError) as info:
        build_renderer(template, engine=engine)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


# -- the server's profile: escaping, context and links follow the Unleash being polled

VERSION_CASES = [
    ("8.2.0", "unleash", True),
    ("8.0.3", "unleash", True),
    ("8.0.2", "none", True),
    ("7.6.5", "none", True),
    ("6.10.1", "none", True),
    ("6.0.0", "none", True),
    ("5.12.8", "unleash", False),
    ("5.0.0+enterprise", "unleash", False),
    (None, "unleash", True),  # not known: as 8.x
    ("nonsense", "unleash", True),
]


@pytest.mark.parametrize(("version", "escape", "markdown"), VERSION_CASES)
def test_default_escape_and_context_follow_the_version(
    version: str | None, escape: str, markdown: bool
) -> None:
    """HTML escaping on 5.x and 8.0.3+, none on 6.0-8.0.2; 5.x has no eventMarkdown."""
    profile = ServerProfile(version, "http://localhost:4242")
    chosen, reason = profile.escape()
    assert chosen == escape
    assert reason  # the start-up log line says why
    assert profile.event_markdown is markdown


def test_5x_renders_event_markdown_empty() -> None:
    """On Unleash 5.x `{{eventMarkdown}}` renders empty, as its webhook has no such name."""
    template = '{"text": "{{eventMarkdown}}", "flag": "{{event.featureName}}"}'
    body = build_renderer(template, event_markdown=False).render(EVENT).decode()
    assert body == '{"text": "", "flag": "checkout"}'
    jinja = build_renderer("[{{ eventMarkdown }}]", "jinja2", event_markdown=False)
    assert jinja.render(EVENT) == b"[]"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("8.2.0", (8, 2, 0)),
        ("v7.6.5", (7, 6, 5)),
        ("6.3.0+ab12", (6, 3, 0)),
        ("5.12.8-beta.1", (5, 12, 8)),
        ("8.2", None),
        ("", None),
        (None, None),
        (8, None),
    ],
)
def test_parse_version(text: object, parsed: tuple[int, int, int] | None) -> None:
    """Versions as ui-config reports them; anything else is "unknown", not an error."""
    assert parse_version(text) == parsed


@settings(max_examples=50, deadline=None)
@given(st.tuples(*(st.integers(0, 99999) for _ in range(3))), st.text(max_size=8))
def test_parse_version_reads_back_any_version(numbers: tuple[int, int, int], suffix: str) -> None:
    """A.B.C followed by anything parses as (A, B, C)."""
    text = ".".join(map(str, numbers)) + ("+" + suffix if suffix else "")
    assert parse_version(text) == numbers


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=20))
def test_parse_version_never_raises(text: str) -> None:
    """Whatever a server reports, parsing gives a version or None."""
    result = parse_version(text)
    assert result is None or len(result) == 3


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "not json",
        "[]",
        '{"version": "8.2.0"}',  # no link base
        '{"version": 8, "unleash_url": "http://u"}',
        '{"version": null, "unleash_url": "ftp://u"}',
        "[" * 100000,
    ],
)
def test_parse_saved_profile_refuses_what_it_did_not_write(text: str | None) -> None:
    """A profile note missing or edited out of shape in the state file is "none saved"."""
    assert parse_saved_profile(text) is None


@settings(max_examples=50, deadline=None)
@given(
    st.one_of(st.none(), st.text(max_size=12)),
    st.sampled_from(["http://", "https://"]).flatmap(lambda s: st.text(max_size=20).map(s.__add__)),
)
def test_saved_profile_reads_back(version: str | None, url: str) -> None:
    """What saved_profile_text writes, parse_saved_profile reads back (version and link base)."""
    back = parse_saved_profile(saved_profile_text(ServerProfile(version, url)))
    assert back is not None
    assert (back.version, back.unleash_url) == (version, url)


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_parse_saved_profile_never_raises(text: str) -> None:
    """Any text in the note gives a profile or None, never an exception."""
    parsed = parse_saved_profile(text)
    assert parsed is None or parsed.unleash_url.startswith(("http://", "https://"))

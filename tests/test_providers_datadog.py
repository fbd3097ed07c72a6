"""poller.providers.datadog: Unleash's Datadog integration."""

from __future__ import annotations

import json

from poller.providers import datadog
from tests.providers_support import LINK, event, settings


def test_events_api_body_and_api_key() -> None:
    """text wraps the markdown in %%%, title, tags as type:value, DD-API-KEY header."""
    tagged = event(tags=[{"type": "team", "value": "x"}])
    [request] = datadog.build(tagged, settings(api_key="k1", source_type_name="src"), LINK)
    body = json.loads(request.body)
    assert list(body) == ["text", "title", "tags", "source_type_name"]
    assert body["text"].startswith("%%% \n *ana* created *[flag-a](")
    assert body["text"].endswith(" \n %%% ")
    assert body["tags"] == ["team:x"]
    assert body["title"] == "Unleash notification update"
    assert request.url == datadog.DEFAULT_URL
    assert request.headers == (("Content-Type", "application/json"), ("DD-API-KEY", "k1"))
    assert "dd-api-key" in request.secret_headers


def test_body_template_replaces_only_text_with_html_escaping() -> None:
    """body_template is rendered by mustache.js (HTML-escaped) into `text` only."""
    hook = settings(api_key="k", body_template="{{event.type}}: {{event.data.description}}")
    [request] = datadog.build(event(), hook, LINK)
    body = json.loads(request.body)
    assert body == {
        "text": "feature-created: d &quot;q&quot; &lt;&amp;&gt;",
        "title": "Unleash notification update",
        "tags": [],
    }


def test_body_template_escapes_as_the_settings_say() -> None:
    """With the server profile's "none" (Unleash 6.0 to 8.0.2) `{{ }}` is not escaped."""
    hook = settings(api_key="k", body_template="{{event.data.description}}")
    [request] = datadog.build(event(), hook.with_escape("none"), LINK)
    assert json.loads(request.body)["text"] == 'd "q" <&>'
    [request] = datadog.build(event(), hook.with_escape("unleash"), LINK)
    assert json.loads(request.body)["text"] == "d &quot;q&quot; &lt;&amp;&gt;"


def test_one_character_template_is_no_template() -> None:
    """Unleash uses a template only when it is longer than one character."""
    [request] = datadog.build(event(), settings(api_key="k", body_template="x"), LINK)
    assert json.loads(request.body)["text"].startswith("%%% ")

"""poller.providers.slack_app: Unleash's Slack App integration's chat.postMessage calls."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from poller.providers import slack_app
from poller.providers.base import Answer, Failure
from tests.providers_support import LINK, event, settings

TOKEN = "xoxb-1"  # noqa: S105 - a test value


def test_one_call_per_channel_tags_first_then_defaults_each_once() -> None:
    """Channels are the slack tags, then default_channels, de-duplicated in that order."""
    tagged = event(tags=[{"type": "slack", "value": "b"}, {"type": "team", "value": "x"},
                         {"type": "slack", "value": "a"}])  # fmt: skip
    got = slack_app.build(tagged, settings(access_token=TOKEN, default_channels=("a", "c")), LINK)
    assert [json.loads(r.body)["channel"] for r in got] == ["b", "a", "c"]
    assert [r.part for r in got] == ["channel:b", "channel:a", "channel:c"]


def test_body_is_exactly_unleash_arguments_in_its_order() -> None:
    """channel, text, blocks (mrkdwn section + Open in Unleash button), unfurl_links."""
    [request] = slack_app.build(
        event(), settings(access_token=TOKEN, default_channels=("c",)), LINK
    )
    text = (
        f"*ana* created *<{LINK}/projects/default/features/flag-a|flag-a>* in project"
        f" *<{LINK}/projects/default|default>*"
    )
    button = {
        "type": "button",
        "url": f"{LINK}/projects/default/features/flag-a",
        "text": {"type": "plain_text", "text": "Open in Unleash"},
        "value": "featureToggle",
        "style": "primary",
    }
    expected = {
        "channel": "c",
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "actions", "elements": [button]},
        ],
        "unfurl_links": False,
    }
    assert request.body == json.dumps(expected, separators=(",", ":"), ensure_ascii=False).encode()
    assert request.url == slack_app.DEFAULT_URL
    assert dict(request.headers)["Authorization"] == f"Bearer {TOKEN}"
    assert request.secret_headers == {"authorization"}


def test_no_button_for_an_event_type_unleash_gives_no_link() -> None:
    """A type without a path in Unleash's EVENT_MAP gets only the section block."""
    [request] = slack_app.build(
        event(type="some-new-type"), settings(access_token=TOKEN, default_channels=("c",)), LINK
    )
    assert [b["type"] for b in json.loads(request.body)["blocks"]] == ["section"]


def test_no_channel_no_request() -> None:
    """Unleash sends nothing when there is no tagged and no default channel."""
    assert slack_app.build(event(), settings(access_token=TOKEN), LINK) == []


def test_text_cut_at_3000_utf16_units() -> None:
    """The cut counts UTF-16 code units like JavaScript's substring."""
    long_name = "n" * 2990 + "🚀" * 20
    [request] = slack_app.build(
        event(createdBy=long_name), settings(access_token=TOKEN, default_channels=("c",)), LINK
    )
    text = json.loads(request.body)["text"]
    assert len(text.encode("utf-16-le", "surrogatepass")) == 6000


def test_slack_answers() -> None:
    """ok:false is a failure, retried only for Slack's transient errors; ok:true and
    non-2xx answers are left to the HTTP status."""
    cases = [
        (200, b'{"ok":true,"ts":"1"}', None),
        (200, b'{"ok":false,"error":"channel_not_found"}',
         Failure("Slack error: channel_not_found", retryable=False)),
        (200, b'{"ok":false,"error":"ratelimited"}',
         Failure("Slack error: ratelimited", retryable=True, rate_limited=True)),
        (200, b'{"ok":false,"error":"internal_error"}',
         Failure("Slack error: internal_error", retryable=True)),
        (200, b'{"ok":false}', Failure("Slack error: unknown error", False)),
        (200, b"<html>proxy</html>", Failure("Slack answered with a body that is not JSON", True)),
        (429, b'{"ok":false,"error":"ratelimited"}', None),
        (500, b"", None),
    ]  # fmt: skip
    for status, body, expected in cases:
        assert slack_app.judge(Answer(status, body)) == expected, (status, body)


@hypothesis_settings(max_examples=60)
@given(st.integers(100, 599), st.binary(max_size=200))
def test_judge_never_raises_and_leaves_non_2xx_to_http(status: int, body: bytes) -> None:
    """Any answer at all is judged without an exception; only a 2xx can be a Slack failure."""
    result = slack_app.judge(Answer(status, body))
    if not 200 <= status < 300:
        assert result is None

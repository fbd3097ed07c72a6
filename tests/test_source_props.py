"""Whatever Unleash (or something posing as it) answers, reading it never raises anything
but an UnleashError: the page parser, the event checks and the paging, as properties."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

import aiohttp
from aioresponses import CallbackResult, aioresponses
from hypothesis import example, given, settings
from hypothesis import strategies as st

from poller.config import Secret, UnleashConfig
from poller.ingest import _dump
from poller.source import MAX_EVENT_ID, Page, UnleashError, UnleashSource, _parse_page

PROPS = settings(max_examples=200, deadline=None)
KINDS = {"auth", "server", "timeout", "connection", "bad_response"}

# Any unicode, lone surrogates and JSON's own punctuation included.
TEXT = st.text(
    st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from('"\\{}[],:')),
    max_size=12,
)
INTEGERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, MAX_EVENT_ID, MAX_EVENT_ID + 1, 2**63 - 1, 2**63, 2**64]),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), INTEGERS, st.floats(allow_nan=False, allow_infinity=False), TEXT
)
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4)
)
ENTRY = st.one_of(
    JSON,
    st.fixed_dictionaries(
        {"id": st.one_of(INTEGERS, JSON), "type": st.one_of(TEXT, JSON)},
        optional={"data": JSON, "project": JSON, "featureName": TEXT},
    ),
)


def _encode(value: object, raw_surrogates: bool) -> bytes:
    """As a server would send it: `\\ud800` escapes, or the bytes a lax encoder writes."""
    if raw_surrogates:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    return json.dumps(value).encode("ascii")


def _parse(body: bytes, total_key: str = "total") -> Page | UnleashError:
    try:
        return _parse_page(body, total_key)
    except UnleashError as exc:
        error = exc
    assert error.kind in KINDS
    assert str(error)
    return error


def _assert_sane(page: Page, entries: int) -> None:
    assert page.served == entries
    for event in page.events:
        event_id = event["id"]
        assert isinstance(event_id, int)
        assert not isinstance(event_id, bool)
        assert 0 <= event_id <= MAX_EVENT_ID
        assert isinstance(event["type"], str)
    for refused in page.refused:
        assert refused.reason
        assert len(refused.id) <= 40
    assert page.total is None or (isinstance(page.total, int) and page.total >= 0)


@PROPS
@given(JSON, st.booleans())
def test_any_json_answer_is_a_page_or_an_unleash_error(value: object, raw: bool) -> None:
    """Any JSON document as the answer parses to a page of valid events or an UnleashError."""
    result = _parse(_encode(value, raw))
    if isinstance(result, Page):
        assert isinstance(value, dict)
        _assert_sane(result, len(value["events"]))


@PROPS
@given(st.lists(ENTRY, max_size=8), st.one_of(st.none(), INTEGERS, JSON), st.booleans())
def test_any_entries_are_taken_or_refused_one_by_one(
    entries: list[object], total: object, raw: bool
) -> None:
    """Each entry of the events list is either a valid event or refused on its own; only
    the page's own shape (its `total`) can refuse the whole page."""
    result = _parse(_encode({"events": entries, "total": total}, raw))
    total_ok = total is None or (
        isinstance(total, int) and not isinstance(total, bool) and total >= 0
    )
    if total_ok:
        assert isinstance(result, Page)
        _assert_sane(result, len(entries))
        assert [e["id"] for e in result.events] == [
            e["id"]  # type: ignore[index]
            for e in entries
            if isinstance(e, dict) and e in result.events
        ]
    else:
        assert isinstance(result, UnleashError)


@PROPS
@given(st.binary(max_size=200))
@example(b'{"events": [{"id": ' + b"9" * 5000 + b', "type": "a"}]}')
@example(b'{"events": [], "total": ' + b"9" * 5000 + b"}")
@example(b'\xef\xbb\xbf{"events": []}')
@example(b'{"events": [{"id": 1, "type": "a\xed\xa0\x80"}]}')
def test_any_bytes_are_a_page_or_an_unleash_error(body: bytes) -> None:
    """Any bytes at all (truncated, not UTF-8, a BOM, huge numbers) never raise another error."""
    result = _parse(body)
    if isinstance(result, Page):
        _assert_sane(result, result.served)


@PROPS
@given(st.lists(ENTRY, max_size=5), st.integers(min_value=1001, max_value=3000))
def test_entries_nested_too_deep_are_marked_or_refused(entries: list[object], depth: int) -> None:
    """A page with an event nested deeper than Python parses still gives a page or an
    UnleashError, and its other entries are checked as usual."""
    deep = '{"id": 5, "type": "x", "data": ' + "[" * depth + "]" * depth + "}"
    body = '{"events": [' + ", ".join([deep, *(json.dumps(e) for e in entries)]) + "]}"
    result = _parse(body.encode())
    if isinstance(result, Page):
        _assert_sane(result, len(entries) + 1)
        assert result.events[0]["id"] == 5


def _same_in_javascript(a: object, b: object) -> bool:
    """Equal as JavaScript values: strings compare by UTF-16 code units."""
    if isinstance(a, str) and isinstance(b, str):
        return a.encode("utf-16-le", "surrogatepass") == b.encode("utf-16-le", "surrogatepass")
    if isinstance(a, dict) and isinstance(b, dict):
        return len(a) == len(b) and all(
            any(_same_in_javascript(k, j) and _same_in_javascript(v, b[j]) for j in b)
            for k, v in a.items()
        )
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same_in_javascript, a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return type(a) is type(b) and a == b


@PROPS
@given(st.dictionaries(TEXT, JSON, max_size=6))
def test_any_event_is_stored_as_utf8_and_reads_back_the_same(event: dict[str, object]) -> None:
    """What the state file stores for an event is valid UTF-8 and reads back as the same
    JavaScript value, lone surrogates included."""
    text = _dump(event)
    text.encode("utf-8")
    assert _same_in_javascript(json.loads(text), event)


CONFIG = UnleashConfig(
    url="http://unleash.test", token=Secret("t"), public_url="http://unleash.test", timeout_s=2
)


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(min_value=0, max_value=300),
    cap=st.integers(min_value=10, max_value=150),
    ignore_offset=st.booleans(),
    total_error=st.sampled_from([None, 0, 0, 0, -7, 5, 300]),
)
def test_paging_ends_whatever_the_server_does(
    count: int, cap: int, ignore_offset: bool, total_error: int | None
) -> None:
    """Against a server that caps pages, ignores `offset` or misreports `total`, reading
    the log ends within a bounded number of requests: with every id when the server is
    honest, with an UnleashError otherwise, never an endless loop."""
    asked: list[tuple[int, int]] = []

    def answer(url: object, **kwargs: Any) -> CallbackResult:
        offset, limit = int(kwargs["params"].get("offset", 0)), int(kwargs["params"]["limit"])
        asked.append((offset, limit))
        assert len(asked) <= count // cap + 5, "paging does not end"
        start = 0 if ignore_offset else offset
        ids = list(range(count - start, max(0, count - start - min(limit, cap)), -1))
        payload: dict[str, object] = {"events": [{"id": i, "type": "a"} for i in ids]}
        if total_error is not None:
            payload["total"] = max(0, count + total_error)
        return CallbackResult(payload=payload)

    async def read() -> list[int] | UnleashError:
        async with aiohttp.ClientSession() as session:
            source = UnleashSource(session, CONFIG)
            try:
                return [int(e["id"]) async for p in source.pages(50, 100) for e in p.events]  # type: ignore[call-overload]
            except UnleashError as exc:
                return exc

    with aioresponses() as mocked:
        mocked.get(re.compile(r"^http://unleash\.test/.*"), callback=answer, repeat=True)
        result = asyncio.run(read())
    # Ignoring `offset` is harmless only while `total` shows the first page held it all.
    honest = total_error in (None, 0) and (
        not ignore_offset or count == 0 or (total_error == 0 and count <= min(50, cap))
    )
    if honest:
        assert result == list(range(count, 0, -1))
    elif isinstance(result, UnleashError):
        assert result.kind == "bad_response"

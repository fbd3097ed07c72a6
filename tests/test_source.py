"""The Unleash client on answers a healthy server will not give: errors, junk, lies.

aioresponses stands in for Unleash only here, for edge cases a real server cannot be made
to produce on demand; the happy paths run against a real Unleash in the e2e tests.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from poller.config import Secret, UnleashConfig
from poller.render import UNREADABLE, ServerProfile
from poller.source import (
    Capabilities,
    UnleashError,
    UnleashSource,
    parse_ui_config,
    read_server_profile,
)

BASE = "http://unleash.test"
SEARCH = re.compile(r"^http://unleash\.test/api/admin/search/events.*$")
CONFIG = UnleashConfig(url=BASE, token=Secret("*:*.tok"), public_url=BASE, timeout_s=2)
T = TypeVar("T")


def _run(call: Callable[[UnleashSource], Awaitable[T]]) -> T:
    async def main() -> T:
        async with aiohttp.ClientSession() as session:
            return await call(UnleashSource(session, CONFIG))

    return asyncio.run(main())


def _error(call: Callable[[UnleashSource], Awaitable[object]]) -> UnleashError:
    with pytest.raises(UnleashError) as info:
        _run(call)
    return info.value


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (401, '{"message":"no"}', "auth", "401 — the token is missing, wrong"),
        (403, "{}", "auth", "403"),
        (500, "oops", "server", "server error 500"),
        (503, "", "server", "server error 503"),
        (200, "<html>", "bad_response", "answer is not JSON (starts '<html>')"),
        (200, '{"total": 3}', "bad_response", "answer has no 'events' list"),
        (200, '{"events": [], "total": "many"}', "bad_response", "'total' is not an integer"),
        (200, '{"events": [], "total": -1}', "bad_response", "'total' is negative"),
        (200, '{"events": {"id": 1}}', "bad_response", "answer has no 'events' list"),
        (200, '[{"id": 1, "type": "x"}]', "bad_response", "answer has no 'events' list"),
        (200, b'{"events": ["\xff"]}', "bad_response", "answer is not JSON"),
        (200, '{"events": [], "total": ' + "9" * 5000 + "}", "bad_response", "not an integer"),
        (418, "{}", "bad_response", "unexpected status 418"),
    ],
)
def test_bad_answers_become_one_clear_error(
    status: int, body: str | bytes, kind: str, message: str
) -> None:
    """Each kind of bad answer is an UnleashError with a kind and a readable sentence."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, status=status, body=body)
        error = _error(lambda s: s.page(0, 10))
    assert error.kind == kind
    assert message in str(error)
    assert "*:*.tok" not in str(error)


def test_connection_refused_and_timeout() -> None:
    """Network failures are 'connection' and 'timeout' errors, not exceptions of aiohttp."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, exception=aiohttp.ClientConnectionError("refused"))
        assert _error(lambda s: s.page(0, 10)).kind == "connection"
    with aioresponses() as mocked:
        mocked.get(SEARCH, exception=TimeoutError())
        error = _error(lambda s: s.page(0, 10))
    assert error.kind == "timeout"
    assert "no answer within 2s" in str(error)


def test_oversized_page_is_refused() -> None:
    """A page larger than the byte limit is refused instead of read into memory."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, body="x", headers={"Content-Length": str(10**9)})
        error = _error(lambda s: s.page(0, 10))
    assert "over the" in str(error)


def test_detect_falls_back_to_post_search_then_legacy() -> None:
    """Without GET search (Unleash 5.x) the POST search is used; without both, the legacy list."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, status=404)
        mocked.post(
            f"{BASE}/api/admin/events/search", status=200, payload={"events": [], "totalEvents": 0}
        )
        caps = _run(lambda s: s.detect())
    assert caps == Capabilities("post-search", id_filter=False)
    with aioresponses() as mocked:
        mocked.get(SEARCH, status=404)
        mocked.post(f"{BASE}/api/admin/events/search", status=404)
        mocked.get(f"{BASE}/api/admin/events", status=200, payload={"events": []})
        caps = _run(lambda s: s.detect())
    assert caps.api == "legacy"
    assert "newest 100 only" in caps.describe()


def test_ignored_id_filter_is_detected() -> None:
    """A server that returns ids it was not asked for (6.x) turns gap re-checks off and the
    answer is not taken for the ids asked."""

    async def call(source: UnleashSource) -> tuple[object, Capabilities]:
        return await source.fetch_ids([1, 2]), source.capabilities

    with aioresponses() as mocked:
        mocked.get(
            SEARCH, payload={"events": [{"id": 6, "type": "a"}, {"id": 2, "type": "b"}], "total": 6}
        )
        found, caps = _run(call)
    assert found == ([], [])
    assert caps.id_filter is False


@pytest.mark.parametrize(("answer", "honoured"), [([9], True), ([12, 9], False), ([12], False)])
def test_detect_checks_the_id_filter(answer: list[int], honoured: bool) -> None:
    """detect() asks for one known id; any other answer means the filter is ignored (6.x)."""
    with aioresponses() as mocked:
        mocked.get(
            SEARCH,
            payload={"events": [{"id": 12, "type": "a"}, {"id": 9, "type": "b"}], "total": 2},
        )
        mocked.get(SEARCH, payload={"events": [{"id": i, "type": "a"} for i in answer], "total": 2})
        caps = _run(lambda s: s.detect())
    assert caps == Capabilities("search", id_filter=honoured)


def test_post_search_pages_are_at_most_100() -> None:
    """Unleash 5.x refuses a POST search limit over 100: pages ask for 100 at most."""
    sent: list[object] = []

    def record(url: object, **kwargs: object) -> None:
        sent.append(kwargs.get("json"))

    async def call(source: UnleashSource) -> int:
        source.capabilities = Capabilities("post-search", id_filter=False)
        return sum([len(p.events) async for p in source.pages(50, 1000)])

    with aioresponses() as mocked:
        mocked.post(
            f"{BASE}/api/admin/events/search",
            callback=record,
            payload={"events": [{"id": i, "type": "a"} for i in range(99)], "totalEvents": 130},
        )
        mocked.post(
            f"{BASE}/api/admin/events/search",
            callback=record,
            payload={"events": [{"id": i, "type": "a"} for i in range(31)], "totalEvents": 130},
        )
        count = _run(call)
    assert count == 130
    assert sent == [{"limit": 99, "offset": 0}, {"limit": 99, "offset": 99}]


@pytest.mark.parametrize(
    ("body", "total"),
    [
        (b'{"events": [{"id": 9, "type": "a"}], "total": 4321}', 4321),
        (b'{"events": [], "total": -1}', None),
        (b'{"events": [], "total": "many"}', None),
        (b'{"events": []}', None),
        (b"<html>proxy</html>", None),
        (b'{"events": [{"id": "x"}], "total": 7}', 7),
    ],
)
def test_a_probe_that_finds_a_change_keeps_the_logs_size(body: bytes, total: int | None) -> None:
    """The size a changed probe reports says where a burst's oldest page lies; a size that
    is not one is no size (the read that follows reports what is wrong), and a 304 keeps
    none."""

    async def call(source: UnleashSource) -> tuple[bool, int | None, bool, int | None]:
        first = await source.changed()
        seen = source.probed_total
        return first, seen, await source.changed(), source.probed_total

    with aioresponses() as mocked:
        mocked.get(SEARCH, status=200, body=body, headers={"ETag": 'W/"a"'})
        mocked.get(SEARCH, status=304)
        assert _run(call) == (True, total, False, None)


def test_probe_uses_etag_and_304() -> None:
    """The idle probe sends If-None-Match with the last ETag; 304 means nothing changed."""
    seen: list[str | None] = []

    def record(url: object, **kwargs: object) -> None:
        headers = kwargs.get("headers")
        seen.append(headers.get("If-None-Match") if isinstance(headers, dict) else None)

    async def call(source: UnleashSource) -> tuple[bool, bool]:
        return await source.changed(), await source.changed()

    with aioresponses() as mocked:
        mocked.get(
            SEARCH,
            status=200,
            payload={"events": [], "total": 0},
            headers={"ETag": 'W/"abc"'},
            callback=record,
        )
        mocked.get(SEARCH, status=304, callback=record)
        first, second = _run(call)
    assert (first, second) == (True, False)
    assert seen == [None, 'W/"abc"']


def test_deeply_nested_event_is_marked_not_fatal() -> None:
    """An event nested deeper than Python's parser goes is marked unreadable (to be
    dead-lettered) while its neighbours on the page are read normally."""
    deep = '{"id": 8, "type": "x", "data": ' + "[" * 5000 + "]" * 5000 + "}"
    body = (
        '{"events": [{"id": 9, "type": "a", "data": {"s": "]}[{"}}, '
        + deep
        + ', {"id": 7, "type": "b"}], "total": 3}'
    )
    with aioresponses() as mocked:
        mocked.get(SEARCH, body=body)
        page = _run(lambda s: s.page(0, 10))
    assert [e["id"] for e in page.events] == [9, 8, 7]
    assert page.total == 3
    assert page.events[0]["data"] == {"s": "]}[{"}
    assert "nested too deeply" in str(page.events[1][UNREADABLE])
    assert UNREADABLE not in page.events[2]


def _events(*ids: int) -> dict[str, object]:
    return {"events": [{"id": i, "type": "a"} for i in ids], "total": 9}


def test_one_event_unleash_cannot_serve_is_stepped_around() -> None:
    """A page that fails with 500 because of one event (Unleash cannot build its summary) is
    read in halves; the one event is skipped, the rest come back."""
    with aioresponses() as mocked:
        for answer in (500, 500, _events(4), 500, _events(2), _events(2, 1)):
            if answer == 500:
                mocked.get(SEARCH, status=500)
            else:
                mocked.get(SEARCH, payload=answer)

        async def call(source: UnleashSource) -> tuple[list[int], int, int]:
            page = await source.read(0, 4)
            return [int(e["id"]) for e in page.events], page.skipped, source.unreadable  # type: ignore[call-overload]

        ids, skipped, unreadable = _run(call)
    assert (ids, skipped, unreadable) == ([4, 2, 1], 1, 1)


def test_an_outage_is_not_mistaken_for_a_bad_event() -> None:
    """When every request fails, reading around a bad event gives up with the server error."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, status=500, repeat=True)
        error = _error(lambda s: s.read(0, 8))
    assert error.kind == "server"


def test_gap_recheck_separates_ids_unleash_cannot_serve() -> None:
    """Re-checking ids: a chunk that fails is split; an id that alone fails is reported."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, status=500)  # ids 3,5
        mocked.get(SEARCH, payload=_events(3))  # id 3
        mocked.get(SEARCH, status=500)  # id 5
        mocked.get(SEARCH, payload=_events(9))  # is Unleash up? yes
        found, failing = _run(lambda s: s.fetch_ids([3, 5]))
    assert [e["id"] for e in found] == [3]
    assert failing == [5]


@pytest.mark.parametrize(
    ("entry", "shown", "reason"),
    [
        ({"id": 2**63, "type": "x"}, "9223372036854775808", "above 2**53 - 1"),
        ({"id": 2**53, "type": "x"}, "9007199254740992", "above 2**53 - 1"),
        ({"id": -1, "type": "x"}, "-1", "negative"),
        ({"id": True, "type": "x"}, "true", "not an integer"),
        ({"id": 5.0, "type": "x"}, "5.0", "not an integer"),
        ({"id": "7", "type": "x"}, '"7"', "not an integer"),
        ({"id": 7}, "7", "type is not a string"),
        ({"id": 7, "type": ["x"]}, "7", "type is not a string"),
        ({"type": "x"}, "?", "has no id"),
        ("event", "?", "not an object"),
        (None, "?", "not an object"),
    ],
)
def test_a_bad_entry_is_refused_alone(entry: object, shown: str, reason: str) -> None:
    """An entry that is not a usable event is refused by name; its neighbours are read."""
    body = {"events": [{"id": 9, "type": "a"}, entry, {"id": 7, "type": "b"}], "total": 3}
    with aioresponses() as mocked:
        mocked.get(SEARCH, payload=body)
        page = _run(lambda s: s.page(0, 10))
    assert [e["id"] for e in page.events] == [9, 7]
    assert len(page.refused) == 1
    assert page.refused[0].index == 1
    assert page.refused[0].id == shown
    assert reason in page.refused[0].reason
    assert page.served == 3


def test_a_huge_id_in_a_too_deep_event_is_refused_not_a_crash() -> None:
    """An event too deep to parse whose id has thousands of digits is refused by name."""
    deep = '{"id": ' + "9" * 5000 + ', "type": "x", "data": ' + "[" * 5000 + "]" * 5000 + "}"
    body = '{"events": [' + deep + ', {"id": 7, "type": "b"}], "total": 2}'
    with aioresponses() as mocked:
        mocked.get(SEARCH, body=body)
        page = _run(lambda s: s.page(0, 10))
    assert [e["id"] for e in page.events] == [7]
    assert page.refused[0].id.startswith('"999')
    assert page.total == 2


def _serve_log(
    count: int, cap: int, *, ignore_offset: bool = False, total: bool = True
) -> tuple[Callable[..., CallbackResult], list[tuple[int, int]]]:
    """A fake search endpoint over ids 1..count, newest first, that never answers more than
    `cap` events a page (a proxy's cap, or Unleash 8.2.0 on limit > 1000)."""
    asked: list[tuple[int, int]] = []

    def answer(url: URL, **kwargs: object) -> CallbackResult:
        params = kwargs.get("params") or {}
        assert isinstance(params, dict)
        limit, offset = int(params.get("limit", 50)), int(params.get("offset", 0))
        asked.append((offset, limit))
        assert len(asked) < 100, "paging does not end"
        start = 0 if ignore_offset else offset
        ids = list(range(count - start, max(0, count - start - min(limit, cap)), -1))
        payload: dict[str, object] = {"events": [{"id": i, "type": "a"} for i in ids]}
        if total:
            payload["total"] = count
        return CallbackResult(payload=payload)

    return answer, asked


def _read_all(source: UnleashSource) -> Awaitable[list[int]]:
    async def read() -> list[int]:
        return [int(e["id"]) async for p in source.pages(50, 1000) for e in p.events]  # type: ignore[call-overload]

    return read()


@pytest.mark.parametrize("total", [True, False])
def test_pages_capped_by_a_proxy_are_read_to_the_end(total: bool) -> None:
    """Pages shorter than asked are not the end of the log: every id is read, by what came
    back and `total` (or, without one, until an empty page)."""
    answer, asked = _serve_log(2000, cap=100, total=total)
    with aioresponses() as mocked:
        mocked.get(SEARCH, callback=answer, repeat=True)
        ids = _run(_read_all)
    assert ids == list(range(2000, 0, -1))
    assert asked[:3] == [(0, 50), (50, 1000), (150, 1000)]
    assert len(asked) == 21 + (0 if total else 1)  # 50, then 1950 in pages of 100


def test_a_server_that_ignores_offset_is_one_clear_error() -> None:
    """Pages that repeat the previous one stop the read with one error, not an endless loop."""
    answer, asked = _serve_log(5000, cap=1000, ignore_offset=True, total=False)
    with aioresponses() as mocked:
        mocked.get(SEARCH, callback=answer, repeat=True)
        error = _error(_read_all)
    assert error.kind == "bad_response"
    assert "repeats the previous page" in str(error)
    assert "ignores `offset`" in str(error)
    assert len(asked) == 3


def test_an_empty_page_before_the_total_is_an_error() -> None:
    """An empty page while `total` says more exist (Unleash's answer on a database error)
    is an error to retry, not the end of the log."""
    with aioresponses() as mocked:
        mocked.get(SEARCH, payload=_events(9, 8))
        mocked.get(SEARCH, payload={"events": [], "total": 9})
        error = _error(_read_all)
    assert "came back empty, but the server says it holds 9 events" in str(error)


def test_gap_recheck_through_a_capping_proxy_gets_every_id() -> None:
    """Re-checking ids through a proxy that caps pages at 3: the ids it left out are asked
    for again, so no late event is given up while it can still be read."""
    asked: list[str] = []

    def answer(url: URL, **kwargs: object) -> CallbackResult:
        params = kwargs.get("params") or {}
        assert isinstance(params, dict)
        ids = [int(i) for i in str(params["id"]).removeprefix("IS_ANY_OF:").split(",")]
        asked.append(str(params["id"]))
        found = [i for i in ids if i % 2 == 0]  # the odd ids were rolled back
        return CallbackResult(
            payload={"events": [{"id": i, "type": "a"} for i in found[:3]], "total": len(found)}
        )

    with aioresponses() as mocked:
        mocked.get(SEARCH, callback=answer, repeat=True)
        found, failing = _run(lambda s: s.fetch_ids(list(range(1, 21))))
    assert sorted(int(e["id"]) for e in found) == list(range(2, 21, 2))  # type: ignore[call-overload]
    assert failing == []
    assert len(asked) == 4


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"version": "8.2.0", "unleashUrl": "http://localhost:4242/", "other": 1}',
            ServerProfile("8.2.0", "http://localhost:4242"),
        ),
        (b'{"unleashUrl": "https://u.example.com"}', ServerProfile(None, "https://u.example.com")),
        (b'{"version": "7.6.5"}', None),  # no link base: keep the offline profile
        (b'{"version": "7.6.5", "unleashUrl": "localhost"}', None),
        (b"[1]", None),
        (b"<html>", None),
        (b"[" * 100_000, None),
    ],
)
def test_parse_ui_config(body: bytes, expected: ServerProfile | None) -> None:
    """ui-config gives the version and the unleashUrl; an answer without them gives None."""
    assert parse_ui_config(body) == expected


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=200)
    | st.builds(
        lambda d: json.dumps(d).encode(),
        st.dictionaries(
            st.sampled_from(["version", "unleashUrl", "x"]), st.text(max_size=20) | st.integers()
        ),
    )
)
def test_parse_ui_config_never_raises(body: bytes) -> None:
    """Whatever ui-config answers, the result is a profile with an http(s) link base or None."""
    profile = parse_ui_config(body)
    assert profile is None or profile.unleash_url.startswith(("http://", "https://"))


def test_server_profile_is_read_from_ui_config() -> None:
    """The source asks GET /api/admin/ui-config with the token; a 404 means "not known"."""
    with aioresponses() as mocked:
        mocked.get(
            f"{BASE}/api/admin/ui-config",
            status=200,
            body='{"version": "5.12.8", "unleashUrl": "http://localhost:4242"}',
        )
        assert _run(read_server_profile) == ServerProfile("5.12.8", "http://localhost:4242")
        request = next(iter(mocked.requests.values()))[0]
        assert request.kwargs["headers"]["Authorization"] == "*:*.tok"
    with aioresponses() as mocked:
        mocked.get(f"{BASE}/api/admin/ui-config", status=404, body="{}")
        assert _run(read_server_profile) is None
    with aioresponses() as mocked:
        mocked.get(f"{BASE}/api/admin/ui-config", status=401, body="{}")
        assert _error(read_server_profile).kind == "auth"


def test_errors_never_carry_the_proxys_password_or_a_urls_path() -> None:
    """aiohttp's texts name the full URL: a proxy's refusal names the proxy with its user
    info, another error the request URL with its query. An UnleashError keeps scheme and
    host only, so neither a log line nor the status shows them."""
    proxy = "http://ops:s3cret@proxy.test:3128"
    config = UnleashConfig(
        url=BASE, token=Secret("*:*.tok"), public_url=BASE, timeout_s=2, proxy=proxy
    )
    info = aiohttp.RequestInfo(URL(proxy), "CONNECT", CIMultiDictProxy(CIMultiDict()), URL(proxy))
    refused = aiohttp.ClientHttpProxyError(info, (), status=407, message="auth required")
    assert "s3cret" in str(refused)  # what aiohttp says, as the test's premise
    leaky = aiohttp.ClientPayloadError(f"broken at {BASE}/api/admin/search/events?type=secret-q")

    async def main(exc: Exception) -> UnleashError:
        with aioresponses() as mocked:
            mocked.get(SEARCH, exception=exc)
            async with aiohttp.ClientSession() as session:
                with pytest.raises(UnleashError) as raised:
                    await UnleashSource(session, config).page(0, 10)
        return raised.value

    error = asyncio.run(main(refused))
    assert error.kind == "bad_response"
    assert "407" in str(error)
    assert "s3cret" not in str(error)
    assert "ops" not in str(error)
    assert "http://proxy.test:3128" in str(error)
    error = asyncio.run(main(leaky))
    assert "secret-q" not in str(error)
    assert "broken at http://unleash.test" in str(error)

"""The Unleash admin events API: detect what the server offers, probe, page, re-check ids.

Never touches disk. Every failure is an `UnleashError` with a kind and one clear
sentence; the caller decides to back off. What comes back is checked before it is
believed: a page must have the shape Unleash documents, and a filtered query must return
only what it asked for (6.x silently ignores `id=IS_ANY_OF:`).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp

from poller import __version__
from poller.config import UnleashConfig
from poller.log import get as get_logger
from poller.render import UNREADABLE, Event, ServerProfile

log = get_logger()
Api = Literal["search", "post-search", "legacy"]
UnleashErrorKind = Literal["auth", "server", "timeout", "connection", "bad_response"]

_SEARCH = "/api/admin/search/events"
_POST_SEARCH = "/api/admin/events/search"
_LEGACY = "/api/admin/events"
_UI_CONFIG = "/api/admin/ui-config"
LEGACY_PAGE = 100  # the deprecated endpoint answers only the newest 100 events


class UnleashError(Exception):
    """Unleash could not be read, and why (`kind`)."""

    def __init__(self, kind: UnleashErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


POST_SEARCH_MAX_LIMIT = 100  # Unleash 5.x answers 400 to a larger page


@dataclass(frozen=True)
class Capabilities:
    api: Api
    # A server that honours `id=IS_ANY_OF:` (7.x+) also orders ties in created_at by id;
    # one that does not (5.x, 6.x) returns events sharing a created_at in no fixed order.
    id_filter: bool

    def describe(self) -> str:
        if self.api == "search" and self.id_filter:
            return "GET /api/admin/search/events (paged, gap re-check by id)"
        if self.api == "search":
            return (
                "GET /api/admin/search/events (paged; this version ignores the id filter "
                "and does not order events that share a timestamp, so pages are read "
                "whole and ids that commit late are looked for in the newest pages only)"
            )
        if self.api == "post-search":
            return (
                "POST /api/admin/events/search (paged; no id filter, so ids that "
                "commit late are found only while still in the newest pages)"
            )
        return (
            "GET /api/admin/events (newest 100 only: a burst of more than 100 events "
            "between polls cannot be read in full)"
        )


@dataclass(frozen=True)
class Page:
    events: list[Event]
    total: int | None
    skipped: int = 0  # events Unleash failed to serve (see UnleashSource.read)


def _check_event(raw: object, index: int) -> Event:
    if not isinstance(raw, dict):
        raise UnleashError("bad_response", f"event #{index} of the page is not an object")
    event_id = raw.get("id")
    if not isinstance(event_id, int) or isinstance(event_id, bool) or event_id < 0:
        raise UnleashError("bad_response", f"event #{index} of the page has no integer id")
    if not isinstance(raw.get("type"), str):
        raise UnleashError("bad_response", f"event {event_id} has no string type")
    return raw


_EVENT_ID = re.compile(r'\{\s*"id"\s*:\s*(\d+)')


def _skip_value(text: str, pos: int) -> int:
    """End of the JSON object or array starting at `pos`, without building it (it is too
    deep to build); strings are stepped over so their brackets do not count."""
    depth = 0
    in_string = escaped = False
    for index in range(pos, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                return index + 1
    raise UnleashError("bad_response", "answer ends inside an event")


def _parse_deep_page(text: str, total_key: str) -> Page:
    """A page holding an event nested deeper than Python's parser goes: read the events one
    by one and mark the unreadable ones, so they are dead-lettered instead of stalling
    every later event behind them."""
    start = text.find('"events"')
    start = text.find("[", start) if start >= 0 else -1
    if start < 0:
        raise UnleashError("bad_response", "answer has no 'events' list")
    decoder = json.JSONDecoder()
    events: list[object] = []
    pos = start + 1
    while True:
        pos = _skip_space(text, pos)
        if text.startswith("]", pos):
            break
        try:
            event, pos = decoder.raw_decode(text, pos)
        except RecursionError:
            end = _skip_value(text, pos)
            match = _EVENT_ID.match(text, pos)
            if match is None:
                raise UnleashError(
                    "bad_response", "an event is nested too deeply to read and has no leading id"
                ) from None
            event = {
                "id": int(match[1]),
                "type": "unreadable",
                UNREADABLE: f"its JSON is nested too deeply ({end - pos} bytes)",
            }
            pos = end
        except ValueError as exc:
            raise UnleashError("bad_response", f"answer is not JSON: {exc}") from None
        events.append(event)
        pos = _skip_space(text, pos)
        if text.startswith(",", pos):
            pos += 1
    total = re.search(rf'"{total_key}"\s*:\s*(\d+)', text[pos:])
    return Page(
        [_check_event(e, i) for i, e in enumerate(events)], int(total[1]) if total else None
    )


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _parse_page(body: bytes, total_key: str) -> Page:
    try:
        data = json.loads(body)
    except RecursionError:
        return _parse_deep_page(body.decode("utf-8", "replace"), total_key)
    except (ValueError, UnicodeDecodeError):
        snippet = body[:80].decode("utf-8", "replace")
        raise UnleashError("bad_response", f"answer is not JSON (starts {snippet!r})") from None
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise UnleashError("bad_response", "answer has no 'events' list")
    total = data.get(total_key)
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)):
        raise UnleashError("bad_response", f"answer's '{total_key}' is not an integer")
    return Page([_check_event(e, i) for i, e in enumerate(data["events"])], total)


class UnleashSource:
    def __init__(self, session: aiohttp.ClientSession, config: UnleashConfig) -> None:
        self._session = session
        self._etag: str | None = None
        self._reads = 0
        self.unreadable = 0
        self.capabilities = Capabilities("search", id_filter=True)
        self.reconfigure(config)

    def reconfigure(self, config: UnleashConfig) -> None:
        """Take new settings (a reload); a new URL or token takes effect on the next request."""
        self._config = config
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)  # built once, not per poll
        self._headers = {
            "Authorization": config.token.reveal(),
            "Accept": "application/json",
            "User-Agent": f"unleash-poller/{__version__}",
        }
        self._etag = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: object = None,
        etag: str | None = None,
    ) -> tuple[int, bytes, str | None]:
        headers = dict(self._headers)
        if etag:
            headers["If-None-Match"] = etag
        url = self._config.url + path
        try:
            async with self._session.request(
                method,
                url,
                params=params,
                json=json_body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                proxy=self._config.proxy,
                ssl=self._config.ssl_context or True,
            ) as resp:
                body = await _read_capped(resp, self._config.max_page_bytes)
                status, new_etag = resp.status, resp.headers.get("ETag")
        except TimeoutError:
            raise UnleashError(
                "timeout", f"{method} {path}: no answer within {self._config.timeout_s:g}s"
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise UnleashError("connection", f"{method} {path}: {exc}") from None
        except aiohttp.ClientError as exc:
            raise UnleashError("bad_response", f"{method} {path}: {exc}") from None
        if status in (401, 403):
            raise UnleashError(
                "auth",
                f"{method} {path}: {status} — the token is missing, "
                "wrong, expired or lacks admin/event access",
            )
        if status >= 500:
            raise UnleashError("server", f"{method} {path}: server error {status}")
        return status, body, new_etag

    async def detect(self) -> Capabilities:
        """Find the best events API this server offers."""
        try:
            status, body, _ = await self._request("GET", _SEARCH, params={"limit": "2"})
        except UnleashError as exc:
            if exc.kind != "server":
                raise
            # The newest events may be ones Unleash cannot serve (see `read`); an empty page
            # far past the end still tells whether the endpoint is there.
            status, _, _ = await self._request(
                "GET", _SEARCH, params={"limit": "1", "offset": "1000000000"}
            )
            body = b'{"events": []}'
        if status == 200:
            self.capabilities = Capabilities("search", id_filter=await self._honours_ids(body))
            return self.capabilities
        status, _, _ = await self._request("POST", _POST_SEARCH, json_body={"limit": 1})
        if status == 200:
            self.capabilities = Capabilities("post-search", id_filter=False)
            return self.capabilities
        status, _, _ = await self._request("GET", _LEGACY)
        if status == 200:
            self.capabilities = Capabilities("legacy", id_filter=False)
            return self.capabilities
        raise UnleashError(
            "bad_response",
            f"no events API answered (last status {status}); is this an Unleash server?",
        )

    async def _honours_ids(self, sample: bytes) -> bool:
        """Ask for one known id: a server that ignores the filter (6.x) answers others too."""
        events = _parse_page(sample, "total").events
        if len(events) < 2:
            return True  # cannot tell yet; fetch_ids checks every answer anyway
        wanted = int(events[-1]["id"])  # type: ignore[call-overload]
        status, body, _ = await self._request(
            "GET", _SEARCH, params={"id": f"IS_ANY_OF:{wanted}", "limit": "2"}
        )
        return status == 200 and [e["id"] for e in _parse_page(body, "total").events] == [wanted]

    async def changed(self) -> bool:
        """Cheap "did anything happen?" probe: a conditional one-event read, answered
        304 when nothing changed. Any new event changes the answer's total, so its ETag."""
        path, params = (
            (_SEARCH, {"limit": "1"}) if self.capabilities.api == "search" else (_LEGACY, None)
        )
        try:
            status, _, etag = await self._request("GET", path, params=params, etag=self._etag)
        except UnleashError as exc:
            if exc.kind != "server":
                raise
            return True  # the newest event may be one Unleash cannot serve: read around it
        if status == 304:
            return False
        if status != 200:
            raise UnleashError("bad_response", f"GET {path}: unexpected status {status}")
        self._etag = etag
        return True

    def forget_probe(self) -> None:
        """Make the next probe answer "changed" (after a failed poll)."""
        self._etag = None

    async def page(self, offset: int, limit: int) -> Page:
        """One page, newest first."""
        api = self.capabilities.api
        if api == "search":
            status, body, _ = await self._request(
                "GET", _SEARCH, params={"limit": str(limit), "offset": str(offset)}
            )
            return self._ok(status, body, _SEARCH, "total")
        if api == "post-search":
            status, body, _ = await self._request(
                "POST",
                _POST_SEARCH,
                json_body={"limit": min(limit, POST_SEARCH_MAX_LIMIT), "offset": offset},
            )
            return self._ok(status, body, _POST_SEARCH, "totalEvents")
        if offset > 0:
            return Page([], None)
        status, body, _ = await self._request("GET", _LEGACY)
        return self._ok(status, body, _LEGACY, "totalEvents")

    async def pages(self, first_limit: int, limit: int) -> AsyncIterator[Page]:
        """Pages newest first until the log ends; the caller stops when it has enough.
        The first page is small, so a poll that finds one new event stays cheap."""
        if self.capabilities.api == "post-search":
            limit = min(limit, POST_SEARCH_MAX_LIMIT)
        if not self.capabilities.id_filter:
            # Ties in created_at come back in any order, so every page boundary can drop or
            # repeat events: make pages as few as possible, and vary their size a little
            # from one read to the next, since PostgreSQL breaks ties differently for a
            # different LIMIT; an event one read skipped (now a gap) shows up in another.
            self._reads += 1
            limit = max(1, limit - self._reads % 5)
            first_limit = limit
        offset, size = 0, first_limit
        while True:
            page = await self.read(offset, size)
            yield page
            served = len(page.events) + page.skipped
            if served < size or self.capabilities.api == "legacy":
                return
            offset += served
            size = limit

    async def read(self, offset: int, size: int) -> Page:
        """A page, stepping around single events Unleash cannot serve.

        Unleash's search builds a markdown summary of every event it returns, and an event
        that summary cannot be made for (a user name holding Mustache tags, say) turns every
        page that holds it into a 500 — forever. Unleash's own integration skips such an
        event; so do we, after narrowing the failure down to it, rather than stall.
        """
        try:
            return await self.page(offset, size)
        except UnleashError as exc:
            if exc.kind != "server" or self.capabilities.api == "legacy":
                raise
        if size == 1:
            await self.page(offset + 1, 1)  # fails too when it is Unleash that is failing
            self.unreadable += 1
            log.error(
                "poll.unreadable_event",
                offset=offset,
                detail="Unleash answers 500 for this one event (its own integration "
                "skips it too); skipped, its id stays a gap until given up",
            )
            return Page([], None, skipped=1)
        half = size // 2
        first = await self.read(offset, half)
        second = await self.read(offset + half, size - half)
        return Page(
            first.events + second.events,
            first.total or second.total,
            first.skipped + second.skipped,
        )

    async def fetch_ids(self, ids: Sequence[int]) -> tuple[list[Event], list[int]]:
        """The events among `ids` that exist now (for re-checking gaps), and the ids Unleash
        fails to serve (see `read`)."""
        if not self.capabilities.id_filter:
            return [], []
        found: list[Event] = []
        failing: list[int] = []
        for start in range(0, len(ids), 100):
            chunk = ids[start : start + 100]
            events, bad = await self._fetch_chunk(chunk)
            if not self.capabilities.id_filter:
                return [], []
            found.extend(events)
            failing.extend(bad)
        return found, failing

    async def _fetch_chunk(self, chunk: Sequence[int]) -> tuple[list[Event], list[int]]:
        try:
            status, body, _ = await self._request(
                "GET",
                _SEARCH,
                params={
                    "id": "IS_ANY_OF:" + ",".join(str(i) for i in chunk),
                    "limit": str(len(chunk)),
                },
            )
        except UnleashError as exc:
            if exc.kind != "server" or (len(chunk) == 1 and not await self._serving()):
                raise
            if len(chunk) == 1:
                return [], list(chunk)
            half = len(chunk) // 2
            first, second = (
                await self._fetch_chunk(chunk[:half]),
                await self._fetch_chunk(chunk[half:]),
            )
            return first[0] + second[0], first[1] + second[1]
        page = self._ok(status, body, _SEARCH, "total")
        stray = [e["id"] for e in page.events if e["id"] not in set(chunk)]
        if stray:
            self.capabilities = Capabilities(self.capabilities.api, id_filter=False)
            log.warning(
                "unleash.id_filter_ignored",
                asked=len(chunk),
                got_others=stray[:5],
                detail="gap re-checks by id are off from now on; late ids are "
                "looked for in the newest pages",
            )
            return [], []
        return page.events, []

    async def _serving(self) -> bool:
        """Whether Unleash answers at all (to tell one bad event from an outage)."""
        try:
            await self.page(0, 1)
        except UnleashError:
            return False
        return True

    @staticmethod
    def _ok(status: int, body: bytes, path: str, total_key: str) -> Page:
        if status != 200:
            raise UnleashError("bad_response", f"{path}: unexpected status {status}")
        return _parse_page(body, total_key)


def parse_ui_config(body: bytes) -> ServerProfile | None:
    """`GET /api/admin/ui-config` → the server's version and unleashUrl; None when the
    answer does not hold them (then the caller keeps the offline profile)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    version, url = data.get("version"), data.get("unleashUrl")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return None
    return ServerProfile(version if isinstance(version, str) else None, url.rstrip("/"))


async def read_server_profile(source: UnleashSource) -> ServerProfile | None:
    """Ask the server what it is (version) and where its UI lives (unleashUrl)."""
    status, body, _ = await source._request("GET", _UI_CONFIG)
    return parse_ui_config(body) if status == 200 else None


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    if resp.content_length is not None and resp.content_length > limit:
        raise UnleashError(
            "bad_response", f"answer of {resp.content_length} bytes is over the {limit}-byte limit"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise UnleashError("bad_response", f"answer is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)

"""The Unleash admin events API: detect what the server offers, probe, page, re-check ids.

Never touches disk. Every failure is an `UnleashError` with a kind and one clear
sentence; the caller decides to back off. What comes back is checked before it is
believed: a page must have the shape Unleash documents, and a filtered query must return
only what it asked for (6.x silently ignores `id=IS_ANY_OF:`).
"""

from __future__ import annotations

import contextlib
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
from poller.urls import scrub_urls

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
_REFUSALS_REMEMBERED = 10000  # refused entries not logged twice (bounded memory)


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


# Unleash is a JavaScript server: an id above Number.MAX_SAFE_INTEGER cannot come from it
# exactly (and SQLite, the state file, stops at 2**63 - 1).
MAX_EVENT_ID = 2**53 - 1


@dataclass(frozen=True)
class Refused:
    """An entry of a page that is not an event we can take in; the rest of the page is."""

    index: int
    id: str  # the id as it came (shortened), or "?" when there is none
    reason: str


@dataclass(frozen=True)
class Page:
    events: list[Event]
    total: int | None
    skipped: int = 0  # events Unleash failed to serve (see UnleashSource.read)
    refused: tuple[Refused, ...] = ()

    @property
    def served(self) -> int:
        """How many entries the server answered: what the next page's offset moves by."""
        return len(self.events) + self.skipped + len(self.refused)


def _shown(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_event(raw: object, index: int) -> Event | Refused:
    """An entry of the page as an event, or why it cannot be one. One bad entry is refused
    on its own: refusing the page would stall every event behind it, on every poll."""
    if not isinstance(raw, dict):
        return Refused(index, "?", f"entry #{index} of the page is not an object")
    if "id" not in raw:
        return Refused(index, "?", f"entry #{index} of the page has no id")
    problem = _id_problem(raw["id"])
    if problem is None and not isinstance(raw.get("type"), str):
        problem = "its type is not a string"
    return raw if problem is None else Refused(index, _shown(raw["id"]), problem)


def _id_problem(event_id: object) -> str | None:
    if not isinstance(event_id, int) or isinstance(event_id, bool):
        return "its id is not an integer"
    if event_id < 0:
        return "its id is negative"
    if event_id > MAX_EVENT_ID:
        return "its id is above 2**53 - 1, more than a JavaScript server can send"
    return None


def _checked(entries: list[object], total: int | None) -> Page:
    events: list[Event] = []
    refused: list[Refused] = []
    for index, entry in enumerate(entries):
        checked = _check_event(entry, index)
        if isinstance(checked, Refused):
            refused.append(checked)
        else:
            events.append(checked)
    return Page(events, total, refused=tuple(refused))


_EVENT_ID = re.compile(r'\{\s*"id"\s*:\s*(-?\d+)')
_MAX_ID_DIGITS = 20  # int() refuses thousands of digits; no event id is that long


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
    decoder = _DECODER
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
            digits = match[1]
            event = {
                # Too many digits stays text, so the check below refuses it by name.
                "id": int(digits) if len(digits) <= _MAX_ID_DIGITS else digits,
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
    total = re.search(rf'"{total_key}"\s*:\s*(\d{{1,{_MAX_ID_DIGITS}}})\b', text[pos:])
    return _checked(events, int(total[1]) if total else None)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _js_number(digits: str) -> int | float:
    """An integer literal as JavaScript's JSON.parse reads it when Python's int() will not
    (thousands of digits): a double, possibly Infinity, which JSON.stringify writes as null."""
    return int(digits) if len(digits) <= _MAX_INT_DIGITS else float(digits)


_MAX_INT_DIGITS = 4000  # below sys.get_int_max_str_digits()'s default of 4300
_DECODER = json.JSONDecoder(parse_int=_js_number)


def _parse_page(body: bytes, total_key: str) -> Page:
    try:
        try:
            data = json.loads(body)
        except ValueError:
            # Perhaps an integer too long for int(): parse again, reading numbers as
            # JavaScript does. Only bad answers pay for the slower second parse.
            data = _DECODER.decode(body.decode(json.detect_encoding(body), "surrogatepass"))
    except RecursionError:
        return _parse_deep_page(body.decode("utf-8", "replace"), total_key)
    except ValueError:  # UnicodeDecodeError included
        snippet = body[:80].decode("utf-8", "replace")
        raise UnleashError("bad_response", f"answer is not JSON (starts {snippet!r})") from None
    if not isinstance(data, dict) or not isinstance(data.get("events"), list):
        raise UnleashError("bad_response", "answer has no 'events' list")
    total = data.get(total_key)
    if total is not None and (not isinstance(total, int) or isinstance(total, bool)):
        raise UnleashError("bad_response", f"answer's '{total_key}' is not an integer")
    if total is not None and total < 0:
        raise UnleashError("bad_response", f"answer's '{total_key}' is negative")
    return _checked(data["events"], total)


class UnleashSource:
    def __init__(self, session: aiohttp.ClientSession, config: UnleashConfig) -> None:
        self._session = session
        self._etag: str | None = None
        # The log's size as the last probe that found a change saw it (search API only).
        self.probed_total: int | None = None
        self._reads = 0
        self.unreadable = 0
        self.refused = 0
        self._refused_seen: set[tuple[str, str]] = set()
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
                body = await read_capped(resp, self._config.max_page_bytes)
                status, new_etag = resp.status, resp.headers.get("ETag")
        except TimeoutError:
            raise UnleashError(
                "timeout", f"{method} {path}: no answer within {self._config.timeout_s:g}s"
            ) from None
        except aiohttp.ClientConnectionError as exc:
            raise UnleashError("connection", f"{method} {path}: {self._scrub(exc)}") from None
        except aiohttp.ClientError as exc:
            raise UnleashError("bad_response", f"{method} {path}: {self._scrub(exc)}") from None
        if status in (401, 403):
            raise UnleashError(
                "auth",
                f"{method} {path}: {status} — the token is missing, "
                "wrong, expired or lacks admin/event access",
            )
        if status >= 500:
            raise UnleashError("server", f"{method} {path}: server error {status}")
        return status, body, new_etag

    def _scrub(self, exc: Exception) -> str:
        """aiohttp's text of `exc` with every URL cut to scheme and host: it names the
        proxy with its user info (a 407), or the request URL with its query."""
        return scrub_urls(str(exc), self._config.proxy)

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
        self.probed_total = None
        try:
            status, body, etag = await self._request("GET", path, params=params, etag=self._etag)
        except UnleashError as exc:
            if exc.kind != "server":
                raise
            return True  # the newest event may be one Unleash cannot serve: read around it
        if status == 304:
            return False
        if status != 200:
            raise UnleashError("bad_response", f"GET {path}: unexpected status {status}")
        self._etag = etag
        if self.capabilities.api == "search":
            with contextlib.suppress(UnleashError):  # the read that follows reports it
                self.probed_total = _parse_page(body, "total").total
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
        The first page is small, so a poll that finds one new event stays cheap.

        A page may hold fewer events than asked for (Unleash 8.2.0 answers a limit over
        1000 with 50; a proxy may cap pages), so a short page is not the end: the log is
        read when the server's `total` is reached, or a page comes back empty."""
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
        previous: list[object] | None = None
        while True:
            page = await self.read(offset, size)
            if page.served == 0 and page.total is not None and page.total > offset:
                # Unleash answers an empty list when its database fails: no proof of an end.
                raise UnleashError(
                    "bad_response",
                    f"the page at offset {offset} came back empty, but the server says it "
                    f"holds {page.total} events",
                )
            ids = [e["id"] for e in page.events]
            if offset > 0 and ids and ids == previous:
                raise UnleashError(
                    "bad_response",
                    f"the page at offset {offset} repeats the previous page (ids "
                    f"{ids[0]}..{ids[-1]}): the server or a proxy ignores `offset`, so the "
                    "log cannot be read past its first page",
                )
            yield page
            offset += page.served
            if (
                page.served == 0
                or self.capabilities.api == "legacy"
                or (page.total is not None and offset >= page.total)
            ):
                return
            previous, size = ids, limit

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
            first.total if first.total is not None else second.total,
            first.skipped + second.skipped,
            first.refused + second.refused,
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
        if page.events and page.total is not None and page.served < min(page.total, len(chunk)):
            # Fewer than the server says match (a proxy capping pages): ask for the rest.
            got = {e["id"] for e in page.events}
            more, failing = await self._fetch_chunk([i for i in chunk if i not in got])
            return page.events + more, failing
        return page.events, []

    async def _serving(self) -> bool:
        """Whether Unleash answers at all (to tell one bad event from an outage)."""
        try:
            await self.page(0, 1)
        except UnleashError:
            return False
        return True

    def _ok(self, status: int, body: bytes, path: str, total_key: str) -> Page:
        if status != 200:
            raise UnleashError("bad_response", f"{path}: unexpected status {status}")
        page = _parse_page(body, total_key)
        for entry in page.refused:
            self._refuse(entry)
        return page

    def _refuse(self, entry: Refused) -> None:
        """One error line per refused entry; an entry read again by a later poll (or a gap
        re-check) is not logged again."""
        key = (entry.id, entry.reason)
        if key in self._refused_seen:
            return
        if len(self._refused_seen) < _REFUSALS_REMEMBERED:
            self._refused_seen.add(key)
        self.refused += 1
        log.error(
            "poll.event_refused",
            id=entry.id,
            reason=entry.reason,
            detail="this entry of Unleash's answer cannot be taken in as an event; it is "
            "skipped and the events around it flow on",
        )


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


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole answer, or UnleashError once it is over `limit` bytes (never more held)."""
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

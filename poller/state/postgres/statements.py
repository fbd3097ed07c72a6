"""The SQL of the store's hot paths, and the steps an ingest is made of.

Statements that run for every few deliveries carry their own fence (`FENCE`), so that each
is one round trip with no pipeline to set up.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, LiteralString

from poller.schedule import Pause
from poller.state.base import EventRow
from poller.state.postgres.link import Step

BODY_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

LEASE_COLUMNS = (
    "holder, epoch, coalesce(extract(epoch FROM expires_at - clock_timestamp()), 0)::float8"
)
# The outbox's next rows in the order of its key, `(webhook, event_id) > (%s, %s)` under an
# inner LIMIT, and only those joined to their bodies; the rows of the following webhooks
# the LIMIT may take (when fewer than %s of this one are left) are dropped outside it. The
# row comparison is what makes the plan hold without statistics: on an outbox just filled,
# which autovacuum has not analysed yet, `webhook = %s AND event_id > %s` is estimated at a
# few rows, and the planner fetched and sorted every pending row of the webhook (20-28 ms
# per call at 20,000 rows); the row comparison's default estimate is a third of the table,
# so the scan of the key's index stopped by the LIMIT wins (0.4 ms; 0.1 ms once analysed).
NEXT_PENDING: LiteralString = (
    "SELECT o.webhook, o.event_id, e.body, o.attempts, o.next_attempt_at, o.enqueued_at, "
    "o.rate_limited FROM (SELECT * FROM outbox WHERE (webhook, event_id) > (%(w)s, %(after)s) "
    "ORDER BY webhook, event_id LIMIT %(n)s) o JOIN events e ON e.id = o.event_id "
    "WHERE o.webhook = %(w)s ORDER BY o.event_id"
)
# Arrays go in binary (%b): the text form escapes every quote of every JSON body with a
# regular expression, which cost ~50 µs of CPU per event taken in.
INSERT_EVENTS = (
    "INSERT INTO events (id, body) SELECT * FROM unnest(%b::bigint[], %b::text[]) "
    "ON CONFLICT DO NOTHING"
)
INSERT_OWED = (
    "INSERT INTO outbox (webhook, event_id, enqueued_at) "
    "SELECT w, e, %s FROM unnest(%b::text[], %b::bigint[]) AS o (w, e) ON CONFLICT DO NOTHING"
)
SET_HIGH_WATER = (
    "INSERT INTO meta (key, value) VALUES ('high_water', %s) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

# Statements that carry their own fence: a scalar sub-select without references to the
# rows becomes a one-time filter, run once before anything is touched (so even when no row
# matches). One statement is one round trip with no pipeline to set up, which matters on
# the paths run for every few deliveries.
FENCE: LiteralString = "(SELECT fence(%(epoch)s, %(durable)s))"
# An event's body is kept while any webhook owes it or holds it as a dead letter, the parts
# of an event sent already while its webhook does. The statement's snapshot still shows the
# rows its first part deletes, hence "another webhook's" in the checks.
DELIVERED: LiteralString = (
    "WITH gone AS (DELETE FROM outbox WHERE " + FENCE + " AND webhook = %(w)s "
    "              AND event_id = ANY(%(ids)b::bigint[]) RETURNING event_id), "
    "parts AS (DELETE FROM parts_sent p USING gone g "
    "          WHERE p.webhook = %(w)s AND p.event_id = g.event_id AND NOT EXISTS "
    "          (SELECT 1 FROM dead_letters d WHERE d.webhook = %(w)s AND d.event_id = g.event_id)) "
    "DELETE FROM events e USING gone g WHERE e.id = g.event_id "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id AND o.webhook <> %(w)s) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id)"
)
REMOVE_DEAD_LETTER: LiteralString = (
    "WITH gone AS (DELETE FROM dead_letters WHERE " + FENCE + " AND webhook = %(w)s "
    "              AND event_id = %(e)s RETURNING event_id), "
    "parts AS (DELETE FROM parts_sent p USING gone g "
    "          WHERE p.webhook = %(w)s AND p.event_id = g.event_id AND NOT EXISTS "
    "          (SELECT 1 FROM outbox o WHERE o.webhook = %(w)s AND o.event_id = g.event_id)) "
    "DELETE FROM events e USING gone g WHERE e.id = g.event_id "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id AND d.webhook <> %(w)s)"
)
# Appends a webhook's attempts numbered on from %(base)s, the highest number the store saw
# last (NULL: read it, as after a reopen or when another writer came between), and trims
# its part to the last %(keep)s: of the new ones only that many are written, and the old
# ones from above %(floor)s (the bound of the store's last trim, below which nothing is
# left) up to the new highest minus %(keep)s go, so the trim never walks the dead index
# entries of earlier trims. Nothing is written when another writer (a tool, another
# leader) numbered past %(base)s since: the statement returns the number it started from
# and whether it wrote, and the store then tries again with %(base)s NULL.
RECORD_ATTEMPTS: LiteralString = (
    "WITH base AS (SELECT coalesce(%(base)s::bigint, "
    "                              (SELECT max(seq) FROM attempt_log WHERE webhook = %(w)s), "
    "                              0) AS seq), "
    "fresh AS (SELECT " + FENCE + " AND NOT EXISTS (SELECT 1 FROM attempt_log a "
    "          WHERE a.webhook = %(w)s AND a.seq > base.seq) AS ok FROM base), "
    "ins AS (INSERT INTO attempt_log (webhook, seq, event_id, at, attempt, status, error, "
    "                                 latency_ms, outcome) "
    "        SELECT %(w)s, base.seq + r.n, r.event_id, r.at, r.attempt, r.status, r.error, "
    "               r.latency_ms, r.outcome "
    "        FROM base, unnest(%(event_id)b::bigint[], %(at)b::float8[], %(attempt)b::int[], "
    "                          %(status)b::int[], %(error)b::text[], %(latency_ms)b::float8[], "
    "                          %(outcome)b::text[]) "
    "        WITH ORDINALITY AS r (event_id, at, attempt, status, error, latency_ms, outcome, n) "
    "        WHERE (SELECT ok FROM fresh) AND r.n > %(count)s - %(keep)s), "
    "trim AS (DELETE FROM attempt_log WHERE (SELECT ok FROM fresh) AND webhook = %(w)s "
    "         AND seq > %(floor)s AND seq <= (SELECT base.seq FROM base) + %(count)s - %(keep)s) "
    "SELECT base.seq, fresh.ok FROM base, fresh"
)
RETRY_LATER: LiteralString = (
    "UPDATE outbox SET attempts = %(a)s, next_attempt_at = %(at)s, last_error = %(error)s, "
    "rate_limited = %(rl)s WHERE " + FENCE + " AND webhook = %(w)s AND event_id = %(e)s"
)


def storable_body(body: str) -> str:
    """An event's JSON text as PostgreSQL can hold it. Text there cannot carry NUL or a
    lone surrogate; both can only stand inside a JSON string, where the `\\uXXXX` escape
    ingest writes for them means the same value (as JSON.stringify writes it)."""
    if body.isascii() and "\x00" not in body:
        return body
    return BODY_UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", body)


def event_columns(events: Sequence[EventRow]) -> tuple[list[int], list[str]]:
    return [i for i, _ in events], [storable_body(body) for _, body in events]


def add_steps(
    events: Sequence[EventRow], owed: Iterable[tuple[str, int]], now: float
) -> list[Step]:
    hooks, ids = [], []
    for hook, event_id in owed:
        hooks.append(hook)
        ids.append(event_id)
    return [(INSERT_EVENTS, event_columns(events)), (INSERT_OWED, (now, hooks, ids))]


def finish_steps(
    high_water: int, new_gaps: Iterable[int], settled_gaps: Iterable[int], now: float
) -> list[Step]:
    return [
        ("DELETE FROM gaps WHERE id = ANY(%b::bigint[])", (list(settled_gaps),)),
        (
            "INSERT INTO gaps (id, missing_since, next_check_at) "
            "SELECT g, %s, %s FROM unnest(%b::bigint[]) AS g ON CONFLICT DO NOTHING",
            (now, now, list(new_gaps)),
        ),
        (SET_HIGH_WATER, (str(high_water),)),
    ]


def pause_of(row: Sequence[Any]) -> Pause:
    reason, since, awaits_resume, probe_at, probes = row
    return Pause(str(reason), float(since), bool(awaits_resume), float(probe_at), int(probes))

"""Offline dead-letter replay (`unleash-poller replay` with no daemon running): each
dead letter re-delivered in id order, removed once it succeeds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp

from poller.app import make_session
from poller.config import Config, WebhookConfig
from poller.deliver import Attempt, Outcome, request_headers
from poller.dispatch import deliver_event
from poller.state import StateStore
from poller.worker import AttemptResult, attempt_once, attempt_record


async def replay_dead_letters(
    config: Config,
    state: StateStore,
    webhook: str | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """With no daemon running: re-deliver dead letters in id order, removing each one
    that succeeds; one that fails again stays, with the new reason. Returns (ok, failed)."""
    ok = failed = 0
    names = [webhook] if webhook else [h.name for h in config.webhooks]
    total = sum(n for name, n in (await state.dead_letter_counts()).items() if name in names)
    async with make_session(config) as session:
        for name in names:
            hook = config.webhook(name)
            after = -1
            while batch := await state.dead_letters(name, after=after, limit=500):
                for letter in batch:
                    after = letter.event_id
                    outcome = await _replay_one(session, hook, state, letter.event_id, letter.body)
                    if outcome.kind == "delivered":
                        await state.remove_dead_letter(name, letter.event_id)
                        ok += 1
                    else:
                        await state.dead_letter(
                            name, letter.event_id, letter.attempts + 1, outcome.reason
                        )
                        failed += 1
                    if progress:
                        progress(ok + failed, total)
    return ok, failed


async def _replay_one(
    session: aiohttp.ClientSession, hook: WebhookConfig, state: StateStore, event_id: int, body: str
) -> Outcome:
    attempts = 0
    headers = request_headers(hook)
    while True:
        if hook.provider is not None:
            # Sends only the requests of the event not yet answered 2xx (State.parts_sent).
            result = AttemptResult(
                *await deliver_event(session, hook, state, event_id, body, attempts)
            )
        else:
            result = await attempt_once(session, hook, headers, event_id, body, attempts)
        attempts = result.attempts
        if hook.attempt_log_size:
            await state.record_attempts(
                [attempt_record(hook.name, event_id, attempts, _attempt(result), _logged(result))],
                {hook.name: hook.attempt_log_size},
            )
        if result.outcome.kind != "retry":
            return result.outcome
        await asyncio.sleep(result.outcome.delay_s)


def _logged(result: AttemptResult) -> str:
    """A replay's outcome as the attempt log names the worker's: a letter that fails
    again stays a dead letter."""
    kind = result.outcome.kind
    return kind if kind in ("delivered", "retry") else "dead_letter"


def _attempt(result: AttemptResult) -> Attempt:
    """What the attempt log keeps: the POST itself, or (a provider's several requests)
    the outcome's reason."""
    if result.attempt is not None:
        return result.attempt
    failed = None if result.outcome.kind == "delivered" else result.outcome.reason
    return Attempt(None, failed, duration_s=result.duration_s or 0.0)

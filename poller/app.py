"""Wires source → ingest → outbox → workers; owns start-up, the poll loop and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import time
from collections.abc import Callable

import aiohttp

from poller.config import Config, WebhookConfig
from poller.deliver import Outcome
from poller.ingest import Ingest
from poller.log import get as get_logger
from poller.source import UnleashError, UnleashSource
from poller.state import State
from poller.worker import Worker, attempt_once, drain

log = get_logger()

EX_OK = 0
EX_UNAVAILABLE = 69  # --once: Unleash could not be read
EX_IOERR = 74        # the state file cannot be written


def make_session(config: Config) -> aiohttp.ClientSession:
    """The one HTTP session of the process. No total connection limit: each webhook's
    worker bounds its own concurrency, so a hung receiver cannot starve the others."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=60,
                                     enable_cleanup_closed=True)
    return aiohttp.ClientSession(connector=connector, trust_env=False,
                                 timeout=aiohttp.ClientTimeout(total=config.unleash.timeout_s),
                                 auto_decompress=True)


class App:
    def __init__(self, config: Config, state: State) -> None:
        self.config = config
        self.state = state
        self.stop = asyncio.Event()
        self.workers: dict[str, Worker] = {}
        self.delivered = 0
        self.dead_lettered = 0
        self._session: aiohttp.ClientSession | None = None

    def _wake(self, hooks: set[str]) -> None:
        for name in hooks:
            if worker := self.workers.get(name):
                worker.wake.set()

    def _count(self, _hook: str, outcome: Outcome, _lag_s: float) -> None:
        if outcome.kind == "delivered":
            self.delivered += 1
        elif outcome.kind == "give_up":
            self.dead_lettered += 1

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_stop(signame: str) -> None:
            if self.stop.is_set():
                log.warning("app.forced_exit", signal=signame)
                # State is transactional; what was in flight is re-sent after restart.
                os._exit(1)
            log.info("app.stopping", signal=signame)
            self.stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig.name)

    async def run(self, *, once: bool = False) -> int:
        loop = asyncio.get_running_loop()
        if not once:
            self._install_signals(loop)
        started = time.monotonic()
        async with make_session(self.config) as session:
            self._session = session
            source = UnleashSource(session, self.config.unleash)
            ingest = Ingest(self.config, self.state, source, self._wake)
            self.workers = {h.name: Worker(h, self.state, session, self.stop, once=once,
                                           on_outcome=self._count)
                            for h in self.config.webhooks}
            self._warn_orphans()
            if once:
                code = await self._run_once(source, ingest)
            else:
                code = await self._run_forever(source, ingest)
        log.info("app.stopped", delivered=self.delivered, dead_lettered=self.dead_lettered,
                 cursor=ingest.high_water, pending=sum(self.state.pending_counts().values()),
                 uptime_s=round(time.monotonic() - started, 1))
        return code

    def _warn_orphans(self) -> None:
        known = {h.name for h in self.config.webhooks}
        for name, count in self.state.pending_counts().items():
            if name not in known:
                log.warning("outbox.orphaned", webhook=name, pending=count,
                            detail="webhook no longer configured; its pending events are "
                            "kept until it is configured again")

    async def _detect(self, source: UnleashSource) -> None:
        caps = await source.detect()
        log.info("unleash.api_detected", api=caps.api, detail=caps.describe())

    async def _run_once(self, source: UnleashSource, ingest: Ingest) -> int:
        code = EX_OK
        try:
            await self._detect(source)
            await ingest.poll(force=True)
            await ingest.recheck_gaps()
        except UnleashError as exc:
            log.error("unleash.unreachable", kind=exc.kind, error=str(exc))
            code = EX_UNAVAILABLE
        tasks = [asyncio.create_task(w.run(), name=f"worker:{n}")
                 for n, w in self.workers.items()]
        await asyncio.gather(*tasks)
        return code

    async def _run_forever(self, source: UnleashSource, ingest: Ingest) -> int:
        tasks = [asyncio.create_task(w.run(), name=f"worker:{n}")
                 for n, w in self.workers.items()]
        poller = asyncio.create_task(self._poll_loop(source, ingest), name="poller")
        stopper = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait([poller, stopper, *tasks],
                                     return_when=asyncio.FIRST_COMPLETED)
        self.stop.set()
        for task in done:
            if task is not stopper and task.exception() is not None:
                # An unexpected error: crash loudly; systemd restarts us, state is safe.
                raise task.exception()  # type: ignore[misc]
        poller.cancel()
        cancelled = await drain(list(self.workers.values()), tasks, self.config.drain_timeout_s)
        if cancelled:
            log.warning("app.drain_timeout", workers_cancelled=cancelled,
                        detail="in-flight deliveries are re-sent after restart")
        return EX_OK

    async def _poll_loop(self, source: UnleashSource, ingest: Ingest) -> None:
        interval = self.config.unleash.poll_interval_s
        failures = 0
        detected = False
        while not self.stop.is_set():
            try:
                if not detected:
                    await self._detect(source)
                    detected = True
                await ingest.poll(force=failures > 0)
                await ingest.recheck_gaps()
                if failures:
                    log.info("unleash.recovered", after_failures=failures)
                failures = 0
                delay = interval
            except UnleashError as exc:
                failures += 1
                ingest.counters.poll_errors += 1
                source.forget_probe()
                delay = _backoff(interval, failures, self.config.unleash.backoff_max_s,
                                 random.random())  # noqa: S311
                log.error("unleash.unreachable", kind=exc.kind, error=str(exc),
                          failures=failures, retry_in_s=round(delay, 2))
            next_gap = ingest.next_gap_check()
            if next_gap is not None and failures == 0:
                delay = max(0.0, min(delay, next_gap - time.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)


def _backoff(interval: float, failures: int, cap: float, jitter: float) -> float:
    """Exponential from the poll interval, capped, with "equal jitter" (half fixed, half
    random) so many pollers do not hammer a recovering Unleash in step."""
    base = min(cap, interval * 2.0 ** min(failures, 30))
    return base / 2 + base / 2 * jitter


async def replay_dead_letters(config: Config, state: State, webhook: str | None,
                              progress: Callable[[int, int], None] | None = None
                              ) -> tuple[int, int]:
    """With no daemon running: re-deliver dead letters in id order, removing each one
    that succeeds; one that fails again stays, with the new reason. Returns (ok, failed)."""
    ok = failed = 0
    names = [webhook] if webhook else [h.name for h in config.webhooks]
    total = sum(n for name, n in state.dead_letter_counts().items() if name in names)
    async with make_session(config) as session:
        for name in names:
            hook = config.webhook(name)
            after = -1
            while batch := state.dead_letters(name, after=after, limit=500):
                for letter in batch:
                    after = letter.event_id
                    outcome = await _replay_one(session, hook, letter.event_id, letter.body)
                    if outcome.kind == "delivered":
                        state.remove_dead_letter(name, letter.event_id)
                        ok += 1
                    else:
                        state.dead_letter(name, letter.event_id, letter.attempts + 1,
                                          outcome.reason)
                        failed += 1
                    if progress:
                        progress(ok + failed, total)
    return ok, failed


async def _replay_one(session: aiohttp.ClientSession, hook: WebhookConfig, event_id: int,
                      body: str) -> Outcome:
    attempts = 0
    while True:
        outcome, attempts = await attempt_once(session, hook, event_id, body, attempts)
        if outcome.kind != "retry":
            return outcome
        await asyncio.sleep(outcome.delay_s)

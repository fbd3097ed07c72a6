"""Wires source → ingest → outbox → workers; owns start-up, the poll loop and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp

from poller import log as log_module
from poller import memory, systemd
from poller.aio import wait_set
from poller.backoff import backoff_s
from poller.config import (
    Config,
    ConfigError,
    WebhookConfig,
    apply_server_profile,
    check_private,
    load_config,
)
from poller.deliver import Outcome
from poller.ingest import GIVE_BACK_AT, Ingest
from poller.lease import LeaseKeeper, LeaseLostError, holder_name
from poller.log import get as get_logger
from poller.reload import Action, Reconfigure, Retire, Start, WhenRetired, plan_reload
from poller.render import ServerProfile, parse_saved_profile, saved_profile_text
from poller.sink import NullMetrics
from poller.source import UnleashError, UnleashErrorKind, UnleashSource, read_server_profile
from poller.state import FencedError, StateError, StateStore, StateUnavailableError
from poller.worker import Worker, drain, make_worker

if TYPE_CHECKING:
    from poller.metrics import Metrics

log = get_logger()

EX_OK = 0
EX_UNAVAILABLE = 69  # --once: Unleash could not be read
EX_IOERR = 74  # the state file cannot be written
EX_TEMPFAIL = 75  # --once on a shared state another daemon leads
COUNTS_EVERY_S = 2.0  # outbox sizes for the status line and the progress log
# Whether the state file is still in place, and whether another connection (a `replay`
# handing dead letters back) wrote to it: asked at most this often, not on every poll.
STATE_CHECK_EVERY_S = 1.0
SETTLE_S = 1.0  # quiet this long after a burst's deliveries: give the memory back
# What ends a leader's term without stopping the daemon: it stands by (and reconnects)
# and leads again from what the state says.
_TERM_ENDERS = (FencedError, StateUnavailableError, LeaseLostError)
PROGRESS_EVERY_S = 10.0
_PROFILE_KEY = "server_profile"  # the last ui-config read, kept in the state file
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _state_place(config: Config) -> tuple[object, ...]:
    """What names the state: it cannot change while the daemon runs."""
    state = config.state
    url = state.url.reveal() if state.url is not None else None
    return (state.path if url is None else None, url, state.schema, state.node_name)


def make_session(config: Config) -> aiohttp.ClientSession:
    """The one HTTP session of the process. No total connection limit: each webhook's
    worker bounds its own concurrency, so a hung receiver cannot starve the others. No
    cookies: Unleash's fetch keeps none, and a jar shared by every webhook would send
    one receiver's cookies back to it and to others on its host, and grow with every
    new one a receiver sets."""
    connector = aiohttp.TCPConnector(
        limit=0, limit_per_host=0, ttl_dns_cache=60, enable_cleanup_closed=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=config.unleash.timeout_s),
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class App:
    def __init__(self, config: Config, state: StateStore) -> None:
        self.config = config
        self.state = state
        # On a shared state, one daemon leads under a lease; on SQLite, this one always does.
        self.lease: LeaseKeeper | None = None
        if state.leadership is not None:
            self.lease = LeaseKeeper(
                state.leadership,
                holder_name(config.state.node_name),
                config.state.lease_ttl_s,
                on_look=self._on_lease_look,
            )
        self.leading = False
        self._term_over = asyncio.Event()  # set to end the current term (see _lead)
        self._term_reason: str | None = None
        self._term_unreachable = False  # the term ended because the state went away
        self._ready_sent = False
        self._pending: dict[str, int] = {}  # outbox sizes, refreshed every COUNTS_EVERY_S
        self._paused: list[str] = []
        self._counts_at = -math.inf
        self._state_checked_at = -math.inf
        self.stop = asyncio.Event()
        self.workers: dict[str, Worker] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        # Workers being stopped by a reload, and the webhooks to start once they are done.
        self.retiring: dict[str, Worker] = {}
        self._retiring_tasks: dict[str, asyncio.Task[None]] = {}  # their run() tasks
        self._finishing: set[asyncio.Task[None]] = set()  # _finish_retiring, until done
        self._start_after_retire: dict[str, WebhookConfig] = {}
        self.delivered = 0
        self.dead_lettered = 0
        # A burst's deliveries leave the heap grown after the take-in gave back what it
        # held: once they are done and the daemon is quiet, give that back too.
        self._settle = memory.AfterWork(at=GIVE_BACK_AT, quiet_s=SETTLE_S)
        self._crash: BaseException | None = None
        self._once = False
        self._unleash_error: UnleashErrorKind | None = None
        self._progress_at = time.monotonic()
        self._progress_done = (0, 0)
        # What the server said it is (version, unleashUrl), asked at start and after each
        # reload; renderers are rebuilt from it then, never per event. Asked beside polling
        # and delivery, never in their way (see _read_profile).
        self.profile: ServerProfile | None = None
        self._profile_task: asyncio.Task[None] | None = None
        self._profile_tried = asyncio.Event()  # the first ui-config read since start is done
        self._defaults_logged = False
        self._detected = False  # which events API the server has (asked again after a reload)
        self.started_at = time.time()
        self._term_started_at = self.started_at  # health: the poll age counts from here
        self.metrics: Metrics | NullMetrics = NullMetrics()
        if config.metrics.listen:
            # Imported only when asked for: prometheus_client and aiohttp's server cost
            # memory a daemon without a metrics listener has no use for.
            from poller.metrics import Metrics  # noqa: PLC0415

            self.metrics = Metrics(
                [h.name for h in config.webhooks],
                pending=self._scrape_pending,
                paused=self._scrape_paused,
            )

    async def _scrape_pending(self) -> dict[str, int]:
        return await self.state.pending_counts() if self.leading else {}

    async def _scrape_paused(self) -> list[str]:
        return list(await self.state.pauses()) if self.leading else []

    async def _refresh_counts(self, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._counts_at < COUNTS_EVERY_S:
            return
        self._counts_at = now
        self._pending = await self.state.pending_counts()
        self._paused = sorted(await self.state.pauses())

    async def _check_state(self, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._state_checked_at < STATE_CHECK_EVERY_S:
            return
        self._state_checked_at = now
        # A state file deleted or replaced under us: stop (exit 74) rather than keep
        # writing to a file the next start will not find.
        await self.state.check_in_place()
        if await self.state.written_elsewhere():
            self._wake(set(self.workers))  # e.g. dead letters handed back by `replay`

    def _wake(self, hooks: set[str]) -> None:
        for name in hooks:
            if worker := self.workers.get(name):
                worker.wake.set()

    def _count(self, hook: str, outcome: Outcome, lag_s: float, duration_s: float | None) -> None:
        # A 410's pause keeps the event to try again later: a retry, as the metrics count.
        kind = "retry" if outcome.kind == "pause" else outcome.kind
        self.metrics.on_delivery(hook, kind, duration_s, lag_s)
        self._settle.note()
        if outcome.kind == "delivered":
            self.delivered += 1
        elif outcome.kind == "give_up":
            self.dead_lettered += 1

    def role(self) -> dict[str, object]:
        """This daemon's part: "single" on SQLite, else "leader" or "standby" and the lease."""
        if self.lease is None:
            return {"role": "single"}
        seen = self.lease.seen
        return {
            "role": "leader" if self.leading else "standby",
            "holder": self.lease.holder,
            "leader": seen.holder if seen else None,
            "epoch": seen.epoch if seen else 0,
        }

    def health(self) -> tuple[bool, dict[str, object]]:
        from poller.metrics import poll_health  # noqa: PLC0415 - see __init__

        if self.lease is not None and not self.leading:
            return True, self.role()  # a standby is healthy: it waits to take over
        ok, details = poll_health(
            self.ingest.last_poll_ok_at,
            self._term_started_at,
            self.config.unleash.poll_interval_s,
            self.config.state.path if self.lease is None else None,
        )
        details["cursor"] = self.ingest.high_water
        details.update(self.role())
        return ok, details

    def status_line(self) -> str:
        if self.lease is not None and not self.leading:
            seen = self.lease.seen
            leader = seen.holder if seen and seen.holder else "none"
            return f"standby; leader {leader} (epoch {seen.epoch if seen else 0})"
        pending = sum(self._pending.values())
        head = f"Unleash unreachable ({self._unleash_error})" if self._unleash_error else "polling"
        if self.lease is not None:
            head = f"leader (epoch {self.lease.epoch}); {head}"
        return (
            f"{head}; cursor {self.ingest.high_water}, {pending} pending, "
            f"{self.delivered} delivered, {self.dead_lettered} dead-lettered"
            + (f"; paused: {', '.join(self._paused)}" if self._paused else "")
        )

    def _request_stop(self) -> None:
        self.stop.set()
        for worker in self.workers.values():
            worker.stop.set()

    @contextlib.contextmanager
    def _capture_signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT stop the daemon and SIGHUP reloads it while this is open; the
        handlers from before are back once it closes, as uvicorn's capture_signals does."""
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
        self._install_signals(loop)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                if handler is not None:
                    signal.signal(sig, handler)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        def on_stop(signame: str) -> None:
            if self.stop.is_set():
                log.warning("app.forced_exit", signal=signame)
                loop.create_task(self._forced_exit())
                return
            log.info("app.stopping", signal=signame)
            self._request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def _forced_exit(self) -> None:
        """A second SIGTERM: exit now. State is transactional; what was in flight is
        re-sent after restart, what was delivered is not (its marks are committed first,
        given a second)."""
        workers = [*self.workers.values(), *self.retiring.values()]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*(w.commit_marks() for w in workers), return_exceptions=True),
                1.0,
            )
        os._exit(1)

    # -- workers -----------------------------------------------------------------------

    def _start_worker(self, hook: WebhookConfig, session: aiohttp.ClientSession) -> None:
        worker = make_worker(
            hook,
            self.state,
            session,
            asyncio.Event(),
            once=self._once,
            on_outcome=self._count,
            may_send=self.lease.may_send if self.lease is not None else None,
        )
        task = asyncio.create_task(worker.run(), name=f"worker:{hook.name}")
        task.add_done_callback(self._worker_done)
        self.workers[hook.name] = worker
        self.tasks[hook.name] = task

    def _worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        error = task.exception()
        if isinstance(error, _TERM_ENDERS) and self.lease is not None:
            self._end_term(error)
            return
        if self._crash is None:
            # An unexpected error: stop, then crash loudly; systemd restarts us, state is safe.
            self._crash = task.exception()
            self._request_stop()

    def _retire(self, name: str) -> None:
        """Stop one worker after its in-flight delivery (a webhook removed, or changed so
        that its worker is replaced); then start its replacement, if one is due. Until the
        old worker is done no other worker runs for that webhook: two at once would send
        the old one's request in flight and its uncommitted marks again. It counts as
        retiring at once, so a reload right after this one plans with it."""
        worker, task = self.workers.pop(name), self.tasks.pop(name)
        self.retiring[name] = worker
        self._retiring_tasks[name] = task
        worker.stop.set()
        finishing = asyncio.get_running_loop().create_task(
            self._finish_retiring(name, worker, task)
        )
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)

    async def _finish_retiring(self, name: str, worker: Worker, task: asyncio.Task[None]) -> None:
        try:
            await drain([worker], [task], self.config.drain_timeout_s)
        finally:
            del self.retiring[name]
            del self._retiring_tasks[name]
        hook = self._start_after_retire.pop(name, None)
        # Not once the term is over: the next one starts every webhook's worker itself.
        if hook is not None and self.leading and not self.stop.is_set():
            self._start_worker(hook, self.session)

    # -- reload ------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: re-read the config. A bad one is rejected and the old one keeps running."""
        source_path = self.config.source_path
        if source_path is None:
            return
        systemd.reloading()
        try:
            self._reload(source_path)
        finally:
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def _reload(self, source_path: Path) -> None:
        try:
            new = load_config(source_path)
        except ConfigError as exc:
            log.error(
                "config.reload_failed",
                problems=exc.problems,
                detail="keeping the running configuration",
            )
            return
        if problem := check_private(new):
            log.error(
                "config.reload_failed",
                problems=[problem],
                detail="keeping the running configuration",
            )
            return
        if new.metrics != self.config.metrics:
            log.warning(
                "config.reload_partial",
                detail="[metrics] listen changes take effect "
                "after a restart; the rest of the new config is applied",
            )
            new = dataclasses.replace(new, metrics=self.config.metrics)
        if _state_place(new) != _state_place(self.config):
            log.error(
                "config.reload_failed",
                problems=["state: cannot change on reload; restart the service to move the state"],
            )
            return
        if self.profile is not None:
            new = apply_server_profile(new, self.profile)  # until the server is asked again
        self._detected = False  # re-read the API on the next poll
        self._defaults_logged = False
        old_hooks = {h.name: h for h in self.config.webhooks}
        new_hooks = {h.name: h for h in new.webhooks}
        self.config = new
        log_module.configure(new.log_level)
        self.source.reconfigure(new.unleash)
        self.ingest.reconfigure(new)
        running = {name: worker.hook for name, worker in self.workers.items()}
        for action in plan_reload(old_hooks, new_hooks, running, self.retiring.keys()):
            self._apply(action)
        log.info(
            "config.reloaded",
            webhooks=sorted(new_hooks),
            added=sorted(new_hooks.keys() - old_hooks.keys()),
            removed=sorted(old_hooks.keys() - new_hooks.keys()),
        )
        if self.lease is None or self.leading:  # a standby asks nothing: its next term will
            self._start_profile_reads()  # ui-config again, in the background

    def _apply(self, action: Action) -> None:
        match action:
            case Start(hook):
                if self.leading:  # a standby starts its workers when it leads
                    self._start_worker(hook, self.session)
            case Reconfigure(hook):
                self.workers[hook.name].reconfigure(hook)
            case Retire(name, then) | WhenRetired(name, then):
                if then is None:
                    self._start_after_retire.pop(name, None)
                else:
                    self._start_after_retire[name] = then  # once the old worker is done
                if isinstance(action, Retire):
                    self._retire(name)

    # -- running -----------------------------------------------------------------------

    async def run(self, *, once: bool = False) -> int:
        self._once = once
        started = time.monotonic()
        with contextlib.nullcontext() if once else self._capture_signals():
            async with make_session(self.config) as session:
                self.session = session
                self.source = UnleashSource(session, self.config.unleash)
                self.ingest = Ingest(self.config, self.state, self.source, self._wake, self.metrics)
                if once:
                    code = await self._run_once()
                else:
                    code = await self._run_forever()
        # The summary counts the outbox as the run leaves it, not as last cached. A state
        # gone by now (unreachable, fenced) only leaves the last count in it.
        with contextlib.suppress(StateError):
            self._pending = await self.state.pending_counts()
        log.info(
            "app.stopped",
            delivered=self.delivered,
            dead_lettered=self.dead_lettered,
            cursor=self.ingest.high_water,
            pending=sum(self._pending.values()),
            uptime_s=round(time.monotonic() - started, 1),
        )
        if self._crash is not None:
            raise self._crash
        return code

    def _warn_orphans(self) -> None:
        known = {h.name for h in self.config.webhooks}
        for name, count in self._pending.items():
            if name not in known:
                log.warning(
                    "outbox.orphaned",
                    webhook=name,
                    pending=count,
                    detail="webhook no longer configured; its pending events are "
                    "kept until it is configured again",
                )

    async def _detect(self) -> None:
        caps = await self.source.detect()
        log.info("unleash.api_detected", api=caps.api, detail=caps.describe())
        self._detected = True

    # -- the server's profile (ui-config) ----------------------------------------------

    async def _use_saved_profile(self) -> None:
        """Before ui-config answers: render for the server as a previous run last read it
        (most often the same server, so the same bytes), else as the config was loaded
        (8.x, links to unleash.url)."""
        saved = parse_saved_profile(await self.state.saved_text(_PROFILE_KEY))
        if saved is not None:
            self._apply_profile(saved)

    def _start_profile_reads(self) -> None:
        """Ask ui-config in the background until it answers (again after a reload)."""
        if self._profile_task is not None:
            self._profile_task.cancel()
        self._profile_task = asyncio.create_task(self._read_profile(retry=True), name="ui-config")
        self._profile_task.add_done_callback(self._profile_done)

    def _profile_done(self, task: asyncio.Task[None]) -> None:
        if task is self._profile_task:
            self._profile_task = None
        self._worker_done(task)  # an unexpected error stops the daemon, as a worker's does

    async def _stop_profile_reads(self) -> None:
        task, self._profile_task = self._profile_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _read_profile(self, *, retry: bool) -> None:
        """Read GET /api/admin/ui-config and apply it (and keep it for the next start).
        It is optional to polling and delivery and never holds them up: until it answers,
        bodies render with the profile already in use (see _use_saved_profile), one
        warning says so and what that means, and it is asked again with back-off."""
        failures = 0
        try:
            while True:
                try:
                    profile = await read_server_profile(self.source)
                except UnleashError as exc:
                    if exc.kind == "auth":
                        # A token that reads events but not ui-config: asking again will not help.
                        self._profile_unknown(str(exc), retry_in_s=None)
                        return
                    failures += 1
                    delay = backoff_s(
                        failures,
                        self.config.unleash.poll_interval_s,
                        self.config.unleash.backoff_max_s,
                        random.random(),  # noqa: S311 - jitter, not a secret
                    )
                    if failures == 1:
                        self._profile_unknown(str(exc), retry_in_s=delay if retry else None)
                    if not retry:
                        return
                    self._profile_tried.set()
                    if await wait_set(self.stop, delay):
                        return
                    continue
                if profile is None:
                    self._profile_unknown(
                        "it did not say the server's version and unleashUrl", retry_in_s=None
                    )
                    return
                if failures:
                    log.info("unleash.profile_read", after_failures=failures)
                self._apply_profile(profile)
                await self.state.save_text(_PROFILE_KEY, saved_profile_text(profile))
                return
        finally:
            self._profile_tried.set()

    def _profile_unknown(self, why: str, *, retry_in_s: float | None) -> None:
        if self.profile is not None:  # read earlier in this run, or saved by the last
            using = (
                f"Unleash {self.profile.version or '(version not said)'}, links to "
                f"{self.profile.unleash_url} ({self.profile.source})"
            )
        else:
            base = self.config.server.unleash_url if self.config.server else "unleash.url"
            using = f"Unleash 8.x escaping and context, links to {base} (never read)"
        log.warning(
            "unleash.profile_unknown",
            error=why,
            rendering_as=using,
            retry_in_s=None if retry_in_s is None else round(retry_in_s, 2),
            detail="GET /api/admin/ui-config (the server's version and unleashUrl) could not "
            "be read; events are polled and delivered meanwhile, but if the server is not "
            "what bodies render as, they may differ from its own integrations' (escaping, "
            "eventMarkdown, link base) until it is read",
        )

    def _apply_profile(self, profile: ServerProfile) -> None:
        """Rebuild the renderers for the server, hand them to the running workers, and say
        once what was chosen and why."""
        self.profile = profile
        before = self.config.server
        self.config = apply_server_profile(self.config, profile)
        for hook in self.config.webhooks:
            if worker := self.workers.get(hook.name):
                worker.reconfigure(hook)
            if hook.name in self._start_after_retire:
                self._start_after_retire[hook.name] = hook
        if self.config.server != before or not self._defaults_logged:
            self._defaults_logged = True
            server = self.config.server or profile
            escape, reason = server.escape()
            log.info(
                "render.defaults",
                unleash_version=server.version,
                link_base=server.unleash_url,
                link_base_from=server.source,
                escape=escape,
                escape_reason=reason,
                event_markdown=server.event_markdown,
                explicit_escape=sorted(h.name for h in self.config.webhooks if h.escape),
            )

    async def _run_once(self) -> int:
        code = EX_OK
        if self.lease is not None and not await self._lead_once():
            return EX_TEMPFAIL
        self.leading = True
        # Renewed from the start: the poll below can outlast the lease (a backlog).
        keeper = asyncio.create_task(self.lease.keep()) if self.lease is not None else None
        try:
            await self._refresh_counts()
            self._warn_orphans()
            await self._use_saved_profile()
            await self._read_profile(retry=False)  # one try: --once does not wait for it
            try:
                await self._detect()
                await self.ingest.poll(force=True)
                await self.ingest.recheck_gaps()
            except UnleashError as exc:
                log.error("unleash.unreachable", kind=exc.kind, error=str(exc))
                code = EX_UNAVAILABLE
        except _TERM_ENDERS as exc:
            if self.lease is None:
                raise
            self._end_term(exc)  # nothing is delivered: exit 75 below
        if not self._term_over.is_set():
            for hook in self.config.webhooks:
                self._start_worker(hook, self.session)
        reporter = asyncio.create_task(self._progress_loop())
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        reporter.cancel()
        if keeper is not None:
            assert self.lease is not None
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError, LeaseLostError):
                await keeper  # a lease lost after the last write: the work is done
            if self._term_reason is not None:  # fenced or cut off: the work is not done
                self._log_term_end()
                self.lease.stand_down()
                return EX_TEMPFAIL
            await self.lease.resign()
        return code

    async def _lead_once(self) -> bool:
        """--once on a shared state: lead if the lease is free, else say who leads."""
        assert self.lease is not None
        try:
            leading = await self.lease.try_once()
        except StateUnavailableError as exc:
            log.error(
                "state.unreachable",
                state=self.state.where,
                error=str(exc),
                detail="--once did nothing; try again once the state answers",
            )
            return False
        if leading:
            self.lease.leading = True
            return True
        seen = self.lease.seen
        log.error(
            "lease.held",
            leader=seen.holder if seen else None,
            epoch=seen.epoch if seen else 0,
            detail="another daemon leads on this state; --once runs only while none does",
        )
        return False

    async def _progress_loop(self) -> None:
        """--once has no poll loop: the progress line's counts are refreshed here."""
        while True:
            await asyncio.sleep(1.0)
            await self._refresh_counts()
            self._report_progress()

    async def _run_forever(self) -> int:
        listen = self.config.metrics.listen
        runner = None
        if listen and not isinstance(self.metrics, NullMetrics):
            from poller.metrics import start_http  # noqa: PLC0415 - see __init__

            # Bound before READY=1: a taken port fails the start instead of a running service.
            runner = await start_http(listen, self.metrics, self.health)
        try:
            return await self._serve()
        finally:
            if runner is not None:
                await runner.cleanup()

    async def _serve(self) -> int:
        watchdog = asyncio.create_task(
            systemd.watchdog_loop(self.stop, self.status_line), name="systemd"
        )
        try:
            while not self.stop.is_set():
                if self.lease is not None:
                    self._ready()  # a standby is up and healthy
                    self.metrics.on_role(False, self.lease.seen.epoch if self.lease.seen else 0)
                    # An outage the last term logged is not logged again while waited out.
                    quiet = self._term_unreachable
                    if not await self.lease.acquire(self.stop, outage_logged=quiet):
                        break
                await self._lead()
                if self.lease is None:
                    break  # SQLite: one term, the daemon's whole run
        finally:
            self._request_stop()
            await watchdog  # sends STOPPING=1 as soon as it sees stop
        return EX_OK

    def _on_lease_look(self, leading: bool, epoch: int) -> None:
        # A standby's gauges follow the lease as it looks (another takeover meanwhile).
        self.metrics.on_role(leading, epoch)

    def _ready(self) -> None:
        if not self._ready_sent:
            self._ready_sent = True
            systemd.notify("READY=1", f"STATUS={self.status_line()}")

    def _end_term(self, error: BaseException) -> None:
        """The state says this daemon may no longer lead (fenced, or unreachable): end the
        term; `_lead` stops the workers and the daemon stands by."""
        if self._term_reason is None:
            self._term_reason = str(error)
            self._term_unreachable = isinstance(error, StateUnavailableError) or (
                isinstance(error, LeaseLostError) and error.unreachable
            )
        self._term_over.set()

    async def _lead(self) -> None:
        """One term as the leader: poll and deliver until stopped, or until the lease is
        lost or the state cannot be reached; then stop the workers (in-flight requests
        are re-sent by whoever leads next) and return."""
        self._term_over.clear()
        self._term_reason = None
        self._term_unreachable = False
        self.leading = True
        self._term_started_at = time.time()  # a new leader has not polled yet
        self._counts_at = -math.inf
        self.metrics.on_role(True, self.lease.epoch if self.lease is not None else 0)
        keeper = asyncio.create_task(self.lease.keep()) if self.lease is not None else None
        poller: asyncio.Task[None] | None = None
        try:
            try:
                await self._begin_term()
            except _TERM_ENDERS as exc:
                if self.lease is None:
                    raise
                self._end_term(exc)
            if not self._term_over.is_set() and not self.stop.is_set():
                for hook in self.config.webhooks:
                    if hook.name not in self.workers:  # a reload meanwhile started it
                        self._start_worker(hook, self.session)
                poller = asyncio.create_task(self._poll_loop(), name="poller")
                self._ready()
            await self._until_term_ends(poller, keeper)
        finally:
            self.leading = False
            if keeper is not None:
                keeper.cancel()
            if poller is not None:
                poller.cancel()
            await self._stop_profile_reads()
            await self._stop_workers()
            if self.lease is not None:
                if self.stop.is_set() and self._term_reason is None:
                    await self.lease.resign()  # a standby takes over without waiting
                else:
                    self.lease.stand_down()
        if self._term_reason is not None and not self.stop.is_set():
            self._log_term_end()

    def _log_term_end(self) -> None:
        """One line for the end of a term: the state gone away, or the lease lost."""
        assert self.lease is not None
        if self._term_unreachable:
            log.error(
                "state.unreachable",
                state=self.state.where,
                error=self._term_reason,
                holder=self.lease.holder,
                epoch=self.lease.epoch,
                detail="stopped delivering and standing by; the state is asked again with "
                "back-off and whoever leads next re-sends what was in flight",
            )
        else:
            log.error(
                "lease.lost",
                holder=self.lease.holder,
                epoch=self.lease.epoch,
                reason=self._term_reason,
                detail="another daemon leads now; this one stands by",
            )

    async def _begin_term(self) -> None:
        """Ask the server first, so pending deliveries render for it: ui-config beside the
        API detection, its first answer awaited no longer than one request. If it cannot
        be read, it is asked again in the background and delivery goes on meanwhile (see
        _read_profile); if the API cannot be, the poll loop asks again."""
        await self.ingest.load()  # the state, not memory, says where to go on
        await self._refresh_counts()
        self._warn_orphans()
        await self._use_saved_profile()
        self._start_profile_reads()
        with contextlib.suppress(UnleashError):
            await self._detect()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._profile_tried.wait(), self.config.unleash.timeout_s)

    async def _until_term_ends(
        self, poller: asyncio.Task[None] | None, keeper: asyncio.Task[None] | None
    ) -> None:
        waits = [asyncio.create_task(self.stop.wait()), asyncio.create_task(self._term_over.wait())]
        tasks = [t for t in (poller, keeper) if t is not None]
        try:
            done, _ = await asyncio.wait([*waits, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
        for task in tasks:
            if task in done and not task.cancelled() and task.exception() is not None:
                error = task.exception()
                assert error is not None
                if isinstance(error, _TERM_ENDERS) and self.lease is not None:
                    self._end_term(error)
                elif self._crash is None:
                    self._crash = error
                    self._request_stop()

    async def _stop_workers(self) -> None:
        """At a stop, in-flight deliveries get the drain time; at the end of a term, only
        as long as the lease surely holds (a new leader re-sends what they carry)."""
        timeout = self.config.drain_timeout_s
        if self.lease is not None and not self.stop.is_set():
            timeout = max(0.0, min(timeout, self.lease.valid_until - time.monotonic()))
        # Workers a reload is replacing end with the term too: none of them may go on
        # sending beside the next term's, nor start its replacement in standby.
        workers = [*self.workers.values(), *self.retiring.values()]
        tasks = [*self.tasks.values(), *self._retiring_tasks.values()]
        cancelled = await drain(workers, tasks, timeout)
        await asyncio.gather(*self._finishing, return_exceptions=True)
        self.workers.clear()
        self.tasks.clear()
        if cancelled and self.stop.is_set():
            log.warning(
                "app.drain_timeout",
                workers_cancelled=cancelled,
                detail="in-flight deliveries are re-sent after restart",
            )

    def _report_progress(self) -> None:
        """A line every PROGRESS_EVERY_S while deliveries flow, so a long backlog (a
        backfill, a replay) shows that it moves and how much is left."""
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_EVERY_S:
            return
        done = (self.delivered, self.dead_lettered)
        if done != self._progress_done:
            log.info(
                "delivery.progress",
                delivered=self.delivered - self._progress_done[0],
                dead_lettered=self.dead_lettered - self._progress_done[1],
                pending=self._pending,
                seconds=round(now - self._progress_at, 1),
            )
        self._progress_at, self._progress_done = now, done

    async def _poll_loop(self) -> None:
        failures = 0
        source, ingest = self.source, self.ingest
        while not self.stop.is_set():
            self._report_progress()
            interval = self.config.unleash.poll_interval_s
            try:
                if not self._detected:
                    await self._detect()
                new = await ingest.poll(force=failures > 0)
                await ingest.recheck_gaps()
                self.metrics.on_poll_ok(new, ingest.high_water, len(ingest.gaps))
                if failures:
                    log.info("unleash.recovered", after_failures=failures)
                failures = 0
                self._unleash_error = None
                delay = interval
                if self._settle.due():
                    self._settle.reset()
                    ingest.give_back()
            except UnleashError as exc:
                failures += 1
                self.metrics.on_poll_error(exc.kind)
                self._unleash_error = exc.kind
                source.forget_probe()
                jitter = random.random()  # noqa: S311 - jitter, not a secret
                delay = backoff_s(failures, interval, self.config.unleash.backoff_max_s, jitter)
                log.error(
                    "unleash.unreachable",
                    kind=exc.kind,
                    error=str(exc),
                    failures=failures,
                    retry_in_s=round(delay, 2),
                )
            await self._check_state()
            await self._refresh_counts()
            next_gap = ingest.next_gap_check()
            if next_gap is not None and failures == 0:
                delay = max(0.0, min(delay, next_gap - time.time()))
            await wait_set(self.stop, delay)


async def ask_server_profile(config: Config) -> ServerProfile | None:
    """One look at the server's ui-config (for `render`); raises UnleashError."""
    async with make_session(config) as session:
        return await read_server_profile(UnleashSource(session, config.unleash))

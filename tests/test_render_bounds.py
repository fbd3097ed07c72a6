"""Rendering is bounded in time and in memory whatever the template does (issue 11, defects
4 and 5): a runaway Jinja2 render is stopped off the event loop, and both engines stop as
soon as the output passes max_body_bytes instead of building the whole body first."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from concurrent import futures

import pytest

from poller import jinja
from poller.jinja import resident_bytes
from poller.render import (
    MUSTACHE_TIME_BUDGET_S,
    RENDER_TIME_BUDGET_S,
    BadTemplateError,
    RenderError,
    build_renderer,
)

SILENT_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
TAGS_EVENT: dict[str, object] = {
    "id": 1,
    "type": "feature-tagged",
    "createdAt": "2026-11-28T13:05:31.123Z",
    "data": {"name": "f"},
    "tags": [{"type": "simple", "value": f"tag-{i:05d}"} for i in range(300)],
}


def _within(seconds: float, work: Callable[[], object]) -> object:
    """Run `work` in a daemon thread; fail (rather than hang the suite) if it outlives
    `seconds`."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still rendering after {seconds}s"
    return result[0]


def test_a_jinja_loop_that_prints_nothing_is_stopped_at_the_time_budget() -> None:
    """The issue's nested loop that outputs nothing is stopped after the time budget with a
    clear reason, not run for hours."""
    renderer = build_renderer(SILENT_LOOP, engine="jinja2")
    started = time.monotonic()
    outcome = _within(RENDER_TIME_BUDGET_S + 5, lambda: renderer.render(TAGS_EVENT))
    took = time.monotonic() - started
    assert isinstance(outcome, RenderError), outcome
    assert f"template ran longer than {RENDER_TIME_BUDGET_S:g}s" in str(outcome)
    assert RENDER_TIME_BUDGET_S * 0.9 <= took < RENDER_TIME_BUDGET_S + 2


def test_a_runaway_jinja_render_leaves_the_event_loop_free() -> None:
    """While a runaway Jinja2 render is awaited, the event loop keeps running other work
    (timers fire every 20 ms), and the render ends as a RenderError."""

    async def main() -> tuple[int, BaseException | bytes]:
        renderer = build_renderer(SILENT_LOOP, engine="jinja2")
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                await asyncio.sleep(0.02)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        try:
            result: BaseException | bytes = await renderer.render_async(TAGS_EVENT)
        except RenderError as exc:
            result = exc
        done.set()
        await tick_task
        return ticks, result

    ticks, result = _within(RENDER_TIME_BUDGET_S + 5, lambda: asyncio.run(main()))  # type: ignore[misc]
    assert isinstance(result, RenderError), result
    # 2 s of 20 ms timers is up to 100 ticks (fewer on a loaded machine, as the loop shares
    # the GIL with the render thread); a loop blocked by the render would see at most one.
    assert ticks >= 10, ticks


def test_a_stopped_render_thread_renders_the_next_event() -> None:
    """After a render was stopped at its deadline, the same webhook renders the next event
    normally (the stopped thread is reused or replaced, never wedged)."""
    renderer = build_renderer(
        "{% if event.id == 1 %}" + SILENT_LOOP + "{% else %}ok {{ event.id }}{% endif %}",
        engine="jinja2",
    )
    before = set(threading.enumerate())
    first = _within(RENDER_TIME_BUDGET_S + 5, lambda: renderer.render(TAGS_EVENT))
    assert isinstance(first, RenderError)
    for event_id in range(2, 30):
        assert renderer.render({**TAGS_EVENT, "id": event_id}) == b"ok %d" % event_id
    # The stopped thread comes back to the pool once it has unwound; a render that came
    # before that got a second thread. No more than that, however many renders follow.
    started = [t for t in threading.enumerate() if t not in before and t.name == "render"]
    assert 1 <= len(started) <= 2


@pytest.mark.parametrize(
    ("template", "engine"),
    [
        ("{{#event.tags}}{{{eventJson}}}{{/event.tags}}", "mustache"),
        ("{% for t in event.tags %}{{ eventJson }}{% endfor %}", "jinja2"),
        (
            "{% set b %}{% for t in event.tags %}{{ eventJson }}{% endfor %}{% endset %}{{ b }}",
            "jinja2",
        ),
        ("{{ eventJson * 1000 }}", "jinja2"),
    ],
)
def test_rendering_stops_once_the_output_passes_max_body_bytes(template: str, engine: str) -> None:
    """A template that repeats eventJson over 300 tags (about 12 MB of output) is refused
    once the output passes max_body_bytes: peak memory stays within a few times the limit,
    which it would not if the size were checked only after rendering."""
    limit = 64 * 1024
    renderer = build_renderer(template, engine=engine, max_body_bytes=limit)  # type: ignore[arg-type]
    renderer.render({"id": 0})  # imports and warm-up outside the measurement
    tracemalloc.start()
    try:
        with pytest.raises(RenderError, match="65536 characters; stopped"):
            renderer.render(TAGS_EVENT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # The event's JSON (twice encoded) is about 40 kB; the context and a limit's worth of
    # output fit well inside 1 MB. Checked after rendering, the peak is over 12 MB.
    assert peak < 1024 * 1024, peak


def test_a_mustache_section_nest_that_prints_nothing_is_stopped_at_the_time_budget() -> None:
    """Three nested sections over 300 tags (27 million passes, no output) stop at the time
    budget with a clear reason instead of running on the event loop for minutes."""
    nest = "{{#event.tags}}" * 3 + "{{/event.tags}}" * 3 + "x"
    renderer = build_renderer(nest)
    started = time.monotonic()
    outcome = _within(MUSTACHE_TIME_BUDGET_S + 30, lambda: renderer.render(TAGS_EVENT))
    assert isinstance(outcome, RenderError), outcome
    assert f"template ran longer than {MUSTACHE_TIME_BUDGET_S:g}s" in str(outcome)
    assert time.monotonic() - started < MUSTACHE_TIME_BUDGET_S + 1


@pytest.mark.parametrize(
    "template",
    [
        "{{ 'x' * 100000000 }}",
        "{{ [1] * 100000000 }}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}",
        "{% set ns = namespace(n=3) %}{% for i in range(40) %}{% set ns.n = ns.n * ns.n %}"
        "{% endfor %}",
        "{{ 7 ** 99999999 }}",
        "{{ eventJson|replace('', eventJson) }}",
        "{{ eventJson.replace('', eventJson) }}",
        "{{ 'x'|center(1000000000) }}",
        "{{ 'x'.ljust(1000000000) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ '{:{}}'.format(1, 999999999) }}",
        "{{ range(100000)|map('string')|join(eventJson) }}",
        "{{ eventJson.join(range(100000)|map('string')) }}",
        "{% macro m() %}{% for i in range(100000) %}{{ eventJson }}{% endfor %}{% endmacro %}"
        "{{ m()|length }}",
        "{{ eventJson|indent(100000000) }}",
        # short lists that print (str(), one C call) as huge texts
        "{{ [eventJson] * 100000 }}",
        "{{ range(1)|batch(100000, eventJson)|list }}",
        "{{ (range(1)|batch(100000, eventJson)|list)|length }}",
        "{{ '%s' % (range(1)|batch(100000, eventJson)|list) }}",
        "{{ 'x' ~ (range(1)|batch(100000, eventJson)|list) }}",
        # short lists of big integers, each printed with hundreds of digits (review)
        "{% set b = 2**2047 %}{{ [b] * 700000 }}",
        "{% set b = 2**2047 %}{{ ([b] * 7000)|string }}",
        "{% set b = 2**2047 %}{{ '%s' % ([b] * 7000,) }}",
    ],
)
def test_jinja_values_too_big_to_build_are_refused_before_they_are_built(template: str) -> None:
    """Each of these would build a huge value in one C call, which no deadline can stop
    (it holds the GIL); the sandbox refuses it up front, in well under the time budget.
    Counted in the process's CPU time (the render thread's included), which other load on
    the machine does not inflate as it does the wall clock."""
    renderer = build_renderer(template, engine="jinja2", max_body_bytes=1024 * 1024)
    started = time.process_time()
    with pytest.raises(RenderError, match=r"^template would build .* over \d+ (characters|bits)"):
        renderer.render(TAGS_EVENT)
    assert time.process_time() - started < 1.0


def test_ordinary_jinja_arithmetic_and_formatting_still_work() -> None:
    """The caps leave ordinary templates alone: big ids and timestamps as arguments, small
    repetitions, sums and powers."""
    template = (
        "{{ '{} {}'.format(1732790000123, event.id) }}|{{ '-' * 3 }}|{{ 2 ** 10 }}|"
        "{{ event.tags|map(attribute='value')|join(',')|length }}|{{ '%05d' % event.id }}"
    )
    assert build_renderer(template, engine="jinja2").render(TAGS_EVENT) == (
        b"1732790000123 1|---|1024|2999|00001"
    )


@pytest.mark.parametrize(
    ("template", "error"),
    [
        ("{{ event|wordwrap(1) }}", "AttributeError"),  # wordwrap calls str methods on a dict
        ("{{ event.tags|indent }}", "AttributeError"),
    ],
)
def test_any_exception_a_jinja_template_raises_is_its_render_error(
    template: str, error: str
) -> None:
    """Found by the template fuzzing: a filter given the wrong kind of value raised
    AttributeError, which escaped the renderer and would stop the worker (and the daemon).
    Whatever a template raises is a RenderError (a dead letter with the reason)."""
    with pytest.raises(RenderError, match=f"^template failed: {error}"):
        build_renderer(template, engine="jinja2").render(TAGS_EVENT)


@pytest.mark.parametrize(
    "template",
    [
        "{{ " + "(" * 3000 + "1" + ")" * 3000 + " }}",
        "{{ " + "[" * 3000 + "]" * 3000 + " }}",
        "{{ 1" + "|string" * 5000 + " }}",
        "{% for i in event.tags %}" * 30 + "{% endfor %}" * 30,
        "{% if 1 %}" * 200 + "{% endif %}" * 200,
    ],
)
def test_a_jinja_template_nested_too_deeply_is_a_config_error(template: str) -> None:
    """Found while fuzzing the config loader: deep nesting made Jinja2's parser raise
    RecursionError, and more than 20 nested blocks made Python's compiler raise
    SyntaxError, out of `check` and `run` as a traceback. Now it is a template error."""
    with pytest.raises(BadTemplateError, match="nested too deeply"):
        build_renderer(template, engine="jinja2")


def test_idle_render_threads_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload builds new renderers: the render threads of the old ones end once idle for
    IDLE_THREAD_S, instead of piling up with every SIGHUP; a renderer still in use simply
    starts a new one."""
    monkeypatch.setattr(jinja, "IDLE_THREAD_S", 0.2)
    before = set(threading.enumerate())
    renderers = [build_renderer("{{ event.id }}", engine="jinja2") for _ in range(5)]
    for renderer in renderers:
        assert renderer.render(TAGS_EVENT) == b"1"
    started = [t for t in threading.enumerate() if t not in before and t.name == "render"]
    assert len(started) == 5
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.is_alive() for t in started)
    assert renderers[0].render(TAGS_EVENT) == b"1"


@pytest.mark.skipif(resident_bytes() is None, reason="resident memory is read from /proc")
def test_a_jinja_render_that_grows_memory_is_stopped() -> None:
    """A loop that builds a big value element by element (each step small, so no size
    check refuses it; 100,000 copies of a 40 kB text would be 4 GB) is stopped once the
    process has grown by the render's memory budget, long before the time budget."""
    event = {**TAGS_EVENT, "data": {"name": "f" * 20000}}
    grow = (
        "{% set x = range(100000)|map('string')|map('replace', '', eventJson)|list %}{{ x|length }}"
    )
    renderer = build_renderer(grow, engine="jinja2")
    started = time.monotonic()
    with pytest.raises(RenderError, match=r"^template used over \d+ MiB of memory; stopped"):
        renderer.render(event)
    assert time.monotonic() - started < RENDER_TIME_BUDGET_S


def test_splicing_many_event_markdowns_is_linear() -> None:
    """Unleash splices eventMarkdown in after rendering, JSON-escaped inside quotes. That
    splice rescanned the body from its start for every placeholder (quadratic: 3,000
    placeholders took seconds on the event loop); now it is one pass."""
    event = {
        **TAGS_EVENT,
        "type": "feature-created",
        "createdBy": 'ann "the admin"',
        "featureName": "f",
        "project": "default",
        "tags": [{"type": "simple", "value": str(i)} for i in range(3000)],
    }
    template = '{{#event.tags}}"{{eventMarkdown}}" {{eventMarkdown}}|{{/event.tags}}'
    renderer = build_renderer(template)
    started = time.monotonic()
    body = renderer.render(event).decode()
    took = time.monotonic() - started
    pieces = body.split("|")
    assert len(pieces) == 3001
    assert pieces[-1] == ""
    assert set(pieces[:-1]) == {pieces[0]}
    inside, outside = pieces[0].split('" ', 1)
    assert 'ann \\"the admin\\"' in inside  # JSON-escaped inside the quotes
    assert 'ann "the admin"' in outside  # raw outside them
    assert took < 0.5, took


def _settles_and_comes_back(pool: jinja.RenderThreads, jobs: list[jinja._Job]) -> None:
    """Every job's future settles, and every thread the pool made is back in it, once."""
    _, unsettled = futures.wait([job.future for job in jobs], timeout=10)
    assert not unsettled, f"{len(unsettled)} renders never settled"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with pool._lock:
            idle = list(pool._idle)
        alive = [t for t in pool_threads(pool) if t.is_alive()]
        if len(idle) == len(alive):
            break
        time.sleep(0.01)
    assert len(idle) == len({id(t) for t in idle}), "a thread given back twice"
    assert len(idle) == len(alive), "a thread never given back"


def pool_threads(pool: jinja.RenderThreads) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if getattr(t, "_pool_tag", None) is pool]


def _tagged_pool(monkeypatch: pytest.MonkeyPatch) -> jinja.RenderThreads:
    pool = jinja.RenderThreads(RENDER_TIME_BUDGET_S, 2**40, RenderError)
    made = jinja._RenderThread.__init__

    def tag(self: jinja._RenderThread, owner: jinja.RenderThreads) -> None:
        made(self, owner)
        self._thread._pool_tag = owner  # type: ignore[attr-defined]

    monkeypatch.setattr(jinja._RenderThread, "__init__", tag)
    return pool


def test_a_render_interrupted_before_its_thread_took_it_is_settled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review race 1: a render stopped right after it was handed to an idle thread (a
    worker cancelled on shutdown) lost its job and its thread for good; now the job is
    settled as stopped and the thread comes back."""
    pool = _tagged_pool(monkeypatch)
    assert pool.run(lambda x: x + 1, 1) == 2  # one thread, idle in its inbox
    jobs = []
    for i in range(200):
        thread, job = pool._start(lambda x: x, i)
        thread.interrupt(job)
        job.future.exception(timeout=10)  # settled (TimeoutError if it never is)
        jobs.append(job)
    _settles_and_comes_back(pool, jobs)
    assert len(pool_threads(pool)) <= 2


def test_thousands_of_interrupts_and_cancels_settle_every_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Stress of the hand-off: renders interrupted before, during and after they run, right
    after the previous one ended, cancelled, or raising; every future settles once, and
    every render thread goes back to its pool once (none leaked, none twice).

    Without the test process's gc callbacks: Hypothesis installs one once a property test
    has run, and CPython swallows an async exception that lands inside it ("Exception
    ignored in gc_callback", which pytest turns into a failure). The daemon installs none."""
    old_interval = sys.getswitchinterval()
    callbacks = gc.callbacks[:]
    gc.callbacks.clear()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        pool = _tagged_pool(monkeypatch)
        rng = random.Random(11)

        def work(n: int) -> int:
            if n % 7 == 0:
                raise ValueError(n)
            total = 0
            for i in range(n % 50):
                total += i
            return total

        jobs = []
        for i in range(3000):
            thread, job = pool._start(work, i)
            jobs.append(job)
            how = rng.randrange(5)
            if how == 1:
                thread.interrupt(job)
            elif how == 2:
                time.sleep(0)
                thread.interrupt(job)
            elif how == 3:
                job.future.cancel()
                thread.interrupt(job)
            elif how == 4:
                assert not futures.wait([job.future], timeout=10).not_done, "never settled"
                thread.interrupt(job)  # ended: must not touch the thread's next job
        _settles_and_comes_back(pool, jobs)
        results = [j.future for j in jobs if not j.future.cancelled() and not j.future.exception()]
        for future in results:
            assert isinstance(future.result(), int)
    finally:
        sys.setswitchinterval(old_interval)
        gc.callbacks[:] = callbacks


def test_renders_cancelled_right_after_they_started_leak_no_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Review race 2: workers cancelled (drain, forced stop) just after their render was
    submitted left a wedged render thread each; now they all go back to the pool."""
    pool = _tagged_pool(monkeypatch)

    async def main() -> None:
        assert await pool.run_async(lambda x: x, 1) == 1
        for i in range(300):
            task = asyncio.create_task(pool.run_async(lambda x: x, i))
            for _ in range(i % 3):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    asyncio.run(main())
    _settles_and_comes_back(pool, [])

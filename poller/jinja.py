"""Jinja2 bodies, bounded: a sandbox that refuses to build oversized values, and threads
that run renders off the event loop and can be stopped where they stand.

A Jinja2 template is a program: `{% for %}` loops nest, `namespace()` lets a value grow on
every pass, and none of that has to produce output, so checking the time between output
chunks is not enough. Each render therefore runs on a thread of its own webhook's small
pool; the event loop only awaits it. At the deadline the awaiting side raises an
exception inside the render thread (CPython's PyThreadState_SetAsyncExc), which the
interpreter delivers at the next bytecode, however deep in the template's loops that is.

While it runs, the awaiting side also checks every 50 ms how much the process has grown,
so a loop that builds a value piece by piece is stopped before it fills memory.

An async exception cannot stop a single C-level operation (a huge `**`, a string
repeated a billion times, str() of a list that prints as gigabytes): those hold the GIL
and would stall the loop as well. The sandbox refuses them before they start, by the size
of what they would build or print.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import itertools
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from typing import Any

from jinja2 import nodes, pass_environment, pass_eval_context
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from poller.jsvalues import json_stringify

# Integers a template may build: far past any id or timestamp, far short of a slow `**`.
MAX_INT_BITS = 4096
# An idle render thread ends after this long: a reload builds new renderers, and the
# threads of the old ones must not pile up.
IDLE_THREAD_S = 60.0
# printf-style widths and precisions in `"%99999999d" % x`, which pad in C.
_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# The same in str.format fields: "{:>99999999}".
_BRACE_WIDTH = re.compile(r"\{[^{}]*?:[^{}]*?(\d+)(?:\.(\d+))?[^{}]*\}")


class TemplateLimitError(SecurityError):
    """The template asked for a value larger than a body may be; the message says which."""


class _Deadline(BaseException):
    """Raised inside a render thread at its deadline. A BaseException, so that no
    `except Exception` on the way (ours or Jinja's) can swallow it."""


def _sized(value: object) -> int | None:
    return len(value) if isinstance(value, str | list | tuple) else None


def text_size(value: object, limit: int) -> int:
    """At least how long `str(value)` is (a list or a dict prints every element), counted
    no further than just past `limit`. str() of a container is one C call that neither the
    deadline nor the memory watch can stop, so what would print too long is refused first."""
    total = 0
    pending: list[Iterator[object]] = [iter((value,))]
    while pending:
        item = next(pending[-1], _END)
        if item is _END:
            pending.pop()
            continue
        if isinstance(item, str):
            total += len(item)
        elif isinstance(item, list | tuple | set | frozenset):
            total += 2 + 2 * len(item)
            pending.append(iter(item))
        elif isinstance(item, dict):
            total += 2 + 4 * len(item)
            pending.append(iter([*item.keys(), *item.values()]))
        elif isinstance(item, Namespace):
            pending.append(iter((item._Namespace__attrs,)))  # its attributes print with it
        elif type(item) is int:
            # An upper bound of its digits (log10(2) < 0.302) and sign: [2**2047] * 700000
            # is a short list that prints as 430 MB.
            total += item.bit_length() * 302 // 1000 + 2
        else:
            total += 1
        if total > limit:
            break
    return total


_END = object()


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, with every way to build a big value in one C call capped
    at `max_chars` (text and lists) or MAX_INT_BITS (integers), checked before the call."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, max_chars: int) -> None:
        super().__init__(autoescape=False, keep_trailing_newline=True)
        self.max_chars = max_chars
        self.code_generator_class = _BoundedCodeGenerator
        self.filters.update(self._bounded_filters())
        # Jinja's own tojson escapes for HTML (<, >, &, '), which is wrong inside JSON.
        self.filters["tojson"] = json_stringify
        # Every filter prints or walks its input in C: none gets one too big to print.
        self.filters = {name: self._sized_input(f) for name, f in self.filters.items()}
        # Lorem ipsum of any length is no part of a webhook body.
        del self.globals["lipsum"]
        # Block sets, macros, call blocks and filter blocks join their buffers with this.
        self.concat = self.bounded_join  # type: ignore[method-assign]
        # Every {{ value }} is printed with str(): a list too long to print is refused.
        self.finalize = self._printable

    def _check_text(self, *values: object) -> None:
        for value in values:
            if not isinstance(value, str) and text_size(value, self.max_chars) > self.max_chars:
                raise self.refuse("a printed value")
            if isinstance(value, str) and len(value) > self.max_chars:
                raise self.refuse("a value")

    def _printable(self, value: Any) -> Any:
        if not isinstance(value, str):
            self._check_text(value)
        return value

    def _sized_input(self, apply: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(apply)  # keeps jinja_pass_arg
        def checked(*args: Any, **kwargs: Any) -> Any:
            self._check_text(*args, *kwargs.values())
            return apply(*args, **kwargs)

        return checked

    def refuse(self, what: str) -> TemplateLimitError:
        return TemplateLimitError(
            f"template would build {what} over {self.max_chars} characters; stopped"
        )

    def bounded_join(self, pieces: Iterable[Any], separator: str = "") -> str:
        """`separator.join(map(str, pieces))`, refused before joining if too long."""
        items = list(pieces)
        self._check_text(items)
        texts = [p if isinstance(p, str) else str(p) for p in items]
        if sum(map(len, texts)) + len(separator) * len(texts) > self.max_chars:
            raise self.refuse("joined text")
        return separator.join(texts)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            self._check_repeat(left, right)
            self._check_repeat(right, left)
            if _both_ints(left, right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateLimitError(
                    f"template would build a product over {MAX_INT_BITS} bits; stopped"
                )
        elif operator == "**":
            if (
                _both_ints(left, right)
                and abs(left) > 1
                and right * left.bit_length() > MAX_INT_BITS
            ):
                raise TemplateLimitError(
                    f"template would build a power over {MAX_INT_BITS} bits; stopped"
                )
        elif operator == "+" and isinstance(left, list | tuple):
            if text_size((left, right), self.max_chars) > self.max_chars:
                raise self.refuse("a sum")
        elif operator == "+":
            left_size, right_size = _sized(left), _sized(right)
            if (
                left_size is not None
                and right_size is not None
                and left_size + right_size > self.max_chars
            ):
                raise self.refuse("a sum")
        elif operator == "%" and isinstance(left, str):
            self._check_widths(left, _PERCENT_WIDTH)
            self._check_text(right)
        return super().call_binop(context, operator, left, right)

    def _check_repeat(self, sequence: object, times: object) -> None:
        if _sized(sequence) is None or type(times) is not int or times <= 0:
            return
        # As printed: [eventJson] * 100000 is short as a list and huge as text.
        if text_size(sequence, self.max_chars // times + 1) * times > self.max_chars:
            raise self.refuse("a repetition")

    def _check_widths(self, text: str, spec: re.Pattern[str]) -> None:
        for match in spec.finditer(text):
            for number in match.groups():
                if number and number.isdigit() and int(number) > self.max_chars:
                    raise self.refuse("a formatted width")

    def _check_width(self, width: object) -> None:
        if type(width) is int and width > self.max_chars:
            raise self.refuse("a width")

    def check_replace(self, text: str, old: str, new: str) -> None:
        count = len(text) + 1 if not old else text.count(old)
        if len(text) + count * (len(new) - len(old)) > self.max_chars:
            raise self.refuse("a replacement")

    def _bounded_filters(self) -> dict[str, Callable[..., Any]]:
        """The filters whose result can be much longer than their input, checked first."""
        original = self.filters
        replace, center, indent = original["replace"], original["center"], original["indent"]
        join, wordwrap, format_ = original["join"], original["wordwrap"], original["format"]

        @pass_eval_context
        def bounded_replace(ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> Any:
            self.check_replace(str(s), str(old), str(new))
            return replace(ctx, s, old, new, count)

        def bounded_center(value: Any, width: Any = 80) -> Any:
            self._check_width(width)
            return center(value, width)

        def bounded_indent(s: Any, width: Any = 4, first: Any = False, blank: Any = False) -> Any:
            pad = len(width) if isinstance(width, str) else width if type(width) is int else 0
            text = str(s)
            if len(text) + (text.count("\n") + 1) * pad > self.max_chars:
                raise self.refuse("an indent")
            return indent(s, width, first, blank)

        @pass_eval_context
        def bounded_join(ctx: Any, value: Any, d: str = "", attribute: Any = None) -> Any:
            items = list(value)
            if attribute is None:
                self.bounded_join(items, str(d))
            return join(ctx, items, d, attribute)

        @pass_environment
        def bounded_wordwrap(env: Any, s: Any, width: Any = 79, *args: Any, **kwargs: Any) -> Any:
            text = str(s)
            wrap = kwargs.get("wrapstring", args[1] if len(args) > 1 else None) or "\n"
            breaks = len(text) // max(1, width if type(width) is int else 1) + text.count(" ")
            if len(text) + (breaks + 1) * len(str(wrap)) > self.max_chars:
                raise self.refuse("a word wrap")
            return wordwrap(env, s, width, *args, **kwargs)

        def bounded_format(value: Any, *args: Any, **kwargs: Any) -> Any:
            self._check_widths(str(value), _PERCENT_WIDTH)
            return format_(value, *args, **kwargs)

        return {
            "replace": bounded_replace,
            "center": bounded_center,
            "indent": bounded_indent,
            "join": bounded_join,
            "wordwrap": bounded_wordwrap,
            "format": bounded_format,
        }

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        """A text's own methods (`"x".center(n)`, `s.replace(a, b)`, `s.join(xs)`,
        `"{:>9}".format(x)`) get the same checks as the filters."""
        __self._check_text(*args, *kwargs.values())
        # The sandbox hands out str.format wrapped; the text it belongs to is underneath.
        method_obj = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(method_obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(method_obj, "__name__", "")
            numbers = (*args, *kwargs.values())
            # A width in `"{:{}}".format(x, n)` comes from the arguments.
            if method in _WIDTH_METHODS or (method in ("format", "format_map") and ":{" in owner):
                for arg in (
                    *numbers,
                    *(v for a in args if isinstance(a, dict) for v in a.values()),
                ):
                    __self._check_width(arg)
            if method == "replace" and len(args) >= 2:
                __self.check_replace(owner, str(args[0]), str(args[1]))
            elif method == "join" and args:
                items = list(args[0])
                __self.bounded_join(items, owner)
                args = (items, *args[1:])
            elif method in ("format", "format_map"):
                __self._check_widths(owner, _BRACE_WIDTH)
        return super().call(__context, __obj, *args, **kwargs)


def _both_ints(left: object, right: object) -> bool:
    return type(left) is int and type(right) is int


class _BoundedCodeGenerator(CodeGenerator):
    """`a ~ b` (Jinja's string concatenation) joins through the sandbox's bounded join."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:  # noqa: N802 - Jinja's name
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Have `thread_id` raise `exc` at its next bytecode (None: forget one not raised yet)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


class _Job:
    __slots__ = ("arg", "fn", "future", "id", "stopped")

    def __init__(self, fn: Callable[[Any], Any], arg: Any) -> None:
        self.id = next(_job_ids)
        self.fn = fn
        self.arg = arg
        self.future: Future[Any] = Future()
        self.stopped = False  # set (under the thread's lock) by interrupt()


_job_ids = itertools.count(1)


class _RenderThread:
    """A daemon thread that runs the renders handed to it, one at a time. A daemon thread,
    so that no render can keep the process from exiting.

    The thread itself publishes, under `_lock`, the id of the job it is running, and
    `interrupt` raises in it only under the same lock, only while that id is the job's own,
    and at most once per job. So an async exception can only ever land between the moment
    the thread published a job and the moment it withdrew it (clearing one not delivered
    yet), and belongs to that job: every step in that window is inside one `try` that takes
    it, and everything else (taking a job, settling it, giving the thread back) runs where
    none can land."""

    def __init__(self, pool: RenderThreads) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._running: int | None = None  # the id of the job the thread runs now
        self._aimed = False  # a _Deadline was raised for the running job
        self._inbox: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="render", daemon=True)
        self._thread.start()
        self._ident: int = self._thread.ident or 0

    def submit(self, job: _Job) -> None:
        self._inbox.put(job)

    def interrupt(self, job: _Job) -> None:
        """Stop `job`: raise in the thread if it runs that job now; one not started yet
        will not start. A job that has ended, or another one, is never touched."""
        with self._lock:
            job.stopped = True
            if self._running == job.id and not self._aimed:
                self._aimed = True
                _raise_in(self._ident, _Deadline)

    def _serve(self) -> None:
        while True:
            try:
                job = self._inbox.get(timeout=IDLE_THREAD_S)
            except queue.Empty:
                if self._pool.retire(self):
                    return
                continue  # taken from the pool just now: its job is on the way
            # A job cancelled before it started (its awaiting side gone) is settled already.
            if job.future.set_running_or_notify_cancel():
                outcome = self._run(job)
                self._pool.give_back(self)
                self._settle(job, outcome)
            else:
                self._pool.give_back(self)

    def _run(self, job: _Job) -> tuple[bool, Any] | None:
        """`job.fn(job.arg)`: (True, result), (False, exception), or None if stopped."""
        outcome: tuple[bool, Any] | None = None
        published = False
        while True:
            try:
                if not published:
                    published = True  # nothing can be raised in this thread before the next line
                    with self._lock:
                        if job.stopped:
                            return None  # stopped before it started
                        self._running = job.id
                    outcome = self._call(job)
                self._withdraw()
            except _Deadline:
                continue  # this job's (none is raised for another); withdrawn on the next pass
            return outcome  # withdrawn: nothing is pending for this thread any more

    def _withdraw(self) -> None:
        """Stop aiming at this thread; after this returns no _Deadline is pending or can be
        raised until the thread publishes another job. Safe to run again if one lands
        inside it."""
        with self._lock:
            if self._aimed:
                _raise_in(self._ident, None)  # one not delivered yet
                self._aimed = False
            self._running = None

    @staticmethod
    def _call(job: _Job) -> tuple[bool, Any]:
        try:
            return True, job.fn(job.arg)
        except _Deadline:
            raise
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting side as is
            return False, exc

    def _settle(self, job: _Job, outcome: tuple[bool, Any] | None) -> None:
        # The future is running, so nobody else can settle it: exactly once, here.
        if outcome is None:
            job.future.set_exception(self._pool.timed_out())
        elif outcome[0]:
            job.future.set_result(outcome[1])
        else:
            job.future.set_exception(outcome[1])


_WATCH_S = 0.05  # how often a render that is still running is checked


@functools.cache
def _statm() -> int | None:
    try:
        return os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # not Linux: renders are bounded in time only


def resident_bytes() -> int | None:
    """The process's resident memory (Linux), about 2 us to read; None where unknown."""
    fd = _statm()
    if fd is None:
        return None
    return int(os.pread(fd, 64, 0).split()[1]) * _PAGE_SIZE


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class RenderThreads:
    """The render threads of one renderer: as many as renders run at once (one for an
    in-order webhook), made when first needed.

    A render is stopped when it has run `budget_s`, or when the process has grown by more
    than `memory_bytes` since it started (checked every 50 ms while it runs: a loop that
    builds a value element by element is bounded in memory, not only in time).
    `stopped(reason)` makes the exception such a render raises."""

    def __init__(
        self, budget_s: float, memory_bytes: int, stopped: Callable[[str], Exception]
    ) -> None:
        self.budget_s = budget_s
        self.memory_bytes = memory_bytes
        self.stopped = stopped
        self._lock = threading.Lock()
        self._idle: list[_RenderThread] = []

    def timed_out(self) -> Exception:
        return self.stopped(f"template ran longer than {self.budget_s:g}s; stopped")

    def give_back(self, thread: _RenderThread) -> None:
        with self._lock:
            self._idle.append(thread)

    def retire(self, thread: _RenderThread) -> bool:
        """Take an idle thread out of the pool so that it can end; False if a render was
        just handed to it."""
        with self._lock:
            if thread in self._idle:
                self._idle.remove(thread)
                return True
            return False

    def _start(self, fn: Callable[[Any], Any], arg: Any) -> tuple[_RenderThread, _Job]:
        with self._lock:
            thread = self._idle.pop() if self._idle else None
        if thread is None:
            thread = _RenderThread(self)  # a stopped render may still be unwinding
        job = _Job(fn, arg)
        thread.submit(job)
        return thread, job

    def _why_stop(self, deadline: float, rss_at_start: int | None) -> str | None:
        if time.monotonic() >= deadline:
            return f"template ran longer than {self.budget_s:g}s; stopped"
        if rss_at_start is not None:
            grown = (resident_bytes() or 0) - rss_at_start
            if grown > self.memory_bytes:
                return f"template used over {self.memory_bytes // 2**20} MiB of memory; stopped"
        return None

    def run(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """`fn(arg)` on a render thread, the caller waiting (the CLI's `render`)."""
        rss_at_start = resident_bytes()
        deadline = time.monotonic() + self.budget_s
        thread, job = self._start(fn, arg)
        while True:
            remaining = deadline - time.monotonic()
            try:
                return job.future.result(max(0.0, min(_WATCH_S, remaining)))
            except TimeoutError:
                if job.future.done():
                    raise  # fn itself raised it
            reason = self._why_stop(deadline, rss_at_start)
            if reason is not None:
                thread.interrupt(job)
                raise self.stopped(reason)

    async def run_async(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        """`fn(arg)` on a render thread while the event loop goes on with other work."""
        rss_at_start = resident_bytes()
        deadline = time.monotonic() + self.budget_s
        thread, job = self._start(fn, arg)
        waiter = asyncio.wrap_future(job.future)
        try:
            while True:
                remaining = deadline - time.monotonic()
                done, _ = await asyncio.wait((waiter,), timeout=max(0.0, min(_WATCH_S, remaining)))
                if done:
                    return waiter.result()
                reason = self._why_stop(deadline, rss_at_start)
                if reason is not None:
                    thread.interrupt(job)
                    raise self.stopped(reason)
        except asyncio.CancelledError:
            thread.interrupt(job)  # a forced stop: the render must not go on behind it
            raise
        finally:
            if not waiter.done():
                waiter.cancel()  # nothing waits for it now, even after the loop is closed

"""Giving memory back to the OS: malloc_trim where glibc has it, nothing elsewhere."""

from __future__ import annotations

import ctypes
import platform

import pytest

from poller import memory


@pytest.fixture(autouse=True)
def _fresh_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_trim", None)
    monkeypatch.setattr(memory, "_looked", False)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_give_back_trims_the_heap_on_glibc() -> None:
    """On glibc the heap is trimmed: malloc_trim is found and called."""
    assert memory.give_back() is True
    assert memory._trim is not None


def test_give_back_calls_malloc_trim_with_no_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    """malloc_trim(0): every free page is handed back, none kept as padding."""
    called: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: called.append(pad) or 1)
    assert memory.give_back() is True
    assert called == [0]


def test_without_malloc_trim_give_back_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """A C library without malloc_trim (musl, macOS) is no error: nothing is trimmed."""

    class NoTrim:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    monkeypatch.setattr(ctypes, "CDLL", lambda _name: NoTrim())
    assert memory.give_back() is False
    assert memory.give_back() is False  # looked up once, still nothing
    assert memory._looked is True


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_after_work_is_due_once_quiet_after_enough_work() -> None:
    """Armed from the start (start-up leaves freed heap); due only after `quiet_s` without
    work; after a reset, only once `at` more pieces of work have been noted and gone quiet."""
    clock = _Clock()
    settle = memory.AfterWork(at=3, quiet_s=1.0, clock=clock)
    assert not settle.due()  # just started: not quiet long enough
    clock.now += 1.0
    assert settle.due()
    settle.reset()
    assert not settle.due()
    for _ in range(2):
        settle.note()
    clock.now += 5.0
    assert not settle.due()  # two pieces of work: not a stretch worth a trim
    settle.note()
    assert not settle.due()  # the third, just now: not quiet yet
    clock.now += 0.9
    assert not settle.due()
    settle.note()  # more work pushes the quiet moment on
    clock.now += 0.9
    assert not settle.due()
    clock.now += 0.1
    assert settle.due()
    assert settle.due()  # until reset
    settle.reset()
    clock.now += 10.0
    assert not settle.due()

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

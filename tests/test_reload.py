"""plan_reload: what a reload does to the workers, as a table, without an event loop."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest

from poller.config import WebhookConfig, parse_config
from poller.reload import Action, Reconfigure, Retire, Start, WhenRetired, plan_reload


def _base_hook() -> WebhookConfig:
    config = parse_config(
        tomllib.loads("""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
[[webhooks]]
name = "base"
url = "http://127.0.0.1:1/a"
"""),
        Path("/nonexistent"),
    )
    return config.webhooks[0]


BASE = _base_hook()


def hook(name: str, *, max_in_flight: int = 1, url: str = "http://127.0.0.1:1/a") -> WebhookConfig:
    return dataclasses.replace(BASE, name=name, max_in_flight=max_in_flight, url=url)


A = hook("a")
A_NEW_URL = hook("a", url="http://127.0.0.1:1/b")
A_LANES = hook("a", max_in_flight=4)
B = hook("b")

# (what, old webhooks, new webhooks, running workers' settings, retiring names, the plan)
CASES: list[
    tuple[
        str,
        list[WebhookConfig],
        list[WebhookConfig],
        list[WebhookConfig],
        set[str],
        list[Action],
    ]
] = [
    ("unchanged webhook is reconfigured in place", [A], [A], [A], set(), [Reconfigure(A)]),
    ("a new url is taken in place", [A], [A_NEW_URL], [A], set(), [Reconfigure(A_NEW_URL)]),
    ("added webhook starts", [A], [A, B], [A], set(), [Reconfigure(A), Start(B)]),
    (
        "removed webhook retires, nothing after",
        [A, B],
        [A],
        [A, B],
        set(),
        [Retire("b", None), Reconfigure(A)],
    ),
    (
        "max_in_flight change replaces the worker after it is done",
        [A],
        [A_LANES],
        [A],
        set(),
        [Retire("a", A_LANES)],
    ),
    (
        "max_in_flight back to 1: the unordered worker is replaced by an ordered one",
        [A_LANES],
        [A],
        [A_LANES],
        set(),
        [Retire("a", A)],
    ),
    # The race of 5a697c7: a second reload while the worker is being replaced.
    (
        "reload while retiring: the newest settings start once it is done",
        [A_LANES],
        [hook("a", max_in_flight=8)],
        [],
        {"a"},
        [WhenRetired("a", hook("a", max_in_flight=8))],
    ),
    (
        "reload while retiring, settings back to the old ones: still waits",
        [A_LANES],
        [A],
        [],
        {"a"},
        [WhenRetired("a", A)],
    ),
    (
        "removed while retiring: its planned replacement is cancelled",
        [A_LANES, B],
        [B],
        [B],
        {"a"},
        [WhenRetired("a", None), Reconfigure(B)],
    ),
    (
        "removed, not running, not retiring: nothing to do",
        [A, B],
        [B],
        [B],
        set(),
        [Reconfigure(B)],
    ),
    (
        "re-added while its old worker retires: waits for it",
        [B],
        [B, A],
        [B],
        {"a"},
        [Reconfigure(B), WhenRetired("a", A)],
    ),
    ("no webhooks running: all start", [A, B], [A, B], [], set(), [Start(A), Start(B)]),
]


@pytest.mark.parametrize(
    ("old", "new", "running", "retiring", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_plan_reload(
    old: list[WebhookConfig],
    new: list[WebhookConfig],
    running: list[WebhookConfig],
    retiring: set[str],
    expected: list[Action],
) -> None:
    """Each reload situation gives exactly the planned actions, in order."""
    plan = plan_reload(
        {h.name: h for h in old},
        {h.name: h for h in new},
        {h.name: h for h in running},
        retiring,
    )
    assert plan == expected


def test_a_webhook_never_gets_a_second_worker() -> None:
    """Whatever the situation, a webhook with a running or retiring worker is never
    started anew: only a worker it does not have yet is."""
    hooks = [A, A_LANES, A_NEW_URL]
    for old in hooks:
        for new in hooks:
            for running, retiring in (([old], set()), ([], {"a"}), ([], set())):
                plan = plan_reload({"a": old}, {"a": new}, {h.name: h for h in running}, retiring)
                starts = [a for a in plan if isinstance(a, Start)]
                assert not starts or (not running and not retiring), (old, new, plan)


@pytest.mark.parametrize(("before", "after"), [(1, 2), (1, 8), (2, 1), (8, 1)])
def test_switching_between_ordered_and_unordered_always_replaces_the_worker(
    before: int, after: int
) -> None:
    """In order and unordered delivery are different workers (make_worker picks one by
    max_in_flight), so a running worker is never reconfigured across that line."""
    old, new = hook("a", max_in_flight=before), hook("a", max_in_flight=after)
    assert old.ordered != new.ordered
    assert plan_reload({"a": old}, {"a": new}, {"a": old}, set()) == [Retire("a", new)]

"""What a reload does to the workers: a pure plan from the old and new webhooks and the
workers there are, which App applies (see App._reload).

No webhook ever has two workers at once: a worker being retired (stopped after its
request in flight) is replaced only once it is done, or the new one would send that
request and the old one's uncommitted marks again.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass

from poller.config import WebhookConfig


@dataclass(frozen=True)
class Start:
    """Start a worker for a webhook that has none."""

    hook: WebhookConfig


@dataclass(frozen=True)
class Reconfigure:
    """The running worker takes the new settings as they are."""

    hook: WebhookConfig


@dataclass(frozen=True)
class Retire:
    """Stop the running worker after its request in flight, then start `then`, if any
    (a change the running worker cannot take, such as max_in_flight)."""

    name: str
    then: WebhookConfig | None


@dataclass(frozen=True)
class WhenRetired:
    """The worker is already being retired: start `then` once it is done (None: nothing),
    in place of whatever an earlier reload planned."""

    name: str
    then: WebhookConfig | None


Action = Start | Reconfigure | Retire | WhenRetired


def plan_reload(
    old: Mapping[str, WebhookConfig],
    new: Mapping[str, WebhookConfig],
    running: Mapping[str, WebhookConfig],
    retiring: Set[str],
) -> list[Action]:
    """The actions that take the workers from `old` webhooks to `new` ones (both by name).
    `running` holds the settings of each running worker, `retiring` the names whose worker
    is being stopped by an earlier reload."""
    actions: list[Action] = []
    for name in sorted(old.keys() - new.keys()):
        if name in retiring:
            actions.append(WhenRetired(name, None))
        elif name in running:
            actions.append(Retire(name, None))
    for name, hook in new.items():
        if name in retiring:
            actions.append(WhenRetired(name, hook))
        elif name not in running:
            actions.append(Start(hook))
        elif running[name].max_in_flight != hook.max_in_flight:
            actions.append(Retire(name, hook))
        else:
            actions.append(Reconfigure(hook))
    return actions

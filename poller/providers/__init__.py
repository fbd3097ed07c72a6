"""The registry of providers: Unleash's integration names → the module that speaks each.

`webhook` (the default) is not here: it is the poller's own Mustache/Jinja2 webhook.
A provider's module is imported the first time its name is looked up, so a daemon that
delivers only webhooks does not carry the Slack, Teams, Datadog and New Relic code
(about 0.4 MB of memory, with the Markdown formatter they share).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping

from poller.providers.base import Provider

WEBHOOK = "webhook"

# Unleash's integration name → the module under poller.providers that defines PROVIDER.
_MODULES = {
    "slack-app": "slack_app",
    "slack": "slack",
    "teams": "teams",
    "teamsworkflow": "teamsworkflow",
    "datadog": "datadog",
    "new-relic": "new_relic",
}


class _Registry(Mapping[str, Provider]):
    """The providers by name; a name's module is imported when it is first looked up."""

    def __getitem__(self, name: str) -> Provider:
        provider: Provider = importlib.import_module(f"poller.providers.{_MODULES[name]}").PROVIDER
        return provider

    def __contains__(self, name: object) -> bool:
        return name in _MODULES  # without importing

    def __iter__(self) -> Iterator[str]:
        return iter(_MODULES)

    def __len__(self) -> int:
        return len(_MODULES)


PROVIDERS: Mapping[str, Provider] = _Registry()


def names() -> list[str]:
    """Every provider name a config may give, the default first."""
    return [WEBHOOK, *PROVIDERS]

"""The registry of providers: Unleash's integration names → the module that speaks each.

`webhook` (the default) is not here: it is the poller's own Mustache/Jinja2 webhook.
"""

from __future__ import annotations

from collections.abc import Mapping

from poller.providers import datadog, new_relic, slack, slack_app, teams, teamsworkflow
from poller.providers.base import Provider

WEBHOOK = "webhook"

PROVIDERS: Mapping[str, Provider] = {
    module.PROVIDER.name: module.PROVIDER
    for module in (slack_app, slack, teams, teamsworkflow, datadog, new_relic)
}


def names() -> list[str]:
    """Every provider name a config may give, the default first."""
    return [WEBHOOK, *PROVIDERS]

"""Which events a webhook wants: event types (exact or `*` globs), projects, environments."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EventFilter:
    """None means "all". An event without a project or environment passes those
    filters, as it does in Unleash's own integration."""

    events: tuple[str, ...] | None = None
    projects: tuple[str, ...] | None = None
    environments: tuple[str, ...] | None = None
    _types: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.events is not None:
            patterns = "|".join(fnmatch.translate(p) for p in self.events)
            object.__setattr__(self, "_types", re.compile(patterns))

    def matches(self, event: Mapping[str, object]) -> bool:
        if self._types is not None:
            kind = event.get("type")
            if not isinstance(kind, str) or not self._types.match(kind):
                return False
        project = event.get("project")
        if self.projects is not None and project and project not in self.projects:
            return False
        environment = event.get("environment")
        return not (
            self.environments is not None and environment and environment not in self.environments
        )

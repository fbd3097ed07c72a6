"""Which events a webhook wants: event types (exact or `*` globs), projects, environments,
and tags (`type:value`, exact or `*` globs)."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields


def tag_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a usable tag filter (`type:value`), or None."""
    kind, colon, value = pattern.partition(":")
    if not colon or not kind or not value:
        return f"{pattern!r} must be type:value (e.g. team:payments or slack:*)"
    return None


def compile_tag_patterns(patterns: Sequence[str]) -> re.Pattern[str]:
    """One regex over "type:value" strings. Only `*` is special (any run of characters,
    colons included): tag values are free text, so `?` and `[` mean themselves."""
    alternatives = (".*".join(re.escape(part) for part in p.split("*")) for p in patterns)
    return re.compile("(?:" + "|".join(alternatives) + r")\Z", re.DOTALL)


def event_tag_strings(tags: object) -> list[str]:
    """The event's tags as "type:value" strings; malformed entries are skipped."""
    if not isinstance(tags, list):
        return []
    return [
        f"{tag['type']}:{tag['value']}"
        for tag in tags
        if isinstance(tag, dict)
        and isinstance(tag.get("type"), str)
        and isinstance(tag.get("value"), str)
    ]


@dataclass(frozen=True)
class EventFilter:
    """None means "all". An event without a project or environment passes those
    filters, as it does in Unleash's own integration. With `tags`, an event passes when
    any of its tags matches any pattern (an event without tags does not)."""

    events: tuple[str, ...] | None = None
    projects: tuple[str, ...] | None = None
    environments: tuple[str, ...] | None = None
    tags: tuple[str, ...] | None = None
    _types: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)
    _tags: re.Pattern[str] | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        if self.events is not None:
            patterns = "|".join(fnmatch.translate(p) for p in self.events)
            object.__setattr__(self, "_types", re.compile(patterns))
        if self.tags is not None:
            object.__setattr__(self, "_tags", compile_tag_patterns(self.tags))

    @property
    def matches_everything(self) -> bool:
        """No filter set (each one's None means "all"), so every event passes."""
        return all(getattr(self, f.name) is None for f in fields(self) if f.init)

    def matches(self, event: Mapping[str, object]) -> bool:
        if self._types is not None:
            kind = event.get("type")
            if not isinstance(kind, str) or not self._types.match(kind):
                return False
        project = event.get("project")
        if self.projects is not None and project and project not in self.projects:
            return False
        environment = event.get("environment")
        if self.environments is not None and environment and environment not in self.environments:
            return False
        if self._tags is not None:
            tags = self._tags
            return any(tags.match(tag) for tag in event_tag_strings(event.get("tags")))
        return True

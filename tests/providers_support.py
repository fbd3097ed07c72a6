"""Shared example events for the provider unit tests."""

from __future__ import annotations

from typing import Any

from poller.providers.base import Settings

LINK = "https://unleash.example"


def event(**changes: Any) -> dict[str, Any]:
    """A feature-created event as the admin API returns it (with the search fields)."""
    base: dict[str, Any] = {
        "id": 7,
        "type": "feature-created",
        "createdBy": "ana",
        "createdAt": "2026-01-02T03:04:05.678Z",
        "createdByUserId": 3,
        "data": {"name": "flag-a", "description": 'd "q" <&>'},
        "preData": None,
        "tags": [],
        "featureName": "flag-a",
        "project": "default",
        "environment": None,
        "label": "Flag created",
        "summary": "**ana** created",
    }
    base.update(changes)
    return base


def settings(**values: Any) -> Settings:
    return Settings(values)

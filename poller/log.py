"""structlog set-up: named, dotted events with fields; JSON lines unless on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import FilteringBoundLogger

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


_debug = True  # until configured, structlog's defaults print everything


def debug_enabled() -> bool:
    """For the hot path: skip building a debug line's fields when nobody will see it."""
    return _debug


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Logs go to stderr (journald captures it); JSON when it is not a terminal."""
    global _debug  # noqa: PLW0603 - the one switch the hot path reads
    _debug = level == "debug"
    use_json = not sys.stderr.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def get(name: str = "unleash-poller") -> FilteringBoundLogger:
    """A logger that filters by the configured level (see `configure`)."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger

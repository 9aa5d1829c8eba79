"""Structured logging: structlog over stdlib, bound to topic/partition/offset/event id by callers."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


class TransientCoordinatorAsWarning(logging.Filter):
    """aiokafka logs at ERROR a group coordinator that is not there yet, and then retries by
    itself: every group's first join on a fresh broker (the offsets topic is being created, so
    each `make run` began with an ERROR) and every broker restart. A warning says what it is."""

    TRANSIENT = ("GroupCoordinatorNotAvailableError", "NotCoordinatorForGroupError")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and any(t in record.getMessage() for t in self.TRANSIENT):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def configure_logging(level: str = "INFO", json: bool = False) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=level.upper(), stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    # aiokafka logs every reconnect attempt at ERROR while a broker restarts; warnings suffice.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    if not any(isinstance(f, TransientCoordinatorAsWarning) for f in coordinator.filters):
        coordinator.addFilter(TransientCoordinatorAsWarning())
    # Alembic announces every plugin and the DDL mode at each start: noise once migrated.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]

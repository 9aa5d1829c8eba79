"""A module's logger replaced by one that keeps its warnings, for tests that check what an
operator is told. The module's own ``log`` is replaced (monkeypatch): structlog's cached loggers
may not see ``capture_logs`` when another test configured logging first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class WarningRecorder:
    """Keeps ``warning(event, **fields)`` calls in ``warnings``; every other level is dropped."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))

    def __getattr__(self, _name: str) -> Callable[..., None]:
        return lambda *_args, **_fields: None

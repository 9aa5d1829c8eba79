"""The sender's loop: its heartbeat says whether its passes complete (RetainWorkerStalled)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest
from sqlalchemy.exc import OperationalError

from services.messenger import sender
from services.messenger.service import MessengerService


class Passes:
    """The sender's view of the service: counts its passes, failing the ones asked to (the
    database away), and asks the loop to stop after ``passes``."""

    def __init__(self, stop: asyncio.Event, passes: int, failing: int = 0, failing_start: int = 0) -> None:
        self.stop, self.passes, self.failing, self.done = stop, passes, failing, 0
        self.failing_start, self.starts, self.reconciled = failing_start, 0, 0

    async def ensure_defaults(self) -> None:
        self.starts += 1
        if self.failing_start:
            self.failing_start -= 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("the database is starting up"))

    async def send_due(self) -> list[object]:
        self.done += 1
        if self.done >= self.passes:
            self.stop.set()
        if self.failing:
            self.failing -= 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database away"))
        return []

    async def reconcile(self) -> None:
        self.reconciled += 1

    async def refresh_gauges(self) -> None:
        return None


async def test_each_completed_pass_beats_and_a_failed_one_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    beats: list[str] = []
    monkeypatch.setattr(sender, "heartbeat", beats.append)

    stop = asyncio.Event()
    service = Passes(stop, passes=3)
    await sender.run(cast(MessengerService, service), 0.0, stop)
    assert service.done == 3
    assert beats == [sender.LOOP] * 4  # as it starts, then one per pass

    beats.clear()
    stop = asyncio.Event()
    away = Passes(stop, passes=3, failing=3)  # the database is away for every pass
    await sender.run(cast(MessengerService, away), 0.0, stop)
    assert away.done == 3
    assert beats == [sender.LOOP]  # as it starts only: five minutes of this is a stall


async def test_a_database_away_as_the_sender_starts_is_waited_out_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The defaults and the first reconciliation are retried as a pass is, then done once."""
    monkeypatch.setattr(sender, "heartbeat", lambda _loop: None)
    stop = asyncio.Event()
    service = Passes(stop, passes=2, failing_start=2)
    await sender.run(cast(MessengerService, service), 0.0, stop)
    assert service.starts == 3  # two refused, then done; not again after
    assert service.done == 2
    assert service.reconciled == 1 + 2  # the first, then one per pass

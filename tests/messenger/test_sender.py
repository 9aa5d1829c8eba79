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

    def __init__(self, stop: asyncio.Event, passes: int, failing: int = 0) -> None:
        self.stop, self.passes, self.failing, self.done = stop, passes, failing, 0

    async def send_due(self) -> list[object]:
        self.done += 1
        if self.done >= self.passes:
            self.stop.set()
        if self.failing:
            self.failing -= 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database away"))
        return []

    async def reconcile(self) -> None:
        return None

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

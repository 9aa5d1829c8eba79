"""When the segmenter's tick sweeps: every interval, deferred while the consumer catches up
on a backlog (so a half-replayed customer is not swept as lapsed), but only up to a limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.segmenter.config import SegmenterSettings
from services.segmenter.service import SegmenterService
from shared.db import Database


@pytest.fixture
async def service(tmp_path: Path) -> SegmenterService:
    settings = SegmenterSettings(
        segmenter_sweep_interval_s=60.0, segmenter_sweep_max_defer_s=600.0, var_dir=tmp_path
    )
    return SegmenterService(Database(f"sqlite+aiosqlite:///{tmp_path / 's.db'}"), settings)


def test_the_first_tick_sweeps_then_every_interval(
    service: SegmenterService, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert service._sweep_due()
    service._last_sweep = 1000.0
    monkeypatch.setattr("services.segmenter.service.time.monotonic", lambda: 1059.0)
    assert not service._sweep_due()
    monkeypatch.setattr("services.segmenter.service.time.monotonic", lambda: 1060.0)
    assert service._sweep_due()


def test_a_backlog_defers_the_sweep_up_to_the_limit(
    service: SegmenterService, monkeypatch: pytest.MonkeyPatch
) -> None:
    service.catching_up = lambda: True
    service._last_sweep = 1000.0
    for now, due in ((1060.0, False), (1500.0, False), (1659.0, False), (1660.0, True)):
        monkeypatch.setattr("services.segmenter.service.time.monotonic", lambda now=now: now)
        assert service._sweep_due() is due, now
    service.catching_up = lambda: False
    monkeypatch.setattr("services.segmenter.service.time.monotonic", lambda: 1060.0)
    assert service._sweep_due()

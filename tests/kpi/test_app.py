"""The kpi API's /metrics: a scrape waits for the KPI gauges a bounded time, never longer.
The service is a stand-in whose recomputation takes as long as the test says (the real one,
through the API, is in test_api.py's metrics tests)."""

from __future__ import annotations

import asyncio
import time
from typing import cast

import pytest

from services.kpi import app as app_module
from services.kpi.app import GaugeRefresher
from services.kpi.service import KpiService
from tests.support.logs import WarningRecorder


class SlowGauges:
    def __init__(self, seconds: float, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.started = 0
        self.finished = 0

    async def refresh_gauges(self) -> None:
        self.started += 1
        await asyncio.sleep(self.seconds)
        if self.fail:
            raise ConnectionRefusedError("the database is away")
        self.finished += 1


async def test_a_slow_recomputation_does_not_hold_the_scrape_past_its_bound() -> None:
    gauges = SlowGauges(0.5)
    refresher = GaugeRefresher(cast(KpiService, gauges))
    started = time.monotonic()
    await refresher.before_scrape(wait_s=0.05)
    assert time.monotonic() - started < 0.3  # answered with the values as they stand
    assert (gauges.started, gauges.finished) == (1, 0)
    await refresher.before_scrape(wait_s=0.05)  # still at it: not a second one
    assert gauges.started == 1
    await asyncio.sleep(0.6)
    assert gauges.finished == 1  # it went on after the scrapes were answered
    await refresher.before_scrape(wait_s=1.0)  # a quick one is waited for
    assert (gauges.started, gauges.finished) == (2, 2)
    gauges.seconds = 5.0
    await refresher.before_scrape(wait_s=0.01)
    await refresher.stop()  # the API stopping: nothing left running
    assert (gauges.started, gauges.finished) == (3, 2)


async def test_a_failed_recomputation_is_logged_and_the_scrape_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = WarningRecorder()
    monkeypatch.setattr(app_module, "log", recorder)
    refresher = GaugeRefresher(cast(KpiService, SlowGauges(0.0, fail=True)))
    await refresher.before_scrape(wait_s=1.0)
    [(event, fields)] = recorder.warnings
    assert event == "KPI gauges not refreshed"
    assert fields["error"] == "ConnectionRefusedError"

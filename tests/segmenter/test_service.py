"""SegmenterService's handler: what it counts for operators as it applies events."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from services.segmenter import service as service_module
from services.segmenter.config import SegmenterSettings
from services.segmenter.consumer import MIGRATIONS
from services.segmenter.rules import default_rules
from services.segmenter.service import UNCONVERTED, SegmenterService
from shared.codec import event_digest
from shared.db import Database, migrate
from shared.events import ClvPrediction, Event
from shared.kafka.consumer import Delivered
from tests.segmenter.factories import NOW, purchase
from tests.support.logs import WarningRecorder


def unconverted(currency: str) -> float:
    registry = CollectorRegistry()
    registry.register(UNCONVERTED)
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(f'retain_segmenter_unconverted_purchases_total{{currency="{currency}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_purchase_in_a_currency_without_a_rate_is_counted_once_and_kept_out_of_the_total(
    tmp_path: Path,
) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'segmenter.db'}")
    await migrate(db, MIGRATIONS)
    service = SegmenterService(db, SegmenterSettings(var_dir=tmp_path), clock=lambda: NOW)
    await service.ensure_default_rules()
    events: list[Event | ClvPrediction] = [
        purchase("p-1", NOW - timedelta(days=3), "o-1", "200000", "JPY"),
        purchase("p-2", NOW - timedelta(days=2), "o-2", "100.00", "ILS"),
    ]
    batch = [Delivered("retain.purchases", 0, i, b"c-1", e, 0) for i, e in enumerate(events)]
    before = unconverted("JPY")
    await service.apply_batch(batch)
    assert unconverted("JPY") == before + 1
    await service.apply_batch(batch)  # a replay: applied once, counted once
    assert unconverted("JPY") == before + 1
    assert unconverted("ILS") == 0.0
    customer = await service.customer("c-1")
    assert customer is not None
    facts = customer["profile"]
    assert (facts["orders_count"], facts["total_value"]) == (2, 100.0)
    assert facts["unconverted_currencies"] == ["JPY"]
    await db.dispose()


async def test_an_event_id_reused_for_another_event_is_handed_back_not_applied(tmp_path: Path) -> None:
    """Straight onto Kafka, an order sent under another order's event id: the profile keeps the
    first, the second comes back for the loop to dead-letter (it used to be dropped unseen as a
    duplicate), and the first sent again is a duplicate."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'segmenter.db'}")
    await migrate(db, MIGRATIONS)
    service = SegmenterService(db, SegmenterSettings(var_dir=tmp_path), clock=lambda: NOW)
    await service.ensure_default_rules()
    first = purchase("p-1", NOW - timedelta(days=3), "o-1", "100.00", "ILS")
    second = purchase("p-1", NOW - timedelta(days=2), "o-2", "900.00", "ILS")

    def delivered(offset: int, event: Event) -> Delivered[Event | ClvPrediction]:
        return Delivered("retain.purchases", 0, offset, b"c-1", event, 0, event_digest(event))

    assert (await service.apply_batch([delivered(0, first)])).applied == 1
    result = await service.apply_batch([delivered(1, second), delivered(2, first)])
    assert (result.applied, result.duplicates) == (0, 1)
    [(refused, why)] = result.reused
    assert (refused.offset, refused.value) == (1, second)
    assert "(first read from retain.purchases partition 0 offset 0)" in why
    customer = await service.customer("c-1")
    assert customer is not None
    assert (customer["profile"]["orders_count"], customer["profile"]["total_value"]) == (1, 100.0)
    await db.dispose()


async def test_the_start_names_saved_rules_that_fail_today_s_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A draft saved under an earlier release's checks (within_days 0, refused since): it would
    be refused at its publish only. The start says so, naming the problem; the live rules pass."""
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'segmenter.db'}")
    await migrate(db, MIGRATIONS)
    service = SegmenterService(db, SegmenterSettings(var_dir=tmp_path), clock=lambda: NOW)
    await service.ensure_default_rules()
    saved = copy.deepcopy(default_rules())
    saved["segments"][0]["when"]["value"] = 0
    async with db.transaction() as session:
        await service.repo.replace_draft(session, saved, "etag-then", "marketing", NOW, None)
    recorder = WarningRecorder()
    monkeypatch.setattr(service_module, "log", recorder)
    await SegmenterService(db, SegmenterSettings(var_dir=tmp_path), clock=lambda: NOW).ensure_default_rules()
    await db.dispose()
    [(message, fields)] = recorder.warnings
    assert message.startswith("saved rules fail today's checks")
    assert fields["rules"] == "draft"
    assert fields["problems"][0].startswith("$.segments[0].when.value: within_days 0")

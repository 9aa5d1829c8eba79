from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shared.demo.live import CUSTOMERS_PER_ROUND, live_round
from shared.events import EVENT_ADAPTER


def test_live_round_happens_now_at_the_rate_for_new_customers() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    events = live_round(7, "abc", 3, now, rate=4)
    times = [datetime.fromisoformat(str(e["occurred_at"])) for e in events]
    assert times[0] == now
    assert times[-1] == now + timedelta(seconds=(len(events) - 1) / 4)
    assert times == sorted(times)
    customers = {str(e["customer_id"]) for e in events}
    assert len(customers) == CUSTOMERS_PER_ROUND
    assert all(c.startswith("live-abc-3-") for c in customers)
    assert len({e["event_id"] for e in events}) == len(events)
    for event in events:
        EVENT_ADAPTER.validate_python(event)


def test_rounds_and_runs_do_not_share_ids() -> None:
    now = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    a = {e["event_id"] for e in live_round(7, "run1", 0, now, 2)}
    b = {e["event_id"] for e in live_round(7, "run1", 1, now, 2)}
    c = {e["event_id"] for e in live_round(7, "run2", 0, now, 2)}
    assert not a & b
    assert not a & c

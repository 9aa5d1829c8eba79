"""The live trickle after the history: fresh customers whose events happen now.

Pure: the caller passes the clock. The generator's stories are reused; only identities and
times change, so a live event looks like one a backend would send at that moment.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from shared.demo.generator import DemoEvent, generate

CUSTOMERS_PER_ROUND = 50


def live_round(seed: int, run_id: str, round_no: int, now: datetime, rate: float) -> list[DemoEvent]:
    """One round of events for new customers ``live-<run>-<round>-…``, the i-th happening at
    ``now + i/rate`` (in the customer's own UTC offset), each story in its own order."""
    step = timedelta(seconds=1 / rate)
    out: list[DemoEvent] = []
    for i, event in enumerate(generate(seed * 1000 + round_no, CUSTOMERS_PER_ROUND, now, 30)):
        offset = datetime.fromisoformat(str(event["occurred_at"])).utcoffset() or timedelta(0)
        live = dict(event)
        live["customer_id"] = f"live-{run_id}-{round_no}-{event['customer_id']}"
        live["event_id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"{run_id}/{round_no}/{event['event_id']}"))
        live["occurred_at"] = (now + i * step).astimezone(timezone(offset)).isoformat()
        out.append(live)
    return out

"""The short chaos run of ``make test``: a 2,500-event stream through ingest while every worker
is SIGKILLed once, the broker restarts, PostgreSQL crashes (``pg_ctl stop -m immediate``) and a
second segmenter joins and leaves, and three poison records go straight onto backend topics
and a dead-lettered purchase is replayed twice with ``retain dlq replay``; then everything is
compared with the oracle. ``make chaos``
runs the long version (20,000 events, three of each) and writes docs/reliability.md."""

from __future__ import annotations

import pytest

from tests.chaos import poison
from tests.chaos.report import problems
from tests.chaos.run import KILLED, Options, Run

pytestmark = pytest.mark.integration


@pytest.mark.timeout(480)  # its own broker and PostgreSQL, and a broker restart, on a busy machine
def test_the_pipeline_loses_and_duplicates_nothing_under_faults() -> None:
    options = Options(events=2500, rounds=1, seed=11, gap_s=(0.5, 2.0), replay_s=30, settle_timeout_s=240)

    figures = Run(options).execute()

    assert {w: figures.count("kill", w) for w in KILLED} == dict.fromkeys(KILLED, 1)
    assert (figures.count("broker"), figures.count("postgres"), figures.count("rebalance")) == (1, 1, 1)
    assert figures.events >= 2500
    assert problems(figures) == []
    # The comparisons ran over real data, not empty tables.
    assert all(c.compared > 0 for c in figures.comparisons), [c.summary() for c in figures.comparisons]
    assert figures.delivery.messages > 0
    # Poison records went to the DLQ (each group reading their topic wrote a letter with the
    # reason), their partitions flowed on, and a replayed dead letter was applied once.
    assert figures.dlq is not None
    assert len(figures.dlq.poisons) == 3
    assert all(n >= 1 for p in figures.dlq.letters.values() for n in p.values()), figures.dlq.letters
    assert figures.dlq.after_poison > 0
    assert len(figures.dlq.replays) == 2, figures.dlq.replay_failures
    assert figures.dlq.applied_in == list(poison.APPLIED_IN), figures.dlq.applied_in
    assert figures.ok

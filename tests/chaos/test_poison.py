"""The chaos suite's poison and dead-letter helpers, without a broker: the letter the run writes
is one the consumer would write, and the report says what the run found, not what it hoped."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy.exc import IntegrityError, OperationalError

from shared.kafka.consumer import _origin, _reason, is_transient
from tests.chaos import poison
from tests.chaos.report import lines
from tests.chaos.run import Figures, Options

NOW = datetime(2026, 11, 27, 18, 0, tzinfo=UTC)


def test_the_replayed_letter_has_the_headers_the_consumer_writes_in_its_order() -> None:
    record: Any = SimpleNamespace(topic="chaos.retain.purchases", partition=0, offset=0, headers=())
    consumer = [
        ("x-retain-error", poison.REPLAY_REASON.encode()),
        ("x-retain-error-detail", b"chaos: a dead letter written by the run, as the consumer would"),
        *_origin(record, NOW.isoformat()),
        ("x-retain-group", b"chaos-run"),
    ]
    assert poison.letter_headers("chaos.retain.purchases", NOW) == consumer


def test_the_replayed_letters_reason_is_one_the_consumer_dead_letters_rather_than_retries() -> None:
    refused = IntegrityError("INSERT …", {}, Exception("duplicate key"))
    assert not is_transient(refused)
    assert _reason(refused) == poison.REPLAY_REASON
    # What the run used before: the consumer retries it for ever and never writes a letter.
    assert is_transient(OperationalError("SELECT 1", {}, Exception("gone")))


def _figures(applied_in: list[str], reasons: dict[str, int]) -> poison.DlqFigures:
    placed = [poison.Placed(p.name, "chaos.retain." + p.topic, 1, 5, p.value) for p in poison.poisons(NOW)]
    return poison.DlqFigures(
        poisons=placed,
        letters={p.name: {"chaos-segmenter": 1, "chaos-kpi": 1} for p in placed},
        reasons={p.name: reasons for p in placed},
        behind={placed[0].name: 3, placed[1].name: 2, placed[2].name: 0},
        replays=["replayed 1", "replayed 0"],
        applied_in=applied_in,
    )


def test_a_sparse_partition_with_nothing_behind_its_poison_is_no_problem() -> None:
    q = _figures(list(poison.APPLIED_IN), {"undecodable": 2})
    assert q.after_poison == 5
    assert q.problems() == []


def test_a_replay_that_applied_nothing_is_a_problem_and_the_report_says_so() -> None:
    q = _figures([], {"IntegrityError": 2})
    assert any("not applied in: profile, kpi purchases" in p for p in q.problems())
    table = "\n".join(lines(Figures(dlq=q), Options(), "test"))
    assert "applied in: nothing" in table
    assert "'IntegrityError' 2" in table
    assert "applied (profile" not in table

"""Customer satisfaction (services/kpi/csat.py): scores, first answers and the statistics, by hand."""

from __future__ import annotations

import pytest

from services.kpi.csat import Answer, first_answers, summarize, survey_score
from tests.kpi.factories import utc


def answer(message: str, score: int, day: int = 1, hour: int = 10, event: str | None = None) -> Answer:
    return Answer(
        event or f"{message}:replied:survey",
        message,
        f"c-{message}",
        utc(2026, 2, day, hour),
        score,
        "thank_you",
    )


@pytest.mark.parametrize(("value", "score"), [(1, 1), (3, 3), (5, 5), (5.0, 5), (1.0, 1)])
def test_a_score_is_a_whole_number_from_1_to_5(value: object, score: int) -> None:
    assert survey_score(value) == score


@pytest.mark.parametrize("value", [0, 6, -1, 0.0, 5.5, True, False, 4.5, "5", None, [5], float("nan")])
def test_anything_else_is_not_a_score(value: object) -> None:
    assert survey_score(value) is None


def test_csat_mean_and_wilson_interval_by_hand() -> None:
    scores = [5, 4, 4, 3, 2, 1, 5, 5]
    s = summarize([answer(f"m{i}", score) for i, score in enumerate(scores)])
    assert (s.answers, s.satisfied, s.neutral, s.dissatisfied) == (8, 5, 1, 2)
    assert s.csat == 5 / 8
    assert s.mean_score == 29 / 8
    assert s.scores == {"1": 1, "2": 1, "3": 1, "4": 2, "5": 3}
    # Wilson, 5 of 8, z = 1.96: centre (0.625 + 0.2401) / 1.4802, half-width 1.3241 * 0.21048.
    assert s.csat_ci_low == pytest.approx(0.3057, abs=1e-4)
    assert s.csat_ci_high == pytest.approx(0.8632, abs=1e-4)


def test_no_answers_give_no_rates() -> None:
    s = summarize([])
    assert (s.answers, s.csat, s.csat_ci_low, s.csat_ci_high, s.mean_score) == (0, None, None, None, None)
    assert s.scores == {"1": 0, "2": 0, "3": 0, "4": 0, "5": 0}


def test_only_the_first_answer_of_a_message_counts_whatever_the_order() -> None:
    first = answer("m1", 5, day=1)
    later = answer("m1", 1, day=3, event="m1:replied:other")
    same_time_smaller_id = answer("m2", 2, day=2, event="m2:a")
    same_time_larger_id = answer("m2", 4, day=2, event="m2:b")
    other = answer("m3", 3)
    for answers in (
        [first, later, same_time_larger_id, same_time_smaller_id, other],
        [other, same_time_smaller_id, later, same_time_larger_id, first],
    ):
        assert sorted(a.event_id for a in first_answers(answers)) == [
            "m1:replied:survey",
            "m2:a",
            "m3:replied:survey",
        ]

"""Customer satisfaction (CSAT) from the answers to the survey behind a message's link. Pure.

Definitions (docs/kpis.md, "Customer satisfaction"):

* an answer is a ``replied`` status of a message whose details carry ``survey_score``, a whole
  number from 1 ("not at all") to 5 ("very"), as the messenger's survey page publishes it;
  any other value is not an answer (a reply by SMS is not a score);
* one answer per message, its first (time, then event id): the messenger keeps the first and
  refuses the next, and this keeps a replay or a second producer from counting twice;
* CSAT = satisfied answers (4 or 5) / answers, with the Wilson score 95 % interval; the
  dissatisfied are the 1s and 2s; the mean score is the mean of the answers;
* an answer belongs to the period (local day) it was given on, and to the journey, channel,
  tier and locale of its message, as the messenger stamped them on the answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from services.kpi.stats import group_by, ratio, wilson

SCORES = range(1, 6)
SATISFIED = frozenset({4, 5})
DISSATISFIED = frozenset({1, 2})


def survey_score(value: object) -> int | None:
    """The score a message event's ``details["survey_score"]`` gives, or None when it is not
    one: a whole number from 1 to 5, written 5 or 5.0 (a producer's JSON may make any number
    a float); not a bool, nor 4.5, nor "5"."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not value.is_integer():
        return None
    score = int(value)
    return score if score in SCORES else None


@dataclass(frozen=True, slots=True)
class Answer:
    """One survey answer, as stored."""

    event_id: str
    message_id: str
    customer_id: str
    at: datetime
    score: int
    journey: str
    channel: str | None = None
    tier: str | None = None
    locale: str | None = None


def first_answers(answers: Iterable[Answer]) -> list[Answer]:
    """The first answer of each message."""
    return [
        min(group, key=lambda a: (a.at, a.event_id))
        for group in group_by(answers, lambda a: a.message_id).values()
    ]


@dataclass(frozen=True, slots=True)
class CsatStats:
    answers: int
    satisfied: int
    neutral: int
    dissatisfied: int
    csat: float | None
    csat_ci_low: float | None
    csat_ci_high: float | None
    mean_score: float | None
    score_sum: int  # a range's mean: the sum of its days' sums over the sum of their answers
    scores: dict[str, int]  # "1" … "5" → answers with that score


def summarize(answers: Iterable[Answer]) -> CsatStats:
    """The statistics of ``answers`` (already one per message: ``first_answers``)."""
    counts = dict.fromkeys(SCORES, 0)
    for a in answers:
        counts[a.score] += 1
    n = sum(counts.values())
    satisfied = sum(counts[s] for s in SATISFIED)
    dissatisfied = sum(counts[s] for s in DISSATISFIED)
    total = sum(s * c for s, c in counts.items())
    low, high = wilson(satisfied, n) if n else (None, None)
    return CsatStats(
        answers=n,
        satisfied=satisfied,
        neutral=n - satisfied - dissatisfied,
        dissatisfied=dissatisfied,
        csat=ratio(satisfied, n),
        csat_ci_low=low,
        csat_ci_high=high,
        mean_score=ratio(total, n),
        score_sum=total,
        scores={str(s): c for s, c in counts.items()},
    )

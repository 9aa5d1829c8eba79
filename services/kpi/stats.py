"""Small statistics shared by the KPI modules. Pure."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K")

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as PostgreSQL's ``percentile_cont`` and
    numpy's default: position q * (n - 1) in the sorted values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Durations:
    """Seconds: how many, median, 90th percentile and mean."""

    count: int
    p50_s: float | None
    p90_s: float | None
    mean_s: float | None


def durations(values: Sequence[float]) -> Durations:
    if not values:
        return Durations(0, None, None, None)
    return Durations(len(values), percentile(values, 0.5), percentile(values, 0.9), sum(values) / len(values))


def ratio(numerator: float, denominator: float) -> float | None:
    return None if denominator == 0 else numerator / denominator


def group_by(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    groups: dict[K, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def wilson(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion (Newcombe 1998, method 3)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_difference(
    x1: int, n1: int, x2: int, n2: int, z: float = Z_95
) -> tuple[float, float, float] | None:
    """p1 - p2 with Newcombe's hybrid score interval (Newcombe 1998, method 10).

    From the Wilson intervals (l1, u1) and (l2, u2) of the two proportions:
    lower = d - sqrt((p1 - l1)^2 + (u2 - p2)^2), upper = d + sqrt((u1 - p1)^2 + (p2 - l2)^2).
    Unlike the Wald interval it stays inside [-1, 1] and behaves at small counts and at 0 or
    100 %, which is where holdout groups live. None when either group is empty.
    """
    if n1 == 0 or n2 == 0:
        return None
    p1, p2 = x1 / n1, x2 / n2
    l1, u1 = wilson(x1, n1, z)
    l2, u2 = wilson(x2, n2, z)
    d = p1 - p2
    return d, d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2), d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)

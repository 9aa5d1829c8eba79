"""The PromQL splitter that finds an alert's signal (tests/ops/promql.py), without Prometheus."""

from __future__ import annotations

import pytest

from tests.ops.grafana import alert_rules
from tests.ops.promql import BinaryExpr, PromQLSyntaxError, signals, split, tokens


@pytest.mark.parametrize(
    ("expr", "root"),
    [
        ("up == 0", BinaryExpr("up", "==", "", "0")),
        # Precedence: `and` binds looser than comparisons, `or` looser than `and`.
        ("a > 1 and b > 0", BinaryExpr("a > 1", "and", "", "b > 0")),
        ("a > 1 or b < 2 and c", BinaryExpr("a > 1", "or", "", "b < 2 and c")),
        ("a unless b and c", BinaryExpr("a unless b", "and", "", "c")),
        ("a / b > 0.10", BinaryExpr("a / b", ">", "", "0.10")),
        ("a + b * c", BinaryExpr("a", "+", "", "b * c")),
        ("a * b atan2 c", BinaryExpr("a * b", "atan2", "", "c")),
        # Left-associative: the last of equals is applied last; ^ groups from the right.
        ("a - b - c", BinaryExpr("a - b", "-", "", "c")),
        ("2 ^ 3 ^ 2", BinaryExpr("2", "^", "", "3 ^ 2")),
        # Signs are not operators.
        ("-a > -1", BinaryExpr("-a", ">", "", "-1")),
        ("a - -1", BinaryExpr("a", "-", "", "-1")),
        ("x offset -5m > 0", BinaryExpr("x offset -5m", ">", "", "0")),
        # Inside brackets, strings and comments nothing counts.
        (
            'sum by (a) (rate(x{op=">", and="or"}[5m])) >= 10',
            BinaryExpr('sum by (a) (rate(x{op=">", and="or"}[5m]))', ">=", "", "10"),
        ),
        ("x{a='>'} > `<`", BinaryExpr("x{a='>'}", ">", "", "`<`")),
        ('x{a="\\" > "} > 2', BinaryExpr('x{a="\\" > "}', ">", "", "2")),
        ("x # > 3\n  > 1", BinaryExpr("x # > 3", ">", "", "1")),
        # Modifiers belong to the operator, not to its right operand.
        ("a > bool 1", BinaryExpr("a", ">", "bool", "1")),
        (
            "a / on (x) group_left (y) b > 0.5",
            BinaryExpr("a / on (x) group_left (y) b", ">", "", "0.5"),
        ),
        ("a / ignoring(x) group_left b", BinaryExpr("a", "/", "ignoring(x) group_left", "b")),
        ("a > 0 and on (job) b", BinaryExpr("a > 0", "and", "on (job)", "b")),
        # Enclosing parentheses go; parentheses that close early stay.
        ("((a > 1))", BinaryExpr("a", ">", "", "1")),
        ("(a) + (b)", BinaryExpr("(a)", "+", "", "(b)")),
        ("(a + b) > 1", BinaryExpr("(a + b)", ">", "", "1")),
        # No binary operator at the root.
        ("up", None),
        ("sum(rate(x[5m]))", None),
        ("-1", None),
    ],
)
def test_split_finds_the_operator_applied_last(expr: str, root: BinaryExpr | None) -> None:
    assert split(expr) == root


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up{job='x'} == 0", ["up{job='x'}"]),
        ("0.5 < ratio", ["ratio"]),
        ("a / b > 0.10 and c >= 10", ["a / b", "c"]),
        ("(a > 1) unless (b > 2)", ["a"]),
        ("a > 1 or b < 2", ["(a) or (b)"]),
        # Between two vectors neither side is a threshold: both must have series.
        ("a > b", ["a", "b"]),
        # `bool` keeps every series (0 or 1): nothing is filtered, the whole is the signal.
        ("a > bool 1", ["a > bool 1"]),
        ("rate(x[5m]) / rate(y[5m])", ["rate(x[5m]) / rate(y[5m])"]),
        ("max(x) > Inf", ["max(x)"]),
        ("x > 1 > 0", ["x"]),
    ],
)
def test_signals_drop_thresholds(expr: str, expected: list[str]) -> None:
    assert signals(expr) == expected


@pytest.mark.parametrize("expr", ["(a > 1", "a > 1)", "a{x='1'] > 1", "a >", "a > on(x", "a ! b"])
def test_malformed_expressions_are_refused(expr: str) -> None:
    with pytest.raises(PromQLSyntaxError):
        signals(expr)


def test_tokens_keep_their_place() -> None:
    expr = 'rate(x{a="b"}[5m]) >= 1e3'
    assert [(t.kind, t.text) for t in tokens(expr)] == [
        ("word", "rate"),
        ("bracket", "("),
        ("word", "x"),
        ("bracket", "{"),
        ("word", "a"),
        ("operator", "="),
        ("string", '"b"'),
        ("bracket", "}"),
        ("bracket", "["),
        ("duration", "5m"),
        ("bracket", "]"),
        ("bracket", ")"),
        ("operator", ">="),
        ("number", "1e3"),
    ]
    assert all(expr[t.start : t.end] == t.text for t in tokens(expr))


def test_every_shipped_alert_has_a_threshold_and_a_signal_without_one() -> None:
    for rule in alert_rules():
        found = signals(rule["expr"])
        assert found, rule["alert"]
        assert found != [rule["expr"].strip()], f"{rule['alert']}: no threshold comparison found"
        for signal in found:
            root = split(signal)
            assert root is None or not root.is_filter, f"{rule['alert']}: {signal} still filters"

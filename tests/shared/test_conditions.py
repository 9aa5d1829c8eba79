from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter

from shared.conditions import (
    OPS,
    OPS_BY_TYPE,
    Catalogue,
    Choices,
    ConditionError,
    ConditionTree,
    Domains,
    FieldType,
    InvalidConditionError,
    Range,
    compile_condition,
    fields_used,
    validate,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)

CATALOGUE: Catalogue = {
    "total_spend": "number",
    "orders": "number",
    "country": "string",
    "email": "string",
    "vip": "bool",
    "last_purchase_at": "datetime",
    "signed_up_at": "datetime",
    "segments": "string_list",
}


def leaf(field: str, op: str, value: object = None, **extra: object) -> dict[str, Any]:
    node: dict[str, Any] = {"field": field, "op": op, **extra}
    if value is not None:
        node["value"] = value
    return node


def holds(tree: object, facts: Mapping[str, object], now: datetime = NOW) -> bool:
    return compile_condition(tree, CATALOGUE).evaluate(facts, now)


def errors_of(tree: object, path: str = "$", **options: Any) -> list[tuple[str, str]]:
    return [(e.path, e.message) for e in validate(tree, CATALOGUE, path, **options)]


def paths_of(tree: object, path: str = "$", **options: Any) -> list[str]:
    return [p for p, _ in errors_of(tree, path, **options)]


# --- operators, per field type ----------------------------------------------------------------

DAY = timedelta(days=1)

OPERATOR_CASES: list[tuple[str, str, object, object, bool]] = [
    # number
    ("total_spend", "eq", 100, 100, True),
    ("total_spend", "eq", 100, 100.0, True),
    ("total_spend", "eq", 100, Decimal("100.00"), True),
    ("total_spend", "eq", 100, 101, False),
    ("total_spend", "ne", 100, 101, True),
    ("total_spend", "ne", 100, 100, False),
    ("total_spend", "lt", 100, 99.5, True),
    ("total_spend", "lt", 100, 100, False),
    ("total_spend", "lte", 100, 100, True),
    ("total_spend", "lte", 100, 100.01, False),
    ("total_spend", "gt", 100, Decimal("100.01"), True),
    ("total_spend", "gt", 100, 100, False),
    ("total_spend", "gte", 100, 100, True),
    ("total_spend", "gte", 100, 99, False),
    ("total_spend", "between", [10, 20], 10, True),
    ("total_spend", "between", [10, 20], 20, True),
    ("total_spend", "between", [10, 20], 20.5, False),
    ("total_spend", "between", [10, 10], 10, True),
    ("total_spend", "in", [1, 2.5, 3], 2.5, True),
    ("total_spend", "in", [1, 2.5, 3], 2, False),
    ("total_spend", "exists", True, 0, True),
    ("total_spend", "exists", False, 0, False),
    # bool is not a number, on either side
    ("total_spend", "eq", 1, True, False),
    ("total_spend", "gte", 0, False, False),
    ("total_spend", "in", [1], True, False),
    # a string where a number belongs never matches
    ("total_spend", "eq", 100, "100", False),
    ("total_spend", "ne", 100, "100", False),
    ("total_spend", "gt", 1, "5", False),
    # string
    ("country", "eq", "IL", "IL", True),
    ("country", "eq", "IL", "il", False),
    ("country", "ne", "IL", "US", True),
    ("country", "ne", "IL", "IL", False),
    ("country", "in", ["IL", "US"], "US", True),
    ("country", "in", ["IL", "US"], "DE", False),
    ("country", "exists", True, "", True),
    ("country", "eq", "1", 1, False),
    # bool
    ("vip", "eq", True, True, True),
    ("vip", "eq", True, False, False),
    ("vip", "eq", True, 1, False),
    ("vip", "eq", False, 0, False),
    ("vip", "ne", True, False, True),
    ("vip", "ne", True, True, False),
    ("vip", "exists", True, False, True),
    # datetime
    ("last_purchase_at", "lt", "2025-01-01T00:00:00Z", datetime(2024, 12, 31, tzinfo=UTC), True),
    ("last_purchase_at", "lt", "2025-01-01T00:00:00Z", datetime(2025, 1, 1, tzinfo=UTC), False),
    ("last_purchase_at", "lte", "2025-01-01T02:00:00+02:00", datetime(2025, 1, 1, tzinfo=UTC), True),
    ("last_purchase_at", "gt", "2025-01-01T00:00:00Z", datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC), True),
    ("last_purchase_at", "gte", "2025-01-01T00:00:00Z", datetime(2024, 12, 31, 23, tzinfo=UTC), False),
    (
        "last_purchase_at",
        "gte",
        "2025-01-01T00:00:00Z",
        datetime(2025, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        True,
    ),
    (
        "last_purchase_at",
        "between",
        ["2025-01-01T00:00:00Z", "2025-02-01T00:00:00.5Z"],
        datetime(2025, 2, 1, 0, 0, 0, 500000, tzinfo=UTC),
        True,
    ),
    (
        "last_purchase_at",
        "between",
        ["2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"],
        datetime(2025, 2, 2, tzinfo=UTC),
        False,
    ),
    ("last_purchase_at", "within_days", 30, NOW - 30 * DAY, True),
    ("last_purchase_at", "within_days", 30, NOW - 30 * DAY - timedelta(microseconds=1), False),
    ("last_purchase_at", "within_days", 0.5, NOW - timedelta(hours=11), True),
    ("last_purchase_at", "within_days", 30, NOW + DAY, True),  # future values are within
    ("last_purchase_at", "older_than_days", 30, NOW - 30 * DAY, False),
    ("last_purchase_at", "older_than_days", 30, NOW - 31 * DAY, True),
    ("last_purchase_at", "older_than_days", 0, NOW, False),
    ("last_purchase_at", "exists", True, NOW, True),
    # a naive datetime fact is the wrong type: it never matches
    ("last_purchase_at", "lt", "2025-01-01T00:00:00Z", datetime(2024, 1, 1), False),  # noqa: DTZ001
    ("last_purchase_at", "within_days", 30, datetime(2025, 6, 1), False),  # noqa: DTZ001
    ("last_purchase_at", "older_than_days", 0, datetime(2000, 6, 1), False),  # noqa: DTZ001
    ("last_purchase_at", "gt", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z", False),
    # string_list
    ("segments", "in", ["vip", "churn_risk"], ["new", "vip"], True),
    ("segments", "in", ["vip", "churn_risk"], ("new",), False),
    ("segments", "in", ["vip"], [], False),
    ("segments", "in", ["vip"], {"vip"}, True),
    ("segments", "in", ["vip"], "vip", False),  # a string is not a list of strings
    ("segments", "contains", "vip", ["new", "vip"], True),
    ("segments", "contains", "vip", frozenset({"new"}), False),
    ("segments", "contains", "vip", "vip", False),
    ("segments", "exists", True, [], True),  # an empty list is a value
]


@pytest.mark.parametrize(("field", "op", "value", "fact", "expected"), OPERATOR_CASES)
def test_operator(field: str, op: str, value: object, fact: object, expected: bool) -> None:
    assert holds(leaf(field, op, value), {field: fact}) is expected


def test_every_allowed_operator_is_covered_on_every_type() -> None:
    covered = {(CATALOGUE[field], op) for field, op, *_ in OPERATOR_CASES}
    allowed = {(ftype, op) for ftype, ops in OPS_BY_TYPE.items() for op in ops}
    assert allowed <= covered


@pytest.mark.parametrize(
    ("field", "op", "value"),
    [(f, op, v) for f, op, v, _, _ in OPERATOR_CASES] + [("email", "exists", None)],
)
@pytest.mark.parametrize("fact", ["missing", None])
def test_missing_or_null_fact_never_matches(field: str, op: str, value: object, fact: object) -> None:
    facts: dict[str, object] = {} if fact == "missing" else {field: None}
    expected = op == "exists" and value is False
    assert holds(leaf(field, op, value), facts) is expected
    # ...and `not` of a comparison on a missing fact is therefore true
    assert holds({"not": leaf(field, op, value)}, facts) is not expected


def test_exists_defaults_to_true_and_false_means_absent() -> None:
    assert holds(leaf("email", "exists"), {"email": "a@b.c"})
    assert not holds(leaf("email", "exists"), {})
    assert holds(leaf("email", "exists", False), {"email": None})
    assert not holds(leaf("email", "exists", False), {"email": "a@b.c"})


def test_empty_groups_follow_logic() -> None:
    assert holds({"all": []}, {})
    assert not holds({"any": []}, {})
    assert not holds({"not": {"all": []}}, {})


def test_groups_combine_children() -> None:
    tree = {
        "all": [
            leaf("total_spend", "gte", 500),
            {"any": [leaf("country", "eq", "IL"), leaf("segments", "contains", "vip")]},
            {"not": leaf("vip", "eq", True)},
        ]
    }
    base = {"total_spend": 600, "country": "US", "segments": ["vip"], "vip": False}
    assert holds(tree, base)
    assert not holds(tree, {**base, "total_spend": 499})
    assert not holds(tree, {**base, "segments": []})
    assert holds(tree, {**base, "segments": [], "country": "IL"})
    assert not holds(tree, {**base, "vip": True})


def test_rfc3339_literals_with_fractions_and_lowercase() -> None:
    tree = leaf("signed_up_at", "gte", "2025-01-01t00:00:00.123456789z")
    assert holds(tree, {"signed_up_at": datetime(2025, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)})
    assert not holds(tree, {"signed_up_at": datetime(2025, 1, 1, 0, 0, 0, 123455, tzinfo=UTC)})


def test_naive_now_is_a_programming_error() -> None:
    condition = compile_condition(leaf("orders", "gt", 1), CATALOGUE)
    naive = datetime(2025, 1, 1)  # noqa: DTZ001
    with pytest.raises(ValueError, match="timezone-aware"):
        condition.evaluate({}, naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        condition.explain({}, naive)
    with pytest.raises(ValueError, match="timezone-aware"):
        condition.time_boundaries({}, naive)


def test_wild_facts_never_raise() -> None:
    tree = {
        "any": [
            leaf("total_spend", "gt", 1),
            leaf("total_spend", "in", [1, 2]),
            leaf("total_spend", "between", [1, 2]),
            leaf("segments", "in", ["a"]),
            leaf("segments", "contains", "a"),
            leaf("last_purchase_at", "within_days", 3),
            leaf("last_purchase_at", "gt", "2020-01-01T00:00:00Z"),
        ]
    }
    condition = compile_condition(tree, CATALOGUE)
    for junk in [Decimal("NaN"), Decimal("sNaN"), float("nan"), [[1]], [{"a": 1}], {"b"}, object()]:
        facts = {"total_spend": junk, "segments": junk, "last_purchase_at": junk}
        assert condition.evaluate(facts, NOW) is False
        condition.explain(facts, NOW)
        assert condition.time_boundaries(facts, NOW) == []


# --- validation -------------------------------------------------------------------------------


def test_valid_tree_has_no_errors() -> None:
    tree = {"all": [leaf("orders", "gt", 1), {"not": {"any": [leaf("vip", "eq", True)]}}]}
    assert validate(tree, CATALOGUE) == []


def test_unknown_field_suggests_close_names() -> None:
    assert errors_of(leaf("totl_spend", "gt", 1), "$.tiers[0].when") == [
        ("$.tiers[0].when.field", "unknown field 'totl_spend'; did you mean 'total_spend'?")
    ]
    # Nothing close: the fields it could be (a marketer cannot read the catalogue's source).
    [(path, message)] = errors_of(leaf("zzz", "gt", 1))
    assert (path, message.split(";")[0]) == ("$.field", "unknown field 'zzz'")
    assert message.endswith("; the fields are " + ", ".join(sorted(CATALOGUE)))


DOMAINS: Domains = {"country": Choices(frozenset({"IL", "JO", "AE"})), "total_spend": Range(0, 1_000_000)}


def test_values_outside_a_fields_domain_are_named_where_they_are() -> None:
    assert errors_of(leaf("country", "eq", "ILL"), domains=DOMAINS) == [
        ("$.value", "no customer has country \"ILL\"; did you mean 'IL'?")
    ]
    [(path, message)] = errors_of(leaf("country", "in", ["IL", "XX"]), domains=DOMAINS)
    assert (path, message) == (
        "$.value[1]",
        "no customer has country \"XX\"; the values of 'country' are AE, IL, JO",
    )
    [(path, message)] = errors_of(leaf("total_spend", "lt", -5), domains=DOMAINS)
    assert path == "$.value"
    assert message.startswith("'total_spend' lies between 0 and 1000000; -5 is outside that")
    # Inside the domain (bounds included), a value is fine; fields without a domain are as before.
    for ok in (
        leaf("country", "ne", "JO"),
        leaf("total_spend", "lte", 1_000_000),
        leaf("total_spend", "between", [0, 10]),
        # Part of the range, with a bound beyond it: it means what it says.
        leaf("total_spend", "between", [10, 2_000_000]),
        # Everyone within the range, by bounds inside it: "has a value".
        leaf("total_spend", "gte", 0),
        leaf("total_spend", "between", [0, 1_000_000]),
        leaf("email", "eq", "x@example.com"),
        leaf("orders", "gt", -1),
    ):
        assert errors_of(ok, domains=DOMAINS) == [], ok
    # Checked when a rule is written, never when a stored one is loaded: a rule stored before
    # its field had a domain still compiles, and evaluates as written.
    assert errors_of(leaf("country", "eq", "Il")) == []
    assert holds(leaf("country", "eq", "Il"), {"country": "Il"})


def _country_form(value: str) -> str:
    if len(value) != 2:
        raise ValueError("not a two-letter country code")
    return value.upper()


def test_operands_are_read_in_their_fields_spelling_when_written_and_when_loaded() -> None:
    forms = {"country": _country_form}
    # What the facts say ("IL") is what a rule saying "il" means, in eq, ne and in alike.
    for tree, expected in (
        (leaf("country", "eq", "il"), True),
        (leaf("country", "ne", "il"), False),
        (leaf("country", "in", ["jo", "il"]), True),
    ):
        assert compile_condition(tree, CATALOGUE, forms=forms).evaluate({"country": "IL"}, NOW) == expected
        assert compile_condition(tree, CATALOGUE).evaluate({"country": "IL"}, NOW) != expected
        assert errors_of(tree, forms=forms) == []
    # A value in no spelling is refused when written, saying why, and where in an `in`.
    assert errors_of(leaf("country", "in", ["IL", "Israel"]), forms=forms) == [
        ("$.value[1]", 'country "Israel": not a two-letter country code')
    ]
    # Stored before the check, it still loads, compared as written.
    stored = compile_condition(leaf("country", "eq", "Israel"), CATALOGUE, forms=forms)
    assert stored.evaluate({"country": "Israel"}, NOW)
    # Read before the field's domain is checked: "jo" is JO, a value customers have.
    assert errors_of(leaf("country", "eq", "jo"), domains=DOMAINS, forms=forms) == []


def test_a_quantity_no_customer_has_below_zero_is_judged_by_its_open_range() -> None:
    never_negative = {"orders": Range(0, math.inf)}
    assert errors_of(leaf("orders", "lt", 0), domains=never_negative) == [
        ("$.value", "'orders' is never below 0, so orders lt 0 would hold for no customer")
    ]
    [(_, message)] = errors_of(leaf("orders", "gte", -1), domains=never_negative)
    assert (
        message == "'orders' is never below 0; -1 is outside that, so the comparison would be the same for "
        "every customer"
    )
    for ok in (leaf("orders", "gte", 0), leaf("orders", "gt", 10**6), leaf("orders", "between", [-1, 3])):
        assert errors_of(ok, domains=never_negative) == [], ok


def test_a_window_of_no_time_is_refused_when_written_and_loads_when_stored() -> None:
    # "Bought today" written as within_days 0 held only for purchases dated in the future.
    assert errors_of(leaf("last_purchase_at", "within_days", 0)) == [
        (
            "$.value",
            "within_days 0 is a window of no time: it holds only for a fact dated in the future; "
            "the last 24 hours is within_days 1",
        )
    ]
    assert errors_of(leaf("last_purchase_at", "older_than_days", 0)) == []
    assert not holds(
        leaf("last_purchase_at", "within_days", 0), {"last_purchase_at": NOW - timedelta(hours=3)}
    )


def test_a_comparison_is_judged_by_what_it_selects_of_a_fields_range() -> None:
    """Refused: what holds for no customer, and what holds for everyone only by a bound outside
    the range (a slip of unit: P(alive) read as a percentage)."""
    spend = "'total_spend' lies between 0 and 1000000"
    never = "would hold for no customer"
    same = "would be the same for every customer"
    for tree, message in (
        (leaf("total_spend", "gt", 1_000_000), f"{spend}, so total_spend gt 1000000 {never}"),
        (leaf("total_spend", "lt", 0), f"{spend}, so total_spend lt 0 {never}"),
        (
            leaf("total_spend", "gte", 2_000_000),
            f"{spend}; 2000000 is outside that, so the comparison {never}",
        ),
        (leaf("total_spend", "eq", -1.5), f"{spend}; -1.5 is outside that, so the comparison {never}"),
        (
            leaf("total_spend", "between", [2e6, 3e6]),
            f"{spend}; 2000000 and 3000000 are outside that, so the comparison {never}",
        ),
        (leaf("total_spend", "lt", 5_000_000), f"{spend}; 5000000 is outside that, so the comparison {same}"),
        (leaf("total_spend", "ne", 5e6), f"{spend}; 5000000 is outside that, so the comparison {same}"),
        (
            leaf("total_spend", "between", [-1, 2e6]),
            f"{spend}; -1 and 2000000 are outside that, so the comparison {same}",
        ),
    ):
        assert errors_of(tree, domains=DOMAINS) == [("$.value", message)], tree
    # Each item of an in-list that no customer has is named at its place; the list as a whole
    # still matches the others.
    assert errors_of(leaf("total_spend", "in", [5, 2e6, 7]), domains=DOMAINS) == [
        ("$.value[1]", f"{spend}; 2000000 is outside that, so this value would match no customer")
    ]
    # At the edges: gte the top and lte the bottom select customers there, and pass.
    for ok in (
        leaf("total_spend", "gte", 1_000_000),
        leaf("total_spend", "lte", 0),
        leaf("total_spend", "lt", 1),
    ):
        assert errors_of(ok, domains=DOMAINS) == [], ok


def test_unknown_operator() -> None:
    assert errors_of(leaf("orders", "gte_", 1)) == [
        ("$.op", "unknown operator 'gte_'; did you mean 'gte' or 'gt'?")
    ]
    [(path, message)] = errors_of(leaf("orders", "equals", 1))
    assert path == "$.op"
    assert message.startswith("unknown operator 'equals'; use one of eq, ne")


@pytest.mark.parametrize(
    ("field", "op"),
    [
        ("country", "lt"),
        ("country", "contains"),
        ("vip", "in"),
        ("vip", "gt"),
        ("last_purchase_at", "eq"),
        ("last_purchase_at", "in"),
        ("segments", "eq"),
        ("total_spend", "within_days"),
        ("total_spend", "contains"),
    ],
)
def test_operator_not_applicable_to_field_type(field: str, op: str) -> None:
    [(path, message)] = errors_of(leaf(field, op, 1))
    assert path == "$.op"
    assert f"operator {op!r} does not apply to {CATALOGUE[field]} field {field!r}" in message


@pytest.mark.parametrize(
    ("tree", "path", "fragment"),
    [
        (leaf("total_spend", "gt", "100"), "$.value", 'must be a number, not a string ("100")'),
        (leaf("total_spend", "eq", True), "$.value", "must be a number, not a boolean"),
        (leaf("total_spend", "eq", float("inf")), "$.value", "not a non-finite number"),
        (leaf("total_spend", "gt", 10**20), "$.value", "an integer beyond 64 bits (JSON loses it"),
        (leaf("country", "eq", 3), "$.value", "must be a string, not a number (3)"),
        (leaf("vip", "eq", "true"), "$.value", "must be true or false, not a string"),
        (leaf("vip", "eq", 1), "$.value", "must be true or false, not a number (1)"),
        ({"field": "country", "op": "eq", "value": None}, "$.value", "null (use the exists operator"),
        (leaf("total_spend", "in", [1, "2", 3]), "$.value[1]", "must be a number, not a string"),
        (leaf("country", "in", []), "$.value", "in takes a non-empty array of strings"),
        (leaf("country", "in", "IL"), "$.value", "in takes a non-empty array of strings"),
        (leaf("segments", "in", ["a", 1]), "$.value[1]", "string_list field, so the value must be a string"),
        (leaf("segments", "contains", ["a"]), "$.value", "contains takes a string, got array"),
        (leaf("orders", "between", [1]), "$.value", "between takes an array [low, high]"),
        (leaf("orders", "between", 5), "$.value", "between takes an array [low, high]"),
        (leaf("orders", "between", [1, "9"]), "$.value[1]", "must be a number"),
        (leaf("orders", "between", [9, 1]), "$.value", "low bound 9 is greater than high bound 1"),
        (
            leaf("signed_up_at", "between", ["2025-02-01T00:00:00Z", "2025-01-01T00:00:00Z"]),
            "$.value",
            "low bound",
        ),
        (leaf("signed_up_at", "gt", "2025-01-01T00:00:00"), "$.value", "has no UTC offset"),
        (leaf("signed_up_at", "gt", "2025-01-01"), "$.value", "has no UTC offset"),
        (leaf("signed_up_at", "gt", "yesterday"), "$.value", "RFC 3339 date-time"),
        (leaf("signed_up_at", "gt", 1700000000), "$.value", "RFC 3339 date-time"),
        (leaf("signed_up_at", "gt", "2025-02-30T00:00:00Z"), "$.value", "not a valid date-time"),
        (leaf("signed_up_at", "within_days", -1), "$.value", "between 0 and 36525"),
        (leaf("signed_up_at", "within_days", 10**9), "$.value", "between 0 and 36525"),
        (leaf("signed_up_at", "older_than_days", "30"), "$.value", "expected a number of days"),
        (leaf("signed_up_at", "older_than_days", True), "$.value", "expected a number of days"),
        (leaf("email", "exists", "yes"), "$.value", "exists takes true or false"),
        (leaf("orders", "gt"), "$.value", "missing key 'value'"),
    ],
)
def test_value_errors(tree: object, path: str, fragment: str) -> None:
    [(error_path, message)] = errors_of(tree)
    assert error_path == path
    assert fragment in message


@pytest.mark.parametrize(
    ("tree", "expected"),
    [
        (5, [("$", "expected a condition object, got number")]),
        ([], [("$", "expected a condition object, got array")]),
        ({}, [("$", "empty condition; expected all, any, not or field/op/value")]),
        ({"all": {}}, [("$.all", "expected an array of conditions, got object")]),
        ({"field": "orders"}, [("$.op", "missing key 'op'")]),
        ({"op": "eq", "value": 1}, [("$.field", "missing key 'field'")]),
        (
            {"field": 3, "op": 4},
            [
                ("$.field", "expected a field name (string), got number"),
                ("$.op", "expected an operator name (string), got number"),
            ],
        ),
        ({"and": []}, [("$.and", "unknown key 'and'; did you mean 'all' or 'any'?")]),
        (
            {"field": "orders", "op": "gt", "value": 1, "note": "x"},
            [("$.note", "unknown key 'note'; did you mean 'not'?")],
        ),
        (
            {"feild": "orders", "op": "gt", "value": 1},
            [("$.feild", "unknown key 'feild'; did you mean 'field'?"), ("$.field", "missing key 'field'")],
        ),
        (
            {"all": [], "any": []},
            [
                (
                    "$.any",
                    "unexpected key 'any' beside 'all'; a condition holds exactly one of "
                    "all, any, not or field/op/value",
                )
            ],
        ),
        (
            {"not": {}, "field": "x"},
            [
                (
                    "$.field",
                    "unexpected key 'field' beside 'not'; a condition holds "
                    "exactly one of all, any, not or field/op/value",
                ),
                ("$.not", "empty condition; expected all, any, not or field/op/value"),
            ],
        ),
        (
            {"all": [], "weird key": 1},
            [
                (
                    "$['weird key']",
                    "unexpected key 'weird key' beside 'all'; a "
                    "condition holds exactly one of all, any, not or field/op/value",
                )
            ],
        ),
    ],
)
def test_shape_errors(tree: object, expected: list[tuple[str, str]]) -> None:
    assert errors_of(tree) == expected


def test_all_errors_are_reported_with_nested_paths() -> None:
    tree = {
        "all": [
            leaf("orders", "gt", 1),
            {
                "any": [
                    leaf("country", "eq", "IL"),
                    {"not": {"all": [leaf("total_spend", "gte", "500"), leaf("vipp", "eq", True)]}},
                ]
            },
            {"not": leaf("segments", "contains", 3)},
            leaf("signed_up_at", "between", ["2025-01-01T00:00:00Z", "2024-01-01T00:00:00Z"]),
            "nope",
        ]
    }
    assert paths_of(tree, "$.tiers[2].when") == [
        "$.tiers[2].when.all[1].any[1].not.all[0].value",
        "$.tiers[2].when.all[1].any[1].not.all[1].field",
        "$.tiers[2].when.all[2].not.value",
        "$.tiers[2].when.all[3].value",
        "$.tiers[2].when.all[4]",
    ]
    with pytest.raises(InvalidConditionError) as caught:
        compile_condition(tree, CATALOGUE, "$.tiers[2].when")
    assert len(caught.value.errors) == 5
    assert caught.value.errors[1] == ConditionError(
        "$.tiers[2].when.all[1].any[1].not.all[1].field", "unknown field 'vipp'; did you mean 'vip'?"
    )
    assert "$.tiers[2].when.all[1].any[1].not.all[0].value" in str(caught.value)
    assert caught.value.errors[0].to_dict()["path"] == "$.tiers[2].when.all[1].any[1].not.all[0].value"


def nest_nots(levels: int) -> dict[str, Any]:
    tree: dict[str, Any] = leaf("orders", "gt", 1)
    for _ in range(levels):
        tree = {"not": tree}
    return tree


def test_depth_limit() -> None:
    # The root is at depth 1: eleven `not`s and a leaf make twelve levels.
    assert validate(nest_nots(11), CATALOGUE) == []
    assert errors_of(nest_nots(12)) == [("$" + ".not" * 12, "conditions are nested deeper than 12 levels")]
    assert paths_of(nest_nots(3), max_depth=3) == ["$.not.not.not"]
    # a deep list nesting is cut off too, and a pathological one does not recurse forever
    deep: dict[str, Any] = {"all": []}
    cursor = deep
    for _ in range(5000):
        child: dict[str, Any] = {"all": []}
        cursor["all"].append(child)
        cursor = child
    assert paths_of(deep) == ["$" + ".all[0]" * 12]


def test_a_value_nested_deep_is_named_without_being_written_out() -> None:
    # Its error message once wrote the whole value, and a thousand levels failed that (a 500).
    deep: list[Any] = [1]
    for _ in range(5000):
        deep = [deep]
    [(path, message)] = errors_of(leaf("country", "eq", deep))
    assert path == "$.value"
    assert message.endswith("not an array ([[…]])"), message
    wide = {"in": list(range(100))}
    [(_, message)] = errors_of(leaf("country", "eq", wide))
    assert message.endswith('({"in": […]})'), message


def test_cyclic_tree_is_rejected_by_depth() -> None:
    tree: dict[str, Any] = {"all": []}
    tree["all"].append(tree)
    assert len(validate(tree, CATALOGUE)) == 1
    assert fields_used(tree) == set()


def test_node_limit() -> None:
    tree = {"any": [leaf("orders", "eq", i) for i in range(600)]}
    assert errors_of(tree, "$.r") == [("$.r", "a rule may hold at most 500 conditions")]
    assert validate({"any": [leaf("orders", "eq", i) for i in range(499)]}, CATALOGUE) == []
    assert paths_of({"any": [leaf("orders", "eq", i) for i in range(3)]}, max_nodes=3) == ["$"]


def test_validate_and_compile_agree() -> None:
    with pytest.raises(InvalidConditionError, match=r"\$\.field: unknown field"):
        compile_condition(leaf("nope", "eq", 1), CATALOGUE)


# --- explanations -----------------------------------------------------------------------------

EXPLAINED_RULE = {
    "all": [
        leaf("total_spend", "gte", 500),
        {"any": [leaf("country", "in", ["IL", "US"]), leaf("segments", "contains", "vip")]},
        {"not": leaf("vip", "eq", True)},
        leaf("last_purchase_at", "within_days", 90),
    ]
}


def test_explain_reports_every_node_with_paths_and_values() -> None:
    condition = compile_condition(EXPLAINED_RULE, CATALOGUE, "$.tiers[0].when")
    last = NOW - 10 * DAY
    facts = {"total_spend": Decimal("812.5"), "country": "DE", "segments": ["vip"], "last_purchase_at": last}
    explanation = condition.explain(facts, NOW)
    assert explanation.matched is True
    assert explanation.path == "$.tiers[0].when"
    assert explanation.kind == "all"
    assert [(e.path, e.matched, e.field, e.op, e.expected, e.actual) for e in explanation.leaves()] == [
        ("$.tiers[0].when.all[0]", True, "total_spend", "gte", 500, Decimal("812.5")),
        ("$.tiers[0].when.all[1].any[0]", False, "country", "in", ["IL", "US"], "DE"),
        ("$.tiers[0].when.all[1].any[1]", True, "segments", "contains", "vip", ["vip"]),
        ("$.tiers[0].when.all[2].not", False, "vip", "eq", True, None),
        ("$.tiers[0].when.all[3]", True, "last_purchase_at", "within_days", 90, last),
    ]
    not_node = explanation.children[2]
    assert (not_node.kind, not_node.path, not_node.matched) == ("not", "$.tiers[0].when.all[2]", True)
    # the reasons: every child of the matching `all`, but only the matching branch of the `any`
    assert [e.path for e in explanation.reasons()] == [
        "$.tiers[0].when.all[0]",
        "$.tiers[0].when.all[1].any[1]",
        "$.tiers[0].when.all[2].not",
        "$.tiers[0].when.all[3]",
    ]
    rendered = explanation.to_dict()
    json.dumps(rendered)  # JSON-ready
    assert rendered["children"][0] == {
        "path": "$.tiers[0].when.all[0]",
        "kind": "leaf",
        "matched": True,
        "field": "total_spend",
        "op": "gte",
        "expected": 500,
        "actual": "812.5",
    }
    assert rendered["children"][3]["actual"] == last.isoformat()
    assert rendered["children"][2]["children"][0]["actual"] is None


def test_explain_failure_reasons_are_the_failing_leaves() -> None:
    condition = compile_condition(EXPLAINED_RULE, CATALOGUE)
    facts = {"total_spend": 100, "country": "DE", "segments": [], "vip": False}
    explanation = condition.explain(facts, NOW)
    assert explanation.matched is False
    assert [e.path for e in explanation.reasons()] == [
        "$.all[0]",
        "$.all[1].any[0]",
        "$.all[1].any[1]",
        "$.all[3]",
    ]


def test_explain_exists_without_value_expects_true() -> None:
    explanation = compile_condition(leaf("email", "exists"), CATALOGUE).explain({}, NOW)
    assert (explanation.matched, explanation.expected, explanation.actual) == (False, True, None)


def test_compiled_condition_does_not_alias_the_tree() -> None:
    tree = leaf("country", "in", ["IL"])
    condition = compile_condition(tree, CATALOGUE)
    tree["value"].append("US")
    assert not condition.evaluate({"country": "US"}, NOW)
    assert condition.explain({}, NOW).expected == ["IL"]


# --- time boundaries --------------------------------------------------------------------------


def test_time_boundaries() -> None:
    tree = {
        "any": [
            leaf("last_purchase_at", "within_days", 30),
            leaf("signed_up_at", "older_than_days", 365),
            leaf("last_purchase_at", "older_than_days", 30),  # same instant as the first
            leaf("last_purchase_at", "lt", "2030-01-01T00:00:00Z"),  # not relative to now
        ]
    }
    condition = compile_condition(tree, CATALOGUE)
    last = NOW - 10 * DAY
    signed = NOW - 400 * DAY  # already older than 365 days: its flip is in the past
    tick = timedelta(microseconds=1)
    assert condition.time_boundaries({"last_purchase_at": last, "signed_up_at": signed}, NOW) == [
        last + 30 * DAY + tick
    ]
    signed = NOW - 100 * DAY
    assert condition.time_boundaries({"last_purchase_at": last, "signed_up_at": signed}, NOW) == [
        last + 30 * DAY + tick,
        signed + 365 * DAY + tick,
    ]
    assert condition.time_boundaries({}, NOW) == []
    assert condition.time_boundaries({"last_purchase_at": "2025-01-01T00:00:00Z"}, NOW) == []
    far = datetime.max.replace(tzinfo=UTC) - DAY
    assert condition.time_boundaries({"last_purchase_at": far}, NOW) == []


def test_time_boundary_is_where_the_leaf_flips() -> None:
    condition = compile_condition(leaf("last_purchase_at", "within_days", 30), CATALOGUE)
    facts = {"last_purchase_at": NOW - 29 * DAY}
    [flip] = condition.time_boundaries(facts, NOW)
    assert condition.evaluate(facts, flip - timedelta(microseconds=1))
    assert not condition.evaluate(facts, flip)
    # re-evaluating exactly at a boundary never loses the next one
    older = compile_condition(leaf("last_purchase_at", "older_than_days", 30), CATALOGUE)
    at_edge = NOW - 30 * DAY
    assert not older.evaluate({"last_purchase_at": at_edge}, NOW)
    assert older.time_boundaries({"last_purchase_at": at_edge}, NOW) == [NOW + timedelta(microseconds=1)]


# --- helpers and pydantic ---------------------------------------------------------------------


def test_fields_used() -> None:
    assert fields_used(EXPLAINED_RULE) == {"total_spend", "country", "segments", "vip", "last_purchase_at"}
    assert fields_used({"all": [5, {"not": {"field": 3}}, {"field": "x", "op": "??"}]}) == {"x"}
    assert compile_condition(EXPLAINED_RULE, CATALOGUE).fields == frozenset(fields_used(EXPLAINED_RULE))


class Rule(BaseModel):
    name: str
    when: ConditionTree


def test_condition_tree_type_documents_the_shape() -> None:
    schema = Rule.model_json_schema()
    assert {"ConditionAll", "ConditionAny", "ConditionNot", "ConditionLeaf"} <= set(schema["$defs"])
    assert {"$ref": "#/$defs/ConditionLeaf"} in schema["properties"]["when"]["anyOf"]
    leaf_schema = schema["$defs"]["ConditionLeaf"]
    assert leaf_schema["properties"]["op"]["enum"] == list(OPS)
    assert schema["$defs"]["ConditionNot"]["required"] == ["not"]
    assert Rule.model_json_schema(mode="serialization") == schema


def test_condition_tree_type_accepts_any_object() -> None:
    # Shape and catalogue checks are validate()'s job; the model only asks for a JSON object.
    rule = Rule.model_validate({"name": "gold", "when": {"whatever": 1}})
    assert rule.when == {"whatever": 1}
    with pytest.raises(ValueError, match="dict"):
        TypeAdapter(ConditionTree).validate_python([1])


# --- properties -------------------------------------------------------------------------------

NUMBERS = st.sampled_from([0, 1, 2.5, 10, 99, 100, -3])
STRINGS = st.sampled_from(["IL", "US", "DE", "vip", "new"])
INSTANTS = st.integers(min_value=-60, max_value=60).map(lambda days: NOW + days * DAY)


def rfc3339(instant: datetime) -> str:
    return instant.isoformat().replace("+00:00", "Z")


def literal(ftype: FieldType) -> st.SearchStrategy[Any]:
    if ftype == "number":
        return NUMBERS
    if ftype in ("string", "string_list"):
        return STRINGS
    if ftype == "bool":
        return st.booleans()
    return INSTANTS.map(rfc3339)


@st.composite
def leaves(draw: st.DrawFn) -> dict[str, Any]:
    field = draw(st.sampled_from(sorted(CATALOGUE)))
    ftype = CATALOGUE[field]
    op = draw(st.sampled_from(sorted(OPS_BY_TYPE[ftype])))
    if op == "exists":
        return draw(st.sampled_from([leaf(field, op), leaf(field, op, True), leaf(field, op, False)]))
    if op in ("within_days", "older_than_days"):
        # within_days 0 is refused when written (test_a_window_of_no_time_is_…); older_than_days 0 is not.
        return leaf(
            field, op, draw(st.sampled_from([1, 7, 30.5] if op == "within_days" else [0, 1, 7, 30.5]))
        )
    if op == "in":
        return leaf(field, op, draw(st.lists(literal(ftype), min_size=1, max_size=3)))
    if op == "between":
        if ftype == "number":
            low, high = sorted(draw(st.lists(NUMBERS, min_size=2, max_size=2)))
            return leaf(field, op, [low, high])
        a, b = sorted(draw(st.lists(INSTANTS, min_size=2, max_size=2)))
        return leaf(field, op, [rfc3339(a), rfc3339(b)])
    return leaf(field, op, draw(literal(ftype)))


trees = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.lists(children, max_size=3).map(lambda c: {"all": c}),
        st.lists(children, max_size=3).map(lambda c: {"any": c}),
        children.map(lambda c: {"not": c}),
    ),
    max_leaves=8,
)


def fact(ftype: FieldType) -> st.SearchStrategy[Any]:
    if ftype == "datetime":
        return INSTANTS
    if ftype == "string_list":
        return st.lists(STRINGS, max_size=3)
    return literal(ftype)


@st.composite
def typed_facts(draw: st.DrawFn) -> dict[str, object]:
    facts: dict[str, object] = {}
    for field, ftype in CATALOGUE.items():
        choice = draw(st.sampled_from(["value", "value", "none", "missing"]))
        if choice == "value":
            facts[field] = draw(fact(ftype))
        elif choice == "none":
            facts[field] = None
    return facts


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.datetimes(),  # naive
    st.datetimes(timezones=st.just(UTC)),
    st.lists(st.one_of(st.text(max_size=3), st.integers(), st.lists(st.integers(), max_size=2)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.frozensets(st.text(max_size=3), max_size=3),
)
any_facts = st.one_of(typed_facts(), st.dictionaries(st.sampled_from(sorted(CATALOGUE)), JUNK))


def ev(tree: object, facts: Mapping[str, object]) -> bool:
    return compile_condition(tree, CATALOGUE).evaluate(facts, NOW)


@given(trees)
def test_generated_trees_validate(tree: dict[str, Any]) -> None:
    assert validate(tree, CATALOGUE, max_depth=100) == []


@given(trees, typed_facts())
def test_double_negation(tree: dict[str, Any], facts: dict[str, object]) -> None:
    assert ev({"not": {"not": tree}}, facts) == ev(tree, facts)


@given(trees, typed_facts())
def test_all_of_one(tree: dict[str, Any], facts: dict[str, object]) -> None:
    assert ev({"all": [tree]}, facts) == ev(tree, facts)
    assert ev({"any": [tree]}, facts) == ev(tree, facts)


@given(trees, trees, typed_facts())
def test_de_morgan(a: dict[str, Any], b: dict[str, Any], facts: dict[str, object]) -> None:
    assert ev({"not": {"all": [a, b]}}, facts) == ev({"any": [{"not": a}, {"not": b}]}, facts)
    assert ev({"not": {"any": [a, b]}}, facts) == ev({"all": [{"not": a}, {"not": b}]}, facts)


@settings(max_examples=300)
@given(trees, any_facts)
def test_evaluation_never_raises(tree: dict[str, Any], facts: dict[str, object]) -> None:
    condition = compile_condition(tree, CATALOGUE, max_depth=100)
    result = condition.evaluate(facts, NOW)
    assert isinstance(result, bool)
    explanation = condition.explain(facts, NOW)
    assert explanation.matched == result
    json.dumps(explanation.to_dict())
    assert all(b > NOW for b in condition.time_boundaries(facts, NOW))


@given(
    st.sampled_from(["total_spend", "signed_up_at"]),
    st.data(),
    any_facts,
)
def test_between_is_gte_and_lte(field: str, data: st.DataObject, facts: dict[str, object]) -> None:
    if CATALOGUE[field] == "number":
        low, high = sorted(data.draw(st.lists(NUMBERS, min_size=2, max_size=2)))
        bounds: list[Any] = [low, high]
        facts = {**facts, field: data.draw(st.one_of(NUMBERS, JUNK))}
    else:
        a, b = sorted(data.draw(st.lists(INSTANTS, min_size=2, max_size=2)))
        bounds = [rfc3339(a), rfc3339(b)]
        facts = {**facts, field: data.draw(st.one_of(INSTANTS, JUNK))}
    between = leaf(field, "between", bounds)
    both = {"all": [leaf(field, "gte", bounds[0]), leaf(field, "lte", bounds[1])]}
    assert ev(between, facts) == ev(both, facts)

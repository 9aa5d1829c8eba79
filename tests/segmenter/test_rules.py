"""Rule sets: validation with JSON paths, the tier ladder, segments, explanations, time boundaries."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.segmenter.profile import FACT_TYPES, SEGMENT_FACT_TYPES
from services.segmenter.rules import (
    NO_TIER,
    CompiledRules,
    compile_rules,
    default_rules,
    ruleset_etag,
    validate_rules,
)
from shared.conditions import OPS_BY_TYPE, FieldType

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
DAY = timedelta(days=1)
TICK = timedelta(microseconds=1)

SEEDS_SEGMENTS = {
    "new_customers",
    "loyal",
    "high_value",
    "at_risk",
    "lapsed",
    "churned_price",
    "churned_service",
    "recent_unresolved_complaint",
    "complaint_resolved",
}


def leaf(field: str, op: str, value: object = True) -> dict[str, Any]:
    return {"field": field, "op": op, "value": value}


def rule(name: str, when: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "when": when}


def problems(raw: object) -> list[tuple[str, str]]:
    return [(e.path, e.message) for e in validate_rules(raw)]


def paths(raw: object) -> list[str]:
    return [p for p, _ in problems(raw)]


# --- the shipped default --------------------------------------------------------------------------


def test_the_default_rules_validate_and_compile() -> None:
    raw = default_rules()
    assert validate_rules(raw) == []
    rules = compile_rules(raw, 1)
    assert rules.version == 1
    assert rules.tier_names == ["platinum", "gold", "silver", "bronze", NO_TIER]
    assert set(rules.segment_names) == SEEDS_SEGMENTS


def base_facts(**overrides: Any) -> dict[str, Any]:
    facts: dict[str, Any] = dict.fromkeys(FACT_TYPES)
    facts |= {
        "orders_count": 0,
        "total_value": 0.0,
        "purchases_365d": 0,
        "lifecycle_stage": "new",
        "open_tickets": 0,
        "complaints_90d": 0,
    }
    return facts | overrides


@pytest.mark.parametrize(
    ("facts", "tier", "segments"),
    [
        pytest.param(base_facts(), NO_TIER, set(), id="no-purchase"),
        pytest.param(
            base_facts(orders_count=1, total_value=50.0, first_purchase_at=NOW - 3 * DAY),
            "bronze",
            {"new_customers"},
            id="first-order",
        ),
        pytest.param(
            base_facts(orders_count=12, total_value=12_000.0, purchases_365d=6, lifecycle_stage="active"),
            "platinum",
            {"loyal", "high_value"},
            id="platinum",
        ),
        pytest.param(
            base_facts(orders_count=12, total_value=12_000.0, lifecycle_stage="lapsed"),
            "gold",
            {"lapsed", "high_value"},
            id="lapsed-big-spender-drops-to-gold",
        ),
        pytest.param(
            base_facts(orders_count=3, total_value=300.0, lifecycle_stage="churned", churn_reason="both"),
            "bronze",
            {"churned_price", "churned_service"},
            id="churned-both",
        ),
        pytest.param(
            base_facts(
                orders_count=2,
                total_value=1500.0,
                lifecycle_stage="at_risk",
                predicted_clv=2500.0,
                last_complaint_at=NOW - 10 * DAY,
                last_complaint_resolved=False,
            ),
            "silver",
            {"at_risk", "high_value", "recent_unresolved_complaint"},
            id="at-risk-complainer",
        ),
        pytest.param(
            base_facts(
                orders_count=2,
                total_value=9000.0,
                predicted_clv=100.0,  # a prediction overrides the spend-based fallback
                last_complaint_at=NOW - 60 * DAY,
                last_complaint_resolved=True,
            ),
            "silver",
            {"complaint_resolved"},
            id="resolved-complaint",
        ),
    ],
)
def test_default_tiers_and_segments(facts: dict[str, Any], tier: str, segments: set[str]) -> None:
    assignment = compile_rules(default_rules(), 1).assign(facts, NOW)
    assert assignment.tier == tier
    assert set(assignment.segments) == segments


def test_a_rule_naming_a_language_or_locale_by_another_code_matches_the_customers_of_it() -> None:
    """The facts give a locale in BCP 47's case and a language by its current code (an event's
    iw-IL is he-IL, its tl-PH fil-PH). A rule saying iw, or stored before the facts said fil,
    matched nobody; its values are read in the facts' spelling."""
    raw = {
        "tiers": [],
        "segments": [
            rule("hebrew", leaf("language", "eq", "iw")),
            rule("tagalog_ph", leaf("locale", "in", ["tl-ph", "en-PH"])),
        ],
    }
    assert validate_rules(raw) == []
    rules = compile_rules(raw, 1)
    assert rules.assign(base_facts(locale="he-IL", language="he"), NOW).segments == ("hebrew",)
    assert rules.assign(base_facts(locale="fil-PH", language="fil"), NOW).segments == ("tagalog_ph",)


def test_a_language_or_locale_no_event_could_give_is_named_when_written() -> None:
    raw = {
        "tiers": [],
        "segments": [
            rule("hebrew_israel", leaf("language", "eq", "he-IL")),
            rule("hebrew", leaf("locale", "eq", "he_IL")),
        ],
    }
    assert problems(raw) == [
        (
            "$.segments[0].when.value",
            'language "he-IL": not a language code, e.g. he, ar, en (a tag such as he-IL is a locale)',
        ),
        ("$.segments[1].when.value", 'locale "he_IL": not a BCP 47 language tag, e.g. he-IL, ar, en-US'),
    ]
    # Saved before they were checked, they still load, and compare as written.
    assert compile_rules(raw, 1).assign(base_facts(locale="he-IL", language="he"), NOW).segments == ()


def test_a_time_zone_is_read_as_the_iana_database_spells_it_and_an_unknown_one_is_named() -> None:
    """`timezone eq "asia/jerusalem"` was accepted and matched nobody: a profile's zone is
    always spelt Asia/Jerusalem."""
    raw = {
        "tiers": [],
        "segments": [
            rule("israel", leaf("timezone", "eq", "asia/jerusalem")),
            rule("cairo", leaf("timezone", "in", ["AFRICA/CAIRO", "Asia/Tel_Aviv"])),
        ],
    }
    assert validate_rules(raw) == []
    rules = compile_rules(raw, 1)
    assert rules.assign(base_facts(timezone="Asia/Jerusalem"), NOW).segments == ("israel",)
    assert rules.assign(base_facts(timezone="Africa/Cairo"), NOW).segments == ("cairo",)
    wrong = {"tiers": [], "segments": [rule("mars", leaf("timezone", "eq", "Mars/Olympus"))]}
    assert problems(wrong) == [
        (
            "$.segments[0].when.value",
            "timezone \"Mars/Olympus\": unknown IANA time zone 'Mars/Olympus', e.g. Asia/Jerusalem",
        )
    ]


# --- validation -----------------------------------------------------------------------------------


def test_an_unknown_field_is_named_by_its_json_path() -> None:
    raw = default_rules()
    raw["tiers"][0]["when"]["all"][1] = leaf("orders", "gte", 10)
    [(path, message)] = problems(raw)
    assert path == "$.tiers[0].when.all[1].field"
    assert "unknown field 'orders'" in message
    assert "orders_count" in message  # the suggestion


def test_comparing_a_number_with_a_string_is_rejected_both_ways() -> None:
    raw = default_rules()
    raw["tiers"][1]["when"]["all"][0]["value"] = "4000"
    raw["segments"][3]["when"] = leaf("lifecycle_stage", "eq", 5)
    found = problems(raw)
    assert [p for p, _ in found] == ["$.tiers[1].when.all[0].value", "$.segments[3].when.value"]
    assert "number field" in found[0][1]
    assert "string field" in found[1][1]


def test_too_deep_nesting_is_rejected_once_at_the_node_too_deep() -> None:
    tree: dict[str, Any] = leaf("orders_count", "gte", 1)
    for _ in range(15):
        tree = {"not": tree}
    raw = {"tiers": [], "segments": [rule("deep", tree)]}
    [(path, message)] = problems(raw)
    assert path == "$.segments[0].when" + ".not" * 12
    assert "nested deeper than 12" in message


def test_nesting_within_the_limit_is_fine() -> None:
    tree: dict[str, Any] = leaf("orders_count", "gte", 1)
    for _ in range(11):
        tree = {"not": tree}
    assert problems({"tiers": [], "segments": [rule("deep", tree)]}) == []


def test_duplicate_names_are_rejected_per_kind() -> None:
    ok = leaf("orders_count", "gte", 1)
    raw = {
        "tiers": [rule("gold", ok), rule("gold", ok)],
        "segments": [rule("gold", ok), rule("vip", ok), rule("vip", ok)],  # a segment may share a tier's name
    }
    assert problems(raw) == [
        ("$.tiers[1].name", "'gold' is defined twice"),
        ("$.segments[2].name", "'vip' is defined twice"),
    ]


def test_none_is_reserved_for_no_tier() -> None:
    raw = {"tiers": [rule("none", leaf("orders_count", "gte", 1))], "segments": []}
    [(path, message)] = problems(raw)
    assert path == "$.tiers[0].name"
    assert "'none'" in message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param({"segments": []}, [("$.tiers", "Field required")], id="missing-tiers"),
        pytest.param(
            [], [("$", "Input should be a valid dictionary or instance of RuleSet")], id="not-an-object"
        ),
        pytest.param(
            {"tiers": [{"name": "gold"}], "segments": []},
            [("$.tiers[0].when", "Field required")],
            id="no-when",
        ),
        pytest.param(
            {"tiers": [], "segments": [], "extra": 1},
            [("$.extra", "Extra inputs are not permitted")],
            id="unknown-key",
        ),
    ],
)
def test_structural_errors(raw: object, expected: list[tuple[str, str]]) -> None:
    assert problems(raw) == expected


def test_a_malformed_rule_does_not_hide_the_other_problems() -> None:
    """One round trip for marketing: the set's shape and every rule's conditions at once."""
    raw = {
        "tiers": [
            rule("Gold Tier", leaf("no_such_fact", "gte", 1)),  # a bad name, and a bad condition
            rule("silver", leaf("orders_count", "gte", 1)),
            rule("silver", leaf("orders_count", "between", 1)),  # defined twice, not a [low, high]
            "bronze",  # not a rule at all
        ],
        "segments": [
            {**rule("vip", leaf("tier", "eq", "platinum")), "colour": "red"},  # unknown key; no such tier
            {"name": "quiet"},  # no condition
        ],
    }
    assert sorted(paths(raw)) == sorted(
        [
            "$.tiers[0].name",
            "$.tiers[0].when.field",
            "$.tiers[2].name",
            "$.tiers[2].when.value",
            "$.tiers[3]",
            "$.segments[0].colour",
            "$.segments[0].when.value",
            "$.segments[1].when",
        ]
    )


def test_too_many_rules_are_one_problem_not_thousands() -> None:
    bad = rule("x", leaf("no_such_fact", "gte", 1))
    raw = {"tiers": [{**bad, "name": f"t{i}"} for i in range(5000)], "segments": []}
    found = problems(raw)
    assert found[0][0] == "$.tiers"  # too many
    assert len(found) <= 1 + 20  # and the conditions of the first twenty, no more


def test_at_most_two_hundred_problems_are_listed_and_the_rest_counted() -> None:
    # Within the limits (200 segments) but every leaf wrong: 2,000 problems were 2,000 lines.
    wrong = {"all": [leaf(f"no_such_{j}", "gte", 1) for j in range(10)]}
    raw = {"tiers": [], "segments": [rule(f"s{i}", wrong) for i in range(200)]}
    found = problems(raw)
    assert len(found) == 201
    assert found[-1] == ("$", "and 1800 more problems, not listed")
    assert found[0][0] == "$.segments[0].when.all[0].field"


def test_rule_names_are_identifiers_and_the_refusal_says_what_to_write() -> None:
    raw = {
        "tiers": [rule("Gold Tier", leaf("orders_count", "gte", 1))],
        "segments": [rule("לקוחות_נאמנים", {"all": []})],
    }
    found = problems(raw)
    assert [p for p, _ in found] == ["$.tiers[0].name", "$.segments[0].name"]
    assert all(m.startswith("a name is lowercase Latin letters, digits and _") for _, m in found)
    assert "in Hebrew or Arabic too, in description" in found[0][1]


def test_a_rule_key_misnamed_is_named_with_what_was_meant() -> None:
    misnamed = {"name": "x", "condition": {"all": []}}
    typo = {"name": "y", "when": {"all": []}, "descripton": "y", "color": "red"}
    assert problems({"tiers": [], "segments": [misnamed, typo]}) == [
        ("$.segments[0].when", "Field required"),
        ("$.segments[0].condition", "unknown key 'condition'; did you mean 'when', a rule's condition?"),
        ("$.segments[1].descripton", "unknown key 'descripton'; did you mean 'description'?"),
        ("$.segments[1].color", "unknown key 'color'; the keys of a rule are description, name, when"),
    ]


def test_tiers_cannot_use_tier_but_segments_can() -> None:
    on_tier = leaf("tier", "eq", "gold")
    assert "tier" not in FACT_TYPES
    assert SEGMENT_FACT_TYPES["tier"] == "string"
    assert problems({"tiers": [rule("t", on_tier)], "segments": []}) == [
        (
            "$.tiers[0].when.field",
            "a tier's rule cannot read 'tier': it is what the tiers decide (a segment's rule can)",
        )
    ]
    assert paths({"tiers": [rule("gold", {"all": []})], "segments": [rule("s", on_tier)]}) == []


def test_values_no_customer_can_have_are_refused_with_the_close_ones() -> None:
    """A typo in a value would make a rule that silently matches no one (or everyone)."""
    tiers = [rule("gold", leaf("total_value", "gt", 1000)), rule("silver", {"all": []})]

    def of(*leaves: dict[str, Any]) -> list[tuple[str, str]]:
        return problems({"tiers": tiers, "segments": [rule("s", {"all": list(leaves)})]})

    at = "$.segments[0].when.all"
    assert of(
        leaf("tier", "eq", "glod"),
        leaf("lifecycle_stage", "eq", "at-risk"),
        leaf("preferred_channel", "in", ["email", "whatsap"]),
        leaf("churn_reason", "eq", "pricing"),
        leaf("p_alive", "lt", 1.5),
    ) == [
        (f"{at}[0].value", "no customer has tier \"glod\"; did you mean 'gold'?"),
        (f"{at}[1].value", "no customer has lifecycle_stage \"at-risk\"; did you mean 'at_risk'?"),
        (f"{at}[2].value[1]", "no customer has preferred_channel \"whatsap\"; did you mean 'whatsapp'?"),
        (f"{at}[3].value", "no customer has churn_reason \"pricing\"; did you mean 'price'?"),
        (
            f"{at}[4].value",
            "'p_alive' lies between 0 and 1; 1.5 is outside that, so the comparison would be the same "
            "for every customer",
        ),
    ]
    # The tier of no match is a tier a segment may ask for; tier rules get the same checks.
    assert of(leaf("tier", "eq", NO_TIER), leaf("p_alive", "between", [0, 1])) == []
    # Judged by what the comparison selects: "likely alive" with a generous upper bound is
    # meant; "above certainty" holds for nobody.
    assert of(leaf("p_alive", "between", [0.5, 1.5])) == []
    assert of(leaf("p_alive", "gt", 1)) == [
        (f"{at}[0].value", "'p_alive' lies between 0 and 1, so p_alive gt 1 would hold for no customer")
    ]
    bad_tier = {"tiers": [rule("gold", leaf("lifecycle_stage", "eq", "activ"))], "segments": []}
    assert paths(bad_tier) == ["$.tiers[0].when.value"]


def test_a_tier_no_customer_can_reach_is_refused() -> None:
    # The default ladder written lowest first: everyone who bought is bronze, and gold and
    # platinum (5+ and 10+ orders, so 1+) could never be assigned.
    raw = default_rules()
    raw["tiers"].reverse()
    found = problems(raw)
    assert [p for p, _ in found] == ["$.tiers[2].when", "$.tiers[3].when"]
    assert found[0][1] == (
        "'gold' can never be assigned: every customer it matches is matched by 'bronze', listed before "
        "it (tiers are tried in order and the first that matches wins: list the highest tier first)"
    )
    catch_all = [rule("everyone", {"all": []}), rule("gold", leaf("total_value", "gte", 1000))]
    assert paths({"tiers": catch_all, "segments": []}) == ["$.tiers[1].when"]
    silver_first = [
        rule("silver", leaf("total_value", "gt", 100)),
        rule("gold", leaf("total_value", "eq", 101)),
    ]
    assert paths({"tiers": silver_first, "segments": []}) == ["$.tiers[1].when"]
    # A bar every customer clears (counts start at 0), a range within a bar, a value within a
    # list: each put everyone it could in the tier before, and was accepted.
    for tiers in (
        [rule("bronze", leaf("orders_count", "gte", 0)), rule("gold", leaf("total_value", "gte", 5000))],
        [rule("member", leaf("purchases_365d", "gte", 0)), rule("gold", leaf("total_value", "gte", 5000))],
        [
            rule("silver", leaf("total_value", "gte", 1000)),
            rule("gold", leaf("total_value", "between", [5000, 10000])),
        ],
        [
            rule("live", leaf("lifecycle_stage", "in", ["active", "new"])),
            rule("active", leaf("lifecycle_stage", "eq", "active")),
        ],
    ):
        assert paths({"tiers": tiers, "segments": []}) == ["$.tiers[1].when"], tiers
    # Reachable: a higher bar first, a bar on another fact, an equal bar not strictly met.
    for tiers in (
        [rule("gold", leaf("total_value", "gte", 1000)), rule("silver", leaf("total_value", "gte", 100))],
        [rule("loyal", leaf("orders_count", "gte", 5)), rule("big", leaf("total_value", "gte", 1000))],
        [rule("above", leaf("total_value", "gt", 100)), rule("at", leaf("total_value", "gte", 100))],
        # A fact a customer may lack (no order converted: no average) is no catch-all at 0.
        [rule("avg", leaf("avg_order_value", "gte", 0)), rule("gold", leaf("total_value", "gte", 5000))],
        [
            rule("mid", leaf("total_value", "between", [100, 5000])),
            rule("gold", leaf("total_value", "gte", 1000)),
        ],
        [
            rule("young", leaf("first_purchase_at", "within_days", 30)),
            rule("old", leaf("first_purchase_at", "within_days", 60)),
        ],
    ):
        assert problems({"tiers": tiers, "segments": []}) == []


def test_the_unreachable_tier_proof_is_bounded() -> None:
    """An "any" against an "all" pairs every child with every child: without memory and a
    budget, 127 conditions a tier took 8.5 s of the API's loop, and the limits allow 500."""
    n = [10**6]  # each tier's bars below the last's: no tier is implied by a later one

    def tree(op: str, field: str, depth: int) -> dict[str, Any]:
        if depth == 0:
            n[0] -= 1
            return leaf(field, "gte", n[0])
        return {op: [tree(op, field, depth - 1), tree(op, field, depth - 1)]}

    big = [
        rule(f"t{i}", tree(("any", "all")[i % 2], ("total_value", "orders_count")[i % 2], 6))
        for i in range(20)
    ]
    assert problems({"tiers": big, "segments": []}) == []  # judged in bounded time: all let through
    # Beside a large tier, a proof still finds what it can; a tier matching no one is not "unreachable".
    late = rule("late", {"all": [leaf("total_value", "gte", 10**7), leaf("orders_count", "gte", 10**7)]})
    # Equal conditions are told by their text, made once: lists of 200 values cost no more.
    long_in = [leaf("orders_count", "in", [*range(200), i]) for i in range(45)]
    assert paths(
        {"tiers": [rule("a", {"any": long_in}), rule("b", {"all": copy.deepcopy(long_in)})], "segments": []}
    ) == [
        "$.tiers[1].when"  # all of a's values is more than any of them
    ]
    never, nobody = rule("never", {"any": []}), rule("nobody", {"any": []})
    assert paths({"tiers": [never, big[0], late, nobody], "segments": []}) == ["$.tiers[2].when"]


@settings(max_examples=300, deadline=None)
@given(
    conditions=st.lists(
        st.recursive(
            st.builds(
                leaf,
                st.sampled_from(["total_value", "orders_count"]),
                st.sampled_from(["gte", "gt", "lte", "lt", "eq"]),
                st.integers(0, 6),
            )
            | st.builds(
                lambda field, low, span: leaf(field, "between", [low, low + span]),
                st.sampled_from(["total_value", "orders_count"]),
                st.integers(0, 6),
                st.integers(0, 3),
            )
            | st.builds(
                lambda field, values: leaf(field, "in", values),
                st.sampled_from(["total_value", "orders_count"]),
                st.lists(st.integers(0, 6), min_size=1, max_size=3),
            ),
            lambda children: st.one_of(
                st.builds(lambda c: {"all": c}, st.lists(children, max_size=3)),
                st.builds(lambda c: {"any": c}, st.lists(children, min_size=1, max_size=3)),
            ),
            max_leaves=5,
        ),
        min_size=2,
        max_size=2,
    ),
    # Counts and totals are never below 0 (the proof knows it: `orders_count gte 0` is everyone).
    customers=st.lists(st.tuples(st.integers(0, 7), st.integers(0, 7)), min_size=1, max_size=30),
)
def test_a_tier_refused_as_unreachable_is_unreachable(
    conditions: list[dict[str, Any]], customers: list[tuple[int, int]]
) -> None:
    first, second = conditions
    raw = {"tiers": [rule("first", first), rule("second", second)], "segments": []}
    if paths(raw) != ["$.tiers[1].when"]:
        return
    rules = compile_rules({**raw, "tiers": [rule("second", second)]}, 1)
    earlier = compile_rules({**raw, "tiers": [rule("first", first)]}, 1)
    for total, orders in customers:
        facts = base_facts(total_value=total, orders_count=orders)
        if rules.assign(facts, NOW).tier == "second":
            assert earlier.assign(facts, NOW).tier == "first", (facts, first, second)


def test_every_problem_is_reported_at_once() -> None:
    raw = {
        "tiers": [rule("a", {"all": [leaf("nope", "eq", 1), leaf("total_value", "gt", "x")]})],
        "segments": [rule("b", {"any": [leaf("lifecycle_stage", "lt", "new")]})],
    }
    assert paths(raw) == [
        "$.tiers[0].when.all[0].field",
        "$.tiers[0].when.all[1].value",
        "$.segments[0].when.any[0].op",
    ]


def test_the_etag_is_a_stable_content_hash() -> None:
    raw = default_rules()
    reordered = {"segments": raw["segments"], "tiers": raw["tiers"]}
    assert ruleset_etag(raw) == ruleset_etag(reordered)
    changed = copy.deepcopy(raw)
    changed["tiers"][0]["when"]["all"][0]["value"] = 10001
    assert ruleset_etag(changed) != ruleset_etag(raw)


# --- evaluation ----------------------------------------------------------------------------------


def ladder() -> CompiledRules:
    return compile_rules(
        {
            "tiers": [
                rule("gold", leaf("total_value", "gte", 1000)),
                rule("silver", leaf("total_value", "gte", 100)),
                rule("everyone", {"all": []}),
            ],
            "segments": [
                rule("spender", leaf("total_value", "gte", 100)),
                rule("golden", leaf("tier", "eq", "gold")),
                rule("not_gold", {"not": leaf("tier", "eq", "gold")}),
                rule("fresh", leaf("first_purchase_at", "within_days", 30)),
                rule("old_hand", leaf("first_purchase_at", "older_than_days", 365)),
            ],
        },
        7,
    )


def test_the_first_matching_tier_wins() -> None:
    rules = ladder()
    # 5000 matches gold and silver (and everyone): the first in the ladder wins.
    assert rules.assign({"total_value": 5000}, NOW).tier == "gold"
    assert rules.assign({"total_value": 500}, NOW).tier == "silver"
    assert rules.assign({"total_value": 5}, NOW).tier == "everyone"
    silver_first = [
        rule("silver", leaf("total_value", "gte", 100)),
        rule("gold", leaf("total_value", "gte", 1000)),
    ]
    reversed_ladder = compile_rules({"tiers": silver_first, "segments": []}, 1)
    assert reversed_ladder.assign({"total_value": 5000}, NOW).tier == "silver"
    assert reversed_ladder.assign({"total_value": 5}, NOW).tier == NO_TIER


def test_every_matching_segment_applies_and_segments_see_the_tier() -> None:
    rules = ladder()
    first = NOW - 10 * DAY
    gold = rules.assign({"total_value": 5000, "first_purchase_at": first}, NOW)
    assert gold.segments == ("spender", "golden", "fresh")
    silver = rules.assign({"total_value": 500, "first_purchase_at": NOW - 400 * DAY}, NOW)
    assert silver.segments == ("spender", "not_gold", "old_hand")


def test_assign_returns_the_instants_when_a_time_condition_flips() -> None:
    rules = ladder()
    first = NOW - 10 * DAY
    assignment = rules.assign({"total_value": 5, "first_purchase_at": first}, NOW)
    # within 30 days until first + 30 d (inclusive); older than 365 days from one tick after.
    assert assignment.boundaries == (first + 30 * DAY + TICK, first + 365 * DAY + TICK)
    assert "fresh" in assignment.segments
    assert "fresh" in rules.assign({"first_purchase_at": first}, first + 30 * DAY).segments
    assert "fresh" not in rules.assign({"first_purchase_at": first}, first + 30 * DAY + TICK).segments
    later = rules.assign({"first_purchase_at": first}, first + 100 * DAY)
    assert later.boundaries == (first + 365 * DAY + TICK,)  # passed instants are not returned
    assert rules.assign({"total_value": 5}, NOW).boundaries == ()


def leaves(node: dict[str, Any]) -> list[dict[str, Any]]:
    if node["kind"] == "leaf":
        return [node]
    return [leaf for child in node["children"] for leaf in leaves(child)]


def test_explain_shows_which_leaf_of_which_rule_matched() -> None:
    rules = compile_rules(default_rules(), 3)
    facts = base_facts(orders_count=6, total_value=5000.0, lifecycle_stage="active")
    why = rules.explain(facts, NOW)
    assert why["tier"]["assigned"] == "gold"
    by_name = {r["name"]: r for r in why["tier"]["rules"]}
    assert by_name["platinum"]["matched"] is False
    assert by_name["gold"]["matched"] is True
    platinum_leaves = by_name["platinum"]["why"]["children"]
    failing = [leaf for leaf in platinum_leaves if not leaf["matched"]]
    assert [(f["field"], f["op"], f["expected"], f["actual"]) for f in failing] == [
        ("total_value", "gte", 10000, 5000.0),
        ("orders_count", "gte", 10, 6),
    ]
    high_value = next(s for s in why["segments"] if s["name"] == "high_value")
    assert high_value["matched"] is True
    fallback = high_value["why"]["children"][1]
    assert fallback["matched"] is True
    assert [(leaf["field"], leaf["matched"]) for leaf in leaves(fallback)] == [
        ("predicted_clv", False),  # under "not": no prediction yet
        ("total_value", True),
    ]
    assert {s["name"] for s in why["segments"] if s["matched"]} == {"high_value"}


def test_explanations_use_the_same_json_paths_as_validation() -> None:
    # A marketer reads "$.tiers[1].when.all[0]" in a validation error and in a customer's "why";
    # both must point at the same place in the rule set.
    why = compile_rules(default_rules(), 1).explain(base_facts(orders_count=6, total_value=5000.0), NOW)
    gold = why["tier"]["rules"][1]
    assert gold["why"]["path"] == "$.tiers[1].when"
    assert gold["why"]["children"][0]["path"] == "$.tiers[1].when.all[0]"
    assert why["segments"][0]["why"]["path"] == "$.segments[0].when"


# --- nothing a client sends makes validation or evaluation raise -------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "x", "gold", "2026-01-01T00:00:00Z", "2026-01-01", "new", "price"]),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
leaves_st = st.fixed_dictionaries(
    {
        "field": st.one_of(st.sampled_from(sorted(SEGMENT_FACT_TYPES)), json_values),
        "op": st.one_of(
            st.sampled_from(
                ["eq", "ne", "lt", "lte", "gt", "gte", "between", "in", "contains", "exists", "within_days",
                 "older_than_days"]
            ),
            json_values,
        ),
    },
    optional={"value": json_values},
)  # fmt: skip


@st.composite
def typed_leaves(draw: st.DrawFn) -> dict[str, Any]:
    """Leaves that are mostly right for their field's type, so that many rule sets validate."""
    field = draw(st.sampled_from(sorted(FACT_TYPES)))
    ftype: FieldType = FACT_TYPES[field]  # type: ignore[assignment]  # the catalogue is typed as str
    op = draw(st.sampled_from(sorted(OPS_BY_TYPE[ftype])))
    one: st.SearchStrategy[Any] = {
        "number": st.one_of(st.integers(-5, 10_000), st.floats(-1e6, 1e6)),
        "string": st.sampled_from(["new", "active", "price", "he-IL", "email"]),
        "bool": st.booleans(),
        "datetime": st.sampled_from(["2026-05-01T00:00:00Z", "2026-06-01T12:00:00+03:00"]),
    }[ftype]
    value: st.SearchStrategy[Any]
    if op in ("within_days", "older_than_days"):
        value = st.integers(0, 400)
    elif op == "exists":
        value = st.booleans()
    elif op == "in":
        value = st.lists(one, min_size=1, max_size=3)
    elif op == "between":
        value = st.lists(one, min_size=2, max_size=2).map(sorted)
    else:
        value = one
    return {"field": field, "op": op, "value": draw(value)}


trees = st.recursive(
    st.one_of(typed_leaves(), typed_leaves(), leaves_st, json_values),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"all": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"any": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"not": inner}),
    ),
    max_leaves=12,
)
rule_st = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["a", "b", "none", "gold"]), json_values), "when": trees}
)
typed_trees = st.recursive(
    typed_leaves(),
    lambda inner: st.one_of(
        st.fixed_dictionaries({"all": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"any": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"not": inner}),
    ),
    max_leaves=8,
)
typed_rules = st.lists(
    st.fixed_dictionaries({"name": st.sampled_from(["a", "b", "c", "gold"]), "when": typed_trees}),
    max_size=4,
    unique_by=lambda r: str(r["name"]),
)
rulesets = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"tiers": st.lists(rule_st, max_size=3), "segments": st.lists(rule_st, max_size=3)}
    ),
    st.fixed_dictionaries({"tiers": typed_rules, "segments": typed_rules}),
)
fact_values = st.one_of(scalars, st.datetimes(timezones=st.just(UTC)), st.datetimes())


@settings(max_examples=400, deadline=None)
@given(raw=rulesets, facts=st.dictionaries(st.sampled_from(sorted(FACT_TYPES)), fact_values))
def test_validation_never_raises_and_what_validates_compiles_and_evaluates(
    raw: object, facts: dict[str, Any]
) -> None:
    errors = validate_rules(raw)
    assert all(e.path.startswith("$") and e.message for e in errors)
    if errors:
        return
    rules = compile_rules(raw, 1)
    assignment = rules.assign(facts, NOW)
    assert assignment.tier in rules.tier_names
    assert set(assignment.segments) <= set(rules.segment_names)
    assert all(b > NOW for b in assignment.boundaries)
    rules.explain(facts, NOW)

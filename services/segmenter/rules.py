"""Rule sets: a tier ladder and named segments over a customer's facts. Pure.

Marketing writes them as JSON; ``validate_rules`` names every problem by its JSON path, and
``compile_rules`` turns a valid set into conditions that evaluate in microseconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Annotated, Any, TypeGuard

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from services.segmenter.profile import FACT_TYPES, SEGMENT_FACT_TYPES
from shared.conditions import (
    Choices,
    Condition,
    ConditionError,
    Explanation,
    Range,
    compile_condition,
    unknown_hint,
    validate,
)
from shared.events import FACT_DOMAINS, FACT_FORMS

NO_TIER = "none"
RuleName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]


MAX_RULES = {"tiers": 20, "segments": 200}
MAX_ERRORS = 200  # problems listed in one answer


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: RuleName
    description: str = Field(default="", max_length=500)
    when: dict[str, Any]


class RuleSet(BaseModel):
    """Tiers are tried in order and the first that matches wins; every segment that matches
    applies. A customer no tier matches is in tier "none"."""

    model_config = ConfigDict(extra="forbid")
    tiers: list[Rule] = Field(max_length=MAX_RULES["tiers"])
    segments: list[Rule] = Field(max_length=MAX_RULES["segments"])


def _json_path(loc: tuple[int | str, ...]) -> str:
    path = "$"
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def _rules_of(raw: object, kind: str) -> list[tuple[int, dict[str, Any]]]:
    """The rules of ``kind`` that are JSON objects, with their index, however malformed the rest;
    only as many as a set may have (the shape's error says there are too many), so that a body
    of thousands of rules is not answered with thousands of problems."""
    listed = raw.get(kind) if isinstance(raw, dict) else None
    if not isinstance(listed, list):
        return []
    return [(i, rule) for i, rule in enumerate(listed[: MAX_RULES[kind]]) if isinstance(rule, dict)]


def validate_rules(raw: object) -> list[ConditionError]:
    """Every problem of a rule set, each with the JSON path where it is: the set's shape first,
    then, rule by rule, duplicate and reserved names and every problem of each condition. A
    malformed rule (a bad name, an unknown key) does not hide the problems of the others, nor
    those of its own condition: marketing fixes them in one go."""
    errors: list[ConditionError] = []
    try:
        RuleSet.model_validate(raw)
    except ValidationError as exc:
        errors += [_said_plainly(e) for e in exc.errors(include_url=False)]
    # A segment rule may read the tier just assigned: one of this set's tiers, or none.
    tier_names = {r["name"] for _, r in _rules_of(raw, "tiers") if isinstance(r.get("name"), str)}
    tiers = Choices(frozenset({NO_TIER, *tier_names}))
    for kind, catalogue, domains in (
        ("tiers", FACT_TYPES, FACT_DOMAINS),
        ("segments", SEGMENT_FACT_TYPES, {**FACT_DOMAINS, "tier": tiers}),
    ):
        seen: set[str] = set()
        for i, rule in _rules_of(raw, kind):
            name = rule.get("name")
            if isinstance(name, str):
                if name in seen:
                    errors.append(ConditionError(f"$.{kind}[{i}].name", f"{name!r} is defined twice"))
                seen.add(name)
                if kind == "tiers" and name == NO_TIER:
                    errors.append(
                        ConditionError(f"$.tiers[{i}].name", f"{NO_TIER!r} is the tier of no match")
                    )
            when = rule.get("when")
            if isinstance(when, dict):  # otherwise the shape's errors say what is wrong with it
                path = f"$.{kind}[{i}].when"
                found = validate(when, catalogue, path, domains=domains, forms=FACT_FORMS)  # type: ignore[arg-type]
                errors += [_tier_unread(e) if kind == "tiers" else e for e in found]
    if not errors:
        errors += _shadowed_tiers([r for _, r in _rules_of(raw, "tiers")])
    if len(errors) > MAX_ERRORS:
        # A body of thousands of broken leaves was answered with every one of them (2.4 MB).
        more = len(errors) - MAX_ERRORS
        errors = [*errors[:MAX_ERRORS], ConditionError("$", f"and {more} more problems, not listed")]
    return errors


_RULE_KEYS = ("name", "description", "when")
_NAME_RULE = (
    "a name is lowercase Latin letters, digits and _, starting with a letter, at most 64 (e.g. "
    "high_value): it is an identifier in rules, journeys and metrics; write the name people read, "
    "in Hebrew or Arabic too, in description"
)


def _said_plainly(error: Any) -> ConditionError:
    """A shape error as a marketer can act on it: pydantic's pattern and extra-key messages name
    a regular expression and nothing to do."""
    loc = tuple(error["loc"])
    path, kind = _json_path(loc), error["type"]
    if kind == "string_pattern_mismatch" and loc[-1] == "name":
        return ConditionError(path, _NAME_RULE)
    if kind == "extra_forbidden" and len(loc) == 3:  # a key of a rule
        key = str(loc[-1])
        if isinstance(error.get("input"), dict):  # a condition under another name
            return ConditionError(path, f"unknown key {key!r}; did you mean 'when', a rule's condition?")
        return ConditionError(path, f"unknown key {key!r}{unknown_hint(key, _RULE_KEYS, 'keys of a rule')}")
    return ConditionError(path, error["msg"])


def _tier_unread(error: ConditionError) -> ConditionError:
    """A tier's rule reading the tier: the one thing it cannot, since it decides it."""
    if error.message.startswith("unknown field 'tier';"):
        return ConditionError(
            error.path,
            "a tier's rule cannot read 'tier': it is what the tiers decide (a segment's rule can)",
        )
    return error


def _shadowed_tiers(tiers: Sequence[dict[str, Any]]) -> list[ConditionError]:
    """Tiers no customer can reach: every customer one matches is matched by a tier listed
    before it, which wins (the first match does). A ladder written lowest first put everyone
    in its lowest tier and was accepted. Judged soundly, never by guess: ``_Implication`` answers
    yes only where it can prove it, so a tier it passes may still be unreachable for reasons
    of the data (a total over 1,000 with no order), which the preview's counts show."""
    errors: list[ConditionError] = []
    proof = _Implication()  # one budget for the whole ladder
    for j, later in enumerate(tiers):
        if later["when"] == {"any": []}:  # matches no one anyway: not for an earlier tier's sake
            continue
        for earlier in tiers[:j]:
            if proof.tiers(later["when"], earlier["when"]):
                errors.append(
                    ConditionError(
                        f"$.tiers[{j}].when",
                        f"{later['name']!r} can never be assigned: every customer it matches is matched "
                        f"by {earlier['name']!r}, listed before it (tiers are tried in order and the "
                        "first that matches wins: list the highest tier first)",
                    )
                )
                break
    return errors


_LOWER = {"gte": False, "gt": True}  # op → strict
_UPPER = {"lte": False, "lt": True}
# Pairs of sub-conditions compared, for one pair of tiers and for a whole ladder: an "any"
# against an "all" tries every pairing, which without memory or bound grew fourteenfold a level
# (127 conditions a tier: 8.5 s of the API's loop). A pair costs about 4.5 µs whatever the
# nodes hold (their texts are compared by hash): at most about half a second for a whole set.
# Out of budget, the answer is "not shown": the tier is let through, as any it cannot judge.
PAIR_BUDGET = 10_000
LADDER_BUDGET = 100_000


class _Implication:
    """Whether every customer one condition matches is matched by another too, where it can be
    shown from the conditions alone (valid trees; no, when it cannot be shown in the budget)."""

    def __init__(self) -> None:
        self.seen: dict[tuple[int, int], bool] = {}
        self.steps = 0
        self.pair_steps = 0
        # Each node's canonical JSON, made once: two nodes are equal when their texts are
        # (hash first, then the text). Compared as dicts, every pair cost the length of an
        # `in` list, and 200 pairs' worth of lists of 200 values took seconds within the budget.
        self.texts: dict[int, str] = {}

    def _text(self, node: Any) -> str:
        text = self.texts.get(id(node))
        if text is None:
            text = self.texts[id(node)] = json.dumps(node, sort_keys=True, separators=(",", ":"))
        return text

    def _same(self, a: Any, b: Any) -> bool:
        x, y = self._text(a), self._text(b)
        return hash(x) == hash(y) and x == y

    def tiers(self, later: Any, earlier: Any) -> bool:
        self.pair_steps = 0
        return self.holds(later, earlier)

    def holds(self, b: Any, a: Any) -> bool:
        key = (id(b), id(a))  # the trees are alive for the whole proof: ids are stable
        found = self.seen.get(key)
        if found is None:
            self.steps += 1
            self.pair_steps += 1
            within = self.pair_steps <= PAIR_BUDGET and self.steps <= LADDER_BUDGET
            found = within and self._holds(b, a)
            self.seen[key] = found
        return found

    def _holds(self, b: Any, a: Any) -> bool:
        if a == {"all": []} or self._same(a, b) or ("field" in a and _always(a)):
            return True
        if "all" in a:
            return all(self.holds(b, c) for c in a["all"])
        if "any" in a and any(self.holds(b, c) for c in a["any"]):
            return True
        if "all" in b:
            return any(self.holds(c, a) for c in b["all"])
        if "any" in b:
            return bool(b["any"]) and all(self.holds(c, a) for c in b["any"])
        return "field" in a and "field" in b and _leaf_implies(b, a)


# Facts every customer has, counts and totals from 0 (services.segmenter.profile.facts): a
# lower bound at or below their least value holds for everyone (`orders_count gte 0`), a
# catch-all like {"all": []}, which put everyone in a bronze listed before gold.
ALWAYS_SET = frozenset(
    {
        "orders_count",
        "distinct_purchase_days",
        "total_value",
        "purchases_30d",
        "purchases_90d",
        "purchases_365d",
        "open_tickets",
        "complaints_90d",
    }
)


def _always(leaf: dict[str, Any]) -> bool:
    domain = FACT_DOMAINS.get(leaf["field"])
    value = leaf.get("value")
    if leaf["field"] not in ALWAYS_SET or not isinstance(domain, Range) or not _number(value):
        return False
    return (leaf["op"] == "gte" and value <= domain.low) or (leaf["op"] == "gt" and value < domain.low)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _leaf_implies(b: dict[str, Any], a: dict[str, Any]) -> bool:
    """One comparison implying another on the same field: a higher threshold implies a lower
    one (orders_count ≥ 5 → ≥ 1), an equality its bounds, a recent window a longer one. A
    missing fact matches neither (a comparison never matches null)."""
    if a["field"] != b["field"]:
        return False
    op_a, op_b, value_a, value_b = a["op"], b["op"], a.get("value"), b.get("value")
    if op_a == "in" and isinstance(value_a, list):
        # eq "active" or in ["active"] implies in ["active", "new"]: a subset of its values.
        if op_b == "eq":
            return value_b in value_a
        return (
            op_b == "in"
            and isinstance(value_b, list)
            and bool(value_b)
            and all(v in value_a for v in value_b)
        )
    if op_b == "between" and isinstance(value_b, list) and len(value_b) == 2 and _number(value_a):
        low, high = value_b  # inclusive: between [5000, 10000] implies gte 1000, lt 20000
        if not (_number(low) and _number(high)):
            return False
        if op_a in _LOWER:
            return low > value_a if _LOWER[op_a] else low >= value_a
        if op_a in _UPPER:
            return high < value_a if _UPPER[op_a] else high <= value_a
        return False
    if not (_number(value_a) and _number(value_b)):
        return False
    x, y = value_a, value_b  # compared as given: int and float compare exactly
    if op_a in ("within_days", "older_than_days"):
        return op_b == op_a and (y <= x if op_a == "within_days" else y >= x)
    if op_a in _LOWER and (op_b in _LOWER or op_b == "eq"):
        strict = _LOWER[op_a] and not _LOWER.get(op_b, False)
        return y > x if strict else y >= x
    if op_a in _UPPER and (op_b in _UPPER or op_b == "eq"):
        strict = _UPPER[op_a] and not _UPPER.get(op_b, False)
        return y < x if strict else y <= x
    return False


def ruleset_etag(raw: object) -> str:
    canonical = json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Assignment:
    tier: str
    segments: tuple[str, ...]
    boundaries: tuple[datetime, ...]  # future instants at which a time condition flips


# Only a condition over a datetime fact can flip with time alone (within_days, older_than_days).
_DATETIME_FIELDS = frozenset(name for name, kind in SEGMENT_FACT_TYPES.items() if kind == "datetime")


@dataclass(frozen=True, slots=True)
class CompiledRules:
    version: int
    tiers: tuple[tuple[str, Condition], ...]
    segments: tuple[tuple[str, Condition], ...]
    # Each rule's name and condition as canonical JSON, in order (tiers, then segments): what
    # tells two versions' rules apart (``changes_from``). Empty when not compiled from JSON.
    tier_sources: tuple[str, ...] = ()
    segment_sources: tuple[str, ...] = ()
    _timed: tuple[Condition, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_timed", _timed((*self.tiers, *self.segments)))

    @property
    def tier_names(self) -> list[str]:
        return [name for name, _ in self.tiers] + [NO_TIER]

    def upgrade(self, old: str | None, new: str) -> bool:
        """Whether ``old`` → ``new`` moves up this set's ladder (its tiers in order, the first the
        highest, then none). A tier this set no longer has is not ranked: no upgrade from it."""
        ladder = self.tier_names
        return old in ladder and new in ladder and ladder.index(new) < ladder.index(old)

    @property
    def segment_names(self) -> list[str]:
        return [name for name, _ in self.segments]

    @property
    def fields(self) -> frozenset[str]:
        """Every fact some rule reads."""
        return frozenset(f for _, cond in (*self.tiers, *self.segments) for f in cond.fields)

    def assign(self, facts: dict[str, Any], now: datetime, *, boundaries: bool = True) -> Assignment:
        tier = next((name for name, cond in self.tiers if cond.evaluate(facts, now)), NO_TIER)
        with_tier = {**facts, "tier": tier}
        segments = tuple(name for name, cond in self.segments if cond.evaluate(with_tier, now))
        if not boundaries:
            return Assignment(tier, segments, ())
        return Assignment(tier, segments, self.time_boundaries(facts, now))

    def time_boundaries(self, facts: dict[str, Any], now: datetime) -> tuple[datetime, ...]:
        """The future instants at which some rule's time condition flips (``assign``'s
        boundaries): they depend on the datetime facts alone, not on the tier."""
        return _boundaries(self._timed, facts, now)

    def changes_from(self, old: CompiledRules) -> RuleChanges | None:
        """What evaluating a customer assigned by ``old`` under these rules needs, when the
        tier ladder is the same (the tier then stays, and segments whose rule is the same
        stay); None when the ladder changed or either set has no sources."""
        if not (self.tier_sources and old.tier_sources) or self.tier_sources != old.tier_sources:
            return None
        same = set(old.segment_sources)
        kept = frozenset(
            name for (name, _), src in zip(self.segments, self.segment_sources, strict=True) if src in same
        )
        evaluated = tuple((name, cond) for name, cond in self.segments if name not in kept)
        return RuleChanges(
            old_version=old.version,
            order=tuple(self.segment_names),
            kept=kept,
            evaluated=evaluated,
            timed=_timed(evaluated),
            fields=frozenset(f for _, c in evaluated for f in c.fields),
        )

    def explain(self, facts: dict[str, Any], now: datetime) -> dict[str, Any]:
        """Why the customer has their tier and segments: every rule with its evaluation."""
        tier = self.assign(facts, now).tier
        with_tier = {**facts, "tier": tier}
        return {
            "tier": {
                "assigned": tier,
                "rules": [
                    {
                        "name": name,
                        "matched": cond.evaluate(facts, now),
                        "why": _plain(cond.explain(facts, now)),
                    }
                    for name, cond in self.tiers
                ],
            },
            "segments": [
                {
                    "name": name,
                    "matched": cond.evaluate(with_tier, now),
                    "why": _plain(cond.explain(with_tier, now)),
                }
                for name, cond in self.segments
            ],
        }


@dataclass(frozen=True, slots=True)
class RuleChanges:
    """A new rule set seen from an older one with the same tier ladder: a customer assigned
    by the older one keeps their tier and the segments whose rule is unchanged, and only the
    new or changed segment rules are evaluated (a publish re-evaluates everyone)."""

    old_version: int
    order: tuple[str, ...]  # the new set's segments, in its order
    kept: frozenset[str]  # segments whose rule is the same in both sets
    evaluated: tuple[tuple[str, Condition], ...]  # the new set's new or changed segment rules
    timed: tuple[Condition, ...]  # those of them that can flip with time alone
    fields: frozenset[str]  # the facts they read

    def assign(self, facts: dict[str, Any], tier: str, segments: Sequence[str], now: datetime) -> Assignment:
        """The new set's assignment of a customer whose tier and ``segments`` the old set
        gave as of ``now`` (the facts it read unchanged since); boundaries: only the
        evaluated rules' own (``time_boundaries``)."""
        with_tier = {**facts, "tier": tier}
        held = set(segments)
        matched = {name for name, cond in self.evaluated if cond.evaluate(with_tier, now)}
        return Assignment(
            tier, tuple(n for n in self.order if n in matched or (n in self.kept and n in held)), ()
        )

    def time_boundaries(self, facts: dict[str, Any], now: datetime) -> tuple[datetime, ...]:
        """The evaluated rules' boundaries: the kept rules' are in the stored next check."""
        return _boundaries(self.timed, facts, now)


def _timed(rules: Sequence[tuple[str, Condition]]) -> tuple[Condition, ...]:
    """The conditions of ``rules`` that can flip with time alone: those reading a datetime."""
    return tuple(c for _, c in rules if c.fields & _DATETIME_FIELDS)


def _boundaries(timed: Sequence[Condition], facts: dict[str, Any], now: datetime) -> tuple[datetime, ...]:
    if not timed:  # most rule changes: asked for every customer of a publish
        return ()
    found: list[datetime] = []
    for cond in timed:
        found += cond.time_boundaries(facts, now)
    return tuple(sorted(set(found)))


def _plain(explanation: Explanation) -> dict[str, Any]:
    return explanation.to_dict()


def _source(rule: Rule) -> str:
    return json.dumps([rule.name, rule.when], sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compile_rules(raw: object, version: int) -> CompiledRules:
    ruleset = RuleSet.model_validate(raw)
    return CompiledRules(
        version=version,
        tiers=tuple(
            (r.name, compile_condition(r.when, FACT_TYPES, f"$.tiers[{i}].when", forms=FACT_FORMS))  # type: ignore[arg-type]
            for i, r in enumerate(ruleset.tiers)
        ),
        segments=tuple(
            (r.name, compile_condition(r.when, SEGMENT_FACT_TYPES, f"$.segments[{i}].when", forms=FACT_FORMS))  # type: ignore[arg-type]
            for i, r in enumerate(ruleset.segments)
        ),
        tier_sources=tuple(_source(r) for r in ruleset.tiers),
        segment_sources=tuple(_source(r) for r in ruleset.segments),
    )


def default_rules() -> dict[str, Any]:
    """The rule set published on first start: RFM-style tiers and the seeds' segments."""
    text = resources.files("services.segmenter").joinpath("default_rules.json").read_text(encoding="utf-8")
    rules: dict[str, Any] = json.loads(text)
    return rules

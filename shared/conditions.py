"""The condition language of segment rules, tiers and journey entry/exit conditions.

Marketing writes conditions as JSON; the segmenter and the messenger compile them once and
evaluate them per customer. This module is pure: no I/O and no clock (``now`` is passed in).

Shape — a node is exactly one of::

    {"all": [node, ...]}     every child matches; an empty list matches (vacuous truth)
    {"any": [node, ...]}     some child matches; an empty list never matches
    {"not": node}            the child does not match
    {"field": "<name>", "op": "<op>", "value": <json>}      a leaf

Empty groups follow ordinary logic so that De Morgan holds (``not all([]) == any([])``) and
``{"all": []}`` can stand for "everyone", e.g. the lowest tier.

Operators, by the type of the field in the caller's catalogue:

===================  ======================================================================
``eq`` ``ne``        number, string, bool; the value has the field's type
``lt`` ``lte``       number, datetime (RFC 3339 with an offset, parsed at compile time)
``gt`` ``gte``
``between``          number, datetime; ``[low, high]``, inclusive, ``low <= high``
``in``               string, number: the fact is one of a non-empty list of values;
                     string_list: *any element* of the fact is in the list
``contains``         string_list: the fact holds the given string
``exists``           every type; optional ``"value": true|false`` (default true) for
                     "has a value" / "has no value". An empty list is a value.
``within_days``      datetime: the fact is set and ``now - fact <= N days`` (N >= 0)
``older_than_days``  datetime: the fact is set and ``now - fact > N days``
===================  ======================================================================

Evaluation never raises because of facts: a missing key, ``None`` or a value of the wrong
type (a string where a number belongs, ``True`` where a number belongs — bool is not a
number, a naive datetime) makes every comparison false, ``ne`` included, and ``exists``
false for missing/``None``. Numbers in facts are ``int``, ``float`` or ``Decimal``;
datetimes are timezone-aware ``datetime`` objects; string lists are list/tuple/set/frozenset.

Errors are reported with JSON paths under the prefix the caller passes
(``$.tiers[0].when.all[1].value``); a key that is missing is reported at the path it should
have had (``….field``), as pydantic does.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import operator
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeAlias, TypeGuard, get_args

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, TypeAdapter
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

FieldType = Literal["number", "string", "bool", "datetime", "string_list"]
Catalogue = Mapping[str, FieldType]
Op = Literal[
    "eq",
    "ne",
    "lt",
    "lte",
    "gt",
    "gte",
    "between",
    "in",
    "contains",
    "exists",
    "within_days",
    "older_than_days",
]
NodeKind = Literal["all", "any", "not", "leaf"]

OPS: tuple[Op, ...] = get_args(Op)
OPS_BY_TYPE: Mapping[FieldType, frozenset[Op]] = {
    "number": frozenset({"eq", "ne", "lt", "lte", "gt", "gte", "between", "in", "exists"}),
    "string": frozenset({"eq", "ne", "in", "exists"}),
    "bool": frozenset({"eq", "ne", "exists"}),
    "datetime": frozenset({"lt", "lte", "gt", "gte", "between", "exists", "within_days", "older_than_days"}),
    "string_list": frozenset({"in", "contains", "exists"}),
}

DEFAULT_MAX_DEPTH = 12
DEFAULT_MAX_NODES = 500
# A window longer than a century is a typo, and far larger ones overflow timedelta.
MAX_DAYS = 36_525

Facts = Mapping[str, object]
Predicate: TypeAlias = Callable[[Facts, datetime], bool]

_GROUP_KEYS: tuple[Literal["all", "any", "not"], ...] = ("all", "any", "not")
_LEAF_KEYS = ("field", "op", "value")
_KNOWN_KEYS = (*_GROUP_KEYS, *_LEAF_KEYS)
_KEY_SYNONYMS = {"and": "all", "or": "any", "operator": "op", "values": "value", "name": "field"}
_NUMBER_TYPES = (int, float, Decimal)
_LIST_TYPES = (list, tuple, set, frozenset)
# What a fact of the right Python type can still raise when compared: Decimal NaN ordering
# (InvalidOperation is an ArithmeticError), naive vs aware datetimes, unhashable list items.
_EVAL_ERRORS = (TypeError, ValueError, ArithmeticError)
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")
_NAIVE_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}([Tt ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# within_days holds while now - value <= N days, so it still holds at value + N days and
# flips one datetime tick later; the same goes for older_than_days' `>`.
_TICK = timedelta(microseconds=1)
_COMPARATORS: Mapping[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}


# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True, slots=True)
class ConditionError:
    """One problem in a condition tree, at a JSON path such as ``$.when.all[1].value``."""

    path: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "message": self.message}


class InvalidConditionError(ValueError):
    """A condition tree did not validate; ``errors`` lists every problem found."""

    def __init__(self, errors: Sequence[ConditionError]) -> None:
        self.errors: tuple[ConditionError, ...] = tuple(errors)
        shown = "; ".join(f"{e.path}: {e.message}" for e in self.errors[:5])
        more = f" (and {len(self.errors) - 5} more)" if len(self.errors) > 5 else ""
        super().__init__(f"invalid condition: {shown}{more}")


# ---------------------------------------------------------------------------------------------
# Explanations


@dataclass(frozen=True, slots=True)
class Explanation:
    """Whether one node matched, with the same for every node below it.

    Leaves carry the field, the operator, the value as written in the rule (``expected``;
    ``true`` for a bare ``exists``) and the fact they were compared with (``actual``; ``None``
    when the fact is missing).
    """

    path: str
    kind: NodeKind
    matched: bool
    children: tuple[Explanation, ...] = ()
    field: str | None = None
    op: Op | None = None
    expected: object = None
    actual: object = None

    def leaves(self) -> Iterator[Explanation]:
        """Every leaf below (or at) this node, in rule order."""
        if self.kind == "leaf":
            yield self
        for child in self.children:
            yield from child.leaves()

    def reasons(self) -> list[Explanation]:
        """The leaves that decided this node's outcome — "why it matched / did not match".

        A matching ``all`` is explained by all of its children and a failing one by the
        failing children; a matching ``any`` by the matching children and a failing one by all
        of them; ``not`` by its child (whose status is then the opposite of this node's).
        """
        if self.kind == "leaf":
            return [self]
        if self.kind == "not":
            return self.children[0].reasons()
        decisive = self.children
        if (self.kind == "all") != self.matched:
            decisive = tuple(c for c in self.children if c.matched == self.matched)
        return [leaf for child in decisive for leaf in child.reasons()]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready rendering (datetimes as RFC 3339, Decimals as strings)."""
        out: dict[str, Any] = {"path": self.path, "kind": self.kind, "matched": self.matched}
        if self.kind == "leaf":
            out |= {
                "field": self.field,
                "op": self.op,
                "expected": _jsonable(self.expected),
                "actual": _jsonable(self.actual),
            }
        else:
            out["children"] = [c.to_dict() for c in self.children]
        return out


def _jsonable(value: object) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        items = [_jsonable(v) for v in value]
        try:
            return sorted(items)
        except TypeError:
            return items
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)


# ---------------------------------------------------------------------------------------------
# The compiled tree: every node keeps its JSON path and a closure that evaluates it.


@dataclass(frozen=True, slots=True, eq=False)
class _Leaf:
    path: str
    field: str
    op: Op
    expected: object
    test: Predicate
    window: timedelta | None = None  # within_days / older_than_days only


@dataclass(frozen=True, slots=True, eq=False)
class _Group:
    path: str
    kind: Literal["all", "any"]
    children: tuple[_Node, ...]
    test: Predicate


@dataclass(frozen=True, slots=True, eq=False)
class _Not:
    path: str
    child: _Node
    test: Predicate


_Node: TypeAlias = _Leaf | _Group | _Not


class Condition:
    """A validated, compiled condition. Build it with :func:`compile_condition`."""

    __slots__ = ("_root", "_test", "_windows", "fields", "path")

    def __init__(self, root: _Node, path: str) -> None:
        self._root = root
        self._test = root.test
        self.path = path
        leaves = list(_iter_leaves(root))
        self.fields: frozenset[str] = frozenset(leaf.field for leaf in leaves)
        self._windows: tuple[tuple[str, timedelta], ...] = tuple(
            (leaf.field, leaf.window) for leaf in leaves if leaf.window is not None
        )

    def __repr__(self) -> str:
        return f"Condition(path={self.path!r}, fields={sorted(self.fields)!r})"

    def evaluate(self, facts: Facts, now: datetime) -> bool:
        """Whether ``facts`` match. ``now`` must be timezone-aware; facts are never trusted."""
        if now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        return self._test(facts, now)

    def explain(self, facts: Facts, now: datetime) -> Explanation:
        """The status of every node (no short-circuit), for "why did this customer match"."""
        if now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        return _explain(self._root, facts, now)

    def time_boundaries(self, facts: Facts, now: datetime) -> list[datetime]:
        """The future instants at which a ``within_days``/``older_than_days`` leaf flips.

        For each such leaf whose fact is an aware datetime, the first instant after ``now`` at
        which the leaf evaluates differently: ``fact + N days + 1 µs`` (the comparisons are
        ``<=`` and ``>``, so at exactly ``fact + N days`` the old result still holds; a caller
        re-evaluating at the returned instant sees the flip). Sorted, without duplicates.
        Every such leaf counts, whether or not the rest of the tree lets it change the result.
        """
        if now.utcoffset() is None:
            raise ValueError("now must be a timezone-aware datetime")
        found: set[datetime] = set()
        for name, window in self._windows:
            value = facts.get(name)
            if not isinstance(value, datetime) or value.utcoffset() is None:
                continue
            try:
                flip = value + window + _TICK
            except OverflowError:
                continue  # beyond year 9999: never
            if flip > now:
                found.add(flip)
        return sorted(found)


def _iter_leaves(node: _Node) -> Iterator[_Leaf]:
    if isinstance(node, _Leaf):
        yield node
    elif isinstance(node, _Not):
        yield from _iter_leaves(node.child)
    else:
        for child in node.children:
            yield from _iter_leaves(child)


def _explain(node: _Node, facts: Facts, now: datetime) -> Explanation:
    if isinstance(node, _Leaf):
        return Explanation(
            path=node.path,
            kind="leaf",
            matched=node.test(facts, now),
            field=node.field,
            op=node.op,
            expected=node.expected,
            actual=facts.get(node.field),
        )
    if isinstance(node, _Not):
        child = _explain(node.child, facts, now)
        return Explanation(path=node.path, kind="not", matched=not child.matched, children=(child,))
    children = tuple(_explain(c, facts, now) for c in node.children)
    statuses = [c.matched for c in children]
    matched = all(statuses) if node.kind == "all" else any(statuses)
    return Explanation(path=node.path, kind=node.kind, matched=matched, children=children)


# ---------------------------------------------------------------------------------------------
# Predicates. Each leaf is one closure that reads its fact, checks the fact's Python type and
# compares; nothing is parsed at evaluation time.


# Plain loops rather than all()/any() over a generator: they are about twice as fast here.
def _all_of(tests: tuple[Predicate, ...]) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        for t in tests:  # noqa: SIM110
            if not t(facts, now):
                return False
        return True

    return test


def _any_of(tests: tuple[Predicate, ...]) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        for t in tests:  # noqa: SIM110
            if t(facts, now):
                return True
        return False

    return test


def _negation(inner: Predicate) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        return not inner(facts, now)

    return test


def _is_number(value: object) -> TypeGuard[int | float | Decimal]:
    return isinstance(value, _NUMBER_TYPES) and value.__class__ is not bool


def _compare(name: str, ftype: FieldType, compare: Callable[[Any, Any], Any], operand: object) -> Predicate:
    """eq/ne/lt/lte/gt/gte on number, string, bool or datetime facts."""
    if ftype == "number":

        def test(facts: Facts, now: datetime) -> bool:
            value = facts.get(name)
            if value.__class__ is bool or not isinstance(value, _NUMBER_TYPES):
                return False
            try:
                return bool(compare(value, operand))
            except _EVAL_ERRORS:
                return False

        return test
    kind: type | tuple[type, ...] = {"string": str, "bool": bool, "datetime": datetime}[ftype]

    def test_typed(facts: Facts, now: datetime) -> bool:
        value = facts.get(name)
        if not isinstance(value, kind):
            return False
        try:
            return bool(compare(value, operand))
        except _EVAL_ERRORS:
            return False

    return test_typed


def _between(name: str, ftype: FieldType, low: Any, high: Any) -> Predicate:
    is_kind: Callable[[object], bool] = _is_number if ftype == "number" else _is_datetime

    def test(facts: Facts, now: datetime) -> bool:
        value: Any = facts.get(name)
        if not is_kind(value):
            return False
        try:
            return bool(low <= value <= high)
        except _EVAL_ERRORS:
            return False

    return test


def _is_datetime(value: object) -> bool:
    return isinstance(value, datetime)


def _one_of(name: str, ftype: FieldType, options: frozenset[object]) -> Predicate:
    if ftype == "string_list":

        def test_list(facts: Facts, now: datetime) -> bool:
            value = facts.get(name)
            if not isinstance(value, _LIST_TYPES):
                return False
            try:
                return not options.isdisjoint(value)
            except _EVAL_ERRORS:
                return False

        return test_list
    is_kind: Callable[[object], bool] = _is_number if ftype == "number" else _is_string

    def test(facts: Facts, now: datetime) -> bool:
        value = facts.get(name)
        if not is_kind(value):
            return False
        try:
            return value in options
        except _EVAL_ERRORS:
            return False

    return test


def _is_string(value: object) -> bool:
    return isinstance(value, str)


def _contains(name: str, item: str) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        value = facts.get(name)
        if not isinstance(value, _LIST_TYPES):
            return False
        try:
            return item in value
        except _EVAL_ERRORS:
            return False

    return test


def _exists(name: str, expect: bool) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        return (facts.get(name) is not None) is expect

    return test


def _within(name: str, window: timedelta) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        value = facts.get(name)
        if not isinstance(value, datetime):
            return False
        try:
            return now - value <= window
        except _EVAL_ERRORS:
            return False

    return test


def _older_than(name: str, window: timedelta) -> Predicate:
    def test(facts: Facts, now: datetime) -> bool:
        value = facts.get(name)
        if not isinstance(value, datetime):
            return False
        try:
            return now - value > window
        except _EVAL_ERRORS:
            return False

    return test


# ---------------------------------------------------------------------------------------------
# Validation and compilation happen in one walk, so the two can never disagree.


def key_path(path: str, key: object) -> str:
    """``path`` then ``key``: ``.key``, or ``['a key']`` when it is not an identifier."""
    if isinstance(key, str) and _IDENTIFIER.fullmatch(key):
        return f"{path}.{key}"
    text = str(key).replace("\\", "\\\\").replace("'", "\\'")
    return f"{path}['{text}']"


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, _NUMBER_TYPES):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _shown(value: object) -> str:
    """A value in an error message, at most 40 characters. A list or an object nested deeper
    than its first level is shown as ``[…]`` / ``{…}``: a value nested a thousand levels
    deep failed json.dumps with a RecursionError (a 500) while its error was being written."""
    text = json.dumps(_shallow(value), default=str, ensure_ascii=False)
    text = text.replace('"[…]"', "[…]").replace('"{…}"', "{…}")
    return text if len(text) <= 40 else text[:37] + "..."


def _shallow(value: object, depth: int = 0) -> object:
    if isinstance(value, list | tuple):
        return "[…]" if depth else [_shallow(v, 1) for v in value[:8]]
    if isinstance(value, Mapping):
        return "{…}" if depth else {str(k): _shallow(v, 1) for k, v in list(value.items())[:8]}
    return value


def number_text(value: float | Decimal) -> str:
    """A number as a marketer wrote it: 2000000 (not 2e+06 or 2000000.0), 0.35, 1.5."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value == value.to_integral_value() else str(value)
    return repr(value) if isinstance(value, float) else str(value)


def unknown_hint(word: str, choices: Sequence[str], noun: str) -> str:
    """What to say after "unknown <noun> 'word'": the close names, else all of them."""
    names = sorted(choices)
    return _suggest(word, names) or f"; the {noun} are {', '.join(names)}"


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    synonym = _KEY_SYNONYMS.get(word)
    if synonym is not None and synonym in choices and synonym not in close:
        close.insert(0, synonym)
    if not close:
        return ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?"


@dataclass(frozen=True, slots=True)
class Choices:
    """The values a string field can hold (a channel, a lifecycle stage, a tier)."""

    values: frozenset[str]


@dataclass(frozen=True, slots=True)
class Range:
    """The closed interval a number field lies in (P(alive) in [0, 1])."""

    low: float
    high: float


# What the values of some fields can be, beyond their type. Checked by ``validate`` (when a rule
# is written), not by ``compile_condition`` (when a stored one is loaded): a rule stored before
# a domain was declared must still load.
Domains = Mapping[str, Choices | Range]

# The one spelling of some string fields' values (a locale in BCP 47's case, a language by its
# current code), into which an operand is read, as the facts are: `language eq "iw"` holds for
# a Hebrew speaker whose facts say "he", and a rule stored before the facts took that spelling
# ("tl" before Tagalog's facts said "fil") still matches. Read when a rule is written and when a
# stored one is loaded; a form raising ValueError refuses the value when a rule is written (its
# message says why) and leaves it as written when a stored one is loaded.
Forms = Mapping[str, Callable[[str], str]]


_TYPE_WORDS: Mapping[FieldType, str] = {
    "number": "a number",
    "string": "a string",
    "bool": "true or false",
    "datetime": "an RFC 3339 date-time with an offset, e.g. 2024-05-01T00:00:00Z",
    "string_list": "a string",
}


def _range_verdict(op: str, operands: Sequence[float | Decimal], domain: Range) -> tuple[bool, bool]:
    """Whether ``field op operands`` holds for no value in ``domain``, and for every value."""
    low, high = domain.low, domain.high
    v = operands[0]
    match op:
        case "eq":
            return not low <= v <= high, low == v == high
        case "ne":
            return low == v == high, not low <= v <= high
        case "lt":
            return v <= low, v > high
        case "lte":
            return v < low, v >= high
        case "gt":
            return v >= high, v < low
        case "gte":
            return v > high, v <= low
        case "between":
            return operands[1] < low or v > high, v <= low and operands[1] >= high
    raise ValueError(f"no range verdict for {op!r}")


class _Compiler:
    def __init__(
        self,
        catalogue: Catalogue,
        root_path: str,
        max_depth: int,
        max_nodes: int,
        domains: Domains | None = None,
        writing: bool = False,
        forms: Forms | None = None,
    ) -> None:
        self.catalogue = catalogue
        self.domains: Domains = domains or {}
        self.forms: Forms = forms or {}
        # A rule being written (``validate``) is judged further than a stored one being loaded
        # (``compile_condition``), which must still load after a check is added.
        self.writing = writing
        self.root_path = root_path
        self.max_depth = max_depth
        self.max_nodes = max_nodes
        self.errors: list[ConditionError] = []
        self.nodes = 0
        self.too_many = False

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConditionError(path, message))

    def node(self, raw: object, path: str, depth: int) -> _Node | None:
        if depth > self.max_depth:
            self.error(path, f"conditions are nested deeper than {self.max_depth} levels")
            return None
        self.nodes += 1
        if self.nodes > self.max_nodes:
            if not self.too_many:
                self.too_many = True
                self.error(self.root_path, f"a rule may hold at most {self.max_nodes} conditions")
            return None
        if not isinstance(raw, Mapping):
            self.error(path, f"expected a condition object, got {_json_type(raw)}")
            return None
        if not raw:
            self.error(path, "empty condition; expected all, any, not or field/op/value")
            return None
        kind = next((k for k in _GROUP_KEYS if k in raw), None)
        if kind is not None:
            for key in raw:
                if key != kind:
                    self.error(
                        key_path(path, key),
                        f"unexpected key {key!r} beside {kind!r}; a condition holds exactly one of "
                        "all, any, not or field/op/value",
                    )
            if kind == "not":
                return self.negation(raw["not"], key_path(path, "not"), path, depth)
            group_kind: Literal["all", "any"] = "all" if kind == "all" else "any"
            return self.group(group_kind, raw[kind], key_path(path, kind), path, depth)
        unknown = [k for k in raw if k not in _LEAF_KEYS]
        for key in unknown:
            self.error(key_path(path, key), f"unknown key {key!r}" + _suggest(str(key), _KNOWN_KEYS))
        if len(unknown) == len(raw):
            return None  # nothing here looks like a condition; missing-key errors would be noise
        return self.leaf(raw, path)

    def negation(self, raw: object, path: str, node_path: str, depth: int) -> _Node | None:
        child = self.node(raw, path, depth + 1)
        if child is None:
            return None
        return _Not(path=node_path, child=child, test=_negation(child.test))

    def group(
        self, kind: Literal["all", "any"], raw: object, path: str, node_path: str, depth: int
    ) -> _Node | None:
        if not isinstance(raw, list | tuple):
            self.error(path, f"expected an array of conditions, got {_json_type(raw)}")
            return None
        children: list[_Node | None] = []
        for index, item in enumerate(raw):
            if self.too_many:
                break
            children.append(self.node(item, f"{path}[{index}]", depth + 1))
        complete = [c for c in children if c is not None]
        if len(complete) != len(raw):
            return None
        tests = tuple(c.test for c in complete)
        test = _all_of(tests) if kind == "all" else _any_of(tests)
        return _Group(path=node_path, kind=kind, children=tuple(complete), test=test)

    def leaf(self, raw: Mapping[Any, object], path: str) -> _Node | None:
        before = len(self.errors)
        name = self.field(raw, path)
        op = self.operator(raw, path)
        ftype = self.catalogue.get(name) if name is not None else None
        if op is None or ftype is None or name is None:
            return None
        allowed_ops = OPS_BY_TYPE.get(ftype)
        if allowed_ops is None:
            self.error(key_path(path, "field"), f"field {name!r} has the unsupported type {ftype!r}")
            return None
        if op not in allowed_ops:
            allowed = ", ".join(o for o in OPS if o in allowed_ops)
            self.error(
                key_path(path, "op"),
                f"operator {op!r} does not apply to {ftype} field {name!r}; use one of {allowed}",
            )
            return None
        value_path = key_path(path, "value")
        if op == "exists":
            expect = raw.get("value", True)
            if not isinstance(expect, bool):
                self.error(value_path, f"exists takes true or false, got {_json_type(expect)}")
                return None
            return _Leaf(path, name, op, expect, _exists(name, expect))
        if "value" not in raw:
            self.error(value_path, f"missing key 'value' (operator {op!r} needs a value)")
            return None
        value = raw["value"]
        test, window = self.predicate(name, ftype, op, value, value_path)
        if test is None or len(self.errors) != before:
            return None
        return _Leaf(path, name, op, copy.deepcopy(value), test, window)

    def field(self, raw: Mapping[Any, object], path: str) -> str | None:
        where = key_path(path, "field")
        if "field" not in raw:
            self.error(where, "missing key 'field'")
            return None
        name = raw["field"]
        if not isinstance(name, str):
            self.error(where, f"expected a field name (string), got {_json_type(name)}")
            return None
        if name not in self.catalogue:
            self.error(where, f"unknown field {name!r}{unknown_hint(name, list(self.catalogue), 'fields')}")
            return None
        return name

    def operator(self, raw: Mapping[Any, object], path: str) -> Op | None:
        where = key_path(path, "op")
        if "op" not in raw:
            self.error(where, "missing key 'op'")
            return None
        op = raw["op"]
        if not isinstance(op, str):
            self.error(where, f"expected an operator name (string), got {_json_type(op)}")
            return None
        for known in OPS:
            if op == known:
                return known
        self.error(
            where, f"unknown operator {op!r}" + (_suggest(op, OPS) or f"; use one of {', '.join(OPS)}")
        )
        return None

    def predicate(
        self, name: str, ftype: FieldType, op: Op, value: object, path: str
    ) -> tuple[Predicate | None, timedelta | None]:
        if op in ("within_days", "older_than_days"):
            days = self.days(value, path)
            if days is None:
                return None, None
            if op == "within_days" and days == 0 and self.writing:
                self.error(
                    path,
                    "within_days 0 is a window of no time: it holds only for a fact dated in the "
                    "future; the last 24 hours is within_days 1",
                )
                return None, None
            window = timedelta(days=days)
            return (_within(name, window) if op == "within_days" else _older_than(name, window)), window
        if op == "contains":
            if not isinstance(value, str):
                self.error(path, f"contains takes a string, got {_json_type(value)}")
                return None, None
            return _contains(name, value), None
        if op == "in":
            if not isinstance(value, list | tuple) or not value:
                self.error(path, f"in takes a non-empty array of {_TYPE_WORDS[ftype][2:]}s")
                return None, None
            before = len(self.errors)
            items = [self.scalar(name, ftype, v, f"{path}[{i}]") for i, v in enumerate(value)]
            if len(self.errors) == before:
                for i, item in enumerate(items):
                    self.in_range(name, f"{path}[{i}]", "eq", (item,), item=True)
            if len(self.errors) != before:
                return None, None
            return _one_of(name, ftype, frozenset(items)), None
        if op == "between":
            if not isinstance(value, list | tuple) or len(value) != 2:
                self.error(path, "between takes an array [low, high]")
                return None, None
            before = len(self.errors)
            low = self.scalar(name, ftype, value[0], f"{path}[0]")
            high = self.scalar(name, ftype, value[1], f"{path}[1]")
            if len(self.errors) != before:
                return None, None
            if low > high:
                self.error(
                    path, f"low bound {_shown(value[0])} is greater than high bound {_shown(value[1])}"
                )
                return None, None
            self.in_range(name, path, "between", (low, high))
            return _between(name, ftype, low, high), None
        operand = self.scalar(name, ftype, value, path)
        self.in_range(name, path, op, (operand,))
        compare = {"eq": operator.eq, "ne": operator.ne, **_COMPARATORS}[op]
        return _compare(name, ftype, compare, operand), None

    def scalar(self, name: str, ftype: FieldType, value: object, path: str) -> Any:
        """The operand for a number/string/bool/datetime comparison, or an error."""
        ok: bool
        if ftype == "number":
            ok = _is_number(value) and _is_finite(value)
        elif ftype in ("string", "string_list"):
            ok = isinstance(value, str)
        elif ftype == "bool":
            ok = isinstance(value, bool)
        else:
            return self.instant(name, value, path)
        if not ok:
            got = _json_type(value)
            if ftype == "number" and got == "number" and isinstance(value, int):
                got = f"{value}, an integer beyond 64 bits (JSON loses it; write it as a decimal, e.g. 1e20)"
            elif ftype == "number" and got == "number":
                got = "a non-finite number"
            elif value is None:
                got = "null (use the exists operator for missing values)"
            else:
                got = f"{'an' if got[0] in 'aeiou' else 'a'} {got} ({_shown(value)})"
            self.error(
                path, f"{name!r} is a {ftype} field, so the value must be {_TYPE_WORDS[ftype]}, not {got}"
            )
            return value
        if isinstance(value, str) and (form := self.forms.get(name)) is not None:
            try:
                value = form(value)
            except ValueError as exc:
                if self.writing:
                    self.error(path, f"{name} {_shown(value)}: {exc}")
        if (
            isinstance(domain := self.domains.get(name), Choices)
            and isinstance(value, str)
            and value not in domain.values
        ):
            # A value no customer has: the comparison would never hold (``eq "emial"``) or
            # hold for everyone (``ne "emial"``), either way not what was meant.
            self.error(
                path,
                f"no customer has {name} {_shown(value)}"
                + unknown_hint(value, list(domain.values), f"values of {name!r}"),
            )
        return value

    def in_range(
        self,
        name: str,
        path: str,
        op: str,
        operands: Sequence[object],
        item: bool = False,
    ) -> None:
        """A comparison of a field whose domain is a range, refused when it holds for no customer
        (``p_alive gt 1``), or for every customer by a bound outside the range, a slip of unit
        (``p_alive lt 30``, P(alive) read as a percentage). What holds for everyone within the
        range (``p_alive gte 0``, "has a P(alive)") and what selects part of it with a bound
        beyond (``p_alive between [0.5, 1.5]``) mean what they say, and pass. ``item``: one value
        of an ``in`` list, checked as ``eq``. Fields with no range, and operands that are not
        numbers (already reported), are left alone."""
        domain = self.domains.get(name)
        if not isinstance(domain, Range):
            return
        numbers = [v for v in operands if _is_number(v)]
        if len(numbers) != len(operands):
            return
        never, everyone = _range_verdict(op, numbers, domain)
        outside = [number_text(v) for v in numbers if not domain.low <= v <= domain.high]
        if not never and not (everyone and outside):
            return
        if math.isinf(domain.high):
            where = f"{name!r} is never below {number_text(domain.low)}"
        else:
            where = f"{name!r} lies between {number_text(domain.low)} and {number_text(domain.high)}"
        result = "would hold for no customer" if never else "would be the same for every customer"
        if item:
            subject, result = "this value", "would match no customer"
        else:
            subject = "the comparison"
        if outside:
            verb = "is" if len(outside) == 1 else "are"
            self.error(path, f"{where}; {' and '.join(outside)} {verb} outside that, so {subject} {result}")
        else:
            shown = ", ".join(number_text(v) for v in numbers)
            asked = f"[{shown}]" if op == "between" else shown
            self.error(path, f"{where}, so {name} {op} {asked} {result}")

    def instant(self, name: str, value: object, path: str) -> datetime | None:
        if isinstance(value, str) and _NAIVE_DATETIME.fullmatch(value):
            self.error(path, f"date-time {_shown(value)} has no UTC offset; add Z or e.g. +03:00")
            return None
        if not isinstance(value, str) or not _RFC3339.fullmatch(value):
            self.error(
                path,
                f"{name!r} is a datetime field, so the value must be {_TYPE_WORDS['datetime']}, "
                f"not {_shown(value)}",
            )
            return None
        try:
            # fromisoformat keeps microseconds only; RFC 3339 allows up to nanoseconds.
            text = re.sub(r"(\.\d{6})\d+", r"\1", value)
            return datetime.fromisoformat(text.replace("z", "Z"))
        except ValueError as exc:
            self.error(path, f"not a valid date-time: {exc}")
            return None

    def days(self, value: object, path: str) -> float | None:
        if not _is_number(value) or not _is_finite(value):
            self.error(path, f"expected a number of days, got {_json_type(value)}")
            return None
        days = float(value)
        if days < 0 or days > MAX_DAYS:
            self.error(path, f"the number of days must be between 0 and {MAX_DAYS}, not {_shown(value)}")
            return None
        return days


INT64 = 2**63 - 1


def _is_finite(value: object) -> bool:
    """Finite, and (for integers) within 64 bits: rules are stored as JSON, whose integers
    beyond that range do not survive a round trip in most implementations."""
    if isinstance(value, float | Decimal):
        return bool(value.is_finite()) if isinstance(value, Decimal) else math.isfinite(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return -INT64 - 1 <= value <= INT64
    return True


# ---------------------------------------------------------------------------------------------
# Public API


def validate(
    tree: object,
    catalogue: Catalogue,
    path: str = "$",
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_nodes: int = DEFAULT_MAX_NODES,
    domains: Domains | None = None,
    forms: Forms | None = None,
) -> list[ConditionError]:
    """Every problem in ``tree`` against ``catalogue``, with JSON paths under ``path``.

    An empty list means :func:`compile_condition` will succeed. The root is at depth 1; a
    node deeper than ``max_depth`` is reported once (its subtree is not inspected). Past
    ``max_nodes`` nodes the walk stops with one error at ``path``. ``domains``: values that no
    customer can have are errors too (see ``Domains``); ``forms``: values in no spelling of
    their field too (see ``Forms``).
    """
    compiler = _Compiler(catalogue, path, max_depth, max_nodes, domains, writing=True, forms=forms)
    compiler.node(tree, path, 1)
    return compiler.errors


def compile_condition(
    tree: object,
    catalogue: Catalogue,
    path: str = "$",
    max_depth: int = DEFAULT_MAX_DEPTH,
    max_nodes: int = DEFAULT_MAX_NODES,
    forms: Forms | None = None,
) -> Condition:
    """Validate and compile ``tree``; raise :class:`InvalidConditionError` listing every error.

    ``path`` prefixes both error paths and the paths in explanations; ``forms``: the spelling
    operands are read in (see ``Forms``), as ``validate`` was given.
    """
    compiler = _Compiler(catalogue, path, max_depth, max_nodes, forms=forms)
    root = compiler.node(tree, path, 1)
    if compiler.errors or root is None:
        raise InvalidConditionError(compiler.errors or [ConditionError(path, "invalid condition")])
    return Condition(root, path)


def fields_used(tree: object) -> set[str]:
    """The field names a tree mentions. Lenient: works on invalid trees too."""
    found: set[str] = set()
    stack: list[object] = [tree]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if not isinstance(node, Mapping) or id(node) in seen:
            continue
        seen.add(id(node))
        name = node.get("field")
        if isinstance(name, str):
            found.add(name)
        for key in ("all", "any"):
            children = node.get(key)
            if isinstance(children, list | tuple):
                stack.extend(children)
        if "not" in node:
            stack.append(node["not"])
    return found


# ---------------------------------------------------------------------------------------------
# JSON schema for OpenAPI. These models describe the shape only; they are never used to
# validate, because what a rule may say depends on the caller's catalogue (see validate()).

_SCHEMA_CONFIG = ConfigDict(extra="forbid")


class ConditionAll(BaseModel):
    """Matches when every child matches (an empty list matches)."""

    model_config = _SCHEMA_CONFIG
    all: list[ConditionNode]


class ConditionAny(BaseModel):
    """Matches when at least one child matches (an empty list never matches)."""

    model_config = _SCHEMA_CONFIG
    any: list[ConditionNode]


class ConditionNot(BaseModel):
    """Matches when the child does not match."""

    model_config = _SCHEMA_CONFIG
    not_: ConditionNode = Field(alias="not")


class ConditionLeaf(BaseModel):
    """Compares one profile field; which operators and values apply depends on its type."""

    model_config = _SCHEMA_CONFIG
    field: str = Field(description="A field of the catalogue, e.g. 'total_spend'.")
    op: Op
    value: Any = Field(
        default=None,
        description=(
            "eq/ne/lt/lte/gt/gte: a number, string, boolean or RFC 3339 date-time; between: "
            "[low, high]; in: a non-empty array; contains: a string; exists: optional boolean "
            "(default true); within_days/older_than_days: days, >= 0."
        ),
    )


ConditionNode = ConditionAll | ConditionAny | ConditionNot | ConditionLeaf
for _model in (ConditionAll, ConditionAny, ConditionNot):
    _model.model_rebuild()
_NODE_SCHEMA = TypeAdapter[Any](ConditionNode)


@dataclass(frozen=True)
class _ConditionTreeSchema:
    def __get_pydantic_json_schema__(
        self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(_NODE_SCHEMA.core_schema)


ConditionTree = Annotated[dict[str, Any], _ConditionTreeSchema()]
"""A condition tree in API models: any JSON object at parse time, documented with its shape."""

__all__ = [
    "DEFAULT_MAX_DEPTH",
    "DEFAULT_MAX_NODES",
    "MAX_DAYS",
    "OPS",
    "OPS_BY_TYPE",
    "Catalogue",
    "Condition",
    "ConditionAll",
    "ConditionAny",
    "ConditionError",
    "ConditionLeaf",
    "ConditionNode",
    "ConditionNot",
    "ConditionTree",
    "Explanation",
    "Facts",
    "FieldType",
    "Forms",
    "InvalidConditionError",
    "Op",
    "compile_condition",
    "fields_used",
    "validate",
]

"""Just enough of a PromQL reader to take an alert's expression apart at its top-level binary
operator, the way Prometheus' parser would, and so find the *signal* of an alert: what its
threshold is compared against.

An alert's full expression rightly returns nothing in a healthy system. Its signal must return
series all the same, or the alert is blind: a typo in a metric or label name, a label that no
process exports, a selector that matches nothing. ``signals("x > 0.1 and y >= 10")`` is
``["x", "y"]``: both operands of a top-level ``and`` must have series for it to ever fire.

The tokenizer knows PromQL's strings (three quotings, with escapes), comments, the brackets of
calls, selectors and ranges, and which ``+``/``-`` are signs; the split honours Prometheus'
precedence (``or`` < ``and``/``unless`` < comparisons < ``+ -`` < ``* / % atan2`` < ``^``), left
associativity (``^`` is right-associative) and the modifiers that may follow an operator
(``bool``, ``on(...)``/``ignoring(...)``, ``group_left(...)``/``group_right(...)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["BinaryExpr", "PromQLSyntaxError", "signals", "split", "tokens"]

COMPARISONS = frozenset({"==", "!=", ">", "<", ">=", "<="})
SET_OPERATORS = frozenset({"and", "or", "unless"})
PRECEDENCE = {
    "or": 1,
    "and": 2,
    "unless": 2,
    **dict.fromkeys(COMPARISONS, 3),
    "+": 4,
    "-": 4,
    "*": 5,
    "/": 5,
    "%": 5,
    "atan2": 5,
    "^": 6,
}
WORD_OPERATORS = frozenset({"and", "or", "unless", "atan2"})
MODIFIERS = frozenset({"on", "ignoring", "group_left", "group_right"})
OPENING = {"(": ")", "{": "}", "[": "]"}
CLOSING = {v: k for k, v in OPENING.items()}

_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`[^`]*`)
    | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![A-Za-z_0-9:]))
    | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
    | (?P<word>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<operator>==|!=|>=|<=|=~|!~|[-+*/%^<>=])
    | (?P<bracket>[(){}\[\]])
    | (?P<punct>[,@])
    """,
    re.VERBOSE,
)


class PromQLSyntaxError(ValueError):
    """Text this reader cannot take apart (Prometheus would most likely refuse it too)."""


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # string, number, duration, word, operator, bracket, punct
    text: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class BinaryExpr:
    """The root of an expression: ``lhs op modifiers rhs`` (each as written, trimmed)."""

    lhs: str
    op: str
    modifiers: str  # "bool", "on (a) group_left", ... or ""
    rhs: str

    @property
    def is_filter(self) -> bool:
        """A comparison that drops series (no ``bool``): what an alert's threshold is."""
        return self.op in COMPARISONS and not self.modifiers.startswith("bool")


def tokens(expr: str) -> list[Token]:
    """Every token but blanks and comments, with its place in ``expr``."""
    found: list[Token] = []
    position = 0
    while position < len(expr):
        match = _TOKEN.match(expr, position)
        if match is None:
            raise PromQLSyntaxError(f"unexpected {expr[position]!r} at {position}: {expr!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            found.append(Token(kind, match.group(), match.start(), match.end()))
        position = match.end()
    return found


def _ends_operand(token: Token | None) -> bool:
    """Whether an operand can end with ``token`` (so a following ``-`` or ``and`` is binary)."""
    if token is None:
        return False
    if token.kind in ("string", "number", "duration"):
        return True
    if token.kind == "bracket":
        return token.text in CLOSING
    return token.kind == "word" and token.text not in WORD_OPERATORS | MODIFIERS | {"bool", "offset"}


def _is_operator(token: Token) -> bool:
    if token.kind == "word":
        return token.text in WORD_OPERATORS
    return token.kind == "operator" and token.text in PRECEDENCE


def _top_level_operators(toks: list[Token], expr: str) -> list[int]:
    """Indexes of the binary operators outside every bracket."""
    depth: list[str] = []
    found: list[int] = []
    previous: Token | None = None
    for i, tok in enumerate(toks):
        if tok.kind == "bracket":
            if tok.text in OPENING:
                depth.append(tok.text)
            elif not depth or depth.pop() != CLOSING[tok.text]:
                raise PromQLSyntaxError(f"unbalanced {tok.text!r} at {tok.start}: {expr!r}")
        elif not depth and _ends_operand(previous) and _is_operator(tok):
            found.append(i)
        previous = tok
    if depth:
        raise PromQLSyntaxError(f"unclosed {depth[-1]!r}: {expr!r}")
    return found


def _strip_parens(expr: str) -> str:
    """``(x)`` → ``x``, as often as the outer pair encloses everything."""
    expr = expr.strip()
    while expr.startswith("("):
        toks = tokens(expr)
        depth = 0
        for i, tok in enumerate(toks):
            if tok.kind == "bracket":
                depth += 1 if tok.text in OPENING else -1
            if depth == 0:
                if i != len(toks) - 1:
                    return expr  # "(a) + (b)": the first pair closes early
                break
        expr = expr[1:-1].strip()
    return expr


def _modifiers_end(toks: list[Token], i: int, expr: str) -> int:
    """The index of the first token of the right operand, after the operator at ``i``."""
    j = i + 1
    if j < len(toks) and toks[j].text == "bool":
        j += 1
    while j < len(toks) and toks[j].kind == "word" and toks[j].text in MODIFIERS:
        j += 1
        if j < len(toks) and toks[j].text == "(":  # the label list, optional after group_x
            while j < len(toks) and toks[j].text != ")":
                j += 1
            if j == len(toks):
                raise PromQLSyntaxError(f"unclosed label list: {expr!r}")
            j += 1
    if j == len(toks):
        raise PromQLSyntaxError(f"{toks[i].text!r} has no right operand: {expr!r}")
    return j


def split(expr: str) -> BinaryExpr | None:
    """The root binary operation of ``expr``, or None when its root is not one (a selector, a
    call, an aggregation, a literal)."""
    expr = _strip_parens(expr)
    toks = tokens(expr)
    operators = _top_level_operators(toks, expr)
    if not operators:
        return None
    lowest = min(PRECEDENCE[toks[i].text] for i in operators)
    candidates = [i for i in operators if PRECEDENCE[toks[i].text] == lowest]
    # The root is the operator applied last: the rightmost of the loosest binding
    # (left-associative), except for ^ which groups from the right.
    root = candidates[0] if lowest == PRECEDENCE["^"] else candidates[-1]
    first_of_rhs = _modifiers_end(toks, root, expr)
    return BinaryExpr(
        lhs=expr[: toks[root].start].strip(),
        op=toks[root].text,
        modifiers=expr[toks[root].end : toks[first_of_rhs].start].strip(),
        rhs=expr[toks[first_of_rhs].start :].strip(),
    )


def _is_literal(expr: str) -> bool:
    toks = [t for t in tokens(_strip_parens(expr)) if t.text not in "+-"]
    return len(toks) == 1 and (toks[0].kind == "number" or toks[0].text.lower() in ("inf", "nan"))


def signals(expr: str) -> list[str]:
    """The expressions that must return series for ``expr`` to be able to return any.

    - ``a and b``: the signals of both; ``a unless b``: of ``a`` (``b`` only takes away);
      ``a or b``: one expression, the signals of each side joined by ``or``.
    - A filtering comparison with a literal on one side (the threshold): the other side.
      Between two vectors: both sides.
    - Anything else (arithmetic, ``bool`` comparisons, a selector or call): ``expr`` itself.
    """
    root = split(expr)
    if root is None:
        return [_strip_parens(expr)]
    if root.op == "and":
        return signals(root.lhs) + signals(root.rhs)
    if root.op == "unless":
        return signals(root.lhs)
    if root.op == "or":
        return [" or ".join(f"({s})" for side in (root.lhs, root.rhs) for s in signals(side))]
    if not root.is_filter:
        return [_strip_parens(expr)]
    if _is_literal(root.rhs):
        return signals(root.lhs)
    if _is_literal(root.lhs):
        return signals(root.rhs)
    return signals(root.lhs) + signals(root.rhs)

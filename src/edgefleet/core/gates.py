"""Gate expressions over fleet telemetry, e.g. ``accuracy_drop > 5% OR latency_increase > 20%``.

A gate describes when a candidate model is *worse*: a true expression trips the gate (the rollout pauses
or aborts); a false one lets the wave pass. Logic is three-valued (Kleene): a metric without data is
*unknown*, ``TRUE OR unknown`` is TRUE (a clear failure acts at once), ``FALSE OR unknown`` is unknown,
and an unknown gate cannot pass yet; a metric with data but no evidence either way is *inconclusive* (same
rules; unknown wins over inconclusive). Percent literals are fractions (``5%`` == ``0.05``).

Grammar::

    expr    := and ( "OR" and )*
    and     := not ( "AND" not )*
    not     := "NOT" not | "(" expr ")" | compare
    compare := operand ( ">" | ">=" | "<" | "<=" | "==" | "!=" ) operand
    operand := METRIC | NUMBER [ "%" ]

Metrics compare a candidate cohort with a baseline cohort, or describe one cohort, each an estimate with an
interval (:mod:`edgefleet.core.cohorts`, :mod:`edgefleet.core.stats`); :func:`evaluate` trips a gate only on
evidence. Rollouts and monitors share this one implementation (:func:`judge_cohorts`). Pure: no I/O.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from edgefleet.core.cohorts import ABSOLUTE, METRICS, CohortStats, estimates, metrics
from edgefleet.core.stats import Estimate, Judge
from edgefleet.errors import ConfigError

__all__ = [
    "ALIASES",
    "METRICS",
    "CohortStats",
    "Gate",
    "GateResult",
    "Judge",
    "estimates",
    "evaluate",
    "judge_cohorts",
    "metrics",
    "parse_gate",
]

Outcome = Literal["pass", "fail", "unknown", "inconclusive"]

ALIASES = {"latency_increase": "latency_p95_increase"}

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<pct>%|[smhd]\b)?|(?P<op>>=|<=|==|!=|>|<)|(?P<paren>[()])"
                    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))")
MAX_EXPRESSION_CHARS = 2000
DURATIONS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
"""Duration literals (``15m``) in seconds, for ``silent_for``."""


# -- syntax tree ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operand:
    """A metric name (canonical) or a number."""

    metric: str | None = None
    value: float | None = None
    percent: bool = False

    def text(self) -> str:
        if self.metric is not None:
            return self.metric
        assert self.value is not None
        return f"{_fmt(self.value * 100)}%" if self.percent else _fmt(self.value)


@dataclass(frozen=True)
class Compare:
    left: Operand
    op: str
    right: Operand


@dataclass(frozen=True)
class Not:
    inner: Node


@dataclass(frozen=True)
class BoolOp:
    op: Literal["AND", "OR"]
    parts: tuple[Node, ...]


Node = Compare | Not | BoolOp


@dataclass(frozen=True)
class Gate:
    """A parsed gate expression; ``text`` is the operator's original wording."""

    text: str
    tree: Node

    @property
    def metrics(self) -> frozenset[str]:
        return frozenset(_metrics_of(self.tree))


@dataclass(frozen=True)
class GateResult:
    """What one evaluation concluded, the values it used (point values, and intervals where it had them), and
    why, in one line."""

    outcome: Outcome
    values: dict[str, float | None]
    explanation: str
    missing: tuple[str, ...] = ()
    intervals: dict[str, Estimate] = field(default_factory=dict)


# -- parsing -------------------------------------------------------------------------------------------------
def parse_gate(text: str) -> Gate:
    """Parse ``text``; ConfigError naming the problem (unknown metric, bad syntax) otherwise."""
    if not text.strip():
        raise ConfigError("empty gate expression")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ConfigError(f"gate expression is longer than {MAX_EXPRESSION_CHARS} characters")
    parser = _Parser(text)
    tree = parser.expr()
    if parser.peek() is not None:
        raise ConfigError(f"gate {text!r}: unexpected {parser.peek()!r} at position {parser.position()}")
    return Gate(text.strip(), tree)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            match = _TOKEN.match(text, pos)
            if match is None or match.end() == pos:
                raise ConfigError(f"gate {text!r}: cannot read {text[pos:].strip()[:20]!r} at position {pos}")
            kind = match.lastgroup if match.lastgroup != "pct" else "num"
            self.tokens.append((kind or "", match.group(0).strip(), match.start() + len(match.group(0))
                                - len(match.group(0).lstrip())))
            pos = match.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i][1] if self.i < len(self.tokens) else None

    def position(self) -> int:
        return self.tokens[self.i][2] if self.i < len(self.tokens) else len(self.text)

    def take(self) -> tuple[str, str]:
        if self.i >= len(self.tokens):
            raise ConfigError(f"gate {self.text!r}: unexpected end of expression")
        kind, value, _ = self.tokens[self.i]
        self.i += 1
        return kind, value

    def keyword(self, word: str) -> bool:
        token = self.peek()
        if token is not None and token.upper() == word and self.tokens[self.i][0] == "word":
            self.i += 1
            return True
        return False

    def expr(self) -> Node:
        parts = [self.conjunction()]
        while self.keyword("OR"):
            parts.append(self.conjunction())
        return parts[0] if len(parts) == 1 else BoolOp("OR", tuple(parts))

    def conjunction(self) -> Node:
        parts = [self.negation()]
        while self.keyword("AND"):
            parts.append(self.negation())
        return parts[0] if len(parts) == 1 else BoolOp("AND", tuple(parts))

    def negation(self) -> Node:
        if self.keyword("NOT"):
            return Not(self.negation())
        if self.peek() == "(":
            self.take()
            inner = self.expr()
            if self.peek() != ")":
                raise ConfigError(f"gate {self.text!r}: missing ')' at position {self.position()}")
            self.take()
            return inner
        left = self.operand()
        op_kind, op = self.take()
        if op_kind != "op":
            raise ConfigError(f"gate {self.text!r}: expected a comparison after {left.text()!r}, got {op!r}")
        right = self.operand()
        if left.metric is None and right.metric is None:
            raise ConfigError(f"gate {self.text!r}: {left.text()} {op} {right.text()} compares no metric")
        return Compare(left, op, right)

    def operand(self) -> Operand:
        kind, value = self.take()
        if kind == "num":
            percent = value.endswith("%")
            unit = DURATIONS.get(value[-1], 1.0)
            number = float(value.rstrip("%smhd"))
            return Operand(value=number / 100 if percent else number * unit, percent=percent)
        if kind == "word" and value.upper() not in ("AND", "OR", "NOT"):
            return Operand(metric=canonical_metric(value, self.text))
        raise ConfigError(f"gate {self.text!r}: expected a metric or a number, got {value!r}")


def canonical_metric(name: str, context: str = "") -> str:
    """The canonical name of a metric or alias; ConfigError listing the known ones otherwise."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in METRICS:
        known = ", ".join(sorted([*METRICS, *ALIASES]))
        where = f"gate {context!r}: " if context else ""
        raise ConfigError(f"{where}unknown metric {name!r} (known: {known})")
    return key


def _metrics_of(node: Node) -> set[str]:
    if isinstance(node, Compare):
        return {o.metric for o in (node.left, node.right) if o.metric is not None}
    if isinstance(node, Not):
        return _metrics_of(node.inner)
    return set().union(*(_metrics_of(p) for p in node.parts))


# -- evaluation ----------------------------------------------------------------------------------------------
# A comparison's truth: "T" the evidence says true, "F" false, "U" no data yet, "I" data but no evidence either way.
_Truth = Literal["T", "F", "U", "I"]
Value = float | Estimate | None


def evaluate(gate: Gate, values: Mapping[str, Value], *, confidence: float | None = None) -> GateResult:
    """Evaluate ``gate`` with metric ``values``: plain numbers (exact) or estimates with intervals; None or
    absent means unavailable. Outcome: ``fail`` (the gate trips), ``pass``, ``unknown`` (data missing) or
    ``inconclusive`` (data present, no decision at the intervals' confidence yet).

    The gate trips only on evidence: a comparison on the *bad* side of the gate (under an even number of NOTs)
    is true when its whole interval satisfies it, false when its point estimate does not, and inconclusive in
    between; under a NOT the roles swap, so a NOT never turns a point estimate into a trip. ``confidence`` is
    only named in the explanation.
    """
    used = {m: _as_estimate(values.get(m)) for m in sorted(gate.metrics)}
    verdict, why = _eval(gate.tree, used, True)
    missing = tuple(m for m, v in used.items() if v is None)
    level = f" at {_fmt(confidence * 100)}% confidence" if confidence is not None else ""
    if verdict == "U":
        outcome: Outcome = "unknown"
        text = f"cannot pass yet: no data for {', '.join(missing)} ({why})"
    elif verdict == "I":
        outcome, text = "inconclusive", f"inconclusive{level}: {why}"
    elif verdict == "T":
        outcome, text = "fail", f"tripped: {why}"
    else:
        outcome, text = "pass", f"passed: {why}"
    points = {m: None if e is None else e.value for m, e in used.items()}
    intervals = {m: e for m, e in used.items() if e is not None and not e.is_exact}
    return GateResult(outcome, points, text, missing, intervals)


def judge_cohorts(gate: Gate, candidate: CohortStats, baseline: CohortStats | None = None,
                  judge: Judge = Judge(sequential=True), extra: Mapping[str, Value] | None = None) -> GateResult:
    """One call for rollouts and monitors alike: the metrics of ``candidate`` (against ``baseline``; without one,
    only the one-cohort metrics such as ``accuracy``, ``error_rate`` and ``latency_p95_ms``) judged by
    ``gate``; ``extra`` adds metrics that are no cohort's (a monitor's ``silent_for``). The default judge is
    sequential: right for a gate looked at again and again, as a monitor is."""
    values: dict[str, Value] = {**estimates(candidate, baseline or CohortStats(), judge), **(extra or {})}
    return evaluate(gate, values, confidence=judge.confidence)


def _eval(node: Node, values: Mapping[str, Estimate | None], bad_side: bool) -> tuple[_Truth, str]:
    if isinstance(node, Compare):
        return _compare(node, values, bad_side)
    if isinstance(node, Not):
        inner, why = _eval(node.inner, values, not bad_side)
        flipped: dict[_Truth, _Truth] = {"T": "F", "F": "T", "U": "U", "I": "I"}
        return flipped[inner], f"NOT ({why})"
    results = [_eval(p, values, bad_side) for p in node.parts]
    decisive: _Truth = "T" if node.op == "OR" else "F"  # OR: any true decides; AND: any false decides
    for verdict, why in results:
        if verdict == decisive:
            return decisive, why
    for waiting in ("U", "I"):
        if any(v == waiting for v, _ in results):
            return waiting, f" {node.op} ".join(w for v, w in results if v in ("U", "I"))
    return ("F" if decisive == "T" else "T"), f" {node.op} ".join(w for _, w in results)


def _compare(node: Compare, values: Mapping[str, Estimate | None], bad_side: bool) -> tuple[_Truth, str]:
    left, right = _operand(node.left, values), _operand(node.right, values)
    shown_left, shown_right = _show(node.left, left), _show(node.right, right)
    if left is None or right is None:
        return "U", f"{shown_left} {node.op} {shown_right}"
    test = _COMPARE[node.op]
    point = test(left.value, right.value)
    # certainly true: every pair of values within the intervals satisfies the comparison (likewise false)
    corners = [test(a, b) for a in (left.low, left.high) for b in (right.low, right.high)]
    same = left.low == left.high == right.low == right.high
    if node.op == "==":
        sure_true, sure_false = same and point, _disjoint(left, right)
    elif node.op == "!=":
        sure_true, sure_false = _disjoint(left, right), same and not point
    else:
        sure_true, sure_false = all(corners), not any(corners)
    truth: _Truth
    if bad_side:
        truth = "T" if sure_true else ("F" if not point else "I")
    else:
        truth = "F" if sure_false else ("T" if point else "I")
    said = {"T": f"{shown_left} {node.op} {shown_right}", "F": f"{shown_left}, not {node.op} {shown_right}",
            "I": f"{shown_left} {node.op} {shown_right} not yet shown (interval spans it)"
            if point else f"{shown_left}, not {node.op} {shown_right} not yet shown (interval spans it)"}
    return truth, said[truth]


def _disjoint(a: Estimate, b: Estimate) -> bool:
    return a.high < b.low or b.high < a.low


def _operand(operand: Operand, values: Mapping[str, Estimate | None]) -> Estimate | None:
    if operand.metric is None:
        assert operand.value is not None
        return Estimate.exact(operand.value)
    return values.get(operand.metric)


def _as_estimate(value: Value) -> Estimate | None:
    if value is None:
        return None
    if isinstance(value, Estimate):
        return value if math.isfinite(value.value) else None
    return Estimate.exact(float(value)) if math.isfinite(value) else None


def _show(operand: Operand, value: Estimate | None) -> str:
    if operand.metric is None:
        return operand.text()
    if value is None:
        return f"{operand.metric}=n/a"

    def unit(x: float) -> str:
        if not math.isfinite(x):
            return "inf" if x > 0 else "-inf"
        return _fmt(x) if operand.metric in ABSOLUTE else f"{_fmt(x * 100)}%"

    text = f"{operand.metric}={unit(value.value)}"
    if not value.is_exact:
        sizes = f"n={value.n}" + (f" vs {value.n_baseline}" if value.n_baseline is not None else "")
        text += f" [{unit(value.low)}, {unit(value.high)}; {sizes}]"
    return text


def _fmt(value: float) -> str:
    return f"{value:.4g}"

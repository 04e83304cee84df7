"""Gate expressions over fleet telemetry, e.g. ``accuracy_drop > 5% OR latency_increase > 20%``.

A gate describes when a candidate model is *worse*: a true expression trips the gate (the rollout pauses
or aborts); a false one lets the wave pass. Logic is three-valued (Kleene): a metric without data is
*unknown*, ``TRUE OR unknown`` is TRUE (a clear failure acts at once), ``FALSE OR unknown`` is unknown,
and an unknown gate cannot pass yet. Percent literals are fractions (``5%`` == ``0.05``).

Grammar::

    expr    := and ( "OR" and )*
    and     := not ( "AND" not )*
    not     := "NOT" not | "(" expr ")" | compare
    compare := operand ( ">" | ">=" | "<" | "<=" | "==" | "!=" ) operand
    operand := METRIC | NUMBER [ "%" ]

Metrics compare a candidate cohort with a baseline cohort (see :func:`metrics`). Pure: no I/O.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram, add_bins
from edgefleet.errors import ConfigError

Outcome = Literal["pass", "fail", "unknown"]

METRICS: dict[str, str] = {
    "install_failure_rate": "share of the wave's devices whose install failed or timed out (0..1)",
    "latency_p95_increase": "relative change of p95 latency, candidate vs baseline ((c - b) / b)",
    "confidence_drop": "mean top-class confidence, baseline minus candidate (absolute, 0..1)",
    "escalation_rate_increase": "escalations per window, candidate minus baseline (absolute)",
    "shadow_disagreement": "share of shadow windows whose class differed from the active model's",
    "accuracy_drop": "accuracy on labelled windows, baseline minus candidate (absolute, 0..1)",
    "error_rate": "share of the candidate's inference calls that failed",
    "latency_p95_ms": "the candidate's p95 latency in milliseconds",
}
ALIASES = {"latency_increase": "latency_p95_increase"}

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
_TOKEN = re.compile(r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<pct>%)?|(?P<op>>=|<=|==|!=|>|<)|(?P<paren>[()])"
                    r"|(?P<word>[A-Za-z_][A-Za-z0-9_]*))")
MAX_EXPRESSION_CHARS = 2000


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
    """What one evaluation concluded, the values it used, and why, in one line."""

    outcome: Outcome
    values: dict[str, float | None]
    explanation: str
    missing: tuple[str, ...] = ()


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
            number = float(value.rstrip("%"))
            return Operand(value=number / 100 if percent else number, percent=percent)
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
def evaluate(gate: Gate, values: Mapping[str, float | None]) -> GateResult:
    """Evaluate ``gate`` with metric ``values`` (None or absent = unavailable): fail, pass or unknown."""
    used = {m: _finite(values.get(m)) for m in sorted(gate.metrics)}
    verdict, why = _eval(gate.tree, used)
    missing = tuple(m for m, v in used.items() if v is None)
    if verdict is None:
        outcome: Outcome = "unknown"
        text = f"cannot pass yet: no data for {', '.join(missing)} ({why})"
    elif verdict:
        outcome, text = "fail", f"tripped: {why}"
    else:
        outcome, text = "pass", f"passed: {why}"
    return GateResult(outcome, used, text, missing)


def _eval(node: Node, values: Mapping[str, float | None]) -> tuple[bool | None, str]:
    if isinstance(node, Compare):
        left, right = _value(node.left, values), _value(node.right, values)
        shown = f"{_show(node.left, left)} {node.op} {_show(node.right, right)}"
        if left is None or right is None:
            return None, shown
        return _COMPARE[node.op](left, right), shown
    if isinstance(node, Not):
        inner, why = _eval(node.inner, values)
        return (None if inner is None else not inner), f"NOT ({why})"
    results = [_eval(p, values) for p in node.parts]
    decisive = node.op == "OR"  # OR: any True decides; AND: any False decides
    for verdict, why in results:
        if verdict is decisive:
            return decisive, why
    if any(v is None for v, _ in results):
        return None, f" {node.op} ".join(w for v, w in results if v is None)
    return not decisive, f" {node.op} ".join(w for _, w in results)


def _value(operand: Operand, values: Mapping[str, float | None]) -> float | None:
    return operand.value if operand.metric is None else values.get(operand.metric)


def _show(operand: Operand, value: float | None) -> str:
    if operand.metric is None:
        return operand.text()
    if value is None:
        return f"{operand.metric}=n/a"
    return f"{operand.metric}={_fmt(value * 100)}%" if operand.metric not in ("latency_p95_ms",) else \
        f"{operand.metric}={_fmt(value)}"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


# -- metrics from cohorts ------------------------------------------------------------------------------------
@dataclass
class CohortStats:
    """Telemetry of a group of devices for one model, summed; optional agent fields stay None if unreported."""

    devices: int = 0
    windows: int = 0
    labelled: int = 0
    correct: int = 0
    errors: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    confidence: list[int] = field(default_factory=list)
    escalations: int | None = None
    shadow_windows: int | None = None
    shadow_agree: int | None = None

    def add(self, other: CohortStats) -> None:
        """Add another cohort (or one device's stats) into this one."""
        self.devices += other.devices
        self.windows += other.windows
        self.labelled += other.labelled
        self.correct += other.correct
        self.errors += other.errors
        self.latency.merge(other.latency)
        self.confidence = add_bins(self.confidence, other.confidence)
        self.escalations = _add_optional(self.escalations, other.escalations)
        self.shadow_windows = _add_optional(self.shadow_windows, other.shadow_windows)
        self.shadow_agree = _add_optional(self.shadow_agree, other.shadow_agree)

    def add_batch(self, payload: Mapping[str, Any], *, shadow: bool = False) -> None:
        """Add one telemetry batch (its JSON form); reads optional fields defensively.

        With ``shadow`` the batch's shadow figures are the ones counted (the candidate ran beside).
        """
        if shadow:
            self.windows += _int(payload.get("shadow_windows"))
            self.errors += _int(payload.get("shadow_errors"))
            self.latency.merge(_histogram(payload.get("shadow_latency_ms")))
            self.shadow_windows = _add_optional(self.shadow_windows, _opt_int(payload.get("shadow_windows")))
            self.shadow_agree = _add_optional(self.shadow_agree, _opt_int(payload.get("shadow_agree")))
            return
        self.windows += _int(payload.get("windows"))
        self.labelled += _int(payload.get("labelled"))
        self.correct += _int(payload.get("correct"))
        self.errors += _int(payload.get("errors"))
        self.latency.merge(_histogram(payload.get("latency_ms")))
        bins = payload.get("confidence")
        if isinstance(bins, list):
            self.confidence = add_bins(self.confidence, [_int(b) for b in bins])
        self.escalations = _add_optional(self.escalations, _escalated(payload.get("escalations")))

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def mean_confidence(self) -> float | None:
        total = sum(self.confidence)
        if not total:
            return None
        width = 1.0 / max(len(self.confidence), CONFIDENCE_BINS)
        return sum(n * (i + 0.5) * width for i, n in enumerate(self.confidence)) / total

    def to_json(self) -> dict[str, Any]:
        return {"devices": self.devices, "windows": self.windows, "labelled": self.labelled, "correct": self.correct,
                "accuracy": self.accuracy, "errors": self.errors, "latency_p95_ms": self.latency.quantile(0.95),
                "mean_confidence": self.mean_confidence, "escalations": self.escalations,
                "shadow_windows": self.shadow_windows, "shadow_agree": self.shadow_agree}


def metrics(candidate: CohortStats, baseline: CohortStats, *, installs_done: int = 0, installs_failed: int = 0,
            min_windows: int = 1) -> dict[str, float | None]:
    """Every metric's value for a candidate cohort against its baseline; None where data is missing.

    A cohort with fewer than ``min_windows`` windows gives no behaviour metric (too few to judge).
    """
    enough_c = candidate.windows >= min_windows
    enough_b = baseline.windows >= min_windows
    both = enough_c and enough_b
    out: dict[str, float | None] = dict.fromkeys(METRICS)
    finished = installs_done + installs_failed
    out["install_failure_rate"] = installs_failed / finished if finished else None
    p95_c, p95_b = candidate.latency.quantile(0.95), baseline.latency.quantile(0.95)
    if enough_c and p95_c is not None:
        out["latency_p95_ms"] = p95_c
        if both and p95_b:
            out["latency_p95_increase"] = (p95_c - p95_b) / p95_b
    conf_c, conf_b = candidate.mean_confidence, baseline.mean_confidence
    if both and conf_c is not None and conf_b is not None:
        out["confidence_drop"] = conf_b - conf_c
    if both and candidate.escalations is not None and baseline.escalations is not None:
        out["escalation_rate_increase"] = (candidate.escalations / candidate.windows
                                           - baseline.escalations / baseline.windows)
    if candidate.shadow_windows and candidate.shadow_windows >= min_windows and candidate.shadow_agree is not None:
        out["shadow_disagreement"] = 1.0 - candidate.shadow_agree / candidate.shadow_windows
    acc_c, acc_b = candidate.accuracy, baseline.accuracy
    if candidate.labelled >= min_windows and baseline.labelled >= min_windows and acc_c is not None \
            and acc_b is not None:
        out["accuracy_drop"] = acc_b - acc_c
    calls = candidate.windows + candidate.errors
    if calls >= min_windows:
        out["error_rate"] = candidate.errors / calls
    return out


def _add_optional(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else a + b)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _opt_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _escalated(value: object) -> int | None:
    """Windows sent upstream: a count, or the agent's counter mapping (its ``sent`` entry)."""
    if isinstance(value, Mapping):
        return _int(value.get("sent", 0))
    return _opt_int(value)


def _histogram(value: object) -> LatencyHistogram:
    if not isinstance(value, Mapping):
        return LatencyHistogram()
    try:
        return LatencyHistogram.from_json({str(k): int(v) for k, v in value.items()})
    except (TypeError, ValueError):
        return LatencyHistogram()

"""A rollout plan: what the operator asked for (candidate, waves, gates, mode, judging settings, timeouts),
validated on construction by :func:`make_plan`, including that every gate can be judged in the plan's mode.
Pure: no I/O. The state machine that carries a plan out is :mod:`edgefleet.core.rollout`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgefleet.core.gates import Gate, parse_gate
from edgefleet.core.stats import Judge
from edgefleet.errors import ConfigError

Mode = Literal["canary", "shadow", "ab"]
Action = Literal["abort", "pause"]
InconclusiveAction = Literal["pause", "abort", "proceed"]
Phase = Literal["installing", "observing", "paused", "done", "shadow-passed", "aborted"]
Kind = Literal["assign", "rollback", "wait", "hold", "pause", "resume", "done", "aborted"]
Role = Literal["active", "shadow"]
MODES: tuple[Mode, ...] = ("canary", "shadow", "ab")
FINAL: tuple[Phase, ...] = ("done", "shadow-passed", "aborted")
INCONCLUSIVE_ACTIONS: tuple[InconclusiveAction, ...] = ("pause", "abort", "proceed")

_SILENCE = "silence is judged by monitors (edgefleet monitor create), not rollouts"
UNJUDGEABLE: dict[Mode, dict[str, str]] = {
    "shadow": {"confidence_drop": "a shadow reports no confidence histogram",
               "escalation_rate_increase": "a shadow never escalates", "silent_for": _SILENCE,
               "drift_psi": "a shadow sees the active model's inputs", "drift_score": "a shadow sees the same inputs"},
    "canary": {"shadow_disagreement": "no shadow runs in canary mode (use --mode shadow)", "silent_for": _SILENCE},
    "ab": {"shadow_disagreement": "no shadow runs in A/B mode (use --mode shadow)", "silent_for": _SILENCE},
}
"""Metrics that a mode cannot measure, and why: a gate naming one is refused when the rollout is created."""


@dataclass(frozen=True)
class WaveSpec:
    """One wave: a cumulative share of the targets (``10%``) or a cumulative device count (``5``)."""

    value: float
    percent: bool

    def cumulative(self, total: int) -> int:
        wanted = math.ceil(self.value * total / 100 - 1e-9) if self.percent else int(self.value)
        return max(1, min(total, wanted))

    def text(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{int(self.value)}"


def parse_waves(text: str) -> tuple[WaveSpec, ...]:
    """``"10%,50%,100%"`` or ``"1,10,100%"``; ConfigError for anything else."""
    waves = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part.rstrip("%"))
        except ValueError as exc:
            raise ConfigError(f"bad wave {part!r} in {text!r}: use a count (5) or a percentage (10%)") from exc
        percent = part.endswith("%")
        if not math.isfinite(value) or value <= 0 or (percent and value > 100) or (not percent and value % 1):
            raise ConfigError(f"bad wave {part!r} in {text!r}: a whole count >= 1 or a percentage in (0, 100]")
        waves.append(WaveSpec(value, percent))
    if not waves or len(waves) > 100:
        raise ConfigError(f"between 1 and 100 waves, not {len(waves)}")
    return tuple(waves)


@dataclass(frozen=True)
class GateRule:
    """A gate and what to do when it trips."""

    gate: Gate
    action: Action = "abort"


@dataclass(frozen=True)
class RolloutPlan:
    """What the operator asked for; validated on construction by :func:`make_plan`."""

    candidate: str
    waves: tuple[WaveSpec, ...]
    gates: tuple[GateRule, ...] = ()
    select: Mapping[str, str] = field(default_factory=dict)
    profile: str | None = None
    mode: Mode = "canary"
    window_s: float = 60.0
    install_timeout_s: float = 300.0
    unknown_timeout_s: float = 600.0
    baseline_s: float = 3600.0
    min_windows: int = 10
    confidence: float = 0.95
    inconclusive_timeout_s: float = 600.0
    on_inconclusive: InconclusiveAction = "pause"
    promoted_from: str | None = None

    @property
    def judge(self) -> Judge:
        return Judge(self.confidence, self.min_windows)

    def to_json(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "waves": [w.text() for w in self.waves],
                "gates": [{"expr": r.gate.text, "action": r.action} for r in self.gates],
                "select": dict(self.select), "profile": self.profile, "mode": self.mode, "window_s": self.window_s,
                "install_timeout_s": self.install_timeout_s, "unknown_timeout_s": self.unknown_timeout_s,
                "baseline_s": self.baseline_s, "min_windows": self.min_windows, "confidence": self.confidence,
                "inconclusive_timeout_s": self.inconclusive_timeout_s, "on_inconclusive": self.on_inconclusive,
                "promoted_from": self.promoted_from}


def make_plan(data: Mapping[str, Any]) -> RolloutPlan:
    """Build a plan from its JSON form (:meth:`RolloutPlan.to_json`); ConfigError names what is wrong."""
    candidate = str(data.get("candidate", ""))
    name, at, version = candidate.partition("@")
    if not (name and at and version):
        raise ConfigError(f"candidate must be NAME@VERSION, not {candidate!r}")
    mode = data.get("mode", "canary")
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    waves = data.get("waves", ["100%"])
    gates = []
    for rule in data.get("gates", []):
        rule = {"expr": rule} if isinstance(rule, str) else rule
        if rule.get("action", "abort") not in ("abort", "pause"):
            raise ConfigError(f"gate action must be abort or pause, not {rule.get('action')!r}")
        gates.append(GateRule(parse_gate(str(rule["expr"])), rule.get("action", "abort")))
    for rule in gates:
        for metric in sorted(rule.gate.metrics):
            why = UNJUDGEABLE[mode].get(metric)
            if why:
                raise ConfigError(f"gate {rule.gate.text!r} cannot be judged in {mode} mode: {metric}: {why}")
    numbers = {}
    for key, default in (("window_s", 60.0), ("install_timeout_s", 300.0), ("unknown_timeout_s", 600.0),
                         ("baseline_s", 3600.0), ("min_windows", 10), ("inconclusive_timeout_s", 600.0)):
        value = data.get(key, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value <= 30 * 86400:
            raise ConfigError(f"{key} must be a number of at least 0, not {value!r}")
        numbers[key] = value
    confidence = data.get("confidence", 0.95)
    if not isinstance(confidence, int | float) or isinstance(confidence, bool) or not 0.5 <= confidence < 1:
        raise ConfigError(f"confidence must be a fraction in [0.5, 1) such as 0.95, not {confidence!r}")
    on_inconclusive = data.get("on_inconclusive", "pause")
    if on_inconclusive not in INCONCLUSIVE_ACTIONS:
        raise ConfigError(f"on_inconclusive must be one of {', '.join(INCONCLUSIVE_ACTIONS)}, not "
                          f"{on_inconclusive!r}")
    promoted_from = data.get("promoted_from")
    return RolloutPlan(candidate=candidate, mode=mode, gates=tuple(gates), confidence=float(confidence),
                       inconclusive_timeout_s=float(numbers["inconclusive_timeout_s"]),
                       on_inconclusive=on_inconclusive,
                       promoted_from=None if promoted_from is None else str(promoted_from),
                       waves=parse_waves(",".join(waves) if isinstance(waves, list) else str(waves)),
                       select={str(k): str(v) for k, v in dict(data.get("select") or {}).items()},
                       profile=data.get("profile"), window_s=float(numbers["window_s"]),
                       install_timeout_s=float(numbers["install_timeout_s"]),
                       unknown_timeout_s=float(numbers["unknown_timeout_s"]),
                       baseline_s=float(numbers["baseline_s"]), min_windows=int(numbers["min_windows"]))

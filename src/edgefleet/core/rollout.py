"""The rollout plan and its state machine: waves -> installs -> observation window -> gates -> next step.

Pure: :func:`start`, :func:`step` and :func:`command` take the plan, the state and what the fleet reports
(an :class:`Observation`) and return a new state plus :class:`Decision` s (assign, roll back, wait, hold,
pause, resume, done, aborted), each carrying the values that caused it. The orchestrator does the I/O.

Phases::

    installing --all wave devices installed, failed or timed out--> observing
    observing  --gates pass at window end--> installing (next wave) | done (shadow-passed in shadow mode)
    observing  --a gate trips--> aborted (roll back) | paused
    observing  --a metric is missing at window end--> hold ... --unknown_timeout_s--> paused
    observing  --a gate is inconclusive at window end--> hold ... --inconclusive_timeout_s--> on_inconclusive
    installing/observing --operator pause--> paused --resume--> where it was (timers restart)
    paused by a gate --resume--> next wave (operator override)        any --operator abort--> aborted

Judging (:mod:`edgefleet.core.stats`): every metric is an estimate with an interval at the plan's
``confidence``, from cohorts of at least ``min_windows``; a gate trips only when the interval is wholly on the
bad side of its threshold. While the window runs, gates are looked at on every step with a time-uniform
(sequential) interval, so a clear failure acts at once without noise tripping it; at the window's end they are
judged once with the fixed-sample interval; while holding, sequentially again.

Modes: ``canary`` compares the moved devices on the candidate with every target's baseline telemetry
(their own before the move included); ``ab`` splits the targets into a control half that keeps the
baseline and a treatment half that receives the candidate in waves, compared over the same period (the split
depends on the device ids only, so the same devices land in the same halves in every rollout); ``shadow``
runs the candidate beside the active model on the moved devices and compares the two there (latency against
the active model timed beside it on the same inputs). A baseline holds the models the targets ran before the
candidate, never the candidate itself nor a model that an earlier rollout rolled back.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from edgefleet.core.cohorts import estimates
from edgefleet.core.gates import CohortStats, GateResult, evaluate
from edgefleet.core.plan import (
    FINAL,
    INCONCLUSIVE_ACTIONS,
    MODES,
    UNJUDGEABLE,
    Action,
    GateRule,
    InconclusiveAction,
    Kind,
    Mode,
    Phase,
    Role,
    RolloutPlan,
    WaveSpec,
    make_plan,
    parse_waves,
)
from edgefleet.core.stats import Estimate
from edgefleet.errors import ConfigError

__all__ = ["FINAL", "INCONCLUSIVE_ACTIONS", "MODES", "UNJUDGEABLE", "Action", "Decision", "DeviceView", "GateRule",
           "InconclusiveAction", "Kind", "Mode", "Observation", "Phase", "Role", "RolloutPlan", "RolloutState",
           "Step", "WaveSpec", "cohorts", "command", "make_plan", "parse_waves", "select_targets", "start", "step",
           "telemetry_since", "wave_counts"]


# -- inputs and outputs --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceView:
    """One device as the server knows it: identity, what it should run and what it reported."""

    id: str
    tags: Mapping[str, str] = field(default_factory=dict)
    profile: str | None = None
    desired: str | None = None
    active: str | None = None
    shadow: str | None = None
    refused: frozenset[str] = frozenset()
    revoked: bool = False
    hardware: str = "generic"
    """Its hardware id (provisioned, or as it reports it); see :mod:`edgefleet.core.targeting`."""
    runtimes: frozenset[str] | None = None
    """The runtimes it reports it can run models on; None: not reported (not judged)."""


@dataclass(frozen=True)
class Observation:
    """The fleet at ``now``: devices, and telemetry since :func:`telemetry_since` per device and model."""

    now: float
    devices: Mapping[str, DeviceView]
    telemetry: Mapping[str, Mapping[str, CohortStats]] = field(default_factory=dict)
    shadow: Mapping[str, Mapping[str, CohortStats]] = field(default_factory=dict)
    rolled_back: frozenset[str] = frozenset()
    """Models that earlier rollouts rolled back: never part of a baseline."""


@dataclass(frozen=True)
class Decision:
    """One step the orchestrator must carry out (or record), with the values that caused it."""

    kind: Kind
    at: float
    wave: int
    reason: str
    devices: tuple[str, ...] = ()
    model: str | None = None
    role: Role = "active"
    restore: Mapping[str, str | None] = field(default_factory=dict)
    until: float | None = None
    values: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["devices"], data["restore"], data["values"] = list(self.devices), dict(self.restore), dict(self.values)
        return data


@dataclass
class RolloutState:
    """Everything the machine remembers between steps; JSON-serializable with :meth:`to_json`."""

    id: str
    phase: Phase
    created: float
    targets: list[str]
    control: list[str] = field(default_factory=list)
    wave: int = -1
    moved: dict[str, str | None] = field(default_factory=dict)
    deadline: float = 0.0
    held_since: float | None = None
    paused_by: str | None = None
    resume_phase: Phase | None = None
    reason: str = ""
    step_no: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    """Selected devices the candidate does not fit, ``{device, reason}`` (:mod:`edgefleet.core.targeting`)."""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RolloutState:
        return cls(**dict(data))


@dataclass(frozen=True)
class Step:
    """A transition: the new state, what to do, and when the machine next needs a step without new input."""

    state: RolloutState
    decisions: tuple[Decision, ...]
    wake_at: float | None


# -- target selection ----------------------------------------------------------------------------------------
TWIN_TAG = "twin"
"""The tag of a digital twin (``edgefleet twin``, rehearsals): only a plan that selects it reaches twins."""


def select_targets(plan: RolloutPlan, devices: Iterable[DeviceView], salt: str) -> list[str]:
    """Devices that match the plan's tags and profile, in a stable pseudo-random order seeded by ``salt``; twins
    (tagged :data:`TWIN_TAG`) only for a plan that selects that tag."""
    chosen = [d.id for d in devices if not d.revoked and (plan.profile is None or d.profile == plan.profile)
              and all(d.tags.get(k) == v for k, v in plan.select.items())
              and (TWIN_TAG not in d.tags or TWIN_TAG in plan.select)]
    return sorted(chosen, key=lambda d: hashlib.sha256(f"{salt}/{d}".encode()).hexdigest())


def wave_counts(plan: RolloutPlan, total: int) -> list[int]:
    """Cumulative device counts per wave; waves that would add no device are dropped."""
    counts: list[int] = []
    for wave in plan.waves:
        n = wave.cumulative(total)
        if not counts or n > counts[-1]:
            counts.append(n)
    return counts


def telemetry_since(plan: RolloutPlan, state: RolloutState) -> float:
    """From when the orchestrator should sum telemetry for this rollout's cohorts."""
    return state.created - plan.baseline_s if plan.mode == "canary" else state.created


# -- transitions ---------------------------------------------------------------------------------------------
def start(plan: RolloutPlan, rollout_id: str, devices: Mapping[str, DeviceView], now: float) -> Step:
    """Choose the targets and assign the first wave; ConfigError if nothing matches."""
    targets = select_targets(plan, devices.values(), rollout_id)
    if not targets:
        raise ConfigError(f"no device matches select={dict(plan.select)} profile={plan.profile}")
    control: list[str] = []
    if plan.mode == "ab":
        if len(targets) < 2:
            raise ConfigError("an A/B rollout needs at least two matching devices")
        halves = sorted(targets, key=lambda d: hashlib.sha256(f"ab/{d}".encode()).hexdigest())
        in_control = set(halves[1::2])  # stable: the same devices make the same halves in every rollout
        control, targets = [d for d in targets if d in in_control], [d for d in targets if d not in in_control]
    state = RolloutState(id=rollout_id, phase="installing", created=now, targets=targets, control=control)
    return _numbered(plan, _next_wave(plan, state, devices, now, "rollout started"))


def step(plan: RolloutPlan, state: RolloutState, obs: Observation) -> Step:
    """Advance on what the fleet reports now."""
    return _numbered(plan, _step(plan, dataclasses.replace(state, moved=dict(state.moved)), obs))


def _numbered(plan: RolloutPlan, result: Step) -> Step:
    """Every step that decides something gets the next step number (the audit trail's key); in shadow mode
    every decision concerns the shadow role."""
    if result.decisions:
        result.state.step_no += 1
    if plan.mode == "shadow":
        result = Step(result.state, tuple(dataclasses.replace(d, role="shadow") for d in result.decisions),
                      result.wake_at)
    return result


def _step(plan: RolloutPlan, s: RolloutState, obs: Observation) -> Step:
    if s.phase in (*FINAL, "paused"):
        return Step(s, (), None)
    done, failed, pending = _install_status(plan, s, obs)
    if s.phase != "installing" or obs.now >= s.deadline:  # past the deadline, not installed is failed
        failed, pending = sorted([*failed, *pending]), []
    installs = {"installed": len(done), "failed": len(failed), "pending": len(pending)}
    if s.phase == "installing":
        if pending:
            return Step(s, (), s.deadline)
        late = [d for d in failed if plan.candidate not in (obs.devices[d].refused if d in obs.devices else ())]
        s.phase, s.deadline, s.held_since = "observing", obs.now + plan.window_s, None
        reason = "installs finished" if not late else f"{len(late)} device(s) did not install in time"
        wait = Decision("wait", obs.now, s.wave, f"{reason}; observing until the window ends", until=s.deadline,
                        devices=tuple(late), values={"installs": installs})
        later = _step(plan, s, obs)
        return Step(later.state, (wait, *later.decisions), later.wake_at)
    candidate, baseline = cohorts(plan, s, obs)
    final_look = obs.now >= s.deadline and s.held_since is None  # the window's one fixed-sample look
    judge = plan.judge.looks(sequential=not final_look)
    values = estimates(candidate, baseline, judge, installs_done=len(done), installs_failed=len(failed))
    results = [(rule, evaluate(rule.gate, values, confidence=plan.confidence)) for rule in plan.gates]
    evidence = _evidence(plan, values, results, candidate, baseline, installs, final_look)
    tripped = [(r, g) for r, g in results if g.outcome == "fail"]
    if tripped:
        rule, result = next(((r, g) for r, g in tripped if r.action == "abort"), tripped[0])
        why = f"gate {rule.gate.text!r} {result.explanation} ({evidence['compared']})"
        if rule.action == "abort":
            return _abort(plan, s, obs.now, why, evidence)
        return _pause(s, obs.now, "gate", why, evidence)
    if obs.now < s.deadline:
        return Step(s, (), s.deadline)
    waiting = [(r, g) for r, g in results if g.outcome in ("unknown", "inconclusive")]
    if waiting:
        kind = "unknown" if any(g.outcome == "unknown" for _, g in waiting) else "inconclusive"
        timeout = plan.unknown_timeout_s if kind == "unknown" else plan.inconclusive_timeout_s
        why = "; ".join(f"gate {r.gate.text!r} {g.explanation}" for r, g in waiting)
        if s.held_since is None:
            s.held_since = obs.now
            until = obs.now + timeout
            return Step(s, (Decision("hold", obs.now, s.wave, f"{why} ({evidence['compared']})", until=until,
                                     values=evidence),), until)
        if obs.now < s.held_since + timeout:
            return Step(s, (), s.held_since + timeout)
        if kind == "unknown":
            return _pause(s, obs.now, "unknown", f"metrics still unavailable after {plan.unknown_timeout_s:g} s: "
                          f"{why}", evidence)
        lead = f"still inconclusive after {timeout:g} s: {why}"
        if plan.on_inconclusive == "abort":
            return _abort(plan, s, obs.now, f"{lead}; aborting as configured", evidence)
        if plan.on_inconclusive == "pause":
            return _pause(s, obs.now, "inconclusive", f"{lead}; pausing as configured", evidence)
        return _next_wave(plan, s, obs.devices, obs.now, f"wave {s.wave + 1} {lead}; proceeding as configured",
                          evidence)
    return _next_wave(plan, s, obs.devices, obs.now, f"wave {s.wave + 1} passed its gates", evidence)


def _evidence(plan: RolloutPlan, values: Mapping[str, Estimate | None], results: list[tuple[GateRule, GateResult]],
              candidate: CohortStats, baseline: CohortStats, installs: Mapping[str, int],
              final_look: bool) -> dict[str, Any]:
    """What a decision rests on: what was compared, each metric (point and interval), each gate's verdict."""
    who = {"canary": "the targets' current models", "ab": "the control half",
           "shadow": "the active model on the same devices (its latency timed beside the shadow)"}[plan.mode]
    compared = (f"{plan.candidate}{' as shadow' if plan.mode == 'shadow' else ''} on {candidate.devices} "
                f"device(s), {candidate.windows} window(s), against {who} on {baseline.devices} device(s), "
                f"{baseline.windows} window(s); {plan.confidence:.0%} confidence, "
                f"{'fixed-sample look at the window end' if final_look else 'sequential look'}")
    return {"compared": compared, "look": "final" if final_look else "sequential",
            "metrics": {m: None if e is None else e.value for m, e in values.items()},
            "intervals": {m: e.to_json() for m, e in values.items() if e is not None},
            "gates": [{"expr": r.gate.text, "action": r.action, "outcome": g.outcome, "explanation": g.explanation}
                      for r, g in results],
            "candidate": candidate.to_json(), "baseline": baseline.to_json(), "installs": dict(installs)}


def command(plan: RolloutPlan, state: RolloutState, action: Literal["pause", "resume", "abort"], now: float,
            devices: Mapping[str, DeviceView] | None = None, note: str = "") -> Step:
    """An operator's pause, resume or abort; ConfigError when it makes no sense in the current phase."""
    return _numbered(plan, _command(plan, dataclasses.replace(state, moved=dict(state.moved)), action, now, devices,
                                    note))


def _command(plan: RolloutPlan, s: RolloutState, action: Literal["pause", "resume", "abort"], now: float,
             devices: Mapping[str, DeviceView] | None, note: str) -> Step:
    by = f" ({note})" if note else ""
    if s.phase in FINAL:
        raise ConfigError(f"rollout {s.id} is already {s.phase}")
    if action == "abort":
        return _abort(plan, s, now, f"aborted by the operator{by}", {})
    if action == "pause":
        if s.phase == "paused":
            raise ConfigError(f"rollout {s.id} is already paused")
        return _pause(s, now, "operator", f"paused by the operator{by}", {})
    if s.phase != "paused":
        raise ConfigError(f"rollout {s.id} is not paused")
    if s.paused_by == "gate":
        s.paused_by, s.resume_phase = None, None
        resumed = Decision("resume", now, s.wave, f"resumed by the operator over the tripped gate{by}")
        nxt = _next_wave(plan, s, devices or {}, now, "operator override")
        return Step(nxt.state, (resumed, *nxt.decisions), nxt.wake_at)
    s.phase = s.resume_phase or "installing"
    s.deadline = now + (plan.install_timeout_s if s.phase == "installing" else plan.window_s)
    s.paused_by, s.resume_phase, s.held_since = None, None, None
    return Step(s, (Decision("resume", now, s.wave, f"resumed by the operator{by}; {s.phase} until deadline",
                             until=s.deadline),), s.deadline)


# -- helpers -------------------------------------------------------------------------------------------------
def _next_wave(plan: RolloutPlan, s: RolloutState, devices: Mapping[str, DeviceView], now: float, why: str,
               evidence: Mapping[str, Any] | None = None) -> Step:
    counts = wave_counts(plan, len(s.targets))
    if s.wave + 1 >= len(counts):
        s.phase, s.reason = "done", f"{why}; all {len(counts)} waves done"
        if plan.mode == "shadow":
            s.phase = "shadow-passed"
            s.reason += (f"; {plan.candidate} passed as a shadow but runs nowhere: promote it with "
                         f"`edgefleet rollout promote {s.id} --waves ...`")
        decisions = [Decision("done", now, s.wave, s.reason, values=dict(evidence or {}))]
        if plan.mode == "shadow":
            decisions.insert(0, Decision("assign", now, s.wave, "shadow evaluation finished: stop shadowing",
                                         devices=tuple(sorted(s.moved)), model=None, role="shadow"))
        return Step(s, tuple(decisions), None)
    s.wave += 1
    new = [d for d in s.targets[:counts[s.wave]] if d not in s.moved]
    for device in new:
        view = devices.get(device)
        s.moved[device] = None if plan.mode == "shadow" else (view.desired or view.active if view else None)
    s.phase, s.deadline, s.held_since = "installing", now + plan.install_timeout_s, None
    role: Literal["active", "shadow"] = "shadow" if plan.mode == "shadow" else "active"
    assign = Decision("assign", now, s.wave, f"{why}; wave {s.wave + 1}/{len(counts)}: {len(new)} device(s), "
                      f"{counts[s.wave]}/{len(s.targets)} of the targets", devices=tuple(new),
                      model=plan.candidate, role=role, until=s.deadline, values=dict(evidence or {}))
    return Step(s, (assign,), s.deadline)


def _abort(plan: RolloutPlan, s: RolloutState, now: float, why: str, evidence: Mapping[str, Any]) -> Step:
    s.phase, s.reason = "aborted", why
    decisions = []
    if s.moved:
        role: Literal["active", "shadow"] = "shadow" if plan.mode == "shadow" else "active"
        decisions.append(Decision("rollback", now, s.wave, why, devices=tuple(sorted(s.moved)), role=role,
                                  restore=dict(s.moved), values=evidence))
    decisions.append(Decision("aborted", now, s.wave, why, values=evidence))
    return Step(s, tuple(decisions), None)


def _pause(s: RolloutState, now: float, by: str, why: str, evidence: Mapping[str, Any]) -> Step:
    s.resume_phase = s.phase if s.phase != "paused" else s.resume_phase
    s.phase, s.paused_by, s.reason = "paused", by, why
    return Step(s, (Decision("pause", now, s.wave, why, values=evidence),), None)


def _install_status(plan: RolloutPlan, s: RolloutState, obs: Observation) -> tuple[list[str], list[str], list[str]]:
    """Moved devices split into installed, failed (refused, revoked, unknown) and not yet installed."""
    done, failed, pending = [], [], []
    for device in sorted(s.moved):
        view = obs.devices.get(device)
        running = view is not None and (view.shadow if plan.mode == "shadow" else view.active) == plan.candidate
        if running:
            done.append(device)
        elif view is None or view.revoked or plan.candidate in view.refused:
            failed.append(device)
        else:
            pending.append(device)
    return done, failed, pending


def cohorts(plan: RolloutPlan, s: RolloutState, obs: Observation) -> tuple[CohortStats, CohortStats]:
    """The candidate's cohort and the baseline it is compared with, per the plan's mode."""
    candidate, baseline = CohortStats(), CohortStats()
    for device in s.moved:
        source = obs.shadow if plan.mode == "shadow" else obs.telemetry
        stats = source.get(device, {}).get(plan.candidate)
        if stats is not None:
            candidate.add(stats)
    pool = s.control if plan.mode == "ab" else (list(s.moved) if plan.mode == "shadow" else s.targets)
    models = baseline_models(plan, s, obs, pool)
    for device in pool:
        for model, stats in obs.telemetry.get(device, {}).items():
            if model in models:
                baseline.add(stats)
    return candidate, baseline


def baseline_models(plan: RolloutPlan, s: RolloutState, obs: Observation, pool: Iterable[str]) -> set[str]:
    """The models a baseline may hold: what the pool's devices run (or the moved ones ran before the candidate),
    less the candidate and any model an earlier rollout rolled back."""
    models = {m for m in s.moved.values() if m}
    for device in pool:
        view = obs.devices.get(device)
        if view is not None and view.active:
            models.add(view.active)
    return models - {plan.candidate} - set(obs.rolled_back)

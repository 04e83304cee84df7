"""Rollout rehearsal: the same rollout (gates, waves, mode, windows) first on twins of the selected devices.

1. The server names the devices the rollout would reach and what it knows of each
   (``POST /api/v1/rollouts/rehearsal-profiles``): tags, profile, hardware, the model it runs, and its recent
   inputs as per-channel mean and std (from its telemetry's drift statistics).
2. Each twin copies one of them (``N`` twins over the devices, round robin): the same tags, profile, hardware
   and model, and the scenario's rows (recorded data or synthetic) scaled to that device's input mean and std,
   so that a drifting device's twin drifts the same way.
3. The twins run the device's model for ``warmup_s`` (the canary baseline: the targets' own history), then the
   rollout is created on them (its selection plus the twins' run tag) and followed to its end, bounded.
4. The report is the rehearsal rollout's phase and every decision with its reason and gate values; the twins
   are revoked and the rehearsal rollout aborted if it still runs.

A rehearsal *passes* when its rollout ends ``done`` (or ``shadow-passed``); anything else (a gate aborted or
paused it, or it did not finish in time) trips it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.core.plan import FINAL
from edgefleet.core.rollout import TWIN_TAG
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.twin.fleet import TwinFleet
from edgefleet.twin.scenario import Group, Scenario
from edgefleet.twin.sensors import Rows, scenario_rows

PASSED = ("done", "shadow-passed")


class RehearsalTripped(EdgefleetError):
    """The rehearsal of a rollout did not pass: the real rollout is not created."""


@dataclass
class Rehearsal:
    """What the rehearsal's rollout did."""

    twins: int
    rollout_id: str | None = None
    phase: str = "not started"
    reason: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.phase in PASSED

    def to_json(self) -> dict[str, Any]:
        return {"twins": self.twins, "rollout": self.rollout_id, "phase": self.phase, "reason": self.reason,
                "passed": self.passed, "decisions": self.decisions, "copied_devices": self.copied,
                "seconds": round(self.seconds, 1)}

    def lines(self) -> list[str]:
        """The report, one line per decision."""
        verdict = "passed" if self.passed else "TRIPPED"
        out = [f"rehearsal on {self.twins} twin(s) of {len(self.copied)} device(s): {verdict} ({self.phase}"
               f"{': ' + self.reason if self.reason else ''}) in {self.seconds:.0f} s"]
        for d in self.decisions:
            values = ", ".join(f"{k}={_short(v)}" for k, v in sorted((d.get("values") or {}).items()))
            shown = f" [{values}]" if values else ""
            out.append(f"  wave {d.get('wave')} {d.get('kind')}: {d.get('reason')}{shown}")
        return out


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def channel_moments(rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the rows' values (channels: axis 1 of recordings, the last axis otherwise)."""
    x = np.asarray(rows.x, dtype=np.float64)
    flat = x.transpose(1, 0, 2).reshape(x.shape[1], -1) if x.ndim == 3 else x.reshape(len(x), -1).T
    return flat.mean(axis=1), flat.std(axis=1)


def twin_groups(profiles: Sequence[dict[str, Any]], rows: Rows, twins: int) -> list[Group]:
    """One group per copied device: its tags, profile, hardware and model, and the rows scaled to its inputs."""
    base_mean, base_std = channel_moments(rows)
    groups = []
    used = profiles[:twins]
    for index, profile in enumerate(used):
        count = twins // len(used) + (1 if index < twins % len(used) else 0)
        gain: float | list[float] = 1.0
        offset: float | list[float] = 0.0
        mean, std = profile.get("input_mean"), profile.get("input_std")
        if mean is not None and std is not None and len(mean) == len(base_mean) == len(std):
            g = np.where(base_std > 1e-9, np.asarray(std) / np.maximum(base_std, 1e-9), 1.0)
            gain = [round(float(v), 6) for v in g]
            offset = [round(float(v), 6) for v in np.asarray(mean) - g * base_mean]
        groups.append(Group(name=f"d{index}", count=count, tags={**profile["tags"], "twin_of": profile["device"]},
                            profile=profile.get("profile"), hardware=profile.get("hardware"),
                            model=profile.get("running"), gain=gain, offset=offset))
    return groups


def rehearse(api: Any, rollout: dict[str, Any], twins: int, root: Path, scenario: Scenario, *,
             warmup_s: float = 10.0, timeout_s: float = 600.0, since_s: float = 3600.0,
             say: Callable[[str], None] = lambda _line: None) -> Rehearsal:
    """Run ``rollout`` (the keyword arguments of ``ControlPlane.create_rollout`` plus ``model``) on ``twins``
    twins of the devices it selects; see the module docstring."""
    started = time.monotonic()
    select = dict(rollout.get("select") or {})
    if TWIN_TAG in select:
        raise ConfigError(f"a rehearsal copies real devices: its selection cannot name the {TWIN_TAG!r} tag")
    profiles = api.rehearsal_profiles(select, rollout.get("profile"), limit=twins, since_s=since_s)
    if not profiles:
        raise ConfigError("nothing to rehearse on: the selection matches no device")
    missing = [p["device"] for p in profiles if not p.get("running")]
    if missing:
        raise ConfigError(f"cannot rehearse: {len(missing)} selected device(s) report no running model "
                          f"({', '.join(missing[:3])})")
    groups = twin_groups(profiles, scenario_rows(scenario), twins)
    fleet = TwinFleet(api, root, scenario.model_copy(update={"groups": groups}))
    report = Rehearsal(twins=twins, copied=[p["device"] for p in profiles[:twins]])
    try:
        say(f"rehearsal: {twins} twin(s) of {len(report.copied)} device(s), run tag {TWIN_TAG}={fleet.run_id}")
        fleet.provision(twins)
        fleet.start(timeout_s=timeout_s)
        deadline = time.monotonic() + timeout_s
        running = fleet.wait_running(None, twins, max(1.0, deadline - time.monotonic()))
        if running < twins:
            raise EdgefleetError(f"rehearsal: only {running} of {twins} twins run their device's model")
        say(f"rehearsal: twins run their devices' models; {warmup_s:.0f} s of baseline telemetry")
        time.sleep(warmup_s)
        options = {k: v for k, v in rollout.items() if k not in ("model", "select")}
        created = api.create_rollout(rollout["model"], select={**select, TWIN_TAG: fleet.run_id}, **options)
        report.rollout_id = created["id"]
        status = created
        while status["phase"] not in (*FINAL, "paused") and time.monotonic() < deadline:
            time.sleep(0.5)
            status = api.rollout(created["id"])
        report.phase, report.reason = status["phase"], status.get("reason", "")
        if status["phase"] not in (*FINAL, "paused"):
            report.reason = f"did not finish within {timeout_s:.0f} s ({status['phase']}, wave {status['wave']})"
            report.phase = "unfinished"
        report.decisions = [{k: d.get(k) for k in ("wave", "kind", "reason", "values", "role")}
                            for d in api.rollout(created["id"]).get("decisions", [])]
        return report
    finally:
        if report.rollout_id is not None and report.phase not in FINAL:
            with contextlib.suppress(EdgefleetError):
                api.rollout_command(report.rollout_id, "abort", "rehearsal over")
        fleet.close()
        report.seconds = time.monotonic() - started

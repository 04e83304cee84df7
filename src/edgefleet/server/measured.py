"""Measured device profiles: what the devices of one profile are (their reported ``facts``) and how fast they run
each model, against how fast the build host ran it.

For every model version that devices of a profile ran, the median latency their telemetry measured (the merged
latency histograms, per window) is divided by the build host's median at batch 1 (the bundle manifest's
``latency_b1_ms``): that model's scaling. The profile's scaling is the median over its models; ``edgefleet build
--profile NAME`` multiplies a candidate's host latency by it instead of estimating from MACs.

A device's profile is the one given at provisioning (else the one it reports); devices with none are under
``none``.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from edgefleet.core.cohorts import CohortStats
from edgefleet.server.store import Store

NO_PROFILE = "none"


@dataclass
class ModelScaling:
    model: str
    devices: int
    windows: int
    device_p50_ms: float | None
    host_b1_ms: float | None
    scaling: float | None
    """device_p50_ms / host_b1_ms; None where either is unknown."""


@dataclass
class MeasuredProfile:
    profile: str
    devices: int
    facts: list[dict[str, Any]] = field(default_factory=list)
    """Each distinct (cpu, machine, cores, memory_mb, runtimes, providers) reported, with its device count."""
    models: list[ModelScaling] = field(default_factory=list)
    scaling: float | None = None
    """Median of the models' scalings: device latency over build-host latency (None: nothing measured)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measured_profiles(store: Store, only: str | None = None, since_ts: float = 0.0) -> list[MeasuredProfile]:
    """Every profile's measured figures (or only ``only``'s: an empty profile when no device has it)."""
    groups: dict[str, list[Any]] = {}
    for device in store.list_devices():
        reported = device.reported if isinstance(device.reported, dict) else {}
        name = device.profile or reported.get("profile") or NO_PROFILE
        if only is None or name == only:
            groups.setdefault(str(name), []).append(device)
    if only is not None and only not in groups:
        return [MeasuredProfile(profile=only, devices=0)]
    host = {f"{m.name}@{m.version}": (m.manifest or {}).get("metrics", {}).get("latency_b1_ms")
            for m in store.list_models()}
    out = []
    for name, devices in sorted(groups.items()):
        primary, _shadow = store.device_model_stats([d.id for d in devices], since_ts)
        merged: dict[str, CohortStats] = {}
        counts: Counter[str] = Counter()
        for per_model in primary.values():
            for model, stats in per_model.items():
                merged.setdefault(model, CohortStats()).add(stats)
                counts[model] += 1
        models = [_scaling(model, stats, counts[model], host.get(model)) for model, stats in sorted(merged.items())]
        scalings = [m.scaling for m in models if m.scaling is not None]
        out.append(MeasuredProfile(profile=name, devices=len(devices), facts=_facts(devices), models=models,
                                   scaling=statistics.median(scalings) if scalings else None))
    return out


def _scaling(model: str, stats: CohortStats, devices: int, host_ms: Any) -> ModelScaling:
    device_ms = stats.latency.quantile(0.5)
    host_b1 = float(host_ms) if isinstance(host_ms, int | float) and host_ms > 0 else None
    return ModelScaling(model=model, devices=devices, windows=stats.windows, device_p50_ms=device_ms,
                        host_b1_ms=host_b1, scaling=device_ms / host_b1 if device_ms and host_b1 else None)


def _facts(devices: list[Any]) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for device in devices:
        facts = (device.reported or {}).get("facts") if isinstance(device.reported, dict) else None
        if not isinstance(facts, dict):
            continue
        key = repr(sorted((k, repr(v)) for k, v in facts.items()))
        entry = seen.setdefault(key, {**facts, "devices": 0})
        entry["devices"] += 1
    return sorted(seen.values(), key=lambda f: -int(f["devices"]))

"""A twin scenario: what the virtual devices sense and what goes wrong with them (YAML, validated).

::

    rate_hz: 10                  # sensor samples per second per twin
    telemetry_interval_s: 2      # the twins' telemetry period (short: a rehearsal's gates need data soon)
    data: recordings.npz         # recorded test rows (test_x, test_y), as the agent's ``npz:`` source reads
    synthetic: {channels: 6, classes: 4, length: 60, offset: 3.0, rows_per_class: 4}   # or generated rows
    groups:                      # each twin belongs to one group, by ``share`` (fractions) or ``count``
      - name: drifting
        share: 0.5
        tags: {site: north}
        profile: gateway
        hardware: generic
        noise: 0.1               # gaussian noise (std) added to every value
        gain: 1.0                # one number or one per channel
        gain_drift_per_min: 0.0  # the gain changes this much per minute of the twin's life
        offset: [0, 0, 2.5, 0, 0, 0]   # one number or one per channel, added after the gain
        sensor: {dropout: 0.0, stuck_after_s: null, spike_rate: 0.0, spike: 10.0}
        faults:
          - {kind: link_loss, at_s: 30, for_s: 10}
          - {kind: slow_link, rate_bps: 20000}       # downloads at this rate, MQTT served every 0.5 s
          - {kind: crash, at_s: 60, restart_after_s: 3}
          - {kind: disk_full, at_s: 0, for_s: 120}
        disk_mb: 64              # the twin's disk (its data directory), as free space for downloads

A malformed file is a :class:`ScenarioError` (exit code 2) in one line: the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgefleet.errors import ConfigError


class ScenarioError(ConfigError):
    """A scenario file that cannot be used."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SensorFaults(_Strict):
    """Faults of the sensor itself."""

    dropout: float = Field(default=0.0, ge=0.0, le=1.0, description="share of readings lost (NaN)")
    stuck_after_s: float | None = Field(default=None, ge=0.0, description="the sensor repeats one value from then")
    spike_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="share of readings with a spike")
    spike: float = Field(default=10.0, description="the spike's size, added to one channel")


class LinkLoss(_Strict):
    kind: Literal["link_loss"]
    at_s: float = Field(ge=0.0)
    for_s: float = Field(gt=0.0)


class SlowLink(_Strict):
    kind: Literal["slow_link"]
    rate_bps: float = Field(gt=0.0, description="download rate, bytes per second")
    mqtt_delay_s: float = Field(default=0.5, ge=0.0, le=30.0, description="how often MQTT traffic moves")


class Crash(_Strict):
    kind: Literal["crash"]
    at_s: float = Field(ge=0.0)
    restart_after_s: float = Field(default=2.0, ge=0.0)


class DiskFull(_Strict):
    kind: Literal["disk_full"]
    at_s: float = Field(default=0.0, ge=0.0)
    for_s: float | None = Field(default=None, gt=0.0, description="none: until the twin stops")


Fault = Annotated[LinkLoss | SlowLink | Crash | DiskFull, Field(discriminator="kind")]
Channels = float | list[float]


class Group(_Strict):
    """Twins that share tags, variation and faults."""

    name: str = Field(default="twins", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9_.-]+$")
    share: float | None = Field(default=None, gt=0.0, le=1.0)
    count: int | None = Field(default=None, ge=0)
    tags: dict[str, str] = Field(default_factory=dict)
    profile: str | None = Field(default=None, max_length=64)
    hardware: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=140, description="NAME@VERSION the twins run at start")
    noise: float = Field(default=0.0, ge=0.0)
    gain: Channels = 1.0
    gain_drift_per_min: float = 0.0
    offset: Channels = 0.0
    sensor: SensorFaults = Field(default_factory=SensorFaults)
    faults: list[Fault] = Field(default_factory=list, max_length=64)
    disk_mb: float = Field(default=1024.0, gt=0.0)

    @model_validator(mode="after")
    def _one_size(self) -> Group:
        if self.share is not None and self.count is not None:
            raise ValueError("give share or count, not both")
        return self


class Synthetic(_Strict):
    """Generated rows: class k raises channel k by ``offset`` over gaussian noise (std 0.3)."""

    channels: int = Field(default=6, ge=1, le=1024)
    classes: int = Field(default=4, ge=2, le=1024)
    length: int = Field(default=60, ge=1, le=100_000)
    offset: float = 3.0
    rows_per_class: int = Field(default=4, ge=1, le=10_000)
    seed: int = 0

    @model_validator(mode="after")
    def _fits(self) -> Synthetic:
        if self.classes > self.channels:
            raise ValueError("synthetic data needs at least one channel per class")
        return self


class Scenario(_Strict):
    """A whole scenario (see the module docstring)."""

    rate_hz: float = Field(default=10.0, gt=0.0, le=10_000.0)
    telemetry_interval_s: float = Field(default=2.0, gt=0.0)
    data: Path | None = None
    synthetic: Synthetic | None = None
    seed: int = 0
    groups: list[Group] = Field(default_factory=lambda: [Group()], min_length=1, max_length=256)

    @model_validator(mode="after")
    def _data(self) -> Scenario:
        if self.data is not None and self.synthetic is not None:
            raise ValueError("give data or synthetic, not both")
        return self

    def sizes(self, total: int) -> list[int]:
        """How many of ``total`` twins each group gets: counts first, the rest by share (the last group takes
        what rounding leaves; groups with neither share the rest equally)."""
        counts = [g.count or 0 for g in self.groups]
        left = max(0, total - sum(counts))
        free = [i for i, g in enumerate(self.groups) if g.count is None]
        if free:
            known = sum(g.share for g in (self.groups[i] for i in free) if g.share is not None)
            unset = [i for i in free if self.groups[i].share is None]
            each = max(0.0, 1.0 - known) / len(unset) if unset else 0.0
            weights = [share if (share := self.groups[i].share) is not None else each for i in free]
            scale = sum(weights) or 1.0
            given = 0
            for pos, i in enumerate(free):
                n = left - given if pos == len(free) - 1 else round(left * weights[pos] / scale)
                counts[i] = max(0, min(n, left - given))
                given += counts[i]
        return counts


def parse_scenario(data: Any, where: str = "scenario") -> Scenario:
    """A :class:`Scenario` from parsed YAML; ScenarioError naming the first bad field."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ScenarioError(f"{where}: must be a mapping of settings, not {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top)"
        raise ScenarioError(f"{where}: {field}: {first['msg']}") from exc


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file (a relative ``data`` path is the file's directory's)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"cannot read scenario {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"scenario {path} is not UTF-8 text") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "malformed"
        raise ScenarioError(f"scenario {path}: not YAML{at}: {problem}") from exc
    scenario = parse_scenario(raw, f"scenario {path}")
    if scenario.data is not None and not scenario.data.is_absolute():
        scenario = scenario.model_copy(update={"data": path.parent / scenario.data})
    return scenario

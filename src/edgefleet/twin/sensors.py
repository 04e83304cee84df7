"""What a twin senses: recorded or generated rows, replayed as the agent's ``npz:`` source replays them, with
this twin's variation (gain, gain drift, offset, noise) and sensor faults (dropouts, spikes, a stuck sensor).

The rows come from a recordings or build data file (``test_x``, ``test_y``: :func:`edgefleet.agent.sensors.
replay_file.load_replay_file`) or are generated (:func:`synthetic_rows`). :class:`TwinSource` is the agent's own
:class:`~edgefleet.agent.sources.ReplaySource` (the same pacing, model binding and labels) with the variation
applied to each block, and a sleep that a stop interrupts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgefleet.agent.sensors.replay_file import load_replay_file
from edgefleet.agent.sources import Block, ReplaySource
from edgefleet.errors import ConfigError
from edgefleet.twin.scenario import Group, Scenario, SensorFaults, Synthetic


@dataclass(frozen=True)
class Rows:
    """Rows [n, ...] and their integer labels [n]."""

    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...] = ()


def synthetic_rows(spec: Synthetic) -> Rows:
    """Rows [n, channels, length]: class k raises channel k by ``offset`` over gaussian noise (std 0.3)."""
    rng = np.random.default_rng(spec.seed)
    y = np.tile(np.arange(spec.classes), spec.rows_per_class)
    x = rng.normal(0.0, 0.3, size=(len(y), spec.channels, spec.length)).astype(np.float32)
    x[np.arange(len(y)), y, :] += spec.offset
    return Rows(x, y.astype(np.int64))  # no names: labels are the model's class indices


def scenario_rows(scenario: Scenario) -> Rows:
    """The rows the scenario names (its data file, else synthetic rows with the defaults)."""
    if scenario.data is not None:
        data = load_replay_file(scenario.data)
        return Rows(data.x, data.y, data.labels)
    return synthetic_rows(scenario.synthetic or Synthetic())


@dataclass(frozen=True)
class Variation:
    """One twin's sensor: ``value * (gain + drift * minutes) + offset + noise``, then its faults."""

    gain: np.ndarray
    gain_drift_per_min: float
    offset: np.ndarray
    noise: float
    faults: SensorFaults

    @classmethod
    def of(cls, group: Group, channels: int) -> Variation:
        return cls(_per_channel(group.gain, channels, "gain"), group.gain_drift_per_min,
                   _per_channel(group.offset, channels, "offset"), group.noise, group.sensor)


def _per_channel(value: float | list[float], channels: int, what: str) -> np.ndarray:
    if isinstance(value, list):
        if len(value) != channels:
            raise ConfigError(f"scenario: {what} has {len(value)} values for {channels} channel(s)")
        return np.asarray(value, dtype=np.float32)
    return np.full(channels, value, dtype=np.float32)


class TwinSource(ReplaySource):
    """The agent's replay of ``rows`` at ``rate_hz``, looping from a row chosen by ``seed``, with ``variation``
    applied (its noise and faults seeded by ``seed`` too)."""

    def __init__(self, rows: Rows, rate_hz: float, variation: Variation, *, seed: int,
                 stop: threading.Event | None = None) -> None:
        self._stopping = stop or threading.Event()
        start = int(np.random.default_rng(seed).integers(len(rows.x)))  # devices are not in step: each starts
        super().__init__(np.roll(rows.x, -start, axis=0), np.roll(rows.y, -start), rate_hz,  # at its own row
                         loop=True, row_rate_hz=rate_hz, fixed_rate=True, sleep=self._sleep_unless_stopped)
        self.labels = rows.labels
        self.waits_for_model = True
        self.variation = variation
        self._rng = np.random.default_rng(seed)
        self._born = time.monotonic()
        self._stuck: np.ndarray | None = None

    def _sleep_unless_stopped(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)

    def close(self) -> None:
        """End the stream at its next block."""
        self._stopping.set()

    def _raw_blocks(self) -> Iterator[Block]:
        for block in super()._raw_blocks():
            if self._stopping.is_set():
                return
            yield Block(self.vary(block.values, time.monotonic() - self._born), block.labels)

    def vary(self, values: np.ndarray, age_s: float) -> np.ndarray:
        """``values`` [n, ..., channels] as this twin's sensor reads them ``age_s`` into its life."""
        v = self.variation
        out = np.asarray(values, dtype=np.float32)
        channels = out.shape[-1]
        if len(v.gain) == channels:
            out = out * (v.gain + np.float32(v.gain_drift_per_min * age_s / 60.0)) + v.offset
        if v.noise:
            out = out + self._rng.normal(0.0, v.noise, size=out.shape).astype(np.float32)
        faults = v.faults
        if faults.stuck_after_s is not None and age_s >= faults.stuck_after_s:
            if self._stuck is None:
                self._stuck = out[0].copy()
            out = np.broadcast_to(self._stuck, out.shape).copy()
        if faults.spike_rate:
            hit = self._rng.random(len(out)) < faults.spike_rate
            if hit.any():
                out = out.copy()
                out[hit, ..., int(self._rng.integers(channels))] += faults.spike
        if faults.dropout:
            lost = self._rng.random(len(out)) < faults.dropout
            if lost.any():
                out = out.copy()
                out[lost] = np.nan
        return out.astype(np.float32, copy=False)

"""A synthetic vibration sensor: a rotating shaft on a rolling-element bearing, healthy or with a bearing fault.

    vibration:?rate=2000&rpm=1797&fault=none|outer_race|inner_race|ball|cage&severity=1&noise=0.05
              &channels=1&seed=0&speed=1&duration=S&fault_after=S&resonance=HZ&labels=0|1

The signal (in g) is the sum of
- shaft harmonics at ``k * f_r`` for k = 1, 2, 3 (imbalance, misalignment, looseness);
- with a fault at frequency ``f_d``: the shaft harmonics amplitude-modulated at ``f_d`` (sidebands at
  ``k f_r +- f_d``) and a train of impacts at ``f_d`` (slightly jittered, as rolling elements slip), each
  ringing a structural resonance and decaying. An inner-race defect turns with the shaft, so its impacts are
  modulated at ``f_r``; a ball defect travels with the cage, so its impacts are modulated at FTF;
- white Gaussian noise.

The fault frequencies follow from the bearing geometry (default: the 6205-2RS deep-groove ball bearing of the
Case Western Reserve University bearing data set), with ``n`` balls of diameter ``d`` on pitch diameter ``D``
at contact angle ``a``:

    FTF  = f_r / 2 * (1 - d/D cos a)              cage (fundamental train)
    BPFO = n f_r / 2 * (1 - d/D cos a)            ball pass, outer race
    BPFI = n f_r / 2 * (1 + d/D cos a)            ball pass, inner race
    BSF  = D / (2 d) * f_r * (1 - (d/D cos a)^2)  ball spin; a ball defect strikes both races: 2 BSF

``fault_after`` starts the fault that many seconds into the stream; with ``labels=1`` (the default when a
fault is named) each reading carries label 0 (normal) or 1 (fault), and the source's labels are
("normal", "fault").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from edgefleet.agent.sources import Pacer, Reading, SensorSource, number_option
from edgefleet.errors import ConfigError

FAULTS = ("none", "outer_race", "inner_race", "ball", "cage")
LABELS = ("normal", "fault")
HARMONICS = (0.5, 0.25, 0.1)  # g at 1x, 2x, 3x running speed
CHANNEL_GAINS = (1.0, 0.7, 0.45, 0.3)
MAX_RATE_HZ = 200_000.0


@dataclass(frozen=True)
class BearingGeometry:
    """Rolling-element count, ball and pitch diameters (same unit) and contact angle in degrees."""

    balls: int = 9
    ball_diameter: float = 0.3126  # inches: SKF 6205-2RS JEM, as in the CWRU data set
    pitch_diameter: float = 1.537
    contact_angle_deg: float = 0.0

    def frequencies(self, shaft_hz: float) -> dict[str, float]:
        """FTF, BPFO, BPFI and BSF in Hz at shaft frequency ``shaft_hz``."""
        ratio = self.ball_diameter / self.pitch_diameter * math.cos(math.radians(self.contact_angle_deg))
        return {
            "ftf": shaft_hz / 2.0 * (1.0 - ratio),
            "bpfo": self.balls * shaft_hz / 2.0 * (1.0 - ratio),
            "bpfi": self.balls * shaft_hz / 2.0 * (1.0 + ratio),
            "bsf": self.pitch_diameter / (2.0 * self.ball_diameter) * shaft_hz * (1.0 - ratio**2),
        }


def fault_frequency(fault: str, shaft_hz: float, geometry: BearingGeometry = BearingGeometry()) -> float:
    """The impact rate of ``fault`` in Hz (0 for none)."""
    f = geometry.frequencies(shaft_hz)
    return {"none": 0.0, "outer_race": f["bpfo"], "inner_race": f["bpfi"], "ball": 2.0 * f["bsf"],
            "cage": f["ftf"]}[fault]


class VibrationSignal:
    """Generates the signal block by block, continuous across blocks (see the module docstring)."""

    def __init__(self, rate_hz: float, rpm: float = 1797.0, fault: str = "none", *, severity: float = 1.0,
                 noise: float = 0.05, channels: int = 1, seed: int = 0, fault_after_s: float = 0.0,
                 resonance_hz: float | None = None, geometry: BearingGeometry = BearingGeometry()) -> None:
        if fault not in FAULTS:
            raise ConfigError(f"unknown bearing fault {fault!r}: use one of {', '.join(FAULTS)}")
        if not (0 < rate_hz <= MAX_RATE_HZ and rpm > 0 and severity >= 0 and noise >= 0):
            raise ConfigError("vibration needs 0 < rate <= 200 kHz, rpm > 0, severity >= 0 and noise >= 0")
        if not 1 <= channels <= len(CHANNEL_GAINS):
            raise ConfigError(f"vibration channels must be 1 to {len(CHANNEL_GAINS)}")
        self.rate_hz = rate_hz
        self.shaft_hz = rpm / 60.0
        self.fault = fault
        self.fault_hz = fault_frequency(fault, self.shaft_hz, geometry)
        self.frequencies = geometry.frequencies(self.shaft_hz)
        self.channels = channels
        self._severity = severity
        self._noise = noise
        self._fault_start = round(fault_after_s * rate_hz)
        self._rng = np.random.default_rng(seed)  # noise
        self._jitter = np.random.default_rng((seed, 1))  # impact timing: independent of the block sizes
        self._phases = self._jitter.uniform(0, 2 * math.pi, len(HARMONICS))
        self._gains = np.asarray(CHANNEL_GAINS[:channels], dtype=np.float64)
        resonance = resonance_hz if resonance_hz is not None else min(3000.0, 0.3 * rate_hz)
        decay_s = min(2e-3, 0.2 / self.fault_hz) if self.fault_hz else 2e-3
        ring = np.arange(math.ceil(5 * decay_s * rate_hz) + 1) / rate_hz
        self._kernel = np.exp(-ring / decay_s) * np.sin(2 * math.pi * resonance * ring)
        self._tail = np.zeros(len(self._kernel) - 1)
        self._next_impact = 0.0  # seconds
        self._modulation_hz = {"inner_race": self.shaft_hz, "ball": self.frequencies["ftf"]}.get(fault, 0.0)
        self._done = 0

    def block(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``n`` samples [n, channels] (float32) and whether the fault was active at each."""
        index = np.arange(self._done, self._done + n)
        t = index / self.rate_hz
        faulty = index >= self._fault_start if self.fault != "none" else np.zeros(n, dtype=bool)
        shaft = sum(a * np.sin(2 * math.pi * (k + 1) * self.shaft_hz * t + p)
                    for k, (a, p) in enumerate(zip(HARMONICS, self._phases, strict=True)))
        signal = np.asarray(shaft, dtype=np.float64)
        if faulty.any():
            depth = 0.4 * min(self._severity, 2.0)
            signal = signal * np.where(faulty, 1.0 + depth * np.cos(2 * math.pi * self.fault_hz * t), 1.0)
        signal = signal + self._impacts(t, faulty)
        out = signal[:, None] * self._gains[None, :] + self._rng.normal(0.0, self._noise, (n, self.channels))
        self._done += n
        return out.astype(np.float32), faulty

    def _impacts(self, t: np.ndarray, faulty: np.ndarray) -> np.ndarray:
        """Overlap-add of the ringing kernel at each impact time in this block."""
        n = len(t)
        train = np.zeros(n + len(self._kernel) - 1)
        train[: len(self._tail)] += self._tail
        if self.fault_hz and faulty.any():
            end = (self._done + n) / self.rate_hz
            period = 1.0 / self.fault_hz
            when = max(self._next_impact, self._fault_start / self.rate_hz)
            impulses = np.zeros(n)
            while when < end:
                at = int(when * self.rate_hz) - self._done
                if 0 <= at < n:
                    amplitude = self._severity
                    if self._modulation_hz:
                        amplitude *= 0.6 + 0.4 * math.cos(2 * math.pi * self._modulation_hz * when)
                    impulses[at] += amplitude
                when += period * max(0.5, 1.0 + 0.01 * self._jitter.standard_normal())
            self._next_impact = when
            train += np.convolve(impulses, self._kernel)
        self._tail = train[n:].copy()
        return train[:n]


class VibrationSource(SensorSource):
    """Streams :class:`VibrationSignal` sample by sample at its rate (times ``speed``)."""

    BLOCK = 1024

    def __init__(self, signal: VibrationSignal, *, speed: float = 1.0, duration_s: float | None = None,
                 with_labels: bool = False, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        if speed <= 0:
            raise ConfigError("vibration speed must be positive")
        self.signal = signal
        self._limit = None if duration_s is None else round(duration_s * signal.rate_hz)
        self._with_labels = with_labels
        self._rate = signal.rate_hz * speed
        self._clock = clock
        self._sleep = sleep
        if with_labels:
            self.labels = LABELS

    @classmethod
    def from_options(cls, options: dict[str, str]) -> VibrationSource:
        """Build from a ``vibration:?...`` spec's options (see the module docstring)."""
        known = {"rate", "rpm", "fault", "severity", "noise", "channels", "seed", "speed", "duration",
                 "fault_after", "resonance", "labels"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"unknown vibration option(s) {', '.join(unknown)}: use {', '.join(sorted(known))}")
        fault = options.get("fault", "none")
        duration = options.get("duration")
        resonance = options.get("resonance")
        signal = VibrationSignal(
            number_option(options, "rate", 2000.0), number_option(options, "rpm", 1797.0), fault,
            severity=number_option(options, "severity", 1.0), noise=number_option(options, "noise", 0.05),
            channels=int(number_option(options, "channels", 1)), seed=int(number_option(options, "seed", 0)),
            fault_after_s=number_option(options, "fault_after", 0.0),
            resonance_hz=None if resonance is None else number_option(options, "resonance", 0.0))
        labels = options.get("labels", "0" if fault == "none" else "1") not in ("0", "false", "no")
        return cls(signal, speed=number_option(options, "speed", 1.0),
                   duration_s=None if duration is None else number_option(options, "duration", 0.0),
                   with_labels=labels)

    def _raw(self) -> Iterator[Reading | None]:
        pacer = Pacer(self._rate, self._clock, self._sleep)
        emitted = 0
        while self._limit is None or emitted < self._limit:
            size = self.BLOCK if self._limit is None else min(self.BLOCK, self._limit - emitted)
            samples, faulty = self.signal.block(size)
            flags = faulty.tolist()
            for row, fault in zip(samples, flags, strict=True):
                pacer.wait()
                yield Reading(row, int(fault) if self._with_labels else None)
            emitted += size

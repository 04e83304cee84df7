"""A time-series pipeline's trigger: a cheap test of each window that decides whether the model runs at all.

    "trigger": {"kind": "rms" | "energy" | "peak", "threshold": T, "channel": C, "hold": N}

The level of a window is measured about each channel's training mean, in the sensor's units: ``rms`` is the
root mean square of ``x - mean``, ``energy`` its mean square (``rms ** 2``), ``peak`` the largest ``|x - mean|``
(a motion threshold). ``channel`` (0-based, optional) measures one channel; without it, all of them. A window
whose level is under ``threshold`` is not inferred on: it is counted (``trigger_skipped`` in telemetry) and
nothing else happens. After a window that fires, the next ``hold`` windows (default 0) run whatever their level,
so that the model sees an event to its end. The test costs one pass over the window's samples, which the
windower has already scaled: a small fraction of any model's run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.errors import BundleError

KINDS = ("rms", "energy", "peak")
KEYS = frozenset({"kind", "threshold", "channel", "hold"})
MAX_HOLD = 1 << 16


def _invalid(why: str) -> BundleError:
    return BundleError(f"preprocessing trigger is invalid: {why}", reason="malformed")


@dataclass(frozen=True)
class TriggerSpec:
    """The parsed ``trigger`` entry (see the module docstring)."""

    kind: str
    threshold: float
    channel: int | None = None
    hold: int = 0

    @classmethod
    def from_manifest(cls, spec: Any, channels: int) -> TriggerSpec:
        """Parse and check the entry for a stream of ``channels`` channels; BundleError with one line."""
        if not isinstance(spec, dict):
            raise _invalid(f"it must be a mapping with keys {', '.join(sorted(KEYS))}")
        unknown = sorted(str(key) for key in spec if key not in KEYS)
        if unknown:
            raise _invalid(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
        kind = spec.get("kind")
        if kind not in KINDS:
            raise _invalid(f"kind {kind!r} is not one of {', '.join(KINDS)}")
        threshold, channel, hold = spec.get("threshold"), spec.get("channel"), spec.get("hold", 0)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold) \
                or threshold < 0:
            raise _invalid(f"threshold must be a number >= 0, got {threshold!r}")
        if channel is not None and (isinstance(channel, bool) or not isinstance(channel, int)
                                    or not 0 <= channel < channels):
            raise _invalid(f"channel must be an integer from 0 to {channels - 1}, got {channel!r}")
        if isinstance(hold, bool) or not isinstance(hold, int) or not 0 <= hold <= MAX_HOLD:
            raise _invalid(f"hold must be a number of windows from 0 to {MAX_HOLD}, got {hold!r}")
        return cls(str(kind), float(threshold), channel, hold)

    def to_manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "threshold": self.threshold}
        if self.channel is not None:
            out["channel"] = self.channel
        if self.hold:
            out["hold"] = self.hold
        return out


class TriggerGate:
    """Applies a :class:`TriggerSpec` to scaled windows [channels, window]; ``std``: the channels' training
    standard deviations (the scaling it undoes). Counts the windows it held back in ``skipped``."""

    def __init__(self, spec: TriggerSpec, std: np.ndarray) -> None:
        self.spec = spec
        self.skipped = 0
        self._std = np.asarray(std, dtype=np.float64)
        self._var = self._std**2
        self._channel = spec.channel
        # compare in the cheapest form: mean square for rms and energy, peak as it is
        self._limit = spec.threshold**2 if spec.kind == "rms" else spec.threshold
        self._peak = spec.kind == "peak"
        self._hold = spec.hold
        self._holding = 0

    def level(self, scaled: np.ndarray) -> float:
        """The window's level in the spec's unit (see the module docstring)."""
        value = self._measure(scaled)
        return math.sqrt(value) if self.spec.kind == "rms" else value

    def _measure(self, scaled: np.ndarray) -> float:
        channel = self._channel
        if self._peak:
            if channel is not None:
                return float(np.abs(scaled[channel]).max()) * float(self._std[channel])
            return float((np.abs(scaled).max(axis=1) * self._std).max())
        if channel is not None:
            row = scaled[channel]
            square: float = float(np.vdot(row, row)) / row.size * float(self._var[channel])
            return square
        squares: np.ndarray = np.einsum("ij,ij->i", scaled, scaled, dtype=np.float64)
        return float(squares @ self._var) / scaled.size

    def fires(self, scaled: np.ndarray) -> bool:
        """Whether the model should run on this window; a window it should not run on is counted."""
        if self._measure(scaled) >= self._limit:
            self._holding = self._hold
            return True
        if self._holding:
            self._holding -= 1
            return True
        self.skipped += 1
        return False

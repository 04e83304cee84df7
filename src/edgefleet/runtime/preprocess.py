"""The manifest's preprocessing spec, run on the device: scaling and a sliding window over a stream."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.errors import BundleError


@dataclass(frozen=True)
class WindowSpec:
    """``{"kind": "sliding_window", "channels", "window", "hop", "mean", "std", "sample_rate_hz"}``."""

    channels: int
    window: int
    hop: int
    mean: np.ndarray
    std: np.ndarray
    sample_rate_hz: float

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> WindowSpec:
        try:
            if spec.get("kind") != "sliding_window":
                raise ValueError(f"unknown preprocessing kind {spec.get('kind')!r}")
            channels, window, hop = int(spec["channels"]), int(spec["window"]), int(spec["hop"])
            mean = np.asarray(spec["mean"], dtype=np.float32)
            std = np.asarray(spec["std"], dtype=np.float32)
            rate = float(spec.get("sample_rate_hz", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"preprocessing spec is invalid: {exc}", reason="malformed") from exc
        if channels < 1 or window < 1 or hop < 1 or mean.shape != (channels,) or std.shape != (channels,):
            raise BundleError("preprocessing spec has inconsistent sizes", reason="malformed")
        if not (np.all(np.isfinite(mean)) and np.all(std > 0)):
            raise BundleError("preprocessing statistics must be finite with std > 0", reason="malformed")
        return cls(channels, window, hop, mean, std, rate)


@dataclass(frozen=True)
class Window:
    """One model input [1, channels, window] and its label when every sample in it carried the same one."""

    x: np.ndarray
    label: int | None


class StreamWindower:
    """Scales each sample and emits a window every ``hop`` samples once ``window`` samples are buffered."""

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._samples: deque[np.ndarray] = deque(maxlen=spec.window)
        self._labels: deque[int | None] = deque(maxlen=spec.window)
        self._since_emit = 0

    def push(self, values: np.ndarray, label: int | None = None) -> Window | None:
        """Add one sample (already validated: finite, ``channels`` long)."""
        self._samples.append((values.astype(np.float32) - self.spec.mean) / self.spec.std)
        self._labels.append(label)
        self._since_emit += 1
        if len(self._samples) < self.spec.window or self._since_emit < self.spec.hop:
            return None
        self._since_emit = 0
        x = np.stack(self._samples, axis=1)[np.newaxis]
        first = self._labels[0]
        pure = first is not None and all(lbl == first for lbl in self._labels)
        return Window(x, first if pure else None)

    def reset(self) -> None:
        """Forget buffered samples (after a gap in the stream)."""
        self._samples.clear()
        self._labels.clear()
        self._since_emit = 0

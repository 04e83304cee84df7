"""The manifest's preprocessing spec, run on the device: impute, scale, window, then optional features.

    {"kind": "sliding_window", "channels": C, "window": W, "hop": H, "sample_rate_hz": R,
     "mean": [C floats], "std": [C floats],                      scaling with the training statistics
     "missing": {"strategy": "hold" | "mean", "max_fraction": 0.1},   optional: fill missing values
     "features": [{"kind": "band_energy", "bands_hz": [[0, 50], ...]}],  optional, see runtime.features
     "trigger": {"kind": "rms", "threshold": 0.5}}   optional: run the model only on windows that fire, see
                                                     runtime.trigger

Without ``missing`` a reading with any missing value never reaches the windower (the source skips and counts
it), as before. With it, a missing value (NaN) is replaced by the channel's last valid value (``hold``; the
training mean until one was seen) or the training mean (``mean``), and a window in which more than
``max_fraction`` of the values were filled in is dropped and counted instead of being inferred on. Without
``features`` the model input is the scaled window [1, C, W]; with them, [1, C, F].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from edgefleet.errors import BundleError
from edgefleet.runtime.features import FeatureStep, feature_step
from edgefleet.runtime.trigger import TriggerSpec


@dataclass(frozen=True)
class MissingSpec:
    """How missing values are filled in, and how many a window may hold (a fraction of its values)."""

    strategy: str = "hold"
    max_fraction: float = 0.1

    @classmethod
    def from_manifest(cls, spec: Any) -> MissingSpec:
        try:
            strategy = str(spec.get("strategy", "hold"))
            max_fraction = float(spec.get("max_fraction", 0.1))
        except (AttributeError, TypeError, ValueError) as exc:
            raise BundleError(f"preprocessing 'missing' is invalid: {exc}", reason="malformed") from exc
        if strategy not in ("hold", "mean") or not 0.0 <= max_fraction <= 1.0:
            raise BundleError("preprocessing 'missing' needs strategy hold|mean and max_fraction in [0, 1]",
                              reason="malformed")
        return cls(strategy, max_fraction)


@dataclass(frozen=True)
class WindowSpec:
    """The parsed spec (see the module docstring)."""

    channels: int
    window: int
    hop: int
    mean: np.ndarray
    std: np.ndarray
    sample_rate_hz: float
    missing: MissingSpec | None = None
    features: tuple[FeatureStep, ...] = field(default=())
    trigger: TriggerSpec | None = None

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> WindowSpec:
        try:
            if spec.get("kind") != "sliding_window":
                raise ValueError(f"unknown preprocessing kind {spec.get('kind')!r}")
            channels, window, hop = int(spec["channels"]), int(spec["window"]), int(spec["hop"])
            mean = np.asarray(spec["mean"], dtype=np.float32)
            std = np.asarray(spec["std"], dtype=np.float32)
            rate = float(spec.get("sample_rate_hz", 0.0))
            steps = spec.get("features", [])
            steps = [steps] if isinstance(steps, dict) else list(steps)
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"preprocessing spec is invalid: {exc}", reason="malformed") from exc
        if channels < 1 or window < 1 or hop < 1 or mean.shape != (channels,) or std.shape != (channels,):
            raise BundleError("preprocessing spec has inconsistent sizes", reason="malformed")
        if not (np.all(np.isfinite(mean)) and np.all(std > 0)):
            raise BundleError("preprocessing statistics must be finite with std > 0", reason="malformed")
        missing = MissingSpec.from_manifest(spec["missing"]) if spec.get("missing") is not None else None
        features = tuple(feature_step(step, sample_rate_hz=rate, window=window) for step in steps)
        trigger = TriggerSpec.from_manifest(spec["trigger"], channels) if spec.get("trigger") is not None else None
        return cls(channels, window, hop, mean, std, rate, missing, features, trigger)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model input one window makes: [1, channels, window] or [1, channels, features]."""
        width = self.window
        for step in self.features:
            width = step.output_width(width)
        return (1, self.channels, width)

    @property
    def imputes(self) -> bool:
        """Whether readings with missing values should reach the windower."""
        return self.missing is not None


class Window(NamedTuple):
    """One model input ``x``, its scaled samples [C, W], its label when every sample carried the same one, the
    number of samples new since the previous window and the number of values filled in."""

    x: np.ndarray
    label: int | None
    samples: np.ndarray | None = None
    fresh: int = 0
    imputed: int = 0


COMPACT_EVERY = 1024  # samples written between two moves of the newest window to the buffer's start


class StreamWindower:
    """Buffers samples and emits a window every ``hop`` samples once ``window`` are buffered.

    Samples are appended to a buffer ``window + COMPACT_EVERY`` rows long, so the newest ``window`` samples are
    always one contiguous slice; when it is full, the newest ``window - 1`` rows move to its start (one copy per
    ``COMPACT_EVERY`` samples). Scaling happens once per window, not per sample.
    """

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self.dropped = 0
        """Windows dropped because too many of their values were missing."""
        self.imputed = 0
        """Values filled in, over the windower's life."""
        self._width = spec.window
        self._hop = spec.hop
        self._channels = spec.channels
        self._buffer = np.zeros((spec.window + COMPACT_EVERY, spec.channels), dtype=np.float32)
        self._mean_col = spec.mean.reshape(-1, 1)
        self._std_col = spec.std.reshape(-1, 1)
        self._imputing = spec.missing is not None
        self._max_filled = int(spec.missing.max_fraction * spec.window * spec.channels) if spec.missing else 0
        self._hold = spec.missing is not None and spec.missing.strategy == "hold"
        self.block_fresh: np.ndarray | None = None
        """After :meth:`push_block`: the scaled samples [C, k] new in its windows (the union of each window's
        ``fresh`` samples, in order); None when the block went row by row or gave no window."""
        self.reset()

    def reset(self) -> None:
        """Forget buffered samples (after a gap in the stream)."""
        self._end = 0
        self._count = 0
        self._since_emit = 0
        self._run_label: int | None = None
        self._run = 0
        self._filled_in_window = 0
        self._filled_per_sample = [0] * self.spec.window
        self._last = self.spec.mean.copy()

    def push(self, values: np.ndarray, label: int | None = None, missing: bool = False) -> Window | None:
        """Add one sample of ``channels`` values, finite unless ``missing`` (then NaN marks what is missing)."""
        filled = 0
        if missing:
            values, filled = self._fill(values)
        elif self._hold:
            self._last = values
        end = self._end
        if end == len(self._buffer):
            keep = self._width - 1
            self._buffer[:keep] = self._buffer[end - keep : end]
            end = keep
        self._buffer[end] = values
        self._end = end = end + 1
        if self._imputing:
            slot = self._count % self._width
            self._filled_in_window += filled - self._filled_per_sample[slot]
            self._filled_per_sample[slot] = filled
        if label is not None:
            if label == self._run_label:
                self._run += 1
            else:
                self._run_label, self._run = label, 1
        elif self._run_label is not None:
            self._run_label = None
        count = self._count = self._count + 1
        since = self._since_emit + 1
        if since < self._hop or count < self._width:
            self._since_emit = since
            return None
        self._since_emit = 0
        if self._filled_in_window > self._max_filled:
            self.dropped += 1
            return None
        width = self._width
        scaled = np.empty((self._channels, width), dtype=np.float32)  # C order: the runtime takes it as it is
        np.subtract(self._buffer[end - width : end].T, self._mean_col, out=scaled)
        np.divide(scaled, self._std_col, out=scaled)
        x = scaled
        for step in self.spec.features:
            x = step(x)
        return Window(x[np.newaxis], self._run_label if self._run >= width else None, scaled,
                      since if since < width else width, self._filled_in_window)

    def push_block(self, values: np.ndarray, labels: np.ndarray | None = None,
                   missing: np.ndarray | None = None, no_label: int = -(2**62)) -> list[Window]:
        """Add consecutive samples [n, channels] at once: the windows :meth:`push` would give one by one, each
        a view of one array scaled in one pass. ``labels`` [n] (``no_label`` where unknown), ``missing`` [n]
        (rows with NaN). A spec that imputes goes row by row."""
        n = len(values)
        self.block_fresh = None
        if self._imputing or missing is not None or n < 2:
            label_list = labels.tolist() if labels is not None else [None] * n
            missing_list = missing.tolist() if missing is not None else [False] * n
            out = []
            for i in range(n):
                label = label_list[i]
                window = self.push(values[i], None if label == no_label else label, missing_list[i])
                if window is not None:
                    out.append(window)
            return out
        width, hop = self._width, self._hop
        # where windows end, in block rows (1-based): exactly where push would emit them
        count, since = self._count, self._since_emit
        ends: list[int] = []
        fresh: list[int] = []
        k = 0
        while True:
            need = max(hop - since, width - count, 1)
            if k + need > n:
                since += n - k
                count += n - k
                break
            k += need
            count += need
            since += need
            ends.append(k)
            fresh.append(since if since < width else width)
            since = 0
        self._count, self._since_emit = count, since
        # label runs: the run of equal labels ending at each row, carried over from the previous samples
        window_labels = self._block_labels(labels, ends, no_label)
        # the samples: the buffer's newest width - 1 rows, then the block
        end = self._end
        keep = min(end, width - 1)
        joined = np.concatenate((self._buffer[end - keep : end], values.astype(np.float32, copy=False)))
        tail = min(len(joined), width - 1)
        self._buffer[:tail] = joined[len(joined) - tail :]
        self._end = tail
        m = len(ends)
        if not m:
            return []
        # scale once, then cut every window from the scaled block (ends are ``hop`` apart after the first)
        scaled_all = np.empty((self._channels, len(joined)), dtype=np.float32)
        np.subtract(joined.T, self._mean_col, out=scaled_all)
        np.divide(scaled_all, self._std_col, out=scaled_all)
        first = keep + ends[0] - width  # joined row where the first window starts
        item = scaled_all.itemsize
        view = np.ndarray((m, self._channels, width), dtype=np.float32, buffer=scaled_all, offset=first * item,
                          strides=(hop * item, scaled_all.shape[1] * item, item))
        windows = view.copy()  # [m, C, W], C order: the runtime takes each window as it is
        if hop <= width:  # the windows' new samples are one run of rows (with a longer hop, some are in none)
            last = keep + ends[-1]
            self.block_fresh = scaled_all[:, last - (ends[-1] - ends[0]) - fresh[0] : last]
        features = self.spec.features
        out = []
        for i in range(m):
            scaled = windows[i]
            if features:
                x = scaled
                for step in features:
                    x = step(x)
                x = x[np.newaxis]
            else:
                x = windows[i : i + 1]
            out.append(Window(x, window_labels[i], scaled, fresh[i], 0))
        return out

    def _block_labels(self, labels: np.ndarray | None, ends: list[int], no_label: int) -> list[int | None]:
        """Each window's label (None unless its ``window`` samples share one), and the run carried on."""
        width = self._width
        if labels is None:
            self._run_label, self._run = None, 0
            return [None] * len(ends)
        first, last = int(labels[0]), int(labels[-1])
        carried = self._run if first == self._run_label else 0
        if first == last and (labels == first).all():  # the common case: one label over the block
            if first == no_label:
                self._run_label, self._run = None, 0
                return [None] * len(ends)
            self._run_label, self._run = first, carried + len(labels)
            return [first if carried + k >= width else None for k in ends]
        n = len(labels)
        row = np.arange(n)
        change = np.empty(n, dtype=bool)
        change[0] = True
        np.not_equal(labels[1:], labels[:-1], out=change[1:])
        starts = np.maximum.accumulate(np.where(change, row, 0))
        runs = row - starts + 1
        runs[starts == 0] += carried
        out: list[int | None] = [None] * len(ends)
        if ends:
            at = np.asarray(ends) - 1
            for i, (label, run) in enumerate(zip(labels[at].tolist(), runs[at].tolist(), strict=True)):
                if run >= width and label != no_label:
                    out[i] = label
        self._run_label, self._run = (None, 0) if last == no_label else (last, int(runs[-1]))
        return out

    def _fill(self, values: np.ndarray) -> tuple[np.ndarray, int]:
        spec = self.spec
        if spec.missing is None:
            raise ValueError("a reading with missing values reached a windower whose spec does not impute")
        gaps = np.isnan(values)
        filled = int(gaps.sum())
        source = self._last if spec.missing.strategy == "hold" else spec.mean
        values = np.where(gaps, source, values).astype(np.float32)
        self._last = values
        self.imputed += filled
        return values, filled

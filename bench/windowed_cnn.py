"""The benchmarks' small BasicMotions classifier: 40-sample windows every 5 samples (denser for training), a
1D-CNN of about 3.5k parameters, its float and int8 ONNX models and their accuracy on the test windows.

It was the first demo's model; the benchmarks keep it so their results stay comparable from run to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.build.evaluate import BuildMetrics, measure
from edgefleet.build.quantize import quantize_int8
from edgefleet.build.train import export_onnx, train_cnn1d
from edgefleet.data.basicmotions import Recordings
from edgefleet.data.windows import channel_stats, sliding_windows

TRAIN_HOP = 2  # denser windows for training: cheap augmentation
CALIBRATION_WINDOWS = 128


@dataclass(frozen=True)
class WindowedBuild:
    """A float model, its int8 twin, their metrics on the test windows, and how to feed them."""

    float_model: bytes
    int8_model: bytes
    float_metrics: BuildMetrics
    int8_metrics: BuildMetrics
    preprocess: dict[str, Any]
    labels: tuple[str, ...]


def normalize(recordings: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(x - mean) / std per channel for recordings [n, channels, length], as float32."""
    out: np.ndarray = (np.asarray(recordings, dtype=np.float32) - mean[:, None]) / std[:, None]
    return out.astype(np.float32, copy=False)


def build_basicmotions_model(
    rec: Recordings, *, window: int = 40, hop: int = 5, epochs: int = 60, seed: int = 0
) -> WindowedBuild:
    """Train, export, quantize and measure a classifier of ``window``-sample windows of ``rec``; test windows
    are cut every ``hop`` samples, the way the device cuts its stream."""
    mean, std = channel_stats(rec.train_x)
    train_x, train_y = sliding_windows(normalize(rec.train_x, mean, std), rec.train_y, window, min(hop, TRAIN_HOP))
    test_x, test_y = sliding_windows(normalize(rec.test_x, mean, std), rec.test_y, window, hop)
    channels = train_x.shape[1]

    model = train_cnn1d(train_x, train_y, len(rec.labels), epochs=epochs, seed=seed)
    float_model = export_onnx(model, channels, window)
    rng = np.random.default_rng(seed)
    calib = train_x[rng.choice(len(train_x), size=min(CALIBRATION_WINDOWS, len(train_x)), replace=False)]
    int8_model = quantize_int8(float_model, calib)
    preprocess: dict[str, Any] = {
        "kind": "sliding_window", "channels": channels, "window": window, "hop": hop,
        "sample_rate_hz": float(rec.sample_rate_hz), "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }
    return WindowedBuild(float_model=float_model, int8_model=int8_model,
                         float_metrics=measure(float_model, test_x, test_y),
                         int8_metrics=measure(int8_model, test_x, test_y), preprocess=preprocess, labels=rec.labels)

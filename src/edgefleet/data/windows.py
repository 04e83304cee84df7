"""Sliding windows over multichannel recordings, and per-channel statistics (pure numpy).

The same windowing runs at build time (to make training and test sets) and on the device (over streamed
samples), so build-time test accuracy is what a device replaying the test set should reproduce.
"""

from __future__ import annotations

import numpy as np

from edgefleet.errors import DataError

STD_FLOOR = 1e-6


def _as_recordings(recordings: np.ndarray) -> np.ndarray:
    """Return ``recordings`` as a finite float32 array [n, channels, length] or raise DataError."""
    try:
        arr = np.asarray(recordings, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"recordings are not numeric: {exc}") from exc
    if arr.ndim != 3:
        raise DataError(f"recordings must have shape [n, channels, length], got {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError("recordings are empty")
    if not np.isfinite(arr).all():
        raise DataError("recordings contain NaN or infinite values")
    return arr


def sliding_windows(
    recordings: np.ndarray, labels: np.ndarray, window: int, hop: int
) -> tuple[np.ndarray, np.ndarray]:
    """Cut every recording into windows of ``window`` samples every ``hop`` samples.

    Windows never span two recordings. Returns x float32 [m, channels, window] and y int64 [m], where
    each window carries its recording's label, in recording order then time order.
    """
    arr = _as_recordings(recordings)
    y = np.asarray(labels)
    if y.shape != (arr.shape[0],):
        raise DataError(f"labels shape {y.shape} does not match {arr.shape[0]} recordings")
    length = arr.shape[2]
    if window < 1 or window > length:
        raise DataError(f"window {window} must be between 1 and the recording length {length}")
    if hop < 1:
        raise DataError(f"hop must be at least 1, got {hop}")
    starts = np.arange(0, length - window + 1, hop)
    # [n, channels, n_windows, window] view, then windows first: [n, n_windows, channels, window]
    views = np.lib.stride_tricks.sliding_window_view(arr, window, axis=2)[:, :, starts, :]
    x = np.ascontiguousarray(views.transpose(0, 2, 1, 3)).reshape(-1, arr.shape[1], window)
    return x.astype(np.float32, copy=False), np.repeat(y.astype(np.int64), len(starts))


def channel_stats(recordings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation (float32) over all recordings and time.

    The standard deviation is floored at 1e-6 so that normalizing a constant channel stays finite.
    """
    arr = _as_recordings(recordings).astype(np.float64)
    mean = arr.mean(axis=(0, 2))
    std = np.maximum(arr.std(axis=(0, 2)), STD_FLOOR)
    return mean.astype(np.float32), std.astype(np.float32)

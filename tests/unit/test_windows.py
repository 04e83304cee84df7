"""Unit tests for edgefleet.data.windows: sliding windows and per-channel statistics."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.data.windows import channel_stats, sliding_windows
from edgefleet.errors import DataError


def _ramp(n: int, channels: int, length: int) -> np.ndarray:
    """Recording r, channel c, time t holds r*1000 + c*100 + t, so every value says where it came from."""
    r, c, t = np.meshgrid(np.arange(n), np.arange(channels), np.arange(length), indexing="ij")
    return (r * 1000 + c * 100 + t).astype(np.float64)


def test_counts_and_contents() -> None:
    """Length 10, window 4, hop 3 gives windows starting at 0, 3, 6, each copying its own samples."""
    x, y = sliding_windows(_ramp(1, 2, 10), np.array([7]), window=4, hop=3)
    assert x.shape == (3, 2, 4) and x.dtype == np.float32
    assert y.tolist() == [7, 7, 7] and y.dtype == np.int64
    np.testing.assert_array_equal(x[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(x[1, 1], [103, 104, 105, 106])
    np.testing.assert_array_equal(x[2, 0], [6, 7, 8, 9])


def test_never_spans_recordings() -> None:
    """Every window comes from one recording, windows follow recording then time order, labels follow."""
    x, y = sliding_windows(_ramp(3, 2, 10), np.array([0, 1, 2]), window=5, hop=2)
    assert x.shape == (9, 2, 5)  # starts 0, 2, 4 in each of 3 recordings
    recording_of_window = x // 1000
    assert (recording_of_window == recording_of_window[:, :1, :1]).all()
    np.testing.assert_array_equal(recording_of_window[:, 0, 0], y)
    assert y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_window_equal_to_length_gives_one_window() -> None:
    """A window as long as the recording yields exactly one window per recording, whatever the hop."""
    x, _ = sliding_windows(_ramp(2, 1, 6), np.array([0, 1]), window=6, hop=100)
    assert x.shape == (2, 1, 6)


@pytest.mark.parametrize(
    ("recordings", "labels", "window", "hop", "message"),
    [
        (_ramp(1, 1, 10), np.array([0]), 11, 1, "window"),
        (_ramp(1, 1, 10), np.array([0]), 0, 1, "window"),
        (_ramp(1, 1, 10), np.array([0]), 4, 0, "hop"),
        (_ramp(2, 1, 10), np.array([0]), 4, 1, "labels"),
        (np.zeros((10, 4)), np.zeros(10), 4, 1, "shape"),
        (np.full((1, 1, 10), np.nan), np.array([0]), 4, 1, "NaN"),
    ],
)
def test_bad_arguments_raise_data_error(
    recordings: np.ndarray, labels: np.ndarray, window: int, hop: int, message: str
) -> None:
    """Each bad argument is refused with a DataError that names the problem."""
    with pytest.raises(DataError, match=message):
        sliding_windows(recordings, labels, window, hop)


def test_channel_stats() -> None:
    """Mean and std are per channel over recordings and time; a constant channel's std is floored."""
    rec = np.stack([np.stack([np.arange(4.0), np.full(4, 5.0)])] * 2)  # [2, 2, 4]
    mean, std = channel_stats(rec)
    assert mean.dtype == np.float32 and std.dtype == np.float32
    np.testing.assert_allclose(mean, [1.5, 5.0])
    np.testing.assert_allclose(std, [np.std(np.arange(4.0)), 1e-6], rtol=1e-6)

"""Unit tests for the npz file that lets a process without sktime replay BasicMotions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefleet.data.basicmotions import Recordings, load_npz, save_npz
from edgefleet.errors import DataError


def _synthetic() -> Recordings:
    rng = np.random.default_rng(0)
    return Recordings(
        train_x=rng.normal(size=(4, 6, 100)).astype(np.float32),
        train_y=np.array([0, 1, 2, 3], dtype=np.int64),
        test_x=rng.normal(size=(2, 6, 100)).astype(np.float32),
        test_y=np.array([3, 1], dtype=np.int64),
        labels=("badminton", "running", "standing", "walking"),
        sample_rate_hz=10.0,
        name="BasicMotions",
    )


def test_round_trip(tmp_path: Path) -> None:
    """save_npz then load_npz gives back the same arrays, dtypes, labels, rate and name."""
    rec = _synthetic()
    path = tmp_path / "bm.npz"
    save_npz(rec, path)
    back = load_npz(path)
    for field in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(back, field), getattr(rec, field))
        assert getattr(back, field).dtype == getattr(rec, field).dtype
    assert back.labels == rec.labels
    assert back.sample_rate_hz == 10.0
    assert back.name == "BasicMotions"
    assert [p.name for p in tmp_path.iterdir()] == ["bm.npz"]  # no temporary file left behind


def test_corrupt_file_raises_data_error(tmp_path: Path) -> None:
    """A file that is not an npz is refused with DataError, not a numpy or zipfile traceback."""
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    with pytest.raises(DataError):
        load_npz(path)


def test_missing_file_raises_data_error(tmp_path: Path) -> None:
    """A missing file is a DataError."""
    with pytest.raises(DataError):
        load_npz(tmp_path / "absent.npz")


def test_missing_keys_raise_data_error(tmp_path: Path) -> None:
    """An npz without the recordings keys is refused with DataError naming what is missing."""
    path = tmp_path / "other.npz"
    np.savez(path, weights=np.zeros(3))
    with pytest.raises(DataError, match="train_x"):
        load_npz(path)

"""The BasicMotions dataset (UEA): 6-channel accelerometer + gyroscope recordings at 10 Hz, 4 classes.

``load_basicmotions`` reads it from sktime (the ``data`` extra, no download); ``save_npz``/``load_npz``
let a process without sktime (the device agent) replay the same recordings from one file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.errors import ConfigError, DataError

BASICMOTIONS_RATE_HZ = 10.0
_KEYS = ("train_x", "train_y", "test_x", "test_y", "labels", "sample_rate_hz", "name")


@dataclass(frozen=True)
class Recordings:
    """A labelled train/test split of multichannel recordings [n, channels, length]."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: tuple[str, ...]
    sample_rate_hz: float
    name: str


def load_basicmotions() -> Recordings:
    """Load BasicMotions from sktime; class ids index the sorted class names."""
    try:
        from sktime.datasets import load_basic_motions
    except ImportError as exc:
        raise ConfigError(
            "BasicMotions needs sktime: install the 'data' extra: pip install 'edgefleet[data]'"
        ) from exc
    try:
        train_x, train_names = load_basic_motions(split="train", return_type="numpy3D")
        test_x, test_names = load_basic_motions(split="test", return_type="numpy3D")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load BasicMotions from sktime: {exc}") from exc
    labels = tuple(sorted({str(v) for v in (*train_names, *test_names)}))
    index = {name: i for i, name in enumerate(labels)}
    return Recordings(
        train_x=np.asarray(train_x, dtype=np.float32),
        train_y=np.array([index[str(v)] for v in train_names], dtype=np.int64),
        test_x=np.asarray(test_x, dtype=np.float32),
        test_y=np.array([index[str(v)] for v in test_names], dtype=np.int64),
        labels=labels,
        sample_rate_hz=BASICMOTIONS_RATE_HZ,
        name="BasicMotions",
    )


def save_npz(rec: Recordings, path: str | os.PathLike[str]) -> None:
    """Write ``rec`` to ``path`` as an uncompressed npz, atomically (temp file, fsync, replace)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                train_x=rec.train_x.astype(np.float32),
                train_y=rec.train_y.astype(np.int64),
                test_x=rec.test_x.astype(np.float32),
                test_y=rec.test_y.astype(np.int64),
                labels=np.array(rec.labels, dtype=np.str_),
                sample_rate_hz=np.float64(rec.sample_rate_hz),
                name=np.str_(rec.name),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: str | os.PathLike[str]) -> Recordings:
    """Read recordings written by ``save_npz``; DataError for a missing, corrupt or incomplete file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in _KEYS if k not in data.files]
            if missing:
                raise DataError(f"{path}: not a recordings file, missing {', '.join(missing)}")
            arrays = {k: data[k] for k in _KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read recordings from {path}: {exc}") from exc
    rec = Recordings(
        train_x=arrays["train_x"].astype(np.float32, copy=False),
        train_y=arrays["train_y"].astype(np.int64, copy=False),
        test_x=arrays["test_x"].astype(np.float32, copy=False),
        test_y=arrays["test_y"].astype(np.int64, copy=False),
        labels=tuple(str(v) for v in arrays["labels"].tolist()),
        sample_rate_hz=float(arrays["sample_rate_hz"]),
        name=str(arrays["name"]),
    )
    for split in ("train", "test"):
        x, y = getattr(rec, f"{split}_x"), getattr(rec, f"{split}_y")
        if x.ndim != 3 or y.shape != (x.shape[0],):
            raise DataError(f"{path}: {split} arrays have shapes {x.shape} and {y.shape}")
    return rec

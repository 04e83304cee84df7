"""Real labelled datasets that installed packages ship (no download), by name.

Time series from sktime (the ``data`` extra): BasicMotions, ItalyPowerDemand, GunPoint, ACSF1, as
[n, channels, length] with their own train/test split. Images from scikit-learn: digits (8x8 grey levels 0..16,
as the "sensor" gives them), as [n, 1, 8, 8] with a fixed stratified 75/25 split. Class ids index the sorted class
names. ``standardize`` gives the model-ready arrays and the manifest's input pipeline that makes them on a device
from the raw arrays: a device replaying the raw test arrays through it feeds the model what the build tested.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgefleet.errors import ConfigError, DataError

_SKTIME = {
    "basicmotions": ("BasicMotions", "load_basic_motions"),
    "italypowerdemand": ("ItalyPowerDemand", "load_italy_power_demand"),
    "gunpoint": ("GunPoint", "load_gunpoint"),
    "acsf1": ("ACSF1", "load_acsf1"),
}
DATASETS = (*(v[0] for v in _SKTIME.values()), "digits")
SAMPLE_RATES_HZ = {"BasicMotions": 10.0}
"""Known sample rates (BasicMotions: 10 s at 100 samples); the others' are unknown and left out of the pipeline."""
DIGITS_SCALE = 1.0 / 16.0


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split; ``kind`` is "timeseries" ([n, channels, length]) or "image" ([n, c, h, w])."""

    name: str
    kind: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    labels: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample."""
        return tuple(int(d) for d in self.train_x.shape[1:])


def _indexed(train: Any, test: Any) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    names = [str(v) for v in train], [str(v) for v in test]
    labels = tuple(sorted(set(names[0]) | set(names[1]), key=lambda s: (len(s), s) if s.isdigit() else (0, s)))
    index = {name: i for i, name in enumerate(labels)}
    return (np.array([index[n] for n in names[0]], dtype=np.int64),
            np.array([index[n] for n in names[1]], dtype=np.int64), labels)


def _load_sktime(key: str) -> Dataset:
    name, loader_name = _SKTIME[key]
    try:
        from sktime import datasets
    except ImportError as exc:
        raise ConfigError(f"{name} needs sktime: install the 'data' extra: pip install 'edgefleet[data]'") from exc
    loader: Callable[..., Any] = getattr(datasets, loader_name)
    try:
        train_x, train_names = loader(split="train", return_type="numpy3D")
        test_x, test_names = loader(split="test", return_type="numpy3D")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot load {name} from sktime: {exc}") from exc
    train_y, test_y, labels = _indexed(train_names, test_names)
    return Dataset(name=name, kind="timeseries", train_x=np.asarray(train_x, dtype=np.float32), train_y=train_y,
                   test_x=np.asarray(test_x, dtype=np.float32), test_y=test_y, labels=labels)


def _load_digits(seed: int = 0) -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise ConfigError("digits needs scikit-learn: install the 'data' extra: pip install 'edgefleet[data]'") from exc
    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return Dataset(name="digits", kind="image", train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                   labels=tuple(str(i) for i in range(10)))


def load_dataset(name: str) -> Dataset:
    """Load a dataset by (case-insensitive) name; ConfigError naming the known ones otherwise."""
    key = name.lower().replace("-", "").replace("_", "")
    if key in _SKTIME:
        return _load_sktime(key)
    if key == "digits":
        return _load_digits()
    raise ConfigError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def standardize(ds: Dataset) -> tuple[Dataset, dict[str, Any]]:
    """Model-ready arrays and the input pipeline (runtime.inputs) a device runs to make them from raw readings.

    Time series: z-normalized per channel with the training statistics; the pipeline is a ``sliding_window`` of
    the series' length with a hop of the same length, its mean/std, and the sample rate where known. Digits:
    grey levels scaled by 1/16; the pipeline an ``image`` of 1x8x8, gray, scale 1/16.
    """
    if ds.kind != "timeseries":
        channels, height, width = ds.input_shape
        scale = DIGITS_SCALE if ds.name == "digits" else 1.0
        image: dict[str, Any] = {"kind": "image", "height": height, "width": width, "channels": channels,
                                 "layout": "NCHW", "color": "gray" if channels == 1 else "rgb", "scale": scale}
        return Dataset(name=ds.name, kind=ds.kind, train_x=(ds.train_x * np.float32(scale)).astype(np.float32),
                       train_y=ds.train_y, test_x=(ds.test_x * np.float32(scale)).astype(np.float32),
                       test_y=ds.test_y, labels=ds.labels), image
    mean = ds.train_x.mean(axis=(0, 2)).astype(np.float32)
    std = np.maximum(ds.train_x.std(axis=(0, 2)), 1e-6).astype(np.float32)

    def norm(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = ((x - mean[:, None]) / std[:, None]).astype(np.float32)
        return out

    length = int(ds.train_x.shape[2])
    spec: dict[str, Any] = {"kind": "sliding_window", "channels": int(ds.train_x.shape[1]), "window": length,
                            "hop": length, "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    if ds.name in SAMPLE_RATES_HZ:
        spec["sample_rate_hz"] = SAMPLE_RATES_HZ[ds.name]
    return Dataset(name=ds.name, kind=ds.kind, train_x=norm(ds.train_x), train_y=ds.train_y,
                   test_x=norm(ds.test_x), test_y=ds.test_y, labels=ds.labels), spec

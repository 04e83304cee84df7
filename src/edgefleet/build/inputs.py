"""What a build starts from: a float ONNX model and validated arrays, from files, a torch factory or a dataset.

* an ONNX file and an ``.npz`` with ``calib_x``, ``test_x`` and ``test_y`` (integer class labels);
* ``module:function`` returning ``(torch_model, data)`` where data maps the same three names (the ``train``
  extra), exported to ONNX here;
* a dataset that a package ships, by name, on which a small default model is trained (1D-CNN for the time
  series, a small 2D-CNN for digits).
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.build.evaluate import predict
from edgefleet.build.pipeline import BuildData
from edgefleet.build.quantize import check_calibration, load_checked
from edgefleet.errors import ConfigError, DataError, ModelError

DATA_KEYS = ("calib_x", "test_x", "test_y")


@dataclass(frozen=True)
class BuildInputs:
    """A float model, validated data, and what the bundle should say about its classes and preprocessing."""

    model: bytes
    data: BuildData
    labels: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def validate(model: bytes, calib_x: Any, test_x: Any, test_y: Any) -> BuildData:
    """Check the model loads and the arrays fit it: shapes, dtypes, finite values, labels in range."""
    proto = load_checked(model)
    _, calib = check_calibration(calib_x, proto, "calib_x")
    _, test = check_calibration(test_x, proto, "test_x")
    labels = np.asarray(test_y)
    if labels.dtype.kind not in "iu":
        raise DataError(f"test_y must hold integer class labels, got dtype {labels.dtype}")
    if labels.shape != (len(test),):
        raise DataError(f"test_y has shape {labels.shape}; expected ({len(test)},), one label per test_x sample")
    n_classes = predict(model, test[:1]).shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"test_y holds labels {labels.min()}..{labels.max()}; the model scores {n_classes} classes "
                        f"(0..{n_classes - 1})")
    return BuildData(calib_x=calib, test_x=test, test_y=labels.astype(np.int64))


def read_model(path: Path) -> bytes:
    """An ONNX file's bytes, or ConfigError/ModelError with one line."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        load_checked(data)
    except ModelError as exc:
        raise ModelError(f"{path} is not an ONNX model: {exc}") from exc
    return data


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """calib_x, test_x and test_y from an .npz; DataError naming what is missing."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in DATA_KEYS if k not in npz.files]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (needs {', '.join(DATA_KEYS)})")
            return {k: npz[k] for k in DATA_KEYS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def from_onnx(model_path: Path, data_path: Path) -> BuildInputs:
    """An ONNX model file and its data file."""
    model = read_model(model_path)
    arrays = read_npz(data_path)
    return BuildInputs(model=model, data=validate(model, *(arrays[k] for k in DATA_KEYS)), source=str(model_path))


def from_factory(spec: str) -> BuildInputs:
    """``module:function`` returning (torch model, data mapping with calib_x/test_x/test_y[, labels, preprocess])."""
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"{spec!r} is not module:function")
    try:
        import torch
    except ImportError as exc:
        raise ConfigError("a PyTorch model needs the train extra: pip install 'edgefleet[train]'") from exc
    try:
        factory = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import {spec}: {exc}") from exc
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)
            and isinstance(result[1], Mapping)):
        raise ConfigError(f"{spec} must return (torch.nn.Module, {{'calib_x', 'test_x', 'test_y'}})")
    net, data = result
    missing = [k for k in DATA_KEYS if k not in data]
    if missing:
        raise DataError(f"{spec} returned data without {', '.join(missing)}")
    from edgefleet.build.train import export_classifier

    calib = np.asarray(data["calib_x"])
    if calib.ndim < 2:
        raise DataError(f"calib_x must be [n, ...], got shape {calib.shape}")
    model = export_classifier(net, tuple(int(d) for d in calib.shape[1:]))
    return BuildInputs(model=model, data=validate(model, *(data[k] for k in DATA_KEYS)),
                       labels=[str(v) for v in data.get("labels", [])], preprocess=dict(data.get("preprocess", {})),
                       source=spec)


def from_dataset(name: str, *, epochs: int = 60, seed: int = 0, calibration: int = 256) -> BuildInputs:
    """Train the default small model on a dataset that a package ships, and export it."""
    from edgefleet.build.train import cnn2d, export_classifier, train_classifier, train_cnn1d
    from edgefleet.data.datasets import load_dataset, standardize

    ds, preprocess = standardize(load_dataset(name))
    n_classes = len(ds.labels)
    if ds.kind == "timeseries":
        net = train_cnn1d(ds.train_x, ds.train_y, n_classes, epochs=epochs, seed=seed)
    else:
        net = train_classifier(lambda: cnn2d(ds.train_x.shape[1], n_classes), ds.train_x, ds.train_y, n_classes,
                               epochs=epochs, seed=seed)
    model = export_classifier(net, ds.input_shape)
    rng = np.random.default_rng(seed)
    calib = ds.train_x[np.sort(rng.choice(len(ds.train_x), size=min(calibration, len(ds.train_x)), replace=False))]
    return BuildInputs(model=model, data=validate(model, calib, ds.test_x, ds.test_y), labels=list(ds.labels),
                       preprocess=preprocess, source=f"dataset {ds.name}")

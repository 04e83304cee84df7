"""What a build starts from: a float ONNX model, validated model inputs, and what the bundle says about them.

* an ONNX file and an ``.npz`` with ``calib_x``, ``test_x`` and ``test_y`` (integer class labels), and optionally
  ``sample_rate_hz`` (a number) and ``labels`` (class names, a string array);
* ``module:function`` returning ``(torch_model, data)`` where data maps the same names (the ``train`` extra),
  exported to ONNX here;
* a dataset that a package ships, by name, on which a small default model is trained (1D-CNN for the time
  series, a small 2D-CNN for digits).

The x arrays hold raw readings in the model's layout; the build feeds the model what the bundle's input pipeline
makes of them (build.io_pipeline), and reads its class scores through the bundle's output spec.
"""

from __future__ import annotations

import importlib
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.build.evaluate import predict
from edgefleet.build.io_pipeline import (
    GOLDEN_ROWS,
    PipelineOptions,
    ResolvedPipeline,
    check_rows,
    model_input,
    resolve_pipeline,
    with_activation,
)
from edgefleet.build.pipeline import BuildData
from edgefleet.build.quantize import check_calibration, load_checked
from edgefleet.build.training.data import load_factory_model, read_training_arrays, training_set
from edgefleet.errors import ConfigError, DataError, ModelError

DATA_KEYS = ("calib_x", "test_x", "test_y")
NAME_CHARS = re.compile(r"[^a-z0-9._-]+")
ACTIVATION_SAMPLES = 256
"""Calibration rows whose float scores decide whether the model's scores need a softmax."""


@dataclass(frozen=True)
class BuildInputs:
    """A float model, validated model inputs, and what the bundle says about its pipeline and classes."""

    model: bytes
    data: BuildData
    labels: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    postprocess: dict[str, Any] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    source: str = ""
    name: str = "model"
    """The bundle name when none is given: the model file's stem, the dataset's or the factory function's name."""

    @property
    def golden(self) -> np.ndarray:
        """Golden inputs: the first calibration rows after the input step."""
        return self.data.calib_x[:GOLDEN_ROWS]


def default_name(text: str) -> str:
    """``text`` as a manifest name: lowercase, other characters as ``-``, at most 64 (``model`` if none is left)."""
    name = NAME_CHARS.sub("-", text.lower()).strip("-._")[:64].rstrip("-._")
    return name or "model"


def validate(model: bytes, calib_x: Any, test_x: Any, test_y: Any,
             postprocess: dict[str, Any] | None = None) -> BuildData:
    """Check the model loads and the model inputs fit it: shapes, dtypes, finite values, labels in range (class
    scores read through ``postprocess``)."""
    proto = load_checked(model)
    _, calib = check_calibration(calib_x, proto, "calib_x")
    _, test = check_calibration(test_x, proto, "test_x")
    labels = np.asarray(test_y)
    if labels.dtype.kind not in "iu":
        raise DataError(f"test_y must hold integer class labels, got dtype {labels.dtype}")
    if labels.shape != (len(test),):
        raise DataError(f"test_y has shape {labels.shape}; expected ({len(test)},), one label per test_x sample")
    n_classes = predict(model, test[:1], postprocess=postprocess).shape[1]
    if labels.min() < 0 or labels.max() >= n_classes:
        raise DataError(f"test_y holds labels {labels.min()}..{labels.max()}; the model scores {n_classes} classes "
                        f"(0..{n_classes - 1})")
    return BuildData(calib_x=calib, test_x=test, test_y=labels.astype(np.int64), postprocess=postprocess)


def prepare(model: bytes, arrays: Mapping[str, Any], pipeline: ResolvedPipeline, *, source: str,
            name: str, torch_model: Any = None) -> BuildInputs:
    """Raw data rows -> model inputs through the pipeline's input step, validated; the softmax decided from the
    float model's scores on calibration rows (build.io_pipeline.with_activation). ``train_x``/``train_y`` rows,
    when given, go through the same step for training-time compression (with ``torch_model`` if given)."""
    from edgefleet.bundle.pack import model_schema

    step = pipeline.step
    model_shape = model_schema(model)[0][0].shape
    calib = model_input(step, check_rows(arrays["calib_x"], step, model_shape, "calib_x"))
    test = model_input(step, check_rows(arrays["test_x"], step, model_shape, "test_x"))
    data = validate(model, calib, test, arrays["test_y"], pipeline.postprocess)
    scores = predict(model, data.calib_x[:ACTIVATION_SAMPLES], postprocess=pipeline.postprocess)
    pipeline = with_activation(pipeline, scores)
    train = training_set(arrays, lambda x, what: model_input(step, check_rows(x, step, model_shape, what)),
                         scores.shape[1], torch_model)
    data = replace(data, postprocess=pipeline.postprocess, train=train)
    return BuildInputs(model=model, data=data, labels=pipeline.labels,
                       preprocess=pipeline.preprocess, postprocess=pipeline.postprocess,
                       thresholds=pipeline.thresholds, source=source, name=name)


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


def read_npz(path: Path, required: tuple[str, ...] = DATA_KEYS) -> dict[str, Any]:
    """The ``required`` arrays of an .npz (calib_x, test_x and test_y), with ``sample_rate_hz`` (float) and
    ``labels`` (list of str) when it has them; DataError naming what is missing or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise DataError(f"{path} lacks {', '.join(missing)} (needs {', '.join(required)})")
            out: dict[str, Any] = {k: npz[k] for k in required}
            if "sample_rate_hz" in npz.files:
                out["sample_rate_hz"] = _sample_rate(npz["sample_rate_hz"], path)
            if "labels" in npz.files:
                names = npz["labels"]
                if names.dtype.kind not in "US" or names.ndim != 1:
                    raise DataError(f"{path}: labels must be a 1-D array of class names, got {names.dtype} "
                                    f"{names.shape}")
                out["labels"] = [str(v) for v in names.tolist()]
            return out
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def _sample_rate(value: np.ndarray, path: Path) -> float:
    if value.size != 1 or value.dtype.kind not in "fiu" or not np.isfinite(value).all() or float(value) <= 0:
        raise DataError(f"{path}: sample_rate_hz must be one positive number, got {value!r}")
    return float(value.reshape(()))


def from_onnx(model_path: Path, data_path: Path, options: PipelineOptions | None = None,
              factory: str | None = None) -> BuildInputs:
    """An ONNX model file and its data file, with the pipeline inferred from the model and the data file, then the
    pipeline file and flags in ``options``. ``factory`` (``module:function``) returns the model in PyTorch for
    training-time compression; it must compute the ONNX model, and the data file must hold train_x/train_y."""
    model = read_model(model_path)
    arrays = {**read_npz(data_path), **read_training_arrays(data_path)}
    if factory is not None and "train_x" not in arrays:
        raise ConfigError(f"--factory trains the model: {data_path} needs train_x and train_y")
    torch_model = load_factory_model(factory) if factory is not None else None
    pipeline = resolve_pipeline(model, options or PipelineOptions(), data_sample_rate=arrays.get("sample_rate_hz"),
                                data_labels=arrays.get("labels"))
    inputs = prepare(model, arrays, pipeline, source=str(model_path), name=default_name(model_path.stem),
                     torch_model=torch_model)
    if factory is not None:
        from edgefleet.build.training.teacher import check_factory

        check_factory(model, torch_model, inputs.data.calib_x, factory)
    return inputs


def from_factory(spec: str, options: PipelineOptions | None = None) -> BuildInputs:
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
    pipeline = resolve_pipeline(model, options or PipelineOptions(), base=dict(data.get("preprocess") or {}),
                                base_labels=[str(v) for v in data.get("labels", [])])
    return prepare(model, data, pipeline, source=spec, name=default_name(func_name), torch_model=net)


def from_dataset(name: str, options: PipelineOptions | None = None, *, epochs: int = 60, seed: int = 0,
                 calibration: int = 256) -> BuildInputs:
    """Train the default small model on a dataset that a package ships, and export it. The model learns from the
    standardized training data; calibration and test rows stay raw and go through the dataset's pipeline, so a
    device replaying the raw test rows reproduces the build's accuracy."""
    from edgefleet.build.train import cnn2d, export_classifier, train_classifier, train_cnn1d
    from edgefleet.data.datasets import load_dataset, standardize

    raw = load_dataset(name)
    ds, preprocess = standardize(raw)
    n_classes = len(ds.labels)
    if ds.kind == "timeseries":
        net = train_cnn1d(ds.train_x, ds.train_y, n_classes, epochs=epochs, seed=seed)
    else:
        net = train_classifier(lambda: cnn2d(ds.train_x.shape[1], n_classes), ds.train_x, ds.train_y, n_classes,
                               epochs=epochs, seed=seed)
    model = export_classifier(net, ds.input_shape)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(raw.train_x), size=min(calibration, len(raw.train_x)), replace=False))
    pipeline = resolve_pipeline(model, options or PipelineOptions(), base=preprocess, base_labels=list(ds.labels))
    arrays = {"calib_x": raw.train_x[rows], "test_x": raw.test_x, "test_y": raw.test_y}
    return prepare(model, arrays, pipeline, source=f"dataset {ds.name}", name=default_name(ds.name))

"""Training rows for training-time compression: ``train_x``/``train_y`` from the data file or a factory, and the
user's own PyTorch model where one is given. No torch import here."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import ConfigError, DataError

TRAIN_KEYS = ("train_x", "train_y")


@dataclass(frozen=True)
class TrainingSet:
    """Model inputs (after the bundle's input step) with integer labels, and the user's torch model if given."""

    x: np.ndarray
    y: np.ndarray
    torch_model: Any = None
    """A ``torch.nn.Module`` computing the ONNX model (``--factory``); None: the model is converted from ONNX."""


def read_training_arrays(path: Path) -> dict[str, np.ndarray]:
    """``train_x`` and ``train_y`` of an .npz when it holds both (empty when neither); DataError for one alone."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            present = [k for k in TRAIN_KEYS if k in npz.files]
            if len(present) == 1:
                raise DataError(f"{path} holds {present[0]} without {({*TRAIN_KEYS} - {present[0]}).pop()}")
            return {k: npz[k] for k in present}
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc


def check_labels(y: Any, rows: int, n_classes: int) -> np.ndarray:
    """``train_y`` as int64, one label per row, in [0, n_classes); DataError otherwise."""
    labels = np.asarray(y)
    if labels.dtype.kind not in "iu":
        raise DataError(f"train_y must hold integer class labels, got dtype {labels.dtype}")
    if labels.shape != (rows,):
        raise DataError(f"train_y has shape {labels.shape}; expected ({rows},), one label per train_x row")
    if rows and (labels.min() < 0 or labels.max() >= n_classes):
        raise DataError(f"train_y holds labels {labels.min()}..{labels.max()}; the model scores {n_classes} classes")
    return labels.astype(np.int64)


def training_set(arrays: Mapping[str, Any], to_model_input: Callable[[Any, str], np.ndarray], n_classes: int,
                 torch_model: Any = None) -> TrainingSet | None:
    """``train_x``/``train_y`` of ``arrays`` as model inputs (``to_model_input`` checks the rows against the
    model and applies the bundle's input step), None when there are none. A ``train_x`` that does not fit the
    model is a ConfigError: the data file given is wrong for this model."""
    if "train_x" not in arrays:
        return None
    if "train_y" not in arrays:
        raise DataError("train_x is given without train_y")
    try:
        x = to_model_input(arrays["train_x"], "train_x")
    except DataError as exc:
        raise ConfigError(str(exc)) from exc
    return TrainingSet(x=x, y=check_labels(arrays["train_y"], len(x), n_classes), torch_model=torch_model)


def import_factory(spec: str) -> Any:
    """The function ``module:function`` names (``--factory``); ConfigError with one line."""
    import importlib

    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise ConfigError(f"--factory {spec!r} is not module:function")
    try:
        return getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"--factory: cannot import {spec}: {exc}") from exc


def load_factory_model(spec: str) -> Any:
    """Call ``module:function`` (no arguments) for the user's torch model; ConfigError with one line."""
    return import_factory(spec)()

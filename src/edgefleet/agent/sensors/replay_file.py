"""The ``npz:`` replay: ``npz:FILE[?speed=X&rate=R&loop=0|1&shard=I/N]``, what it reads, and how the file's rows
become the readings a model's input step takes.

Two kinds of file hold ``test_x`` [N, ...] and ``test_y`` [N] (integer labels), with optional ``labels`` (class
names, the source's ``labels``) and ``sample_rate_hz``:

* the data file given to ``edgefleet build --data`` (it also holds ``calib_x``): rows of raw readings in the
  model's layout, before the pipeline's scaling (``build.io_pipeline``), which the build measured the model on;
* a recordings file (``data.basicmotions.save_npz``: ``train_x``, ``test_x``, ... at a sample rate): raw
  recordings [N, C, T].

The replay starts once the agent has a model (``waits_for_model``) and shapes its stream by the model's input
step (:meth:`ReplaySource.bind`), so that the agent's pipeline makes from it exactly the model input the build
made from the rows: for a time-series model, one continuous sample stream (row after row, each sample labelled
with its row's label) at the model's sample rate, else the file's ``sample_rate_hz``, else 10 Hz (``rate=R``
given wins), so that with window T and hop T each row becomes exactly one window; for an image model, one frame
[h, w, c] per row (:func:`readings_from_rows`: rows in the model's layout become frames), for a vector or tensor
model one row per reading, at ``rate`` rows per second (default 10). ``speed=X`` replays X times faster
(``inf``: as fast as inference goes). ``loop``: a build data file is a test set and plays once by default, so
the on-device accuracy is the accuracy on those rows, and then the source ends (and the agent with it); a
recordings file loops by default, like a sensor that never stops. ``shard=I/N`` takes every N-th row from the
I-th (one shard per simulated device).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.sources import DEFAULT_ROW_RATE_HZ, ReplaySource, flag_option, number_option
from edgefleet.errors import ConfigError, DataError
from edgefleet.runtime.inputs import ImageInput, InputStep

NPZ_OPTIONS = ("shard", "speed", "rate", "loop")


@dataclass(frozen=True)
class ReplayFile:
    """The test rows of a data or recordings file."""

    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...] = ()
    sample_rate_hz: float = 0.0
    """The file's sample rate; 0 when it does not say."""
    test_set: bool = False
    """True for a build data file (it holds ``calib_x``): a test set, played once by default."""


def load_replay_file(path: str | os.PathLike[str]) -> ReplayFile:
    """Read ``test_x``/``test_y`` (and ``labels``, ``sample_rate_hz``) of a build data file or a recordings
    file; DataError naming what is missing or malformed."""
    try:
        with np.load(path, allow_pickle=False) as data:
            files = set(data.files)
            missing = [k for k in ("test_x", "test_y") if k not in files]
            if missing:
                raise DataError(f"{path}: no {' or '.join(missing)}: a replay needs test_x and test_y (the data "
                                "file given to edgefleet build --data, or a recordings file)")
            x, y = data["test_x"], data["test_y"]
            names = data["labels"] if "labels" in files else np.array([], dtype=np.str_)
            rate = data["sample_rate_hz"] if "sample_rate_hz" in files else np.float64(0.0)
            test_set = "calib_x" in files
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if x.ndim < 2 or not x.size:
        raise DataError(f"{path}: test_x must be rows [n, ...], got shape {x.shape}")
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        raise DataError(f"{path}: test_y must be {len(x)} integer labels (one per test_x row), got "
                        f"{y.dtype} {y.shape}")
    try:
        sample_rate = float(rate)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: sample_rate_hz is not a number") from exc
    if not (np.isfinite(sample_rate) and sample_rate >= 0):
        raise DataError(f"{path}: sample_rate_hz must be a positive number, got {sample_rate}")
    labels = (str(names),) if names.ndim == 0 else tuple(str(v) for v in names.tolist())
    if x.dtype.kind not in "iuf":
        raise DataError(f"{path}: test_x must hold numbers, got {x.dtype}")
    if x.dtype.kind == "f" and x.dtype != np.float32:
        x = x.astype(np.float32)  # as the build reads it
    return ReplayFile(x, y.astype(np.int64), labels, sample_rate, test_set)


def series_samples(rows: np.ndarray) -> np.ndarray:
    """Recordings [N, C, T] -> one sample stream [N * T, C] float32, row after row."""
    samples = np.asarray(rows, dtype=np.float32).transpose(0, 2, 1)
    return np.ascontiguousarray(samples.reshape(-1, rows.shape[1]))


def readings_from_rows(step: InputStep, rows: np.ndarray) -> np.ndarray:
    """Rows [N, ...] in the model's layout -> the readings ``step`` takes: for an image model whose rows they fit,
    frames [N, h, w, c] (``step.to_frames``: the agent's pipeline then makes from them what the build made from
    the rows); anything else as it is (rows of another shape the agent refuses and counts)."""
    if isinstance(step, ImageInput) and tuple(rows.shape[1:]) == step.model_shape[1:]:
        return np.ascontiguousarray(step.to_frames(rows))
    return rows


def npz_source(path: Path, options: dict[str, str]) -> ReplaySource:
    """The replay ``npz:PATH?OPTIONS`` describes (see the module docstring)."""
    unknown = sorted(set(options) - set(NPZ_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown npz source option(s) {', '.join(unknown)}: use {', '.join(NPZ_OPTIONS)}")
    index, count = shard_option(options.get("shard", "0/1"))
    speed = number_option(options, "speed", 1.0)
    rate = number_option(options, "rate", DEFAULT_ROW_RATE_HZ)
    data = load_replay_file(path)
    loop = flag_option(options, "loop", not data.test_set)  # a build's test set plays once, recordings loop
    x, y = data.x[index::count], data.y[index::count]
    if len(x) == 0:
        raise ConfigError(f"shard {index}/{count} of {path} holds no row")
    fixed_rate = "rate" in options
    series_rate = rate if fixed_rate else data.sample_rate_hz or DEFAULT_ROW_RATE_HZ
    source = ReplaySource(x, y, series_rate, speed=speed, loop=loop, row_rate_hz=rate, fixed_rate=fixed_rate)
    source.labels = data.labels
    source.waits_for_model = True
    return source


def shard_option(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N; ConfigError otherwise."""
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as exc:
        raise ConfigError(f"shard must look like I/N, got {text!r}") from exc
    if not 0 <= index < count:
        raise ConfigError(f"shard index must be in [0, {count}), got {index}")
    return index, count

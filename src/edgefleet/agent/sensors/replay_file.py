"""The ``npz:`` replay: ``npz:FILE[?speed=X&rate=R&loop=0|1&shard=I/N]``, what it reads, and how the file's rows
become the readings a model's input step takes.

Two kinds of file hold ``test_x`` [N, ...] and ``test_y`` [N] (integer labels), with optional ``labels`` (class
names, the source's ``labels``) and ``sample_rate_hz``:

* the data file given to ``edgefleet build --data`` (it also holds ``calib_x``): its rows are model inputs, so
  the replay turns them back into readings by undoing the bound input step (:func:`readings_from_model_rows`:
  frames [h, w, c] from image rows in the model's layout), and the model sees exactly those rows again (up to
  float rounding where the step scales);
* a recordings file (``data.basicmotions.save_npz``: ``train_x``, ``test_x``, ... at a sample rate): raw
  recordings [N, C, T], streamed as they are.

The replay starts once the agent has a model (``waits_for_model``) and shapes its stream by the model's input
step (:meth:`ReplaySource.bind`): for a time-series model, one continuous sample stream (row after row, each
sample labelled with its row's label) at the model's sample rate, else the file's ``sample_rate_hz``, else
10 Hz (``rate=R`` given wins), so that with window T and hop T each row becomes exactly one window; for an
image, vector or tensor model, one row per inference at ``rate`` rows per second (default 10). ``speed=X``
replays X times faster (``inf``: as fast as inference goes). ``loop``: a build data file is a test set and plays
once by default, so the on-device accuracy is the accuracy on those rows, and then the source ends (and the
agent with it); a recordings file loops by default, like a sensor that never stops. ``shard=I/N`` takes every
N-th row from the I-th (one shard per simulated device).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet.agent.sources import DEFAULT_ROW_RATE_HZ, ReplaySource, flag_option, number_option
from edgefleet.errors import ConfigError, DataError
from edgefleet.runtime.inputs import ImageInput, InputStep, SeriesInput, VectorInput

NPZ_OPTIONS = ("shard", "speed", "rate", "loop")


@dataclass(frozen=True)
class ReplayFile:
    """The test rows of a data or recordings file."""

    x: np.ndarray
    y: np.ndarray
    labels: tuple[str, ...] = ()
    sample_rate_hz: float = 0.0
    """The file's sample rate; 0 when it does not say."""
    model_inputs: bool = False
    """True for a build data file: the rows are model inputs, not raw readings."""


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
            model_inputs = "calib_x" in files
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
    return ReplayFile(x, y.astype(np.int64), labels, sample_rate, model_inputs)


def series_samples(rows: np.ndarray, step: SeriesInput | None = None) -> np.ndarray:
    """Recordings [N, C, T] -> one sample stream [N * T, C] float32, row after row; with ``step``, the rows are
    scaled model inputs and are unscaled (``x * std + mean``) so that the windower's scaling gives them back."""
    samples = np.asarray(rows, dtype=np.float32).transpose(0, 2, 1)
    if step is not None and step.window.channels == rows.shape[1]:
        spec = step.window
        if not (np.all(spec.mean == 0) and np.all(spec.std == 1)):
            samples = samples * spec.std + spec.mean
    return np.ascontiguousarray(samples.reshape(-1, rows.shape[1]), dtype=np.float32)


def readings_from_model_rows(step: InputStep, rows: np.ndarray) -> np.ndarray:
    """Model inputs [N, ...] -> readings [N, ...] that ``step.apply`` maps back to them: for images, frames
    [N, h, w, c] (layout, then scaling, normalization and colour order undone); for vectors, unstandardized
    rows; anything else (or rows of another shape, which the agent will refuse and count) as it is."""
    if isinstance(step, ImageInput):
        if tuple(rows.shape[1:]) != step.model_shape[1:]:
            return rows
        frames = step.to_frames(rows)
        if step.scale != 1.0 or step.std is not None:
            frames = frames.astype(np.float32)
            if step.mean is not None and step.std is not None:
                frames = frames * step.std + step.mean
            if step.scale != 1.0:
                frames = frames / np.float32(step.scale)
        if step.color == "bgr":
            frames = frames[..., ::-1]
        return np.ascontiguousarray(frames)
    if isinstance(step, VectorInput) and step.mean is not None and step.std is not None \
            and rows.shape[1:] == (step.features,):
        return np.ascontiguousarray(rows.astype(np.float32) * step.std + step.mean, dtype=np.float32)
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
    loop = flag_option(options, "loop", not data.model_inputs)  # a build's test set plays once, recordings loop
    x, y = data.x[index::count], data.y[index::count]
    if len(x) == 0:
        raise ConfigError(f"shard {index}/{count} of {path} holds no row")
    fixed_rate = "rate" in options
    series_rate = rate if fixed_rate else data.sample_rate_hz or DEFAULT_ROW_RATE_HZ
    source = ReplaySource(x, y, series_rate, speed=speed, loop=loop, row_rate_hz=rate, fixed_rate=fixed_rate,
                          model_inputs=data.model_inputs)
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

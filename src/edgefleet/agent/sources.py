"""Sensor sources behind one interface; a source spec string picks one.

    npz:PATH[?speed=X&rate=R&loop=0|1&shard=I/N]
                                 replay the test rows (test_x, test_y) of the data file given to
                                 ``edgefleet build --data``, or of a recordings file (data.basicmotions)
    images:DIR[?rate=R&loop=0|1]  image files in a directory, sorted by name (agent.sensors.images)
    video:PATH[?rate=R&loop=0|1]  the frames of a video file (OpenCV, the ``camera`` extra)
    camera:INDEX[?rate=R]         a live camera (OpenCV); frames that inference does not keep up with are dropped
    jsonl:PATH | jsonl:-          one JSON object per line: {"values": [...], "label": optional int}
    csv:PATH                      one sample per line: channel values, optional trailing label column
                                  named "label" in a header line; an empty cell is a missing value
    vibration:?rate=2000&fault=outer_race...  a synthetic rotating machine with a bearing (agent.sensors.vibration)
    mqtt://HOST:PORT/TOPIC[?qos=1&queue=N]    JSON ``{"values": [...]}`` messages on a topic (agent.sensors.mqtt_source)

An ``npz:`` replay (agent.sensors.replay_file) starts once the agent has a model and shapes its stream by the
model's input step (:meth:`SensorSource.bind`): a sample stream for a time-series model, one row per inference
for an image, vector or tensor model.

A missing value is NaN (JSON null or NaN, an empty CSV cell); a reading with one is skipped and counted unless
``allow_missing`` is set (by a pipeline whose preprocessing imputes), then passed on with ``missing=True``.

Two ways to read a source, validated alike: :meth:`SensorSource.readings` (one :class:`Reading` per sample) and
:meth:`SensorSource.blocks` (a :class:`Block` of consecutive samples as one array, checked with one vectorized
pass). A source that holds its samples as arrays (a replay, a synthetic signal, a sensor FIFO) yields blocks
of whatever is due at once; any other source yields one-sample blocks.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING
from urllib.parse import parse_qs

import numpy as np

from edgefleet.errors import ConfigError, DataError

if TYPE_CHECKING:
    from edgefleet.runtime.inputs import InputStep, SeriesInput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """One reading (a multi-channel sample [C], a frame [h, w, c], a row [F]: see ``runtime.inputs``) and its
    ground-truth label where the source knows it."""

    values: np.ndarray
    label: int | None = None
    missing: bool = False
    """True when some values are NaN (passed on only to a pipeline that imputes)."""


NO_LABEL = -(2**62)
"""A block's label for a sample whose label is unknown."""


@dataclass(frozen=True)
class Block:
    """Consecutive readings: ``values`` [n, ...] (samples [n, channels] float32, frames [n, h, w, c], rows
    [n, F]), ``labels`` [n] int64 (:data:`NO_LABEL` where a reading has none; None when no reading has one),
    ``missing`` [n] bool (samples passed on with NaN)."""

    values: np.ndarray
    labels: np.ndarray | None = None
    missing: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.values)


class SensorSource(ABC):
    """A stream of readings. ``readings`` validates each one; malformed input is skipped and counted."""

    labels: tuple[str, ...] = ()
    allow_missing: bool = False
    waits_for_model: bool = False
    """True for a replay: the agent starts reading it only once it has a model, so the replay's first rows are
    inferred on (a live sensor is read from the start, and what comes before a model is skipped)."""

    def __init__(self) -> None:
        self.skipped = 0
        self.partial = 0

    def bind(self, step: InputStep) -> None:  # noqa: B027 - a hook with a default, not abstract
        """Told the input step of the model it now feeds; a replay shapes its stream by it. Default: nothing."""

    @abstractmethod
    def _raw(self) -> Iterator[Reading | None]:
        """Yield readings, or None for a record that could not be parsed."""

    def _raw_blocks(self) -> Iterator[Block] | None:
        """Yield unvalidated blocks [n, ...] (a source holding its readings as arrays); None: this source has
        readings only."""
        return None

    def blocks(self) -> Iterator[Block]:
        """Yield the well-formed samples as blocks, validated as :meth:`readings` does, row by row."""
        raw = self._raw_blocks()
        if raw is None:
            for reading in self.readings():
                labels = None if reading.label is None else np.array([reading.label], dtype=np.int64)
                yield Block(reading.values[np.newaxis], labels,
                            np.ones(1, dtype=bool) if reading.missing else None)
            return
        for block in raw:
            checked = self._check_block(block)
            if checked is not None:
                yield checked

    def _check_block(self, block: Block) -> Block | None:
        values = block.values
        n = len(values)
        if values.ndim < 2 or 0 in values.shape[1:]:
            self.skipped += n
            return None
        if values.dtype.kind in "biu" or math.isfinite(values.sum()):  # the common case: every value finite
            return block                                              # (a NaN or an infinity makes the sum so)
        finite = np.isfinite(values)
        whole = finite.reshape(n, -1).all(axis=1)
        if whole.all():  # the sum overflowed
            return block
        imputing = values.ndim == 2 and self.allow_missing  # samples with some values missing pass on, to be filled
        partial = finite.any(axis=1) & ~whole if imputing else np.zeros(n, dtype=bool)
        keep = whole | partial
        self.skipped += int(n - keep.sum())
        self.partial += int(partial.sum())
        if not keep.any():
            return None
        labels = None if block.labels is None else block.labels[keep]
        if not partial.any():
            return Block(values[keep], labels)
        kept = np.where(finite, values, np.nan).astype(np.float32)[keep]
        return Block(kept, labels, partial[keep])

    def readings(self) -> Iterator[Reading]:
        """Yield every well-formed reading (an array of finite values: a sample, a frame, a row; a sample [C]
        with ``allow_missing`` may have some NaN, an infinity counting as missing); count the rest in ``skipped``
        (a reading with no finite value always) and the partially missing ones passed on in ``partial``."""
        isfinite = math.isfinite
        for reading in self._raw():
            if reading is None:
                self.skipped += 1
                continue
            values = reading.values
            if not values.ndim or not values.size:
                self.skipped += 1
                continue
            if values.ndim > 1:  # a frame or a tensor: whole, or skipped
                if values.dtype.kind in "biu" or isfinite(values.sum()) or np.isfinite(values).all():
                    yield reading
                else:
                    self.skipped += 1
                continue
            if isfinite(values.dot(values)):  # any NaN or infinity makes the sum of squares non-finite
                yield reading
                continue
            finite = np.isfinite(values)
            if finite.all():  # the sum of squares overflowed
                yield reading
            elif self.allow_missing and finite.any():
                self.partial += 1
                yield Reading(np.where(finite, values, np.nan).astype(np.float32), reading.label, missing=True)
            else:
                self.skipped += 1


class Pacer:
    """Releases item ``n`` no earlier than ``start + n / rate``; an infinite rate never waits."""

    def __init__(self, rate_hz: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if not rate_hz > 0:
            raise ConfigError("a source's rate must be positive")
        self._period = 1.0 / rate_hz if math.isfinite(rate_hz) else 0.0
        self._clock, self._sleep = clock, sleep
        self._start: float | None = None
        self._emitted = 0

    def take(self, most: int) -> int:
        """Sleep until the next item is due; return how many are due now (at least 1, at most ``most``)."""
        if not self._period:
            self._emitted += most
            return most
        if self._start is None:
            self._start = self._clock()
        now = self._clock()
        due = int((now - self._start) / self._period) + 1 - self._emitted
        if due < 1:
            self._sleep(self._start + self._emitted * self._period - now)
            due = 1
        due = min(due, most)
        self._emitted += due
        return due

    def wait(self) -> None:
        """Sleep until the next item is due."""
        if self._period:
            if self._start is None:
                self._start = self._clock()
            delay = self._start + self._emitted * self._period - self._clock()
            if delay > 0:
                self._sleep(delay)
        self._emitted += 1


DEFAULT_ROW_RATE_HZ = 10.0
"""Rows per second of an image, vector or tensor replay, and a series replay's sample rate when neither the
model nor the file says (``rate`` sets either)."""
ROWS_PER_BLOCK = 32
"""Rows (images, vectors, tensors) one replay block holds at most when many are due at once."""


@dataclass(frozen=True)
class _Plan:
    """What a replay streams: ``readings`` [m, ...] with ``labels`` [m], released at ``rate_hz``, ``per_row``
    readings for each of the file's rows (a row's samples for a series, else 1), at most ``block`` per block
    (a series block never crosses a row's end, so windows of a row's length line up with the rows)."""

    readings: np.ndarray
    labels: np.ndarray
    rate_hz: float
    per_row: int
    block: int


class ReplaySource(SensorSource):
    """Replays rows [n, ...] with a label each, shaped by the input step of the model it feeds (:meth:`bind`).

    A series model (and, before any bind, recordings [n, channels, length]) gets one continuous sample stream:
    row after row, each sample labelled with its row's label, at the model's sample rate (``rate_hz`` when the
    model does not say, or always when ``fixed_rate``). An image, vector or tensor model gets one row per reading
    at ``row_rate_hz`` (image rows in the model's layout become frames: see ``agent.sensors.replay_file``).
    ``speed`` multiplies either rate.

    When the model changes mid-replay, the new stream starts at the next row, so that its windows line up with
    the rows again.
    """

    def __init__(self, recordings: np.ndarray, labels: np.ndarray, rate_hz: float, *, speed: float = 1.0,
                 loop: bool = True, row_rate_hz: float = DEFAULT_ROW_RATE_HZ, fixed_rate: bool = False,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        rows = np.asarray(recordings)
        if rows.ndim < 2 or len(rows) != len(labels) or len(rows) == 0:
            raise DataError("replay needs rows [n, ...] (recordings [n, channels, length]) with one label each")
        if not (rate_hz > 0 and speed > 0 and row_rate_hz > 0):
            raise ConfigError("replay rate and speed must be positive")
        self._rows = rows
        self._labels = np.asarray(labels, dtype=np.int64)
        self._rate, self._row_rate, self._speed = rate_hz, row_rate_hz, speed
        self._fixed_rate = fixed_rate
        self._loop = loop
        self._clock = clock
        self._sleep = sleep
        self._plan = self._series_plan(None) if rows.ndim == 3 else self._rows_plan(None)

    @property
    def rate_hz(self) -> float:
        """Readings released per second now (samples for a series, else rows; ``speed`` included)."""
        return self._plan.rate_hz

    def bind(self, step: InputStep) -> None:
        """Shape the stream for ``step``: a sample stream for a series model, one row per reading otherwise."""
        from edgefleet.runtime.inputs import SeriesInput

        if isinstance(step, SeriesInput) and self._rows.ndim == 3:
            self._plan = self._series_plan(step)
        elif isinstance(step, SeriesInput) and self._rows.ndim == 2:  # each row is one sample
            rate = self._rate if self._fixed_rate or not step.window.sample_rate_hz > 0 else step.window.sample_rate_hz
            self._plan = _Plan(self._rows.astype(np.float32, copy=False), self._labels, rate * self._speed, 1,
                               ROWS_PER_BLOCK)
        else:
            self._plan = self._rows_plan(step)

    def _series_plan(self, step: SeriesInput | None) -> _Plan:
        from edgefleet.agent.sensors.replay_file import series_samples

        rate = self._rate
        if step is not None and not self._fixed_rate and step.window.sample_rate_hz > 0:
            rate = step.window.sample_rate_hz
        length = self._rows.shape[2]
        samples = series_samples(self._rows)
        return _Plan(samples, np.repeat(self._labels, length), rate * self._speed, length, length)

    def _rows_plan(self, step: InputStep | None) -> _Plan:
        rows = self._rows
        if step is not None:
            from edgefleet.agent.sensors.replay_file import readings_from_rows

            rows = readings_from_rows(step, rows)
        return _Plan(rows, self._labels, self._row_rate * self._speed, 1, ROWS_PER_BLOCK)

    def _raw(self) -> Iterator[Reading | None]:
        for block in self._raw_blocks():
            assert block.labels is not None
            for values, label in zip(block.values, block.labels.tolist(), strict=True):
                yield Reading(values, label)

    def _raw_blocks(self) -> Iterator[Block]:
        """The readings due at once, at most a block (a series block ends at its row's end)."""
        plan = self._plan
        pacer = Pacer(plan.rate_hz, self._clock, self._sleep)
        position = 0
        while True:
            total = len(plan.readings)
            while position < total:
                if self._plan is not plan:  # bound to a new model: its stream starts at the next row
                    next_row = -(-position // plan.per_row)
                    plan = self._plan
                    pacer = Pacer(plan.rate_hz, self._clock, self._sleep)
                    position, total = next_row * plan.per_row, len(plan.readings)
                    continue
                end = min(total, position - position % plan.block + plan.block)
                n = pacer.take(end - position)
                yield Block(plan.readings[position : position + n], plan.labels[position : position + n])
                position += n
            if not self._loop:
                log.info("replay of %d rows done (loop=1 repeats it)", len(self._rows))
                return
            position = 0


class JsonLinesSource(SensorSource):
    """``{"values": [...], "label": 2}`` per line; anything else on a line is a skipped record."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream

    def _raw(self) -> Iterator[Reading | None]:
        for line in self._stream:
            if not line.strip():
                continue
            yield parse_json_reading(line)


class CsvSource(SensorSource):
    """Comma-separated channel values per line; a header naming a ``label`` column marks labels."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream

    def _raw(self) -> Iterator[Reading | None]:
        import csv

        label_col: int | None = None
        for row_number, row in enumerate(csv.reader(self._stream)):
            if not row:
                continue
            if row_number == 0 and any(not _is_number(cell) for cell in row):
                names = [cell.strip().lower() for cell in row]
                label_col = names.index("label") if "label" in names else None
                continue
            try:
                label = int(row[label_col]) if label_col is not None else None
                cells = [c for i, c in enumerate(row) if i != label_col]
                yield Reading(np.asarray([float(c) if c.strip() else math.nan for c in cells], dtype=np.float32),
                              label)
            except (ValueError, IndexError):
                yield None


def parse_json_reading(text: str | bytes) -> Reading | None:
    """``{"values": [...], "label": optional int}`` -> a Reading (values may be 2-D); None when malformed."""
    try:
        record = json.loads(text)
        values = np.asarray(record["values"], dtype=np.float32)  # null becomes NaN: a missing value
        label = record.get("label")
        return Reading(values, int(label) if label is not None else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def open_source(spec: str) -> SensorSource:
    """Build a source from its spec string (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    if kind == "mqtt":
        from edgefleet.agent.sensors.mqtt_source import MqttSource

        return MqttSource.from_spec(spec)
    target, _, query = rest.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    if kind == "npz":
        from edgefleet.agent.sensors.replay_file import npz_source

        return npz_source(Path(target), options)
    if kind in ("jsonl", "csv"):
        stream = sys.stdin if target == "-" else _open_text(Path(target))
        return JsonLinesSource(stream) if kind == "jsonl" else CsvSource(stream)
    if kind == "vibration":
        from edgefleet.agent.sensors.vibration import VibrationSource

        return VibrationSource.from_options(options)
    if kind in ("images", "video", "camera"):
        from edgefleet.agent.sensors.images import open_frame_source

        return open_frame_source(kind, target, options)
    raise ConfigError(f"unknown sensor source {spec!r}: use npz:PATH, jsonl:PATH|-, csv:PATH, images:DIR, "
                      "video:PATH, camera:INDEX, vibration:?OPTIONS or mqtt://HOST:PORT/TOPIC")


def flag_option(options: dict[str, str], name: str, default: bool) -> bool:
    """A 0|1 option of a source spec; ConfigError for anything else."""
    text = options.get(name)
    if text is None:
        return default
    if text.strip().lower() in ("1", "true", "yes"):
        return True
    if text.strip().lower() in ("0", "false", "no"):
        return False
    raise ConfigError(f"{name} must be 0 or 1, got {text!r}")


def number_option(options: dict[str, str], name: str, default: float) -> float:
    """A numeric option of a source spec; ConfigError when it is not a number."""
    try:
        return float(options.get(name, default))
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {options[name]!r}") from exc


def _open_text(path: Path) -> IO[str]:
    try:
        return io.open(path, encoding="utf-8", newline="")  # noqa: UP020 - a handle the source owns
    except OSError as exc:
        raise ConfigError(f"cannot open sensor file {path}: {exc.strerror}") from exc


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True

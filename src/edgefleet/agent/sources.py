"""Sensor sources behind one interface; a source spec string picks one.

    npz:PATH[?shard=I/N&speed=X&loop=0|1]   replay the test recordings of a dataset file at its sample rate
    jsonl:PATH | jsonl:-                     one JSON object per line: {"values": [...], "label": optional int}
    csv:PATH                                 one sample per line: channel values, optional trailing label column
                                             named "label" in a header line; an empty cell is a missing value
    vibration:?rate=2000&fault=outer_race... a synthetic rotating machine with a bearing (agent.sensors.vibration)
    mqtt://HOST:PORT/TOPIC[?qos=1&queue=N]   JSON ``{"values": [...]}`` messages on a topic (agent.sensors.mqtt_source)

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
    from edgefleet.runtime.inputs import InputStep


@dataclass(frozen=True)
class Reading:
    """One multi-channel sample and its ground-truth label where the source knows it."""

    values: np.ndarray
    label: int | None = None
    missing: bool = False
    """True when some values are NaN (passed on only to a pipeline that imputes)."""


NO_LABEL = -(2**62)
"""A block's label for a sample whose label is unknown."""


@dataclass(frozen=True)
class Block:
    """Consecutive samples: ``values`` [n, channels] float32, ``labels`` [n] int64 (:data:`NO_LABEL` where a
    sample has none; None when no sample has one), ``missing`` [n] bool (samples passed on with NaN)."""

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
        """Yield unvalidated blocks [n, channels] (a source holding its samples as arrays); None: this source
        has readings only."""
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
        if values.ndim != 2 or not values.shape[1]:
            self.skipped += n
            return None
        if math.isfinite(values.sum()):  # the common case: every value finite (a NaN or an infinity makes the
            return block                 # sum non-finite)
        finite = np.isfinite(values)
        whole = finite.all(axis=1)
        if whole.all():  # the sum of squares overflowed
            return block
        partial = finite.any(axis=1) & ~whole if self.allow_missing else np.zeros(n, dtype=bool)
        keep = whole | partial
        self.skipped += int(n - keep.sum())
        self.partial += int(partial.sum())
        if not keep.any():
            return None
        kept = np.where(finite, values, np.nan).astype(np.float32)[keep]
        labels = None if block.labels is None else block.labels[keep]
        return Block(kept, labels, partial[keep] if partial.any() else None)

    def readings(self) -> Iterator[Reading]:
        """Yield every well-formed reading (a 1-D array of finite values, or with ``allow_missing`` some NaN, an
        infinity counting as missing); count the rest in ``skipped`` (a reading with no finite value always) and
        the partially missing ones passed on in ``partial``."""
        isfinite = math.isfinite
        for reading in self._raw():
            if reading is None:
                self.skipped += 1
                continue
            values = reading.values
            if values.ndim != 1 or not values.size:
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


class ReplaySource(SensorSource):
    """Replays recordings [n, channels, length] sample by sample at ``rate_hz * speed``, optionally looping."""

    def __init__(self, recordings: np.ndarray, labels: np.ndarray, rate_hz: float, *, speed: float = 1.0,
                 loop: bool = True, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        if recordings.ndim != 3 or len(recordings) != len(labels) or len(recordings) == 0:
            raise DataError("replay needs recordings [n, channels, length] with one label each")
        if rate_hz <= 0 or speed <= 0:
            raise ConfigError("replay rate and speed must be positive")
        self._samples = np.ascontiguousarray(recordings.transpose(0, 2, 1), dtype=np.float32)  # rows = samples
        self._labels = [int(label) for label in labels]
        self._rate = rate_hz * speed
        self._loop = loop
        self._clock = clock
        self._sleep = sleep

    def _raw(self) -> Iterator[Reading | None]:
        pacer = Pacer(self._rate, self._clock, self._sleep)
        while True:
            for recording, label in zip(self._samples, self._labels, strict=True):
                for row in recording:
                    pacer.wait()
                    yield Reading(row, label)
            if not self._loop:
                return

    def _raw_blocks(self) -> Iterator[Block]:
        """The samples due at once, up to one recording at a time (every sample at full speed)."""
        pacer = Pacer(self._rate, self._clock, self._sleep)
        label_rows = {label: np.full(self._samples.shape[1], label, dtype=np.int64) for label in set(self._labels)}
        while True:
            for recording, label in zip(self._samples, self._labels, strict=True):
                labels = label_rows[label]
                start, length = 0, len(recording)
                while start < length:
                    n = pacer.take(length - start)
                    yield Block(recording[start : start + n], labels[start : start + n])
                    start += n
            if not self._loop:
                return


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
        return _npz_source(Path(target), options)
    if kind in ("jsonl", "csv"):
        stream = sys.stdin if target == "-" else _open_text(Path(target))
        return JsonLinesSource(stream) if kind == "jsonl" else CsvSource(stream)
    if kind == "vibration":
        from edgefleet.agent.sensors.vibration import VibrationSource

        return VibrationSource.from_options(options)
    raise ConfigError(f"unknown sensor source {spec!r}: use npz:PATH, jsonl:PATH|-, csv:PATH, "
                      "vibration:?OPTIONS or mqtt://HOST:PORT/TOPIC")


def _npz_source(path: Path, options: dict[str, str]) -> ReplaySource:
    from edgefleet.data.basicmotions import load_npz

    index, count = _shard(options.get("shard", "0/1"))
    recordings = load_npz(path)
    x, y = recordings.test_x[index::count], recordings.test_y[index::count]
    if len(x) == 0:
        raise ConfigError(f"shard {index}/{count} of {path} holds no recording")
    speed = number_option(options, "speed", 1.0)
    source = ReplaySource(x, y, recordings.sample_rate_hz, speed=speed, loop=options.get("loop", "1") != "0")
    source.labels = recordings.labels
    return source


def number_option(options: dict[str, str], name: str, default: float) -> float:
    """A numeric option of a source spec; ConfigError when it is not a number."""
    try:
        return float(options.get(name, default))
    except ValueError as exc:
        raise ConfigError(f"{name} must be a number, got {options[name]!r}") from exc


def _shard(text: str) -> tuple[int, int]:
    try:
        index_text, count_text = text.split("/")
        index, count = int(index_text), int(count_text)
    except ValueError as exc:
        raise ConfigError(f"shard must look like I/N, got {text!r}") from exc
    if not 0 <= index < count:
        raise ConfigError(f"shard index must be in [0, {count}), got {index}")
    return index, count


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

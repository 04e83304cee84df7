"""Sensor sources behind one interface; a source spec string picks one.

    npz:PATH[?shard=I/N&speed=X&loop=0|1]   replay the test recordings of a dataset file at its sample rate
    jsonl:PATH | jsonl:-                     one JSON object per line: {"values": [...], "label": optional int}
    csv:PATH                                 one sample per line: channel values, optional trailing label column
                                             named "label" in a header line
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import parse_qs

import numpy as np

from edgefleet.errors import ConfigError, DataError


@dataclass(frozen=True)
class Reading:
    """One multi-channel sample and its ground-truth label where the source knows it."""

    values: np.ndarray
    label: int | None = None


class SensorSource(ABC):
    """A stream of readings. ``readings`` validates each one; malformed input is skipped and counted."""

    labels: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.skipped = 0

    @abstractmethod
    def _raw(self) -> Iterator[Reading | None]:
        """Yield readings, or None for a record that could not be parsed."""

    def readings(self) -> Iterator[Reading]:
        """Yield every well-formed reading (a 1-D array of finite values); count the rest in ``skipped``."""
        for reading in self._raw():
            if reading is None or reading.values.ndim != 1 or not np.all(np.isfinite(reading.values)):
                self.skipped += 1
                continue
            yield reading


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
        self._recordings = recordings.astype(np.float32)
        self._labels = labels.astype(np.int64)
        self._period = 1.0 / (rate_hz * speed) if math.isfinite(speed) else 0.0
        self._loop = loop
        self._clock = clock
        self._sleep = sleep

    def _raw(self) -> Iterator[Reading | None]:
        start = self._clock()
        emitted = 0
        while True:
            for recording, label in zip(self._recordings, self._labels, strict=True):
                for t in range(recording.shape[1]):
                    if self._period:
                        delay = start + emitted * self._period - self._clock()
                        if delay > 0:
                            self._sleep(delay)
                    emitted += 1
                    yield Reading(recording[:, t], int(label))
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
            try:
                record = json.loads(line)
                values = np.asarray(record["values"], dtype=np.float32)
                label = record.get("label")
                yield Reading(values, int(label) if label is not None else None)
            except (ValueError, KeyError, TypeError, AttributeError):
                yield None


class CsvSource(SensorSource):
    """Comma-separated channel values per line; a header naming a ``label`` column marks labels."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self._stream = stream

    def _raw(self) -> Iterator[Reading | None]:
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
                yield Reading(np.asarray([float(c) for c in cells], dtype=np.float32), label)
            except (ValueError, IndexError):
                yield None


def open_source(spec: str) -> SensorSource:
    """Build a source from its spec string (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    target, _, query = rest.partition("?")
    options = {k: v[-1] for k, v in parse_qs(query).items()}
    if kind == "npz":
        return _npz_source(Path(target), options)
    if kind in ("jsonl", "csv"):
        stream = sys.stdin if target == "-" else _open_text(Path(target))
        return JsonLinesSource(stream) if kind == "jsonl" else CsvSource(stream)
    raise ConfigError(f"unknown sensor source {spec!r}: use npz:PATH, jsonl:PATH|-, or csv:PATH")


def _npz_source(path: Path, options: dict[str, str]) -> ReplaySource:
    from edgefleet.data.basicmotions import load_npz

    index, count = _shard(options.get("shard", "0/1"))
    recordings = load_npz(path)
    x, y = recordings.test_x[index::count], recordings.test_y[index::count]
    if len(x) == 0:
        raise ConfigError(f"shard {index}/{count} of {path} holds no recording")
    try:
        speed = float(options.get("speed", "1"))
    except ValueError as exc:
        raise ConfigError(f"speed must be a number, got {options['speed']!r}") from exc
    source = ReplaySource(x, y, recordings.sample_rate_hz, speed=speed, loop=options.get("loop", "1") != "0")
    source.labels = recordings.labels
    return source


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

"""Frames through OpenCV (a video file, a camera) and a camera's in-memory twin, read by the agent as a
recording (paced, late frames skipped undecoded) or live (a capture thread and a one-slot buffer). The specs
that open them and what they yield: ``agent.sensors.images``."""

from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.sensors.images import EXTRA, frame_channels
from edgefleet.agent.sources import Pacer, Reading, SensorSource
from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.runtime.inputs import InputStep

log = logging.getLogger(__name__)

POLL_S = 0.1
"""How long the reader of a live source waits for a frame before it looks at ``close`` again."""
MAX_READ_FAILURES = 50
"""Failed reads in a row after which a live camera counts as gone (the stream ends)."""


def opencv() -> ModuleType:
    """cv2, or a one-line ConfigError naming the extra."""
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError(f"video and cameras need OpenCV: {EXTRA}") from exc
    return cv2


class FrameReader(ABC):
    """A port: frames from a camera, a video file or a twin, read on one thread; ``channels`` (1, 3 or 4) is
    what ``read`` returns."""

    channels: int = 3
    live: bool = True
    """True for a device (a failed read may be retried); False for a recording (None from ``read``: the end)."""

    @abstractmethod
    def read(self) -> np.ndarray | None:
        """The next frame [h, w, channels] uint8 RGB(A) or grey; None at the end or when the read failed."""

    def skip(self) -> bool:
        """Pass over one frame without decoding it; False at the end."""
        return self.read() is not None

    def rewind(self) -> bool:
        """Start again from the first frame; False when this reader cannot."""
        return False

    def close(self) -> None:  # noqa: B027 - a hook with a default, not abstract
        """Release the device or file."""


class OpenCvReader(FrameReader):
    """A ``cv2.VideoCapture`` (a video file or a camera), its BGR frames converted to RGB, grey or RGBA."""

    def __init__(self, capture: Any, cv2: ModuleType, *, live: bool) -> None:
        self._capture, self._cv2, self.live = capture, cv2, live

    @property
    def fps(self) -> float:
        """The frame rate the file or device states (0 when it does not)."""
        rate = float(self._capture.get(self._cv2.CAP_PROP_FPS) or 0.0)
        return rate if math.isfinite(rate) and rate > 0 else 0.0

    def read(self) -> np.ndarray | None:
        cv2 = self._cv2
        try:
            ok, frame = self._capture.read()
            if not ok or frame is None:
                return None
            if frame.ndim == 2:
                frame = cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
            code = {1: cv2.COLOR_BGR2GRAY, 4: cv2.COLOR_BGR2RGBA}.get(self.channels, cv2.COLOR_BGR2RGB)
            converted: np.ndarray = cv2.cvtColor(frame, code)
        except cv2.error as exc:
            log.warning("frame read failed: %s", exc)
            return None
        return converted[..., np.newaxis] if converted.ndim == 2 else converted

    def skip(self) -> bool:
        try:
            return bool(self._capture.grab())
        except self._cv2.error:
            return False

    def rewind(self) -> bool:
        return bool(self._capture.set(self._cv2.CAP_PROP_POS_FRAMES, 0))

    def close(self) -> None:
        self._capture.release()


class SyntheticCamera(FrameReader):
    """The in-memory twin of a camera: frame ``i`` is a diagonal gradient shifted by ``i``, ``fps`` frames per
    second (None: as fast as it is read), ``frames`` of them (None: no end)."""

    def __init__(self, width: int = 64, height: int = 48, *, fps: float | None = 30.0,
                 frames: int | None = None) -> None:
        if not (0 < width <= 8192 and 0 < height <= 8192) or (fps is not None and not fps > 0) \
                or (frames is not None and frames < 0):
            raise ConfigError("a synthetic camera needs 0 < width, height <= 8192, fps > 0 and frames >= 0")
        self._grid = (np.arange(width)[None, :] + np.arange(height)[:, None]).astype(np.int64)
        self._period = 1.0 / fps if fps else 0.0
        self._frames = frames
        self.live = frames is None
        self.index = 0
        self._next = time.monotonic()
        self.closed = False

    def _tick(self) -> bool:
        if self._frames is not None and self.index >= self._frames:
            return False
        if self._period:
            delay = self._next - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._next = max(self._next + self._period, time.monotonic() - self._period)
        self.index += 1
        return True

    def read(self) -> np.ndarray | None:
        if not self._tick():
            return None
        base = ((self._grid + self.index) % 256).astype(np.uint8)
        if self.channels == 1:
            return base[..., np.newaxis]
        planes = [base, base + np.uint8(85), base + np.uint8(170)] + ([np.full_like(base, 255)]
                                                                      if self.channels == 4 else [])
        return np.stack(planes, axis=-1)

    def skip(self) -> bool:
        return self._tick()

    def close(self) -> None:
        self.closed = True


class RecordedFrameSource(SensorSource):
    """The frames of a recording (a video file) at ``rate_hz``; late frames are skipped undecoded and counted."""

    waits_for_model = True

    def __init__(self, reader: FrameReader, rate_hz: float, *, loop: bool = False,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        if not rate_hz > 0:
            raise ConfigError("a video source's rate must be positive")
        self.reader = reader
        self._rate, self._loop, self._clock, self._sleep = rate_hz, loop, clock, sleep
        self.dropped = 0

    def bind(self, step: InputStep) -> None:
        self.reader.channels = frame_channels(step)

    def close(self) -> None:
        self.reader.close()

    def _raw(self) -> Iterator[Reading | None]:
        pacer = Pacer(self._rate, self._clock, self._sleep)
        paced = math.isfinite(self._rate)
        reader = self.reader
        try:
            while True:
                frame = None
                for _ in range(pacer.take(1 << 30) - 1 if paced else 0):  # late: skip the frames due before
                    if not reader.skip():
                        break
                    self.dropped += 1
                    self.skipped += 1
                else:
                    frame = reader.read()
                if frame is not None:
                    yield Reading(frame)
                elif not (self._loop and reader.rewind()):
                    return
        finally:
            reader.close()


class LatestFrame:
    """A one-slot buffer between a capture thread and its reader: ``put`` replaces a frame not taken yet (counted
    in ``overwritten``), ``take`` returns the newest frame once. It never holds more than one frame."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._frame: np.ndarray | None = None
        self.overwritten = 0

    def put(self, frame: np.ndarray) -> None:
        with self._cond:
            if self._frame is not None:
                self.overwritten += 1
            self._frame = frame
            self._cond.notify()

    def take(self, timeout_s: float) -> np.ndarray | None:
        """The newest frame (waiting up to ``timeout_s`` for one), or None."""
        with self._cond:
            if self._frame is None:
                self._cond.wait(timeout_s)
            frame, self._frame = self._frame, None
            return frame


class LiveFrameSource(SensorSource):
    """A live camera: a capture thread reads ``reader`` continuously into a :class:`LatestFrame`, decoding at
    most ``rate_hz`` frames per second (the others are grabbed and passed over); the reader yields the newest."""

    def __init__(self, reader: FrameReader, *, rate_hz: float | None = None) -> None:
        super().__init__()
        if rate_hz is not None and not rate_hz > 0:
            raise ConfigError("a camera's rate must be positive")
        self.reader = reader
        self._period = 1.0 / rate_hz if rate_hz is not None and math.isfinite(rate_hz) else 0.0
        self._slot = LatestFrame()
        self._closed = threading.Event()
        self._ended = threading.Event()
        self._thread: threading.Thread | None = None
        self._counted_drops = 0
        self.failed_reads = 0

    @property
    def dropped(self) -> int:
        """Frames captured and overwritten before the agent took them."""
        return self._slot.overwritten

    @property
    def capturing(self) -> bool:
        """Whether the capture thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def bind(self, step: InputStep) -> None:
        self.reader.channels = frame_channels(step)

    def close(self) -> None:
        """Stop capturing: the thread ends within a frame and releases the camera (safe in a signal handler)."""
        self._closed.set()
        if self._thread is None:
            self._ended.set()
            self.reader.close()

    def _capture(self) -> None:
        reader, closed, period = self.reader, self._closed, self._period
        due = time.monotonic()
        failures = 0
        try:
            while not closed.is_set():
                if period and time.monotonic() < due:  # not due: keep the device's buffer fresh, decode nothing
                    if not reader.skip() and not reader.live:
                        return
                    continue
                frame = reader.read()
                if frame is None:
                    if not reader.live:
                        return
                    failures += 1
                    self.failed_reads += 1
                    if failures >= MAX_READ_FAILURES:
                        log.warning("the camera failed %d reads in a row: the source ends", failures)
                        return
                    closed.wait(POLL_S)
                    continue
                failures = 0
                self._slot.put(frame)
                due = max(due + period, time.monotonic() - period) if period else due
        finally:
            reader.close()
            self._ended.set()

    def _fold_drops(self) -> None:
        dropped = self._slot.overwritten  # the capture thread's count, folded in on the reading thread
        if dropped != self._counted_drops:
            self.skipped += dropped - self._counted_drops
            self._counted_drops = dropped

    def _raw(self) -> Iterator[Reading | None]:
        if self._closed.is_set():
            return
        self._thread = threading.Thread(target=self._capture, name="edgefleet-capture", daemon=True)
        self._thread.start()
        try:
            while not self._closed.is_set():
                frame = self._slot.take(POLL_S)
                self._fold_drops()
                if frame is not None:
                    yield Reading(frame)
                elif self._ended.is_set():
                    frame = self._slot.take(0.0)
                    if frame is not None:
                        yield Reading(frame)
                    return
        finally:
            self._closed.set()
            self._thread.join(timeout=5.0)


def open_capture(what: str | int, name: str, *, live: bool) -> OpenCvReader:
    """A file or device opened through OpenCV; ConfigError when it cannot be read."""
    cv2 = opencv()
    capture = cv2.VideoCapture(what)
    if not capture.isOpened():
        capture.release()
        raise ConfigError(f"cannot open {name} (OpenCV could not read it)")
    return OpenCvReader(capture, cv2, live=live)

"""Image sources: frames [h, w, c] uint8 in RGB from a directory of image files, a video file or a camera.

    images:DIR[?rate=R&loop=0|1]   the image files in DIR, sorted by name (Pillow: PNG, JPEG, BMP, ...), R frames
                                   per second (default 10; ``inf``: as fast as inference goes); a ``labels.csv``
                                   in DIR (``file,label`` per line, header optional; labels are class ids or
                                   names) labels them; a file that is not an image is skipped and counted
    video:PATH[?rate=R&loop=0|1]   the frames of a video file (OpenCV), R per second (default: the file's rate)
    camera:INDEX[?rate=R]          a live camera (OpenCV device INDEX), at most R frames per second
    camera:synthetic[?width=W&height=H&fps=F&frames=N&rate=R]
                                   the in-memory twin of a camera: a moving test pattern, F frames per second
                                   (default 30), N frames (default: no end)

A directory and a video file are recordings: like an ``npz:`` replay they start once the agent has a model, and
play once unless ``loop=1``. A frame that falls due while the agent is still busy with an earlier one is
dropped (a file by not reading it, a video frame by grabbing it without decoding): the stream stays current
and nothing queues up. A camera is live: a capture thread reads it all the time into a one-slot buffer
(:class:`LatestFrame`) and the agent takes the newest frame; a frame overwritten before it was taken is dropped.
Either way dropped frames are counted in ``dropped`` and in ``skipped`` (which telemetry reports); ``close``
stops a capture thread (the agent calls it on SIGTERM).

Frames are RGB, or grey [h, w, 1] and RGBA when the bound model's image step takes 1 or 4 channels. Pillow and
OpenCV are the ``camera`` extra, imported only when such a source is opened.
"""

from __future__ import annotations

import csv
import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.sources import Pacer, Reading, SensorSource, flag_option, number_option
from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.runtime.inputs import InputStep

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
DEFAULT_RATE_HZ = 10.0
POLL_S = 0.1
"""How long the reader of a live source waits for a frame before it looks at ``close`` again."""
MAX_READ_FAILURES = 50
"""Failed reads in a row after which a live camera counts as gone (the stream ends)."""
PILLOW_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
EXTRA = "install the 'camera' extra: pip install 'edgefleet[camera]'"


def pillow() -> Any:
    """PIL.Image, or a one-line ConfigError naming the extra."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError(f"image files need Pillow: {EXTRA}") from exc
    return Image


def opencv() -> ModuleType:
    """cv2, or a one-line ConfigError naming the extra."""
    try:
        import cv2
    except ImportError as exc:
        raise ConfigError(f"video and cameras need OpenCV: {EXTRA}") from exc
    return cv2


def frame_channels(step: InputStep) -> int:
    """The channels a frame should have for ``step``: the image step's, else 3 (RGB)."""
    from edgefleet.runtime.inputs import ImageInput

    return step.channels if isinstance(step, ImageInput) else 3


class ImageDirectorySource(SensorSource):
    """The image files of a directory, sorted by name, paced at ``rate_hz`` (see the module docstring)."""

    waits_for_model = True

    def __init__(self, directory: Path, *, rate_hz: float = DEFAULT_RATE_HZ, loop: bool = False,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__()
        if not rate_hz > 0:
            raise ConfigError("an image source's rate must be positive")
        self._image = pillow()
        try:
            self.files = sorted(p for p in directory.iterdir()
                                if p.is_file() and p.name != LABELS_FILE and not p.name.startswith("."))
        except OSError as exc:
            raise ConfigError(f"cannot list images in {directory}: {exc.strerror or exc}") from exc
        if not self.files:
            raise ConfigError(f"{directory} holds no image files")
        self._by_file, self.labels = read_labels(directory / LABELS_FILE)
        self._rate, self._loop, self._clock, self._sleep = rate_hz, loop, clock, sleep
        self._mode = PILLOW_MODES[3]
        self.dropped = 0

    def bind(self, step: InputStep) -> None:
        self._mode = PILLOW_MODES[frame_channels(step)]

    def _raw(self) -> Iterator[Reading | None]:
        pacer = Pacer(self._rate, self._clock, self._sleep)
        paced = math.isfinite(self._rate)
        files = self.files
        while True:
            read = index = 0
            while index < len(files):
                due = pacer.take(len(files) - index) if paced else 1
                if due > 1:  # late: the frames due before the newest one are dropped unread
                    self.dropped += due - 1
                    self.skipped += due - 1
                    index += due - 1
                path = files[index]
                index += 1
                frame = self._load(path)
                read += frame is not None
                yield None if frame is None else Reading(frame, self._by_file.get(path.name))
            if not self._loop:
                return
            if not read:
                log.warning("no image in %s could be read: the source ends", files[0].parent)
                return

    def _load(self, path: Path) -> np.ndarray | None:
        """The file as a frame [h, w, c] uint8, or None when it is not a readable image."""
        image = self._image
        try:
            with image.open(path) as img:
                frame = np.asarray(img.convert(self._mode))
        except (OSError, ValueError, SyntaxError, image.DecompressionBombError) as exc:
            log.debug("%s is not an image: %s", path, exc)
            return None
        return frame[..., np.newaxis] if frame.ndim == 2 else frame


def read_labels(path: Path) -> tuple[dict[str, int], tuple[str, ...]]:
    """``labels.csv`` (``file,label``) -> label per file name and the class names (empty when the labels are
    class ids); nothing when the file does not exist."""
    if not path.is_file():
        return {}, ()
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            pairs = [(row[0].strip(), row[1].strip()) for row in csv.reader(fh) if len(row) >= 2 and row[0].strip()]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if pairs and (pairs[0][0].lower(), pairs[0][1].lower()) == ("file", "label"):
        pairs = pairs[1:]
    if all(label.lstrip("-").isdigit() for _, label in pairs):
        return {name: int(label) for name, label in pairs}, ()
    names = tuple(sorted({label for _, label in pairs}))
    index = {name: i for i, name in enumerate(names)}
    return {name: index[label] for name, label in pairs}, names


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


IMAGE_OPTIONS = {"images": ("rate", "loop"), "video": ("rate", "loop"), "camera": ("rate",),
                 "synthetic": ("width", "height", "fps", "frames", "rate")}


def open_frame_source(kind: str, target: str, options: dict[str, str]) -> SensorSource:
    """``images:DIR``, ``video:PATH`` or ``camera:INDEX|synthetic`` with their options (module docstring)."""
    known = IMAGE_OPTIONS["synthetic" if kind == "camera" and target == "synthetic" else kind]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown {kind} source option(s) {', '.join(unknown)}: use {', '.join(known)}")
    rate = number_option(options, "rate", DEFAULT_RATE_HZ) if "rate" in options else None
    if kind == "images":
        return ImageDirectorySource(Path(target), rate_hz=rate or DEFAULT_RATE_HZ,
                                    loop=flag_option(options, "loop", False))
    if kind == "video":
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"no video file {path}")
        reader = _open_capture(str(path), f"video {path}", live=False)
        return RecordedFrameSource(reader, rate or reader.fps or DEFAULT_RATE_HZ,
                                   loop=flag_option(options, "loop", False))
    if target == "synthetic":
        frames = options.get("frames")
        camera = SyntheticCamera(int(number_option(options, "width", 64)), int(number_option(options, "height", 48)),
                                 fps=number_option(options, "fps", 30.0),
                                 frames=None if frames is None else int(number_option(options, "frames", 0)))
        return LiveFrameSource(camera, rate_hz=rate)
    try:
        index = int(target)
    except ValueError as exc:
        raise ConfigError(f"camera:INDEX needs a device number (0 for the first camera), got {target!r}") from exc
    return LiveFrameSource(_open_capture(index, f"camera {index}", live=True), rate_hz=rate)


def _open_capture(what: str | int, name: str, *, live: bool) -> OpenCvReader:
    cv2 = opencv()
    capture = cv2.VideoCapture(what)
    if not capture.isOpened():
        capture.release()
        raise ConfigError(f"cannot open {name} (OpenCV could not read it)")
    return OpenCvReader(capture, cv2, live=live)

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
OpenCV are the ``camera`` extra, imported only when such a source is opened. The OpenCV readers, the camera twin
and the capture thread live in ``agent.sensors.camera``.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.agent.sources import Pacer, Reading, SensorSource, flag_option, number_option
from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.runtime.inputs import InputStep

log = logging.getLogger(__name__)

LABELS_FILE = "labels.csv"
DEFAULT_RATE_HZ = 10.0

PILLOW_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
EXTRA = "install the 'camera' extra: pip install 'edgefleet[camera]'"


def pillow() -> Any:
    """PIL.Image, or a one-line ConfigError naming the extra."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ConfigError(f"image files need Pillow: {EXTRA}") from exc
    return Image


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


IMAGE_OPTIONS = {"images": ("rate", "loop"), "video": ("rate", "loop"), "camera": ("rate",),
                 "synthetic": ("width", "height", "fps", "frames", "rate")}


def open_frame_source(kind: str, target: str, options: dict[str, str]) -> SensorSource:
    """``images:DIR``, ``video:PATH`` or ``camera:INDEX|synthetic`` with their options (module docstring)."""
    from edgefleet.agent.sensors.camera import LiveFrameSource, RecordedFrameSource, SyntheticCamera, open_capture

    known = IMAGE_OPTIONS["synthetic" if kind == "camera" and target == "synthetic" else kind]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"unknown {kind} source option(s) {', '.join(unknown)}: use {', '.join(known)}")
    rate = number_option(options, "rate", DEFAULT_RATE_HZ) if "rate" in options else None
    if kind == "images":
        return ImageDirectorySource(Path(target), rate_hz=DEFAULT_RATE_HZ if rate is None else rate,
                                    loop=flag_option(options, "loop", False))
    if kind == "video":
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"no video file {path}")
        loop = flag_option(options, "loop", False)
        reader = open_capture(str(path), f"video {path}", live=False)
        return RecordedFrameSource(reader, rate if rate is not None else reader.fps or DEFAULT_RATE_HZ, loop=loop)
    if target == "synthetic":
        frames = whole_option(options, "frames", -1)
        camera = SyntheticCamera(whole_option(options, "width", 64), whole_option(options, "height", 48),
                                 fps=number_option(options, "fps", 30.0), frames=None if frames < 0 else frames)
        return LiveFrameSource(camera, rate_hz=rate)
    try:
        index = int(target)
    except ValueError as exc:
        raise ConfigError(f"camera:INDEX needs a device number (0 for the first camera), got {target!r}") from exc
    return LiveFrameSource(open_capture(index, f"camera {index}", live=True), rate_hz=rate)


def whole_option(options: dict[str, str], name: str, default: int) -> int:
    """A whole-number option of a source spec; ConfigError for anything else."""
    value = number_option(options, name, default)
    if not (math.isfinite(value) and value == int(value)):
        raise ConfigError(f"{name} must be a whole number, got {options.get(name)!r}")
    return int(value)

"""The manifest's input pipeline: how what a device senses becomes the model's input, one step per kind.

    {"kind": "sliding_window", ...}                 a sample stream, windowed (see runtime.preprocess)
    {"kind": "image", "height": H, "width": W, "channels": C, "layout": "NCHW" | "NHWC",
     "color": "rgb" | "bgr" | "gray", "resize": "none" | "nearest" | "bilinear",
     "scale": 1.0, "mean": [C floats], "std": [C floats], "dtype": "float32"}
    {"kind": "vector", "features": F, "names": [F names], "mean": [F floats], "std": [F floats], "dtype": ...}
    {"kind": "tensor", "shape": [d1, ...], "dtype": "float32"}

Every spec may say ``"version": 1`` (the default); a newer version is refused as needing a newer agent.

What one reading is, per kind: a stream sample [C] (series); a frame [h, w, c] in height-width-channel order with
RGB colour, as image files and cameras give them (image); a row [F] (vector); the model input without its batch
axis (tensor). ``apply`` maps a batch of readings [n, ...] to the model's input [n, ...] in one vectorized pass:
resize, colour order, ``x * scale``, ``(x - mean) / std``, layout, element type. A reading of another shape is
refused by ``accepts`` (the agent skips and counts it); images of another size are resized unless ``resize`` is
``none``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

import numpy as np

from edgefleet.errors import BundleError
from edgefleet.runtime.preprocess import WindowSpec

SPEC_VERSION = 1
MAX_DIM = 1 << 16
DTYPES: dict[str, type[np.generic]] = {"float32": np.float32, "float16": np.float16, "float64": np.float64,
                                       "uint8": np.uint8, "int8": np.int8, "int32": np.int32, "int64": np.int64}
ONNX_TO_DTYPE = {"float": "float32", "float16": "float16", "double": "float64", "uint8": "uint8", "int8": "int8",
                 "int32": "int32", "int64": "int64"}


def _invalid(kind: str, why: str) -> BundleError:
    return BundleError(f"preprocessing spec ({kind}) is invalid: {why}", reason="malformed")


def check_version(spec: dict[str, Any], what: str) -> None:
    """Refuse a spec written for a newer pipeline format than this agent runs."""
    version = spec.get("version", SPEC_VERSION)
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{what} version must be a positive integer, got {version!r}", reason="malformed")
    if version > SPEC_VERSION:
        raise BundleError(f"{what} version {version} needs a newer agent (this one runs {SPEC_VERSION})",
                          reason="incompatible")


def _dtype(kind: str, spec: dict[str, Any]) -> str:
    name = str(spec.get("dtype", "float32"))
    if name not in DTYPES:
        raise _invalid(kind, f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return name


def _stats(kind: str, spec: dict[str, Any], size: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Optional per-channel (or per-feature) mean and std, checked: finite, std > 0, ``size`` values each."""
    mean, std = spec.get("mean"), spec.get("std")
    if mean is None and std is None:
        return None, None
    try:
        m = np.asarray(mean if mean is not None else [0.0] * size, dtype=np.float32)
        s = np.asarray(std if std is not None else [1.0] * size, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise _invalid(kind, f"mean/std are not numbers: {exc}") from exc
    if m.shape != (size,) or s.shape != (size,):
        raise _invalid(kind, f"mean and std need {size} values each, got {m.shape} and {s.shape}")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s > 0)):
        raise _invalid(kind, "mean and std must be finite with std > 0")
    return m, s


class InputStep(ABC):
    """One kind of input: parsed from the manifest, and mapping readings to model input."""

    kind: ClassVar[str]
    streamed: ClassVar[bool] = False
    """True when readings are stream samples that a windower groups (series); otherwise one reading, one input."""
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version"})
    """The spec keys this step reads (a pipeline file with any other key is refused)."""

    @classmethod
    @abstractmethod
    def from_manifest(cls, spec: dict[str, Any]) -> InputStep:
        """Parse and check the spec; BundleError with the reason for anything the device cannot run."""

    @property
    @abstractmethod
    def model_shape(self) -> tuple[int, ...]:
        """The model input one reading (or window) makes, with its batch axis of 1."""

    @property
    def dtype(self) -> type[np.generic]:
        return np.float32

    @abstractmethod
    def accepts(self, shape: tuple[int, ...]) -> bool:
        """Whether one reading of this shape can be fed (others are skipped and counted)."""

    @abstractmethod
    def apply(self, readings: np.ndarray) -> np.ndarray:
        """Readings [n, ...] (all accepted) -> model input [n, ...] of the model's element type."""

    def example(self) -> np.ndarray:
        """A neutral model input [1, ...] for probes (zeros after the pipeline's scaling)."""
        return np.zeros(self.model_shape, dtype=self.dtype)


class SeriesInput(InputStep):
    """A sample stream of C channels, cut into windows (runtime.preprocess does the streaming part)."""

    kind = "sliding_window"
    streamed = True
    KEYS = frozenset({"kind", "version", "channels", "window", "hop", "sample_rate_hz", "mean", "std", "missing",
                      "features", "trigger"})

    def __init__(self, window: WindowSpec) -> None:
        self.window = window

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> SeriesInput:
        return cls(WindowSpec.from_manifest({**spec, "kind": cls.kind}))

    @property
    def model_shape(self) -> tuple[int, ...]:
        return self.window.input_shape

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return shape == (self.window.channels,)

    def apply(self, readings: np.ndarray) -> np.ndarray:
        """Whole windows [n, C, W] (build time, golden samples) -> model input, as the windower scales them."""
        spec = self.window
        x = (np.asarray(readings, dtype=np.float32) - spec.mean[:, None]) / spec.std[:, None]
        if not spec.features:
            scaled: np.ndarray = x.astype(np.float32, copy=False)
            return scaled
        out = []
        for row in x:
            y = row
            for step in spec.features:
                y = step(y)
            out.append(y)
        stacked: np.ndarray = np.stack(out).astype(np.float32, copy=False)
        return stacked


@dataclass(frozen=True)
class ImageInput(InputStep):
    """Frames [h, w, c] (RGB, any numeric type) -> resized, scaled, normalized model input in its layout."""

    kind: ClassVar[str] = "image"
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "height", "width", "channels", "layout", "color",
                                                "resize", "scale", "mean", "std", "dtype"})
    height: int
    width: int
    channels: int
    layout: str = "NCHW"
    color: str = "rgb"
    resize: str = "none"
    scale: float = 1.0
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    dtype_name: str = "float32"

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> ImageInput:
        try:
            height, width, channels = int(spec["height"]), int(spec["width"]), int(spec.get("channels", 3))
            layout = str(spec.get("layout", "NCHW")).upper()
            color = str(spec.get("color", "rgb" if channels == 3 else "gray")).lower()
            resize = str(spec.get("resize", "none")).lower()
            scale = float(spec.get("scale", 1.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise _invalid(cls.kind, f"needs height, width (and channels): {exc}") from exc
        if not (0 < height <= MAX_DIM and 0 < width <= MAX_DIM and channels in (1, 3, 4)):
            raise _invalid(cls.kind, f"size {height}x{width}x{channels} is out of range (channels 1, 3 or 4)")
        if layout not in ("NCHW", "NHWC"):
            raise _invalid(cls.kind, f"layout {layout!r} is not NCHW or NHWC")
        if color not in ("rgb", "bgr", "gray") or (color == "gray") != (channels == 1):
            raise _invalid(cls.kind, f"color {color!r} does not fit {channels} channel(s) (gray for 1, rgb|bgr)")
        if resize not in ("none", "nearest", "bilinear"):
            raise _invalid(cls.kind, f"resize {resize!r} is not none, nearest or bilinear")
        if not (np.isfinite(scale) and scale > 0):
            raise _invalid(cls.kind, "scale must be a positive number")
        mean, std = _stats(cls.kind, spec, channels)
        return cls(height, width, channels, layout, color, resize, scale, mean, std, _dtype(cls.kind, spec))

    @property
    def dtype(self) -> type[np.generic]:
        return DTYPES[self.dtype_name]

    @property
    def model_shape(self) -> tuple[int, ...]:
        if self.layout == "NCHW":
            return (1, self.channels, self.height, self.width)
        return (1, self.height, self.width, self.channels)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if len(shape) == 2:  # a grey frame without its channel axis
            shape = (*shape, 1)
        if len(shape) != 3 or shape[2] != self.channels or not (shape[0] and shape[1]):
            return False
        return self.resize != "none" or shape[:2] == (self.height, self.width)

    def apply(self, readings: np.ndarray) -> np.ndarray:
        frames = np.asarray(readings)
        if frames.ndim == 3:
            frames = frames[..., np.newaxis]
        if frames.shape[1:3] != (self.height, self.width):
            frames = resize_frames(frames, self.height, self.width, self.resize)
        if self.color == "bgr":
            frames = frames[..., ::-1]
        if self.layout == "NCHW":  # channels outermost: the affine step below runs over long rows
            frames = frames.transpose(0, 3, 1, 2)
        gain, offset = self._affine
        if gain is None and offset is None:
            return np.ascontiguousarray(frames, dtype=self.dtype)
        x = np.empty(frames.shape, dtype=np.float32)
        axis = (-1, 1, 1) if self.layout == "NCHW" else (-1,)
        if gain is not None:  # the type conversion, the layout change and the gain in one pass
            np.multiply(frames, gain.reshape(axis), out=x, casting="unsafe")
        else:
            np.copyto(x, frames, casting="unsafe")
        if offset is not None:
            x += offset.reshape(axis)
        return x if self.dtype_name == "float32" else x.astype(self.dtype)

    @cached_property
    def _affine(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``x * scale``, then ``(x - mean) / std``, as one gain and offset per channel (None: not needed)."""
        scale = np.float32(self.scale)
        if self.mean is None or self.std is None:
            return (None if self.scale == 1.0 else np.full(self.channels, scale, dtype=np.float32)), None
        return (scale / self.std).astype(np.float32), (-self.mean / self.std).astype(np.float32)

    def to_frames(self, model_rows: np.ndarray) -> np.ndarray:
        """The inverse of the layout step: rows in the model's layout [n, ...] -> frames [n, h, w, c]."""
        rows = np.asarray(model_rows)
        return rows.transpose(0, 2, 3, 1) if self.layout == "NCHW" else rows


def resize_frames(frames: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
    """Frames [n, h, w, c] -> [n, height, width, c] by nearest neighbour or bilinear interpolation (float32 for
    bilinear), with pixel centres aligned as image libraries do."""
    h, w = frames.shape[1:3]
    ys = (np.arange(height, dtype=np.float32) + 0.5) * (h / height) - 0.5
    xs = (np.arange(width, dtype=np.float32) + 0.5) * (w / width) - 0.5
    if method != "bilinear":
        rows = np.clip(np.round(ys), 0, h - 1).astype(np.intp)
        cols = np.clip(np.round(xs), 0, w - 1).astype(np.intp)
        return frames[:, rows][:, :, cols]
    ys, xs = np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)
    y0, x0 = np.floor(ys).astype(np.intp), np.floor(xs).astype(np.intp)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[None, :, None, None]
    wx = (xs - x0)[None, None, :, None]
    f = frames.astype(np.float32, copy=False)
    top = f[:, y0][:, :, x0] * (1 - wx) + f[:, y0][:, :, x1] * wx
    bottom = f[:, y1][:, :, x0] * (1 - wx) + f[:, y1][:, :, x1] * wx
    resized: np.ndarray = (top * (1 - wy) + bottom * wy).astype(np.float32)
    return resized


@dataclass(frozen=True)
class VectorInput(InputStep):
    """Rows of F features (in ``names`` order when given) -> optionally standardized model input [n, F]."""

    kind: ClassVar[str] = "vector"
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "features", "names", "mean", "std", "dtype"})
    features: int
    names: tuple[str, ...] = ()
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    dtype_name: str = "float32"

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> VectorInput:
        try:
            features = int(spec["features"])
            names = tuple(str(n) for n in spec.get("names", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise _invalid(cls.kind, f"needs features: {exc}") from exc
        if not 0 < features <= MAX_DIM * 16:
            raise _invalid(cls.kind, f"features {features} is out of range")
        if names and len(names) != features:
            raise _invalid(cls.kind, f"{len(names)} names for {features} features")
        mean, std = _stats(cls.kind, spec, features)
        return cls(features, names, mean, std, _dtype(cls.kind, spec))

    @property
    def dtype(self) -> type[np.generic]:
        return DTYPES[self.dtype_name]

    @property
    def model_shape(self) -> tuple[int, ...]:
        return (1, self.features)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return shape == (self.features,)

    def apply(self, readings: np.ndarray) -> np.ndarray:
        x = np.asarray(readings, dtype=np.float32)
        if self.mean is not None and self.std is not None:
            x = (x - self.mean) / self.std
        return np.ascontiguousarray(x, dtype=self.dtype)


@dataclass(frozen=True)
class TensorInput(InputStep):
    """The model input as it is, without its batch axis: no transformation but the element type."""

    kind: ClassVar[str] = "tensor"
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "shape", "dtype"})
    shape: tuple[int, ...]
    dtype_name: str = "float32"

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> TensorInput:
        try:
            shape = tuple(int(d) for d in spec["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise _invalid(cls.kind, f"needs shape: {exc}") from exc
        if not shape or len(shape) > 8 or any(not 0 < d <= MAX_DIM for d in shape):
            raise _invalid(cls.kind, f"shape {list(shape)} is out of range")
        return cls(shape, _dtype(cls.kind, spec))

    @property
    def dtype(self) -> type[np.generic]:
        return DTYPES[self.dtype_name]

    @property
    def model_shape(self) -> tuple[int, ...]:
        return (1, *self.shape)

    def accepts(self, shape: tuple[int, ...]) -> bool:
        return shape == self.shape

    def apply(self, readings: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(readings, dtype=self.dtype)


INPUT_STEPS: dict[str, type[InputStep]] = {
    "sliding_window": SeriesInput, "series": SeriesInput, "image": ImageInput, "vector": VectorInput,
    "tensor": TensorInput,
}


def input_step(spec: dict[str, Any]) -> InputStep:
    """The input step a manifest's ``preprocess`` describes; BundleError naming what is wrong."""
    if not isinstance(spec, dict) or not spec:
        raise BundleError("the bundle has no input pipeline (preprocess): pack it with one", reason="malformed")
    check_version(spec, "preprocessing spec")
    kind = spec.get("kind")
    step = INPUT_STEPS.get(str(kind))
    if step is None:
        raise BundleError(f"unknown preprocessing kind {kind!r} (known: {', '.join(sorted(INPUT_STEPS))})",
                          reason="malformed")
    return step.from_manifest(spec)

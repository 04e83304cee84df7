"""The bundle manifest and its canonical bytes, which are what gets signed.

Golden samples (inputs and the outputs the model gave for them at pack time, with a tolerance) ride
inline in the manifest, so they are covered by the signature and never extracted as a file. Optional
fields added after the first format (``golden``, ``encryption``, ``postprocess``, ``runtime``) are left out of the
canonical bytes while unset, so bundles signed before they existed keep verifying.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edgefleet.bundle.runtimes import DEFAULT_RUNTIME
from edgefleet.errors import BundleError, ModelError

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_FORMAT = 1
MAX_GOLDEN_SAMPLES = 16
MAX_GOLDEN_VALUES = 16384  # per tensor: golden samples are small probes, not a test set
_UNSET_WHEN_NONE = ("golden", "encryption", "postprocess", "runtime")
_DTYPES: dict[str, type[np.generic]] = {
    "float": np.float32, "double": np.float64, "float16": np.float16, "int64": np.int64, "int32": np.int32,
    "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class TensorSpec(BaseModel):
    """Name, element type and shape of one model input or output (None for a free axis)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    dtype: str
    shape: list[int | None]


class MemberDigest(BaseModel):
    """Size and SHA-256 of one bundle member."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    size: int = Field(ge=0)
    sha256: str

    @field_validator("sha256")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not SHA256_HEX.match(value):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return value


class GoldenSample(BaseModel):
    """One input tensor (with its batch axis) and the scores the model gave for it (its output as the output spec
    reads it), flattened."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    input: list[float] = Field(max_length=MAX_GOLDEN_VALUES)
    input_shape: list[int]
    output: list[float] = Field(max_length=MAX_GOLDEN_VALUES)
    output_shape: list[int]

    @model_validator(mode="after")
    def _shapes(self) -> GoldenSample:
        for values, shape in ((self.input, self.input_shape), (self.output, self.output_shape)):
            if len(shape) > 8 or any(d < 0 for d in shape) or math.prod(shape) != len(values):
                raise ValueError(f"shape {shape} does not hold {len(values)} values")
        return self


class GoldenSet(BaseModel):
    """The device's health check: every sample's output must match within ``atol + rtol * |expected|``."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    samples: list[GoldenSample] = Field(min_length=1, max_length=MAX_GOLDEN_SAMPLES)
    atol: float = Field(default=1e-3, ge=0)
    rtol: float = Field(default=1e-3, ge=0)


class Encryption(BaseModel):
    """How the model member is encrypted; the member's own digest covers the ciphertext."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Literal["AES-256-GCM"] = "AES-256-GCM"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="which model key: SHA-256 of it, 16 hex digits")
    plaintext_size: int = Field(ge=0)
    plaintext_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Manifest(BaseModel):
    """Everything a device needs to decide whether to trust and how to run a model."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    format: int = MANIFEST_FORMAT
    name: str
    version: str
    release: int = Field(ge=1, description="monotonic release counter; devices refuse a lower one")
    created: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    expires: str | None = None
    members: dict[str, MemberDigest]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    labels: list[str] = Field(default_factory=list)
    preprocess: dict[str, Any] = Field(default_factory=dict, description="the input pipeline (runtime.inputs)")
    postprocess: dict[str, Any] | None = Field(default=None, description="the output interpretation "
                                               "(runtime.outputs); None: the first output's class scores")
    thresholds: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list)
    hardware: list[str] = Field(default_factory=list, description="compatible hardware ids; empty = any")
    min_agent_version: str = "0.1.0"
    golden: GoldenSet | None = None
    encryption: Encryption | None = None
    runtime: str | None = Field(default=None, pattern=r"^[a-z0-9][a-z0-9._-]{0,31}$",
                                description="the runtime the model needs (None: onnxruntime); a device without it "
                                "refuses the bundle")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-', at most 64")
        return value

    @field_validator("created", "expires")
    @classmethod
    def _iso_time(cls, value: str | None) -> str | None:
        if value is not None:
            datetime.fromisoformat(value)  # ValueError -> a validation error naming the field
        return value

    @field_validator("version", "min_agent_version")
    @classmethod
    def _semver(cls, value: str) -> str:
        if not SEMVER.match(value):
            raise ValueError(f"{value!r} is not a semantic version such as 1.2.3")
        return value

    @property
    def ref(self) -> str:
        """``name@version``, the way operators name a model."""
        return f"{self.name}@{self.version}"

    @property
    def needs_runtime(self) -> str:
        """The runtime the model runs on (``onnxruntime`` when the manifest names none)."""
        return self.runtime or DEFAULT_RUNTIME

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no spaces, UTF-8; unset optional fields left out."""
        data = self.model_dump(mode="json")
        for key in _UNSET_WHEN_NONE:
            if data[key] is None:
                del data[key]
        try:
            return canonical_json(data)
        except ValueError as exc:  # a NaN or infinity inside a free-form dict such as ``preprocess``
            raise BundleError(f"manifest cannot be made canonical: {exc}") from exc

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes, raising BundleError with one line on anything malformed."""
        try:
            manifest = cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise BundleError(f"manifest is invalid: {where}: {first['msg']}") from exc
        manifest.canonical_bytes()
        return manifest


def numpy_dtype(onnx_type: str) -> type[np.generic]:
    """The numpy type for a TensorSpec dtype such as ``float`` or ``int64`` (float32 when unknown)."""
    return _DTYPES.get(onnx_type, np.float32)


def golden_samples(manifest: Manifest) -> list[tuple[np.ndarray, np.ndarray]]:
    """The manifest's golden (input, expected scores) pairs, the inputs typed like the model's first input."""
    if manifest.golden is None:
        return []
    in_type = numpy_dtype(manifest.inputs[0].dtype if manifest.inputs else "float")
    return [(np.asarray(s.input, dtype=in_type).reshape(s.input_shape),
             np.asarray(s.output, dtype=np.float32).reshape(s.output_shape)) for s in manifest.golden.samples]


def check_golden(manifest: Manifest, run: Callable[[np.ndarray], np.ndarray]) -> None:
    """Run every golden input through ``run``; raise ModelError at the first output out of tolerance."""
    if manifest.golden is None:
        return
    atol, rtol = manifest.golden.atol, manifest.golden.rtol
    for index, (sample, expected) in enumerate(golden_samples(manifest)):
        actual = np.asarray(run(sample))
        if actual.shape != expected.shape:
            raise ModelError(f"golden sample {index}: output shape {actual.shape}, expected {expected.shape}")
        want, got = expected.astype(np.float64), actual.astype(np.float64)
        if not np.all(np.isfinite(got)) or not np.allclose(got, want, atol=atol, rtol=rtol):
            worst = float(np.max(np.abs(got - want))) if np.all(np.isfinite(got)) else math.inf
            raise ModelError(f"golden sample {index}: output differs by {worst:.3g} "
                             f"(tolerance {atol:g} + {rtol:g} x expected)")


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no insignificant white space; floats must be finite."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

"""The bundle manifest and its canonical bytes, which are what gets signed."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgefleet.errors import BundleError

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MANIFEST_FORMAT = 1


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


class Manifest(BaseModel):
    """Everything a device needs to decide whether to trust and how to run a model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

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
    preprocess: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict)
    profiles: list[str] = Field(default_factory=list)
    hardware: list[str] = Field(default_factory=list, description="compatible hardware ids; empty = any")
    min_agent_version: str = "0.1.0"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME.match(value):
            raise ValueError("name must be lowercase letters, digits, '.', '_' or '-', at most 64")
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

    def canonical_bytes(self) -> bytes:
        """The exact bytes that are signed: sorted keys, no spaces, UTF-8."""
        return canonical_json(self.model_dump(mode="json"))

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes, raising BundleError with one line on anything malformed."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "manifest"
            raise BundleError(f"manifest is invalid: {where}: {first['msg']}") from exc


def canonical_json(value: Any) -> bytes:
    """JSON with sorted keys and no insignificant white space; floats must be finite."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()

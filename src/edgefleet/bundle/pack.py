"""Pack a model into a signed bundle (build plane) and read a bundle's manifest without trusting it."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from edgefleet.bundle.container import MANIFEST, MODEL, SIGNATURES, read_container, write_container
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.manifest import Manifest, MemberDigest, TensorSpec
from edgefleet.errors import BundleError, ConfigError, ModelError
from edgefleet.storage import atomic_write


@dataclass(frozen=True)
class BundleSpec:
    """What the packer needs besides the model bytes and the key."""

    name: str
    version: str
    release: int = 1
    labels: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    hardware: list[str] = field(default_factory=list)
    expires: str | None = None


def pack_bundle(model: bytes, key: SigningKey, spec: BundleSpec) -> bytes:
    """Describe, sign and serialize ``model`` as one bundle file's bytes."""
    inputs, outputs = model_schema(model)
    try:
        manifest = Manifest(
            name=spec.name, version=spec.version, release=spec.release, expires=spec.expires,
            members={MODEL: MemberDigest(size=len(model), sha256=hashlib.sha256(model).hexdigest())},
            inputs=inputs, outputs=outputs, labels=spec.labels, preprocess=spec.preprocess,
            thresholds=spec.thresholds, metrics=spec.metrics, profiles=spec.profiles, hardware=spec.hardware,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"bundle {first['loc'][0]} is invalid: {first['msg']}") from exc
    manifest_bytes = manifest.canonical_bytes()
    signatures = {"signatures": [{"keyid": key.public.key_id,
                                  "sig": base64.b64encode(key.sign(manifest_bytes)).decode()}]}
    return write_container({MANIFEST: manifest_bytes, SIGNATURES: json.dumps(signatures).encode(), MODEL: model})


def write_bundle(path: Path, data: bytes) -> None:
    """Write bundle bytes crash-safely (temporary file, fsync, rename)."""
    atomic_write(path, data)


def peek_manifest(data: bytes) -> Manifest:
    """Parse a bundle's manifest WITHOUT checking its signature: for display and routing only."""
    return Manifest.from_bytes(read_container(data)[MANIFEST])


def model_schema(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output tensor specs of an ONNX model, checked with ``onnx.checker``."""
    import onnx
    from onnx import TensorProto

    try:
        proto = onnx.load_model_from_string(model)
        onnx.checker.check_model(proto)
    except Exception as exc:  # onnx raises DecodeError, ValidationError, ... : all mean "not a model"
        raise ModelError(f"not a valid ONNX model: {str(exc).splitlines()[0][:200]}") from exc
    initializers = {init.name for init in proto.graph.initializer}

    def spec(value: Any) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        return TensorSpec(name=value.name, dtype=TensorProto.DataType.Name(tensor.elem_type).lower(), shape=dims)

    inputs = [spec(v) for v in proto.graph.input if v.name not in initializers]
    if not inputs:
        raise BundleError("model has no inputs", reason="malformed")
    return inputs, [spec(v) for v in proto.graph.output]

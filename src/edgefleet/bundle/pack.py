"""Pack a model into a signed bundle (build plane) and read a bundle's manifest without trusting it.

The packer refuses what a device would refuse (external data, pickles, models that fail
``onnx.checker``), computes the golden samples' expected outputs itself by running the model on the runtime the
bundle names (ONNX Runtime by default), and optionally encrypts the model member (AES-256-GCM, see
``bundle.encrypt``). A bundle for LiteRT carries a ``.tflite`` model (``model.tflite``, never encrypted).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from edgefleet.bundle.container import (
    MANIFEST,
    MODEL,
    MODEL_ENC,
    MODEL_TFLITE,
    SIGNATURES,
    read_container,
    write_container,
)
from edgefleet.bundle.encrypt import ModelKey, encrypt_model, release_aad
from edgefleet.bundle.manifest import (
    MAX_GOLDEN_SAMPLES,
    Encryption,
    GoldenSample,
    GoldenSet,
    Manifest,
    MemberDigest,
    TensorSpec,
    numpy_dtype,
)
from edgefleet.bundle.runtimes import MODEL_FORMATS
from edgefleet.bundle.safe_onnx import check_onnx
from edgefleet.bundle.safe_tflite import check_tflite
from edgefleet.bundle.signing import SigningKey
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
    """The input pipeline (runtime.inputs); empty: inferred from the model's input shape (bundle.describe)."""
    postprocess: dict[str, Any] | None = None
    """The output interpretation (runtime.outputs); None: inferred from the model's outputs."""
    thresholds: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    profiles: list[str] = field(default_factory=list)
    hardware: list[str] = field(default_factory=list)
    expires: str | None = None
    golden: np.ndarray | Sequence[np.ndarray] | None = None
    """Golden inputs: one array per sample, or one array whose first axis lists the samples."""
    golden_atol: float = 1e-3
    golden_rtol: float = 1e-3
    min_agent_version: str = "0.1.0"
    created: str | None = None
    """Creation time (ISO 8601); now when None."""
    encrypt_key: ModelKey | None = None
    runtime: str | None = None
    """The runtime the device must run the model on (None: ONNX Runtime); ``litert`` takes a ``.tflite`` model."""


def pack_bundle(model: bytes, key: SigningKey, spec: BundleSpec) -> bytes:
    """Describe, sign and serialize ``model`` as one bundle file's bytes."""
    tflite = MODEL_FORMATS.get(spec.runtime or "") == "tflite"
    if spec.runtime is not None and spec.runtime not in MODEL_FORMATS:
        raise ConfigError(f"unknown runtime {spec.runtime!r} (known: {', '.join(MODEL_FORMATS)})")
    if tflite and spec.encrypt_key is not None:
        raise ConfigError("a LiteRT bundle cannot be encrypted (only ONNX model members are)")
    if tflite:
        check_tflite(model)
    else:
        check_onnx(model)
    inputs, outputs = tflite_schema(model) if tflite else model_schema(model)
    preprocess, postprocess = model_pipeline(model, inputs, outputs, spec)
    member, payload, encryption = (MODEL_TFLITE if tflite else MODEL), model, None
    if spec.encrypt_key is not None:
        member, payload = MODEL_ENC, encrypt_model(model, spec.encrypt_key,
                                                   release_aad(spec.name, spec.version, spec.release))
        encryption = {"key_id": spec.encrypt_key.key_id, "plaintext_size": len(model),
                      "plaintext_sha256": hashlib.sha256(model).hexdigest()}
    try:
        golden = None if spec.golden is None else golden_set(model, spec.golden, inputs[0], spec.golden_atol,
                                                              spec.golden_rtol, postprocess, spec.runtime)
        optional: dict[str, Any] = {"created": spec.created} if spec.created else {}
        manifest = Manifest(
            name=spec.name, version=spec.version, release=spec.release, expires=spec.expires,
            members={member: MemberDigest(size=len(payload), sha256=hashlib.sha256(payload).hexdigest())},
            inputs=inputs, outputs=outputs, labels=spec.labels, preprocess=preprocess, postprocess=postprocess,
            thresholds=spec.thresholds, metrics=spec.metrics, profiles=spec.profiles, hardware=spec.hardware,
            min_agent_version=spec.min_agent_version, golden=golden,
            encryption=None if encryption is None else Encryption.model_validate(encryption), runtime=spec.runtime,
            **optional,
        )
        manifest_bytes = manifest.canonical_bytes()
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"bundle {'.'.join(map(str, first['loc']))} is invalid: {first['msg']}") from exc
    except BundleError as exc:
        raise ConfigError(str(exc)) from exc
    signatures = {"signatures": [{"keyid": key.public.key_id,
                                  "sig": base64.b64encode(key.sign(manifest_bytes)).decode()}]}
    return write_container({MANIFEST: manifest_bytes, SIGNATURES: json.dumps(signatures).encode(), member: payload})


def model_pipeline(model: bytes, inputs: list[TensorSpec], outputs: list[TensorSpec],
                   spec: BundleSpec) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The bundle's input pipeline and output spec (given, or inferred from the model), checked against the model
    the way the agent will run them: a bundle the agent could not run is refused here with the reason."""
    from edgefleet.bundle.describe import default_postprocess, default_preprocess
    from edgefleet.runtime.spec import ModelPipeline

    try:
        preprocess = dict(spec.preprocess) if spec.preprocess else default_preprocess(inputs)
        postprocess = dict(spec.postprocess) if spec.postprocess else default_postprocess(model, outputs)
        ModelPipeline.from_manifest(preprocess, postprocess).check(inputs, outputs, spec.labels)
    except BundleError as exc:
        raise ConfigError(f"the agent could not run this bundle: {exc}") from exc
    return preprocess, postprocess


def golden_set(model: bytes, golden: np.ndarray | Sequence[np.ndarray], first_input: TensorSpec,
               atol: float = 1e-3, rtol: float = 1e-3, postprocess: dict[str, Any] | None = None,
               runtime: str | None = None) -> GoldenSet:
    """Run each golden input through ``model`` (on ``runtime`` where it is installed here, else ONNX Runtime for an
    ONNX model) and record its scores (as ``postprocess`` reads the outputs; the first output without one) as
    expected."""
    from edgefleet.runtime.outputs import output_step
    from edgefleet.runtime.runner import installed_runtimes, make_runner

    rank = len(first_input.shape)
    if isinstance(golden, np.ndarray) and golden.ndim == rank:
        arrays = [golden[i : i + 1] for i in range(len(golden))]
    else:
        arrays = [np.asarray(x) for x in golden]
    if not 1 <= len(arrays) <= MAX_GOLDEN_SAMPLES:
        raise ConfigError(f"give 1 to {MAX_GOLDEN_SAMPLES} golden samples, got {len(arrays)}")
    here = runtime if runtime in installed_runtimes() or MODEL_FORMATS.get(runtime or "") == "tflite" else None
    runner = make_runner(model, here)
    score = output_step(postprocess).scorer(runner)
    samples = []
    for index, array in enumerate(arrays):
        x = np.ascontiguousarray(array[None] if array.ndim == rank - 1 else array, dtype=numpy_dtype(first_input.dtype))
        try:
            y = score(x)
        except ModelError as exc:
            raise ConfigError(f"golden sample {index} of shape {x.shape} does not fit the model: {exc}") from exc
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise ConfigError(f"golden sample {index}: input or output is not finite")
        samples.append(GoldenSample(input=_compact(x), input_shape=list(x.shape),
                                    output=_compact(y), output_shape=list(y.shape)))
    return GoldenSet(samples=samples, atol=atol, rtol=rtol)


def _compact(array: np.ndarray) -> list[float]:
    """Values as JSON floats; float32 ones in their shortest exact form (``0.1``, not ``0.10000000149011612``)."""
    flat = array.ravel()
    if flat.dtype != np.float32:
        return [float(v) for v in flat.tolist()]
    short = [float(str(v)) for v in flat]
    exact = np.asarray(short, dtype=np.float32) == flat
    return [s if ok else float(v) for s, ok, v in zip(short, exact.tolist(), flat.tolist(), strict=True)]


def write_bundle(path: Path, data: bytes) -> None:
    """Write bundle bytes crash-safely (temporary file, fsync, rename)."""
    atomic_write(path, data)


def peek_manifest(data: bytes) -> Manifest:
    """Parse a bundle's manifest WITHOUT checking its signature: for display and routing only."""
    return Manifest.from_bytes(read_container(data)[MANIFEST])


def tflite_schema(model: bytes) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Input and output specs of a ``.tflite`` model as the LiteRT runner takes and gives them (floats where the
    model's own tensors are int8: the runner quantizes and dequantizes)."""
    from edgefleet.runtime.litert_runner import LiteRtRunner

    inputs, outputs = LiteRtRunner(model).tensor_details()

    def spec(detail: dict[str, Any]) -> TensorSpec:
        quantized = detail["quantization"][0] != 0.0
        kind = np.dtype(detail["dtype"])
        dtype = "float" if quantized or kind == np.float32 else str(kind)
        return TensorSpec(name=str(detail["name"]), dtype=dtype, shape=[int(d) for d in detail["shape"]])

    return [spec(d) for d in inputs], [spec(d) for d in outputs]


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
        if value.type.HasField("sequence_type"):  # an ONNX-ML ZipMap: a list of {class: probability}
            return TensorSpec(name=value.name, dtype="seq(map)", shape=[None])
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
        return TensorSpec(name=value.name, dtype=TensorProto.DataType.Name(tensor.elem_type).lower(), shape=dims)

    inputs = [spec(v) for v in proto.graph.input if v.name not in initializers]
    if not inputs:
        raise BundleError("model has no inputs", reason="malformed")
    return inputs, [spec(v) for v in proto.graph.output]

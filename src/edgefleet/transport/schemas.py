"""Message schemas on the MQTT topics (pydantic): the server validates what it receives with these.

They are the one definition of the wire messages. The agent, which must not load pydantic, encodes and decodes
with pydantic-free twins (``agent.stats.TelemetryReport``, ``messages.ModelTarget``, ``messages.DesiredUpdate``);
``tests/unit/test_wire_parity.py`` holds each twin to its schema field for field and checks that every encoding
of a telemetry batch (this module's JSON, the compact ``encode_telemetry``) decodes to the same message.

Import them from :mod:`edgefleet.transport.messages`, which loads this module (and pydantic) only when one of
them is used, and whose :func:`~edgefleet.transport.messages.parse` is the one decode entry.
"""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgefleet.core.telemetry import LatencyHistogram


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_bytes(self) -> bytes:
        """Compact JSON: fields with no value (None) are left out; the receiver reads them as absent."""
        return self.model_dump_json(exclude_none=True).encode()


class ModelRef(BaseModel):
    """A model version as the device sees it: where to fetch it and what it must hash to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    version: str
    release: int
    sha256: str
    size: int
    url: str = Field(description="artifact URL, relative to the server's base URL")
    delta_url: str | None = Field(default=None, description="weight-level delta from delta_base_sha256")
    delta_base_sha256: str | None = None
    delta_size: int | None = Field(default=None, ge=0)
    rollback_order: str | None = Field(default=None, description="base64 signed order allowing a lower release")
    wrapped_key: str | None = Field(default=None, max_length=200,
                                    description="an encrypted model's key, wrapped for this device (bundle.keywrap)")

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class DesiredState(_Message):
    """Server -> device (retained): which model to run, or None for no change requested."""

    device: str
    model: ModelRef | None = None
    shadow: ModelRef | None = Field(default=None, description="candidate to run beside the model, reporting only")
    statements: list[str] = Field(default_factory=list, description="base64 signed key rotations and revocations")
    issued_at: float = Field(default_factory=time.time)
    mqtt_url: str | None = Field(default=None, max_length=300,
                                 description="broker address the device dials from its next start")
    telemetry_interval_s: float | None = Field(
        default=None, gt=0, le=86_400, description="while a rollout involves the device: report at least this often "
        "(a quarter of the rollout's window); None: the device's own interval")


class DeviceFacts(BaseModel):
    """What a device is, as it measures itself at start (``edgefleet.agent.facts``): the server keeps the latest
    and joins it with the latency the device's telemetry measures per model (measured profiles)."""

    model_config = ConfigDict(extra="forbid")

    cpu: str | None = Field(default=None, max_length=128, description="CPU model name")
    machine: str | None = Field(default=None, max_length=32, description="architecture (x86_64, aarch64, ...)")
    cores: int | None = Field(default=None, ge=1, le=4096)
    memory_mb: int | None = Field(default=None, ge=0, description="physical memory")
    runtimes: dict[str, str] = Field(default_factory=dict, max_length=8,
                                     description="installed runtime packages and their versions")
    providers: list[str] = Field(default_factory=list, max_length=16,
                                 description="ONNX Runtime execution providers available")


class ReportedState(_Message):
    """Device -> server (retained): the model it runs and where its update stands."""

    device: str
    agent_version: str
    active: str | None = None
    active_sha256: str | None = None
    previous: str | None = None
    shadow: str | None = None
    running: str | None = Field(default=None, description="the model it runs (name@version); null: none runs")
    active_expired: bool = Field(default=False, description="the running model's signed expiry has passed; "
                                 "it keeps running until an update replaces it")
    update_state: str = "idle"
    last_error: str | None = None
    hardware: str | None = Field(default=None, max_length=64, description="its hardware id (from provisioning)")
    profile: str | None = Field(default=None, max_length=64, description="its device profile (from provisioning)")
    runtimes: list[str] | None = Field(default=None, max_length=8, description="the runtimes it runs models on; a "
                                       "bundle for another is left out of rollouts to it")
    public_key: str | None = Field(default=None, max_length=64,
                                   description="the device's X25519 public key (base64): model keys are wrapped for it")
    facts: DeviceFacts | None = Field(default=None, description="CPU, cores, memory, runtimes and providers")
    ts: float = Field(default_factory=time.time)


class DriftStats(BaseModel):
    """Input drift against the bundle's training statistics (see ``edgefleet.core.drift``)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=0, description="scaled samples the statistics cover")
    mean_z: list[float] = Field(default_factory=list, description="per channel: mean shift in training stds")
    std_ratio: list[float] = Field(default_factory=list, description="per channel: std against training")
    score: float = Field(default=0.0, description="max over channels of |mean_z| and |ln std_ratio|")
    psi: float | None = Field(default=None, description="population stability index, with a reference histogram")


class HardExample(BaseModel):
    """One low-confidence model input kept for labelling, base64: float16 little-endian (``f16``), or int8 times
    ``scale`` (``i8``), either maybe zlib-compressed (``+zlib``)."""

    model_config = ConfigDict(extra="forbid")

    predicted: str
    confidence: float
    shape: list[int]
    encoding: Literal["f16", "f16+zlib", "i8", "i8+zlib"] = "f16"
    data: str
    scale: float | None = Field(default=None, description="int8 encodings: value = int8 * scale")
    ts: float = 0.0


class TelemetryBatch(_Message):
    """Device -> server (QoS 1): inference statistics since the previous batch."""

    device: str
    seq: int = Field(ge=0)
    ts: float
    model: str | None = None
    windows: int = Field(ge=0)
    labelled: int = Field(ge=0, default=0)
    correct: int = Field(ge=0, default=0)
    classes: dict[str, int] = Field(default_factory=dict)
    latency_ms: dict[str, int] = Field(default_factory=dict, description="LatencyHistogram buckets")
    confidence: list[int] = Field(default_factory=list, description="CONFIDENCE_BINS counts")
    skipped: int = Field(ge=0, default=0, description="sensor samples dropped as malformed")
    errors: int = Field(ge=0, default=0, description="inference calls that failed")
    shadow_model: str | None = Field(default=None, description="candidate running beside the active model")
    shadow_windows: int = Field(ge=0, default=0)
    shadow_agree: int = Field(ge=0, default=0, description="windows where the shadow predicted the same class")
    shadow_errors: int = Field(ge=0, default=0)
    shadow_latency_ms: dict[str, int] = Field(default_factory=dict)
    shadow_labelled: int = Field(ge=0, default=0, description="shadow windows that came with a label")
    shadow_correct: int = Field(ge=0, default=0, description="labelled shadow windows the shadow got right")
    shadow_active_latency_ms: dict[str, int] = Field(
        default_factory=dict, description="the active model timed beside the shadow on the same inputs")
    outbox_dropped: int = Field(ge=0, default=0, description="queued messages dropped on overflow, since start")
    imputed: int = Field(ge=0, default=0, description="missing sensor values filled in by the preprocessing")
    incomplete: int = Field(ge=0, default=0, description="windows dropped for too many missing values")
    uncertain: int = Field(ge=0, default=0, description="windows under the manifest's min_confidence")
    alerts: dict[str, int] = Field(default_factory=dict, description="alert windows per reason (class or anomaly)")
    drift: DriftStats | None = Field(default=None, description="input drift against the training statistics")
    hard_examples: list[HardExample] = Field(default_factory=list, description="sampled low-confidence inputs")
    hard_left_out: int = Field(ge=0, default=0, description="hard inputs sampled but not sent (count/byte budget)")
    escalations: dict[str, int] = Field(default_factory=dict,
                                        description="tiered inference: sent, answered, late, failed, queued, ...")
    trigger_skipped: int = Field(ge=0, default=0, description="windows the bundle's trigger kept from the model "
                                 "(under its threshold: the model did not run)")

    @field_validator("latency_ms", "shadow_latency_ms", "shadow_active_latency_ms", mode="before")
    @classmethod
    def _sparse_histogram(cls, value: object) -> object:
        """A dense wire histogram ``[scale, first, counts...]`` read as the sparse map everything else keeps."""
        if isinstance(value, list):
            return LatencyHistogram.from_wire(value).to_json()
        return value


class Event(_Message):
    """Device -> server (QoS 1): an update step, a refusal or an alert."""

    device: str
    seq: int = Field(ge=0)
    ts: float = Field(default_factory=time.time)
    kind: Literal["update", "alert", "agent"]
    name: str
    detail: dict[str, str | int | float | None] = Field(default_factory=dict)


# -- the generated wire table (edgefleet.transport.wire_table) -------------------------------------------------
CHANNEL_MESSAGES: dict[str, tuple[type[BaseModel], ...]] = {
    "telemetry": (TelemetryBatch, HardExample, DriftStats),
    "events": (Event,),
    "reported": (ReportedState, DeviceFacts),
}
"""The schemas of what a device sends on each channel: their field names make the channel's compact dictionary."""


def channel_dictionary(models: tuple[type[BaseModel], ...]) -> bytes:
    """The deflate dictionary of a channel: each field's JSON key, with its literal values and its scalar default
    (``"update_state":"idle"``), in declaration order; DEFLATE finds the later entries cheapest."""
    import json
    import typing

    parts: list[str] = []
    for model in models:
        for name, info in model.model_fields.items():
            key = f'"{name}":'
            if typing.get_origin(info.annotation) is Literal:
                parts.extend(key + json.dumps(value) for value in typing.get_args(info.annotation))
            elif not info.is_required() and isinstance(info.default, str | bool | int) and info.default is not None:
                parts.append(key + json.dumps(info.default))
            else:
                parts.append(key)
    return ",".join(parts).encode()


def wire_fields(model: type[BaseModel]) -> dict[str, bool]:
    """A schema's fields and whether each is required."""
    return {name: info.is_required() for name, info in model.model_fields.items()}


def wire_table_source(existing: dict[int, dict[str, bytes]]) -> str:
    """The text of ``wire_table.py``: the released dictionaries (``existing``) and, when the schemas' current
    dictionaries differ from the latest, a new version after them; the field table of every message."""
    from edgefleet.transport.compact import CHANGES_KEY

    current = {channel: channel_dictionary(models) for channel, models in CHANNEL_MESSAGES.items()}
    current["reported"] += f',"{CHANGES_KEY}":1'.encode()  # a report of changes (compact.ReportChanges)
    versions = dict(existing)
    if not versions or versions[max(versions)] != current:
        versions[max(versions, default=0) + 1] = current
    lines = ['"""The wire table, generated from :mod:`edgefleet.transport.schemas` by '
             '``python -m edgefleet.transport.schemas``:', 'do not edit. Released dictionary versions are never '
             'changed (devices in the field compress with them).', '"""', "",
             "from __future__ import annotations", "",
             f"DICTIONARY_VERSION = {max(versions)}",
             '"""The version this release packs with (:mod:`edgefleet.transport.compact`)."""', "",
             "DICTIONARIES: dict[int, dict[str, bytes]] = {"]
    for version, channels in sorted(versions.items()):
        lines.append(f"    {version}: {{")
        for channel, data in channels.items():
            lines.append(f'        "{channel}": (')
            lines.extend(f"            {data[i:i + 96]!r}" for i in range(0, len(data), 96))
            lines.append("        ),")
        lines.append("    },")
    lines += ["}", "", "FIELDS: dict[str, dict[str, bool]] = {"]
    tabled: tuple[type[BaseModel], ...] = (*CHANNEL_MESSAGES["telemetry"], Event, *CHANNEL_MESSAGES["reported"],
                                           DesiredState, ModelRef)
    for model in tabled:
        lines.append(f'    "{model.__name__}": {{')
        row = "       "
        for name, required in wire_fields(model).items():
            entry = f' "{name}": {required},'
            if len(row) + len(entry) > 112:
                lines.append(row)
                row = "       "
            row += entry
        lines += [row, "    },"]
    lines += ["}", '"""Every message\'s fields and whether each is required: the agent\'s light twins are held to '
              'it."""', ""]
    return "\n".join(lines)


if __name__ == "__main__":  # regenerate wire_table.py from the schemas
    from pathlib import Path

    from edgefleet.transport import wire_table

    target = Path(wire_table.__file__)
    target.write_text(wire_table_source(wire_table.DICTIONARIES))
    print(f"wrote {target}")

"""Messages on the MQTT topics: one decode entry, :func:`parse`, and the agent's light encoders.

The schemas themselves (``TelemetryBatch``, ``DesiredState``, ``ReportedState``, ``Event``, ``ModelRef``, ...)
are pydantic models in :mod:`edgefleet.transport.schemas`; importing them from here loads that module (and
pydantic) on first use, so a process that never touches them (the edge agent) never pays pydantic's memory.

The agent side stays light: it encodes its messages from plain mappings (:func:`encode`,
:func:`encode_telemetry`) and decodes what the server sends into the small frozen dataclasses
:class:`DesiredUpdate` and :class:`ModelTarget` (the same fields as ``DesiredState`` and ``ModelRef``), still
through :func:`parse`: ``parse(DesiredUpdate, payload)`` checks the same schema without pydantic. The fields they
accept and require, and the telemetry fields always sent, come from :mod:`edgefleet.transport.wire_table`, which
``python -m edgefleet.transport.schemas`` generates from the schemas (so does the compact form's dictionary:
:mod:`edgefleet.transport.compact`).

Telemetry on the wire is compact JSON (:func:`encode_telemetry`): counters that are zero and mappings and lists
that are empty are left out, since every reader treats them as zero (``TelemetryBatch``'s defaults, the
store's ``merge_payloads`` and ``CohortStats.add_batch``). Two exceptions keep their meaning: with a shadow
model the shadow counters are always sent (a missing ``shadow_agree`` reads as "not reported" to the rollout
gates, not as zero), and ``escalations`` is always sent (an absent one reads as "this agent does not
escalate", which makes the escalation gate unavailable rather than zero).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from edgefleet.errors import TransportError
from edgefleet.transport.wire_table import FIELDS

if TYPE_CHECKING:
    from edgefleet.transport.schemas import (
        DesiredState,
        DriftStats,
        Event,
        HardExample,
        ModelRef,
        ReportedState,
        TelemetryBatch,
    )

__all__ = ["MAX_MESSAGE_BYTES", "DesiredState", "DesiredUpdate", "DriftStats", "Event", "HardExample", "ModelRef",
           "ModelTarget", "ReportedState", "TelemetryBatch", "encode", "encode_telemetry", "event_detail", "parse"]

MAX_MESSAGE_BYTES = 256 * 1024
_SCHEMAS = frozenset({"DesiredState", "DriftStats", "Event", "HardExample", "ModelRef", "ReportedState",
                      "TelemetryBatch"})
T = TypeVar("T")

# Telemetry fields always sent: those the schema requires (from the wire table), and two whose absence means
# something else than zero (see the module docstring).
_TELEMETRY_KEPT = frozenset({name for name, required in FIELDS["TelemetryBatch"].items() if required}
                            | {"model", "escalations"})
_SHADOW_FIELDS = frozenset({"shadow_windows", "shadow_agree", "shadow_errors"})


def __getattr__(name: str) -> Any:
    """The pydantic schemas, loaded on first use (PEP 562)."""
    if name in _SCHEMAS:
        from edgefleet.transport import schemas

        return getattr(schemas, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Light(Protocol):
    @classmethod
    def from_wire(cls, data: Any) -> Any: ...


_LIGHT: dict[type, bool] = {}


def _is_light(model: type) -> bool:
    """Whether ``model`` decodes itself (``from_wire``); cached, since asking a pydantic class costs an
    AttributeError raised by its metaclass (7 us, on the server's ingest path for every message)."""
    light = _LIGHT.get(model)
    if light is None:
        light = _LIGHT[model] = hasattr(model, "from_wire")
    return light


def parse(model: type[T], payload: bytes) -> T:
    """Validate a payload as ``model`` (a schema, or a light agent-side class), raising TransportError with one
    line for anything malformed."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise TransportError(f"message of {len(payload)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    name = getattr(model, "__name__", "message")
    if _is_light(model):
        try:
            return cast(T, cast(_Light, model).from_wire(json.loads(payload)))
        except RecursionError as exc:
            raise TransportError(f"malformed {name}: nested too deeply") from exc
        except (ValueError, TypeError, KeyError) as exc:
            raise TransportError(f"malformed {name}: {exc}") from exc
    from pydantic import ValidationError

    try:
        return cast(T, cast(Any, model).model_validate_json(payload))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or name
        raise TransportError(f"malformed {name}: {where}: {first['msg']}") from exc


# -- encoding -------------------------------------------------------------------------------------------------
def _dumps(data: Any) -> bytes:
    try:
        return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity: null on the wire, as pydantic writes them
        return json.dumps(_finite(data), separators=(",", ":"), allow_nan=False).encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def event_detail(detail: Mapping[str, Any]) -> dict[str, str | int | float | None]:
    """An event's detail as its schema takes it: numbers, strings or null (a flag as 0/1, anything else as text)."""
    out: dict[str, str | int | float | None] = {}
    for key, value in detail.items():
        if isinstance(value, bool):
            out[str(key)] = int(value)
        elif value is None or isinstance(value, str | int | float):
            out[str(key)] = value
        else:
            out[str(key)] = str(value)
    return out


def encode(fields: Mapping[str, Any]) -> bytes:
    """Compact JSON of a message; fields whose value is None are left out (the receiver reads them as absent)."""
    return _dumps({k: v for k, v in fields.items() if v is not None})


def encode_telemetry(fields: Mapping[str, Any]) -> bytes:
    """Compact JSON of a telemetry batch: zero counters and empty collections left out (see the module
    docstring for the fields always sent)."""
    shadow = bool(fields.get("shadow_model"))
    kept: dict[str, Any] = {}
    for key, value in fields.items():
        if key in _TELEMETRY_KEPT or (shadow and key in _SHADOW_FIELDS):
            if value is not None or key == "model":
                kept[key] = value
            continue
        empty = value is None or value == 0 or (isinstance(value, list | dict) and not value)
        if not empty and (shadow or not key.startswith("shadow_")):
            kept[key] = value
    return _dumps(kept)


# -- light agent-side decoding ----------------------------------------------------------------------------------
def _obj(data: Any, what: str, schema: str) -> dict[str, Any]:
    """``data`` as the object of the message ``schema``: its fields and required ones from the wire table (the
    schemas' own, generated: edgefleet.transport.wire_table)."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} must be an object")
    fields = FIELDS[schema]
    extra = set(data) - set(fields)
    if extra:
        raise ValueError(f"{what}: unexpected field {sorted(extra)[0]!r}")
    missing = [name for name, required in fields.items() if required and name not in data]
    if missing:
        raise KeyError(f"{missing[0]}: field required")
    return data


def _str(data: dict[str, Any], key: str, default: str | None = None, *, required: bool = True) -> str | None:
    value = data.get(key, default)
    if value is None:
        if required and key not in data:
            raise KeyError(f"{key}: field required")
        if required:
            raise TypeError(f"{key}: must be a string")
        return None
    if not isinstance(value, str):
        raise TypeError(f"{key}: must be a string")
    return value


def _int(data: dict[str, Any], key: str, *, required: bool = True, minimum: int | None = None) -> int | None:
    if key not in data or data[key] is None:
        if required:
            raise KeyError(f"{key}: field required")
        return None
    value = data[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{key}: must be an integer")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key}: must be >= {minimum}")
    return value


@dataclass(frozen=True)
class ModelTarget:
    """The fields of ``ModelRef``, without pydantic: the model version a device is told to run."""

    name: str
    version: str
    release: int
    sha256: str
    size: int
    url: str
    delta_url: str | None = None
    delta_base_sha256: str | None = None
    delta_size: int | None = None
    rollback_order: str | None = None
    wrapped_key: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def from_wire(cls, data: Any) -> ModelTarget:
        d = _obj(data, "model", "ModelRef")
        return cls(name=cast(str, _str(d, "name")), version=cast(str, _str(d, "version")),
                   release=cast(int, _int(d, "release")), sha256=cast(str, _str(d, "sha256")),
                   size=cast(int, _int(d, "size")), url=cast(str, _str(d, "url")),
                   delta_url=_str(d, "delta_url", required=False),
                   delta_base_sha256=_str(d, "delta_base_sha256", required=False),
                   delta_size=_int(d, "delta_size", required=False, minimum=0),
                   rollback_order=_str(d, "rollback_order", required=False),
                   wrapped_key=_str(d, "wrapped_key", required=False))

    def to_wire(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class DesiredUpdate:
    """The fields of ``DesiredState``, without pydantic: what the server wants a device to run."""

    device: str
    model: ModelTarget | None = None
    shadow: ModelTarget | None = None
    statements: list[str] = field(default_factory=list)
    issued_at: float = 0.0
    mqtt_url: str | None = None
    telemetry_interval_s: float | None = None

    @classmethod
    def from_wire(cls, data: Any) -> DesiredUpdate:
        d = _obj(data, "DesiredState", "DesiredState")
        statements = d.get("statements", [])
        if not isinstance(statements, list) or not all(isinstance(s, str) for s in statements):
            raise TypeError("statements: must be a list of strings")
        issued = d.get("issued_at", 0.0)
        if not isinstance(issued, int | float) or isinstance(issued, bool) or not math.isfinite(issued):
            raise TypeError("issued_at: must be a number")
        interval = d.get("telemetry_interval_s")
        if interval is not None and (not isinstance(interval, int | float) or isinstance(interval, bool)
                                     or not 0 < interval <= 86_400):
            raise TypeError("telemetry_interval_s: must be a number of seconds in (0, 86400]")
        model, shadow = d.get("model"), d.get("shadow")
        return cls(device=cast(str, _str(d, "device")),
                   model=None if model is None else ModelTarget.from_wire(model),
                   shadow=None if shadow is None else ModelTarget.from_wire(shadow),
                   statements=list(statements), issued_at=float(issued),
                   mqtt_url=_str(d, "mqtt_url", required=False),
                   telemetry_interval_s=None if interval is None else float(interval))

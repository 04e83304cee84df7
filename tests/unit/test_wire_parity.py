"""The wire messages have one definition, the schemas in ``transport/schemas.py``; the pydantic-free twins the
agent encodes and decodes with (it must not load pydantic) are held to it field for field, and every encoding of
a telemetry batch decodes to the same message:

* the schema's own (``to_bytes``: None left out; ``model_dump_json``: everything),
* the compact encoder (``encode_telemetry``: zero counters and empty collections left out), as the agent's
  ``TelemetryReport.to_bytes`` and the fleet simulator use it.

A field added to one side only (a counter in the agent's report that the server's schema would refuse, a field in
the desired state the agent's light decoder would refuse) fails here, not in the field.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from edgefleet.agent.stats import Example, TelemetryReport
from edgefleet.core.drift import DriftSnapshot
from edgefleet.errors import TransportError
from edgefleet.transport import messages
from edgefleet.transport.messages import (
    DesiredState,
    DesiredUpdate,
    DriftStats,
    HardExample,
    ModelRef,
    ModelTarget,
    TelemetryBatch,
    encode_telemetry,
    parse,
)
from edgefleet.transport.wire_table import FIELDS

REQUIRED = object()


def dataclass_fields(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


def model_fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: REQUIRED if info.is_required() else info.get_default(call_default_factory=True)
            for name, info in model.model_fields.items()}


@pytest.mark.parametrize(("light", "schema"), [
    (TelemetryReport, TelemetryBatch), (Example, HardExample), (DriftSnapshot, DriftStats),
    (ModelTarget, ModelRef), (DesiredUpdate, DesiredState)])
def test_light_twin_has_the_schemas_fields(light: type, schema: type[BaseModel]) -> None:
    """Same field names; where both give a default it is the same (an optional field is optional on both)."""
    mine, theirs = dataclass_fields(light), model_fields(schema)
    assert sorted(mine) == sorted(theirs), (set(mine) ^ set(theirs))
    for name, default in mine.items():
        if default is REQUIRED or theirs[name] is REQUIRED:
            continue
        if name in ("issued_at", "ts"):  # the schema stamps the time it is built; the twin reads it from the wire
            continue
        assert default == theirs[name], name


@pytest.mark.parametrize(("light", "schema"), [
    (TelemetryReport, "TelemetryBatch"), (Example, "HardExample"), (DriftSnapshot, "DriftStats"),
    (ModelTarget, "ModelRef"), (DesiredUpdate, "DesiredState")])
def test_light_twin_has_the_generated_tables_fields(light: type, schema: str) -> None:
    """The agent's twins are typed views of the table their decoders validate with (wire_table.FIELDS, generated
    from the schemas): same names."""
    assert set(dataclass_fields(light)) == set(FIELDS[schema])


def test_light_decoder_requires_what_the_table_requires() -> None:
    ref = {"name": "m", "version": "1.0.0", "release": 1, "sha256": "0" * 64, "size": 1, "url": "/a"}
    for name in [n for n, required in FIELDS["ModelRef"].items() if required]:
        with pytest.raises(TransportError, match=f"{name}: field required"):
            parse(DesiredUpdate, json.dumps({"device": "d", "model": {k: v for k, v in ref.items() if k != name}})
                  .encode())


def test_compact_encoder_always_sends_what_the_schema_requires() -> None:
    required = {name for name, default in model_fields(TelemetryBatch).items() if default is REQUIRED}
    assert required <= messages._TELEMETRY_KEPT
    assert set(TelemetryBatch.model_fields) >= messages._TELEMETRY_KEPT | messages._SHADOW_FIELDS


# -- every encoding of a telemetry batch decodes to the same message -------------------------------------------
names = st.text("abcxyz_", min_size=1, max_size=6)
counts = st.dictionaries(names, st.integers(0, 10**6), max_size=3)
counter = st.integers(0, 10**6)
two_places = st.integers(-10**4, 10**4).map(lambda v: v / 100)


@st.composite
def reports(draw: st.DrawFn) -> TelemetryReport:
    shadow = draw(st.one_of(st.none(), st.just("clf@2.0.0")))
    drift = draw(st.one_of(st.none(), st.builds(
        DriftSnapshot, n=counter, mean_z=st.lists(two_places, max_size=3), std_ratio=st.lists(two_places, max_size=3),
        score=st.integers(0, 10**5).map(lambda v: v / 1000),
        psi=st.one_of(st.none(), st.integers(0, 10**5).map(lambda v: v / 10**4)))))
    examples = draw(st.lists(st.builds(
        Example, predicted=names, confidence=st.floats(0, 1), shape=st.lists(st.integers(1, 9), min_size=1,
                                                                              max_size=2),
        encoding=st.sampled_from(["f16", "f16+zlib", "i8", "i8+zlib"]), data=st.text("AB=", max_size=8),
        scale=st.one_of(st.none(), st.floats(0.001, 10)), ts=st.integers(0, 10**6).map(float)), max_size=2))
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(TelemetryReport):
        if f.name.startswith("shadow_") and shadow is None:
            continue  # without a shadow model its counters mean nothing, and the compact form leaves them out
        if f.type in ("int", int):
            fields[f.name] = draw(counter)
        elif f.type in ("dict[str, int]",):
            fields[f.name] = draw(counts)
        elif f.type in ("list[int]",):
            fields[f.name] = draw(st.lists(counter, max_size=5))
    return TelemetryReport(**{**fields, "device": draw(names), "seq": draw(counter),
                              "ts": draw(st.integers(0, 2 * 10**12)) / 1000,
                              "model": draw(st.one_of(st.none(), st.just("clf@1.0.0"))), "shadow_model": shadow,
                              "drift": drift, "hard_examples": examples})


def expected(report: TelemetryReport) -> TelemetryBatch:
    """The message as the schema reads the report's fields, every one spelled out."""
    fields = {f.name: getattr(report, f.name) for f in dataclasses.fields(report)}
    fields["drift"] = None if report.drift is None else dataclasses.asdict(report.drift)
    fields["hard_examples"] = [dataclasses.asdict(e) for e in report.hard_examples]
    return TelemetryBatch.model_validate(fields)


@settings(max_examples=150, deadline=None)
@given(reports())
def test_every_encoding_decodes_to_the_same_batch(report: TelemetryReport) -> None:
    want = expected(report)
    compact = report.to_bytes()  # the agent's
    assert parse(TelemetryBatch, compact) == want
    assert parse(TelemetryBatch, want.to_bytes()) == want  # the schema's, None left out
    assert parse(TelemetryBatch, want.model_dump_json().encode()) == want  # the schema's, everything
    assert parse(TelemetryBatch, encode_telemetry(want.model_dump())) == want  # a plain mapping (the simulator)
    assert len(compact) <= len(want.model_dump_json())
    assert json.loads(compact)["device"] == report.device

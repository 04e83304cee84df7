"""The compact wire form (transport/compact.py): what a device packs, the server reads back as the same JSON; a
report of changes, merged by the ingest, gives the same stored state as the full report; old agents' plain JSON
reads as before; and the wire table is what the schemas generate (released dictionaries unchanged)."""

from __future__ import annotations

import json
import time
import zlib
from pathlib import Path

import pytest

from edgefleet.agent.stats import WindowStats
from edgefleet.errors import TransportError
from edgefleet.server.ingest import Ingest
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.transport import compact, schemas, topics, wire_table
from edgefleet.transport.messages import ReportedState, TelemetryBatch, parse
from edgefleet.transport.mqtt_url import parse_mqtt_url


def telemetry_json() -> bytes:
    stats = WindowStats(model="clf@1.0.0")
    for i in range(300):
        stats.record(("idle", "walk", "run")[i % 3], 0.5 + (i % 50) / 100, 0.1 + (i % 17) / 50, None)
    return stats.batch("dev-1", 7, 1.8e9, 0).to_bytes()


def full_report(**changes: object) -> dict[str, object]:
    report: dict[str, object] = {
        "device": "dev-1", "agent_version": "0.1.0", "active": "clf@1.0.0", "active_sha256": "ab" * 32,
        "running": "clf@1.0.0", "active_expired": False, "hardware": "generic", "update_state": "idle",
        "public_key": "vQLrx8C81f6bcs1IRFJC46zJ8WFST1ed4//bkkOUQTw=", "ts": 1.8e9}
    report.update(changes)
    return report


def test_packed_telemetry_is_shorter_and_reads_back_as_the_same_json() -> None:
    plain = telemetry_json()
    packed = compact.pack("telemetry", plain)
    assert packed[0] == wire_table.DICTIONARY_VERSION
    assert len(packed) < 0.7 * len(plain)
    assert compact.unpack("telemetry", packed) == plain
    assert parse(TelemetryBatch, compact.unpack("telemetry", packed)) == parse(TelemetryBatch, plain)


def test_every_released_dictionary_still_reads() -> None:
    """Agents in the field pack with the version they shipped with: the server reads every one."""
    plain = json.dumps(full_report(facts={"cpu": "Cortex-A72", "cores": 4})).encode()
    for version in wire_table.DICTIONARIES:
        packed = compact.pack("reported", plain, version=version)
        assert packed[0] == version and compact.unpack("reported", packed) == plain


def test_plain_json_passes_through_and_a_tiny_message_stays_plain() -> None:
    assert compact.unpack("events", b'{"device":"d"}') == b'{"device":"d"}'
    assert compact.pack("events", b"{}") == b"{}"


@pytest.mark.parametrize(("payload", "why"), [
    (bytes([0x1f]) + b"xx", "unknown version"),
    (bytes([1]) + b"\xff\xff\xff", "corrupt"),
    (bytes([1]) + zlib.compress(b"{", 9)[2:4], "truncated"),
])
def test_bad_compact_messages_are_refused_in_one_line(payload: bytes, why: str) -> None:
    with pytest.raises(TransportError, match=why):
        compact.unpack("telemetry", payload)


def test_a_small_message_that_would_inflate_beyond_the_limit_is_refused() -> None:
    bomb = compact.pack("telemetry", b"{" + b" " * (compact.MAX_UNPACKED_BYTES + 10) + b"}")
    assert len(bomb) < 2000
    with pytest.raises(TransportError, match="inflates beyond"):
        compact.unpack("telemetry", bomb)


def test_report_changes_sends_only_the_update_step_until_the_model_changes() -> None:
    changes = compact.ReportChanges()
    assert json.loads(changes.encode(full_report())) == full_report()
    step = json.loads(changes.encode(full_report(update_state="downloading", ts=1.8e9 + 1)))
    assert step == {"device": "dev-1", "ts": 1.8e9 + 1, "update_state": "downloading", "changes": 1}
    failed = json.loads(changes.encode(full_report(update_state="idle", last_error="no space")))
    assert failed == {"device": "dev-1", "ts": 1.8e9, "update_state": "idle", "last_error": "no space", "changes": 1}
    cleared = json.loads(changes.encode(full_report()))
    assert cleared["last_error"] is None and compact.is_changes(cleared)
    activated = json.loads(changes.encode(full_report(active="clf@1.0.1", running="clf@1.0.1")))
    assert not compact.is_changes(activated) and activated["active"] == "clf@1.0.1"


def test_ingest_merges_reports_of_changes_into_the_stored_state(tmp_path: Path) -> None:
    """A packed full report, then packed changes (a step, an error, its clearing): the store holds what the full
    reports would have given; changes for a device with no report yet are counted and dropped."""
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    for device in ("dev-1", "dev-2"):
        store.add_device(Device(id=device, token_sha256="0" * 64, mqtt_password_sha256="0" * 64, tags={},
                                created=time.time()))
    ingest = Ingest(store, parse_mqtt_url("mqtt://127.0.0.1:1"))
    changes = compact.ReportChanges()
    for report in (full_report(), full_report(update_state="verifying"), full_report(last_error="bad hash")):
        ingest.handle(topics.reported("dev-1"), compact.pack("reported", changes.encode(report)))
        row = store.get_device("dev-1")
        assert row is not None
        assert row.reported == ReportedState.model_validate(report).model_dump(mode="json")
    ingest.handle(topics.telemetry("dev-1"), compact.pack("telemetry", telemetry_json()))
    orphan = {"device": "dev-2", "ts": 1.0, "update_state": "verifying", "changes": 1}
    ingest.handle(topics.reported("dev-2"), compact.pack("reported", json.dumps(orphan).encode()))
    counts = ingest.snapshot()
    assert counts["reported"] == 3 and counts["telemetry"] == 1
    assert counts["reported_changes_without_base"] == 1


def test_ingest_reads_changes_against_the_stored_state_after_a_restart(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.add_device(Device(id="dev-1", token_sha256="0" * 64, mqtt_password_sha256="0" * 64, tags={},
                            created=time.time()))
    Ingest(store, parse_mqtt_url("mqtt://127.0.0.1:1")).handle(
        topics.reported("dev-1"), json.dumps(full_report()).encode())  # an agent sending plain JSON
    fresh = Ingest(store, parse_mqtt_url("mqtt://127.0.0.1:1"))
    step = {"device": "dev-1", "ts": 2.0, "update_state": "staged", "changes": 1}
    fresh.handle(topics.reported("dev-1"), compact.pack("reported", json.dumps(step).encode()))
    row = store.get_device("dev-1")
    assert row is not None and row.reported is not None
    assert row.reported["update_state"] == "staged" and row.reported["active"] == "clf@1.0.0"


def test_the_wire_table_is_what_the_schemas_generate() -> None:
    """Regenerating (``python -m edgefleet.transport.schemas``) changes nothing: the table matches the schemas, and
    a schema change that alters a dictionary must add a version (released ones are never rewritten)."""
    source = Path(wire_table.__file__).read_text()
    assert schemas.wire_table_source(wire_table.DICTIONARIES) == source
    for name, fields in wire_table.FIELDS.items():
        model = getattr(schemas, name)
        assert fields == schemas.wire_fields(model), name


def test_facts_are_sent_once_a_process_and_kept_by_the_server(tmp_path: Path) -> None:
    """The device's facts go with its first report only (then when they change); a later full report without them
    leaves the stored facts in place."""
    facts = {"cpu": "Cortex-A72", "cores": 4, "memory_mb": 3840}
    changes = compact.ReportChanges()
    first = json.loads(changes.encode(full_report(facts=facts)))
    assert first["facts"] == facts
    moved = json.loads(changes.encode(full_report(facts=facts, active="clf@1.0.1")))
    assert "facts" not in moved and not compact.is_changes(moved)
    grown = json.loads(changes.encode(full_report(facts={**facts, "cores": 8}, active="clf@1.0.1")))
    assert grown["facts"]["cores"] == 8 and compact.is_changes(grown)

    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.add_device(Device(id="dev-1", token_sha256="0" * 64, mqtt_password_sha256="0" * 64, tags={},
                            created=time.time()))
    ingest = Ingest(store, parse_mqtt_url("mqtt://127.0.0.1:1"))
    for payload in (first, moved):
        ingest.handle(topics.reported("dev-1"), compact.pack("reported", json.dumps(payload).encode()))
    restarted = Ingest(store, parse_mqtt_url("mqtt://127.0.0.1:1"))  # the cache gone: the store's copy is used
    restarted.handle(topics.reported("dev-1"), json.dumps(full_report(active="clf@1.0.2")).encode())
    row = store.get_device("dev-1")
    assert row is not None and row.reported is not None
    assert row.reported["active"] == "clf@1.0.2" and row.reported["facts"]["cpu"] == "Cortex-A72"

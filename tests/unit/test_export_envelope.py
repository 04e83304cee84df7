"""The Kafka export's message format and settings, without a broker: every envelope validates against its
topic's published JSON Schema, nonconforming rows are flagged (never dropped), bad settings are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.errors import ConfigError
from edgefleet.server.export.envelope import CURRENT_VERSION, TOPICS, envelope, headers, schema
from edgefleet.server.export.settings import KafkaSettings
from edgefleet.server.store.export import Queued

jsonschema_rs = pytest.importorskip("jsonschema_rs")

ROWS = {
    "telemetry": {"device": "d1", "seq": 4, "ts": 1.5, "model": "clf@1.0.0", "windows": 10, "classes": {"a": 10}},
    "events": {"device": "d1", "seq": 9, "ts": 2.0, "kind": "update", "name": "installed", "detail": {"x": 1}},
    "alerts": {"id": 3, "monitor": "m", "model": "clf", "expr": "accuracy < 0.9", "raised": 1.0, "cleared": None,
               "explanation": "accuracy 0.5", "values": {}, "paused": []},
    "decisions": {"rollout_id": "ro-1", "step_no": 0, "idx": 0, "kind": "assign", "at": 1.0, "wave": 0,
                  "reason": "wave 1", "actor": "server", "detail": {}},
    "hard_examples": {"id": 1, "name": "clf", "model": "clf@1.0.0", "device": "d1", "ts": 1.0, "predicted": "a",
                      "confidence": 0.4, "shape": [2, 3], "encoding": "f16", "data": "AAAA", "scale": None,
                      "received": 1.0},
}


def row(topic: str, data: str, version: int = 1) -> Queued:
    return Queued(id=17, topic=topic, key="d1", seq=4, msg_id="d1/4", version=version, data=data, created=10.0)


@pytest.mark.parametrize("topic", TOPICS)
def test_each_topic_has_a_current_schema_its_messages_validate_against(topic: str) -> None:
    published = schema(topic, CURRENT_VERSION[topic])
    assert published is not None
    value, conforms = envelope(row(topic, json.dumps(ROWS[topic])))
    message = json.loads(value)
    assert conforms and message["conforms"] is True and message["data"] == ROWS[topic]
    assert (message["schema"], message["version"], message["id"], message["export_seq"]) == \
        (f"edgefleet.{topic}", 1, "d1/4", 17)
    jsonschema_rs.validator_for(published).validate(message)
    missing = dict(ROWS[topic])
    missing.pop(next(iter(published["then"]["properties"]["data"]["required"])))
    bad = json.loads(envelope(row(topic, json.dumps(missing)))[0])
    assert bad["conforms"] is False and bad["data"] == missing, "exported as stored, flagged"
    jsonschema_rs.validator_for(published).validate(bad)
    assert not jsonschema_rs.validator_for(published).is_valid({**bad, "conforms": True})


def test_an_unknown_version_or_text_that_is_not_json_is_exported_as_stored() -> None:
    old = json.loads(envelope(row("telemetry", '{"device": "d1"}', version=0))[0])
    assert old["version"] == 0 and old["conforms"] is False and old["data"] == {"device": "d1"}
    broken = json.loads(envelope(row("events", 'not "json'))[0])
    assert broken["data"] is None and broken["raw"] == 'not "json' and broken["conforms"] is False
    assert dict(headers(row("events", "{}"))) == {"schema": b"edgefleet.events", "version": b"1", "id": b"d1/4"}


def test_schema_files_are_packaged_beside_the_module() -> None:
    folder = Path(__file__).resolve().parents[2] / "src/edgefleet/server/export/schemas"
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(f"{t}.v1.json" for t in TOPICS)
    assert schema("telemetry", 99) is None and schema("nope", 1) is None


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"bootstrap": "kafka"}, "is not HOST:PORT"),
    ({"bootstrap": "k:1,k:99999"}, "is not HOST:PORT"),
    ({"bootstrap": "k:9092", "security_protocol": "TLS"}, "--kafka-security must be one of"),
    ({"bootstrap": "k:9092", "security_protocol": "SASL_SSL"}, "needs --kafka-user and --kafka-password"),
    ({"bootstrap": "k:9092", "username": "u"}, "need --kafka-security SASL_SSL"),
    ({"bootstrap": "k:9092", "ca_file": Path("/nonexistent/ca.pem")}, "--kafka-ca needs --kafka-security SSL"),
    ({"bootstrap": "k:9092", "security_protocol": "SSL", "ca_file": Path("/nonexistent/ca.pem")}, "no such file"),
    ({"bootstrap": "k:9092", "topic_prefix": "a b"}, "--kafka-topic-prefix"),
    ({"bootstrap": "k:9092", "timeout_s": 0.0}, "export timeout"),
])
def test_bad_settings_are_one_line_naming_the_option(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as raised:
        KafkaSettings(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)


def test_sasl_and_tls_reach_the_client_options(tmp_path: Path) -> None:
    import ssl

    from edgefleet.server.pki import FleetCA

    ca = FleetCA(tmp_path / "pki")
    settings = KafkaSettings("a:9093, b:9093", security_protocol="sasl_ssl", sasl_mechanism="SCRAM-SHA-512",
                             username="fleet", password="secret", ca_file=ca.ca_path, topic_prefix="plant1.")
    kwargs = settings.client_kwargs()
    assert kwargs["bootstrap_servers"] == ["a:9093", "b:9093"] and kwargs["security_protocol"] == "SASL_SSL"
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == \
        ("SCRAM-SHA-512", "fleet", "secret")
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert settings.topic("telemetry") == "plant1.telemetry"


def test_export_tail_parquet_without_pyarrow_says_so_in_one_line(tmp_path: Path) -> None:
    import importlib.util

    from typer.testing import CliRunner

    from edgefleet.cli import app

    result = CliRunner().invoke(app, ["export", "tail", "--kafka", "127.0.0.1:1", "--format", "parquet",
                                      "--out", str(tmp_path / "out.parquet")])
    if importlib.util.find_spec("pyarrow") is not None:
        pytest.skip("pyarrow is installed here: parquet output is available")
    assert isinstance(result.exception, ConfigError) and "needs pyarrow" in str(result.exception)
    assert "\n" not in str(result.exception)

"""`edgefleet device telemetry ID [--json]` with real processes: a server (embedded broker, SQLite), real agents
replaying labelled recordings, and the CLI as a user runs it. A tap on the broker, subscribed as the server's own
MQTT user, records every telemetry batch the agents published: that is what the CLI's totals are checked against.

Also proven here: the agent sends its last telemetry batch when it stops, on SIGTERM and at the end of
``--duration`` (with a telemetry interval of an hour, that batch is the only one it sends).
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.core.telemetry import LatencyHistogram
from edgefleet.errors import EdgefleetError
from edgefleet.processes import wait_until
from edgefleet.server.broker_auth import SERVER_USER
from edgefleet.testing.fleet import LocalFleet
from edgefleet.transport import compact, topics
from edgefleet.transport.messages import TelemetryBatch, parse
from edgefleet.transport.mqtt_url import parse_mqtt_url

pytestmark = pytest.mark.integration
MODEL = "clf@1.0.0"


class TelemetryTap:
    """Subscribes to devices' telemetry topics on the fleet's embedded broker and keeps each batch once (by seq)."""

    def __init__(self, fleet: LocalFleet, devices: list[str]) -> None:
        server_dir = fleet.root / "server"
        endpoint = parse_mqtt_url(json.loads((server_dir / "server.json").read_text())["mqtt_url"])
        self.batches: dict[tuple[str, int], TelemetryBatch] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="telemetry-tap")
        self._client.username_pw_set(SERVER_USER, (server_dir / "broker" / "server.secret").read_text().strip())
        self._client.on_connect = lambda c, *_: c.subscribe([(topics.telemetry(d), 1) for d in devices])
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message
        self._client.connect(endpoint.host, endpoint.port)
        self._client.loop_start()
        assert self._subscribed.wait(15), "the tap never subscribed"

    def _on_message(self, _client: mqtt.Client, _userdata: object, message: mqtt.MQTTMessage) -> None:
        batch = parse(TelemetryBatch, compact.unpack("telemetry", bytes(message.payload)))
        with self._lock:
            self.batches[(batch.device, batch.seq)] = batch

    def of(self, device: str) -> list[TelemetryBatch]:
        with self._lock:
            return [b for (d, _), b in sorted(self.batches.items()) if d == device]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def started(fleet: LocalFleet) -> LocalFleet:
    """The fleet's server with the synthetic classifier (exact on clean data) registered."""
    assert fleet.api is not None
    fleet.api.push_model(fleet.bundle("1.0.0", 1))
    return fleet


@pytest.fixture
def tap_factory(started: LocalFleet) -> Iterator[Any]:
    taps: list[TelemetryTap] = []

    def make(devices: list[str]) -> TelemetryTap:
        taps.append(TelemetryTap(started, devices))
        return taps[-1]

    yield make
    for tap in taps:
        tap.close()


def expected_summary(device: str, batches: list[TelemetryBatch]) -> dict[str, Any]:
    """What `device telemetry --json` must print for these batches: sums per model, merged histograms."""
    models: dict[str, dict[str, Any]] = {}
    histograms: dict[str, LatencyHistogram] = {}
    for b in batches:
        if b.model is None:
            continue
        m = models.setdefault(b.model, {"windows": 0, "labelled": 0, "correct": 0})
        m["windows"] += b.windows
        m["labelled"] += b.labelled
        m["correct"] += b.correct
        histograms.setdefault(b.model, LatencyHistogram()).merge(LatencyHistogram.from_json(b.latency_ms))
    for name, m in models.items():
        m["accuracy"] = m["correct"] / m["labelled"] if m["labelled"] else None
        m["latency_ms"] = {"p50": histograms[name].quantile(0.5), "p99": histograms[name].quantile(0.99)}
    return {"device": device, "models": models}


def wait_stored(fleet: LocalFleet, tap: TelemetryTap, device: str) -> None:
    """Until the server has stored exactly the batches the tap saw (both receive them asynchronously)."""
    api = fleet.api
    assert api is not None

    def stored() -> bool:
        batches = tap.of(device)
        answer = api.telemetry(device)
        return bool(batches) and answer["batches"] == len(batches) and \
            sum(m["windows"] for m in answer["models"]) == sum(b.windows for b in batches)

    try:
        wait_until(stored, 60, f"the server to store every batch {device} sent")
    except EdgefleetError as exc:  # say what each side has, and what the server logged
        batches, answer = tap.of(device), api.telemetry(device)
        logs = sorted((fleet.root / "logs").glob("*.log"))
        tail = "\n".join(f"--- {p.name}: {p.read_text(errors='replace')[-1500:]}" for p in logs
                          if p.stem in ("server", device))
        raise AssertionError(f"{exc}: the broker carried seqs {[b.seq for b in batches]} with "
                             f"{sum(b.windows for b in batches)} windows; the server stored {answer['batches']} "
                             f"batches: {answer['models']}\n{tail}") from exc


def test_device_telemetry_sums_exactly_what_the_agent_sent(started: LocalFleet, tap_factory: Any) -> None:
    fleet, api = started, started.api
    assert api is not None
    fleet.provision("cam-01")
    api.deploy(MODEL, ["cam-01"])
    tap = tap_factory(["cam-01"])
    agent = fleet.start_agent("cam-01", telemetry_interval_s=0.5)

    def reported() -> bool:  # several batches of labelled windows (after an install that may take a while)
        batches = tap.of("cam-01")
        return len(batches) > 1 and sum(b.labelled for b in batches) > 10

    wait_until(reported, 90, "several batches of labelled windows from cam-01")
    assert agent.stop(30) == 0, agent.log_tail()  # SIGTERM: it sends its last batch and ends
    wait_stored(fleet, tap, "cam-01")
    sent = tap.of("cam-01")

    result = fleet.cli("device", "telemetry", "cam-01", "--json")
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    expected = expected_summary("cam-01", sent)
    assert printed == expected
    (summary,) = printed["models"].values()
    assert len(sent) > 1 and summary["labelled"] > 10  # several batches of labelled windows were summed
    assert summary["accuracy"] == 1.0  # the synthetic classifier is exact on the replayed recordings
    assert summary["latency_ms"]["p50"] is not None and summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"]

    table = fleet.cli("device", "telemetry", "cam-01")
    assert table.returncode == 0, table.stderr
    assert MODEL in table.stdout and str(summary["windows"]) in table.stdout and "100.0%" in table.stdout


def test_an_unknown_device_is_one_line_and_a_non_zero_exit(started: LocalFleet) -> None:
    for args in (("device", "telemetry", "nope", "--json"), ("device", "telemetry", "nope")):
        result = started.cli(*args)
        assert result.returncode != 0 and result.stdout == ""
        assert "Traceback" not in result.stderr and "unknown device 'nope'" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_api_documents_its_typed_response(started: LocalFleet) -> None:
    import httpx

    assert started.server_url is not None
    schema = httpx.get(f"{started.server_url}/openapi.json", timeout=10).json()
    get = schema["paths"]["/api/v1/devices/{device_id}/telemetry"]["get"]
    assert get["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DeviceTelemetry"}
    assert "404" in get["responses"]
    models = schema["components"]["schemas"]["DeviceTelemetry"]["properties"]["models"]
    assert models["items"] == {"$ref": "#/components/schemas/ModelTelemetry"}


def test_the_agent_sends_its_last_batch_when_it_stops(started: LocalFleet, tap_factory: Any) -> None:
    """With a telemetry interval of an hour, the one batch each agent sends is the one it sends on stopping:
    at the end of ``--duration`` for one, on SIGTERM for the other; it reaches the server and the CLI."""
    fleet, api = started, started.api
    assert api is not None
    devices = ["cam-duration", "cam-sigterm"]
    for device in devices:
        fleet.provision(device)
    api.deploy(MODEL, devices)
    tap = tap_factory(devices)
    timed = fleet.start_agent("cam-duration", duration_s=30, telemetry_interval_s=3600)  # update + restart first
    # one process: a re-exec after the update (a fresh start's memory) could take the few seconds of inference below
    # on a loaded machine, and an agent that has inferred nothing rightly sends nothing
    running = fleet.start_agent("cam-sigterm", telemetry_interval_s=3600, env={"EDGEFLEET_AGENT_REEXEC": "0"})
    wait_until(lambda: (api.device("cam-sigterm")["reported"] or {}).get("active") == MODEL, 40,
               "cam-sigterm to activate the model")
    time.sleep(3)  # a few seconds of inference at 20x the recordings' rate: dozens of windows
    assert tap.of("cam-sigterm") == []  # nothing sent before the stop
    assert running.proc is not None
    running.proc.send_signal(signal.SIGTERM)
    assert running.wait(30) == 0, running.log_tail()
    assert timed.wait(60) == 0, timed.log_tail()

    for device in devices:
        wait_stored(fleet, tap, device)
        (last,) = tap.of(device)
        assert last.model == MODEL and last.windows > 0 and last.labelled > 0
        result = fleet.cli("device", "telemetry", device, "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == expected_summary(device, [last])

"""Measured profiles (E9): a real agent reports its device facts in its (compact) state and the latency of its model
in telemetry; the server keeps them and answers, per profile, the device latency against the build host's
(`edgefleet device profiles`); `edgefleet build --server` takes that scaling for the profile and says which
profiles are measured and which estimated; the profile check then uses it and marks the verdict measured."""

from __future__ import annotations

import json

import pytest

from edgefleet.agent.facts import cpu_model
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.cli.build import measured_scaling
from edgefleet.core.profiles import BUILTIN_PROFILES, Footprint, check
from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
HOST_MS = 0.004
"""The build host's batch-1 latency written in the bundle's metrics (what `edgefleet build` measures)."""


def test_agents_facts_and_latency_make_the_profiles_measured_scaling(fleet: LocalFleet) -> None:
    assert fleet.api is not None and fleet.key is not None and fleet.server_url is not None
    fleet.provision("pi-01", profile="raspberry-pi")
    fleet.api.push_model(pack_bundle(synthetic.channel_mean_model(), fleet.key, BundleSpec(
        name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec(),
        metrics={"latency_b1_ms": HOST_MS})))
    fleet.api.deploy("clf@1.0.0", ["pi-01"])
    agent = fleet.start_agent("pi-01")

    def measured() -> bool:
        assert agent.running, agent.log_tail(15)
        assert fleet.api is not None
        reported = fleet.api.device("pi-01")["reported"] or {}
        return bool(reported.get("facts")) and fleet.api.telemetry("pi-01")["batches"] > 0

    wait_until(measured, 90, "the agent's facts and telemetry")
    agent.stop()  # what the server holds stays put while it is read twice
    facts = fleet.api.device("pi-01")["reported"]["facts"]
    assert facts["cpu"] == cpu_model() and facts["cores"] >= 1 and facts["memory_mb"] > 0
    assert "onnxruntime" in facts["runtimes"] and "CPUExecutionProvider" in facts["providers"]

    shown = fleet.cli("device", "profiles", "--profile", "raspberry-pi", "--json")
    assert shown.returncode == 0, shown.stderr
    profile = json.loads(shown.stdout)
    assert profile["devices"] == 1 and profile["facts"][0]["cpu"] == facts["cpu"]
    model = next(m for m in profile["models"] if m["model"] == "clf@1.0.0")
    assert model["host_b1_ms"] == HOST_MS and model["device_p50_ms"] > 0
    assert model["scaling"] == pytest.approx(model["device_p50_ms"] / HOST_MS)
    assert profile["scaling"] == pytest.approx(model["scaling"])

    said: list[str] = []
    scaling = measured_scaling(fleet.server_url, fleet.operator_token or "", ["raspberry-pi", "drone"], said.append)
    assert scaling == {"raspberry-pi": pytest.approx(profile["scaling"])}
    assert "raspberry-pi: latency measured on 1 device(s)" in said[0]
    assert "drone: no device measured it; latency estimated from MACs" in said[1]

    footprint = Footprint(file_bytes=1000, weight_bytes=1000, arena_bytes=1000, macs=10**9, int8_fraction=1.0,
                          energy_uj=1.0)
    pi = BUILTIN_PROFILES["raspberry-pi"]
    estimated, on_device = check(pi, footprint), check(pi, footprint, 2.0 * scaling["raspberry-pi"])
    assert estimated.latency_source == "estimate" and on_device.latency_source == "measured"
    assert on_device.est_latency_ms == pytest.approx(2.0 * scaling["raspberry-pi"])


def test_a_server_that_cannot_answer_leaves_every_profile_estimated() -> None:
    said: list[str] = []
    assert measured_scaling("http://127.0.0.1:9", "t", ["raspberry-pi"], said.append) == {}
    assert len(said) == 1 and "latency estimated from MACs" in said[0]

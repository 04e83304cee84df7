"""Monitors with real processes: an `edgefleet server` and real agents replaying recordings. A silence monitor
fires when an agent is stopped and clears when it comes back; a drift monitor fires on a device whose replayed
inputs are shifted; the CLI lists monitors and alerts, and a label for an unknown hard example is one line and a
non-zero exit."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.core.drift import reference_histogram
from edgefleet.data.basicmotions import save_npz
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration


def monitors(fleet: LocalFleet) -> dict[str, dict[str, Any]]:
    answer = fleet.cli("monitor", "list", "--json")
    assert answer.returncode == 0, answer.stderr
    return {m["expr"]: m for m in json.loads(answer.stdout)}


def state(fleet: LocalFleet, expr: str) -> str:
    return str(monitors(fleet)[expr]["state"])


def test_monitors_fire_on_silence_and_drift_and_clear_when_the_device_is_back(fleet: LocalFleet) -> None:
    assert fleet.api is not None and fleet.key is not None
    clean = synthetic.recordings(per_class=2, length=60)
    spec = {**synthetic.preprocess_spec(), "drift_reference": reference_histogram(clean.train_x)}
    fleet.api.push_model(pack_bundle(synthetic.channel_mean_model(), fleet.key, BundleSpec(
        name="clf", version="1.0.0", release=1, labels=list(synthetic.LABELS), preprocess=spec)))
    fleet.provision("quiet", {"site": "clean"})
    fleet.provision("shifted", {"site": "shifted"})
    fleet.api.deploy("clf@1.0.0", ["quiet", "shifted"])
    shifted_file = fleet.root / "shifted.npz"
    save_npz(dataclasses.replace(clean, test_x=clean.test_x + 2.5, train_x=clean.train_x + 2.5), shifted_file)

    silence, drift = "silent_for > 4s", "drift_psi > 0.2"
    for args in (["monitor", "create", silence, "--model", "clf"],
                 ["monitor", "create", drift, "--model", "clf", "--select", "site=shifted", "--window", "30"]):
        created = fleet.cli(*args)
        assert created.returncode == 0 and "watches clf" in created.stdout, created.stderr
    quiet = fleet.start_agent("quiet")
    fleet.group.start(ManagedProcess.edgefleet(
        ["agent", "--credentials", str(fleet.root / "devices" / "shifted.json"),
         "--data-dir", str(fleet.root / "agents" / "shifted"), "--source", f"npz:{shifted_file}?speed=20",
         "--telemetry-interval", "0.5"], fleet.root / "logs" / "shifted.log"))

    wait_until(lambda: state(fleet, drift) == "firing", 90, "the drift monitor to fire on shifted inputs")
    assert monitors(fleet)[drift]["values"]["drift_psi"] > 0.2
    wait_until(lambda: state(fleet, silence) == "ok", 60, "both devices to report")

    quiet.stop()
    wait_until(lambda: state(fleet, silence) == "firing", 30, "the silence monitor to fire")
    listed = fleet.cli("alert", "list", "--active", "--json")
    firing = {a["expr"] for a in json.loads(listed.stdout)}
    assert firing == {silence, drift}, listed.stdout
    counter = 'edgefleet_alerts_total{model="clf"}'
    raised = [line for line in fleet.api.metrics().splitlines() if line.startswith(counter)]
    assert raised and float(raised[0].split()[-1]) >= 2  # the silence monitor may also have fired before start-up

    fleet.start_agent("quiet")
    wait_until(lambda: state(fleet, silence) == "ok", 60, "the silence monitor to clear")
    cleared = json.loads(fleet.cli("alert", "list", "--json").stdout)
    silences = [a for a in cleared if a["expr"] == silence]
    assert silences and all(a["cleared"] is not None for a in silences)

    bad = fleet.cli("data", "label", "alpha", "--example", "999999")
    lines = (bad.stdout + bad.stderr).strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1 and "unknown hard example 999999" in lines[0], lines
    started = time.time()
    assert fleet.cli("monitor", "delete", monitors(fleet)[drift]["id"]).returncode == 0
    assert drift not in monitors(fleet) and time.time() - started < 60

"""Hardware and profile targeting: a device's hardware id and profile come from provisioning, its agent reports
them, and a rollout leaves out, with the reason, the selected devices that the candidate's manifest does not fit.

The first test uses real processes (server, agents); the others drive the orchestrator over a real SQLite store.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle, peek_manifest
from edgefleet.bundle.signing import SigningKey
from edgefleet.errors import ConfigError
from edgefleet.processes import wait_until
from edgefleet.server.orchestrator import Orchestrator, rollout_json
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
HARDWARE = {"dev-pi": "rpi4", "dev-plain": None, "dev-jetson": "jetson-orin"}


def restricted(key: SigningKey, version: str, release: int, *, hardware: list[str] | None = None,
               profiles: list[str] | None = None) -> bytes:
    """The synthetic classifier, packed for ``hardware`` and signed as fitting ``profiles``."""
    return pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec(), hardware=hardware or [], profiles=profiles or []))


def _reported(fleet: LocalFleet, device: str) -> dict[str, object]:
    assert fleet.api is not None
    return fleet.api.device(device)["reported"] or {}  # type: ignore[no-any-return]


def test_a_hardware_restricted_bundle_installs_on_its_hardware_and_skips_the_rest_with_the_reason(
        fleet: LocalFleet) -> None:
    api, key = fleet.api, fleet.key
    assert api is not None and key is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(restricted(key, "2.0.0", 2, hardware=["rpi4"]))
    for device, hardware in HARDWARE.items():
        args = ["--hardware", hardware] if hardware else []
        added = fleet.cli("device", "add", device, "--tag", "site=lab", "--out",
                          str(fleet.root / "devices" / f"{device}.json"), *args)
        assert added.returncode == 0, added.stderr
    credentials = json.loads((fleet.root / "devices" / "dev-pi.json").read_text())
    assert credentials["hardware"] == "rpi4"
    assert api.device("dev-plain")["hardware"] == "generic"
    api.deploy("clf@1.0.0", list(HARDWARE))
    for i, device in enumerate(HARDWARE):
        fleet.start_agent(device, shard=f"{i}/{len(HARDWARE)}", duration_s=300)
    wait_until(lambda: all(_reported(fleet, d).get("running") == "clf@1.0.0" for d in HARDWARE), 120,
               "version 1 everywhere")
    for device, hardware in HARDWARE.items():  # each agent reports what it was provisioned with
        assert _reported(fleet, device)["hardware"] == (hardware or "generic")

    created = fleet.cli("rollout", "create", "clf@2.0.0", "--select", "site=lab", "--install-timeout", "300",
                        "--window", "2", "--min-windows", "2")  # this test is about targeting, not judging
    assert created.returncode == 0, created.stderr
    assert "to 1 device(s)" in created.stdout
    assert "skipped dev-plain: hardware generic is not among the bundle's (rpi4)" in created.stdout
    assert "skipped dev-jetson: hardware jetson-orin is not among the bundle's (rpi4)" in created.stdout
    (rollout,) = api.rollouts()
    wait_until(lambda: _reported(fleet, "dev-pi").get("running") == "clf@2.0.0", 240, "version 2 on dev-pi")
    wait_until(lambda: api.rollout(rollout["id"])["phase"] == "done", 60, "the rollout to finish")
    status = json.loads(fleet.cli("rollout", "status", rollout["id"], "--json").stdout)
    assert status["targets"] == 1 and status["skipped"] == [
        {"device": "dev-jetson", "reason": "hardware jetson-orin is not among the bundle's (rpi4)"},
        {"device": "dev-plain", "reason": "hardware generic is not among the bundle's (rpi4)"}]
    for device in ("dev-plain", "dev-jetson"):
        assert api.device(device)["desired"] == "clf@1.0.0"
        assert _reported(fleet, device)["running"] == "clf@1.0.0"

    # sent anyway (a deployment does not judge fit), the device itself refuses it and keeps version 1
    api.deploy("clf@2.0.0", ["dev-plain"])
    wait_until(lambda: any(e["name"] == "refused" and e["detail"].get("reason") == "wrong_hardware"
                           for e in api.events("dev-plain")), 30, "the device's refusal")
    assert _reported(fleet, "dev-plain")["running"] == "clf@1.0.0"


class Fleet:
    """An orchestrator over a real SQLite store, devices added as provisioning adds them."""

    def __init__(self, root: Path) -> None:
        self.key = SigningKey.generate()
        self.store = Store(f"sqlite:///{root / 'db.sqlite'}")
        self.orchestrator = Orchestrator(self.store, lambda states: None, clock=time.time)

    def push(self, version: str, release: int, **restrict: list[str]) -> None:
        data = restricted(self.key, version, release, **restrict)
        self.store.add_model(peek_manifest(data), f"{version}".ljust(64, "0"), len(data), self.key.public.key_id)

    def device(self, device_id: str, profile: str | None = None, hardware: str | None = None) -> None:
        self.store.add_device(Device(id=device_id, token_sha256=device_id.ljust(64, "0"), mqtt_password_sha256="p" * 64,
                                     tags={"site": "lab"}, profile=profile, hardware=hardware, created=time.time(),
                                     revoked=False))


@pytest.fixture
def local(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def test_devices_of_a_profile_the_bundle_does_not_fit_are_skipped_with_the_reason(local: Fleet) -> None:
    local.push("2.0.0", 2, profiles=["raspberry-pi", "drone"])
    local.device("pi", profile="raspberry-pi")
    local.device("mcu", profile="microcontroller")
    local.device("unprofiled")  # judged on hardware only
    row = local.orchestrator.create({"candidate": "clf@2.0.0", "select": {"site": "lab"}})
    status = rollout_json(row, local.store)
    assert status["targets"] == 2 and status["skipped"] == [
        {"device": "mcu", "reason": "profile microcontroller is not among those the bundle fits (raspberry-pi, drone)"}]
    assert sorted(status["decisions"][0]["devices"]) == ["pi", "unprofiled"]
    assert local.store.get_device("mcu").desired_model_id is None  # type: ignore[union-attr]


def test_a_candidate_that_fits_no_selected_device_starts_no_rollout(local: Fleet) -> None:
    local.push("2.0.0", 2, hardware=["rpi4"], profiles=["raspberry-pi"])
    local.device("x86", profile="raspberry-pi")
    local.device("pi", profile="microcontroller", hardware="rpi4")
    with pytest.raises(ConfigError, match=r"fits none of the 2 selected device\(s\): pi: profile microcontroller"
                                          r".*; x86: hardware generic"):
        local.orchestrator.create({"candidate": "clf@2.0.0", "select": {"site": "lab"}})
    assert local.store.list_rollouts() == []


def test_a_device_that_could_not_restore_its_model_is_not_counted_as_running_it(local: Fleet) -> None:
    """The agent reports ``running: null`` when its accepted model failed to load (agent/restore.py): the
    rollout's installed check reads ``running``, and ``active`` only from reports without it."""
    local.device("restored")
    local.device("broken")
    local.device("older-agent")
    local.store.record_reported("restored", {"active": "clf@2.0.0", "running": "clf@2.0.0"})
    local.store.record_reported("broken", {"active": "clf@2.0.0", "running": None})
    local.store.record_reported("older-agent", {"active": "clf@2.0.0"})
    views, _ = local.orchestrator._devices()
    assert {d: v.active for d, v in views.items()} == {"restored": "clf@2.0.0", "broken": None,
                                                        "older-agent": "clf@2.0.0"}

"""A bundle for a runtime the device lacks: the agent (real process, its runtimes limited by
``EDGEFLEET_AGENT_RUNTIMES``) reports its runtimes, a rollout leaves it out and lists it with the reason, and a
bundle sent to it anyway is refused with reason ``missing_runtime`` (reported like any refusal) while it keeps
running its model.
"""

from __future__ import annotations

import json

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration


def _reported(fleet: LocalFleet, device: str) -> dict[str, object]:
    assert fleet.api is not None
    return fleet.api.device(device)["reported"] or {}  # type: ignore[no-any-return]


def test_a_device_without_the_runtime_is_skipped_by_the_rollout_and_refuses_the_bundle(fleet: LocalFleet) -> None:
    api, key = fleet.api, fleet.key
    assert api is not None and key is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version="2.0.0", release=2, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec(), runtime="openvino")))
    for device in ("dev-lean", "dev-quiet"):  # dev-quiet never reports: its runtimes are not judged
        added = fleet.cli("device", "add", device, "--tag", "site=lab", "--out",
                          str(fleet.root / "devices" / f"{device}.json"))
        assert added.returncode == 0, added.stderr
    api.deploy("clf@1.0.0", ["dev-lean"])
    fleet.start_agent("dev-lean", duration_s=400, env={"EDGEFLEET_AGENT_RUNTIMES": "onnxruntime"})
    wait_until(lambda: _reported(fleet, "dev-lean").get("running") == "clf@1.0.0", 240, "version 1 on dev-lean")
    assert _reported(fleet, "dev-lean")["runtimes"] == ["onnxruntime"]

    created = fleet.cli("rollout", "create", "clf@2.0.0", "--select", "site=lab", "--install-timeout", "300")
    assert created.returncode == 0, created.stderr
    assert "skipped dev-lean: runtime openvino is not among the device's (onnxruntime)" in created.stdout
    (rollout,) = api.rollouts()
    status = json.loads(fleet.cli("rollout", "status", rollout["id"], "--json").stdout)
    assert status["skipped"] == [{"device": "dev-lean",
                                  "reason": "runtime openvino is not among the device's (onnxruntime)"}]
    assert api.device("dev-lean")["desired"] == "clf@1.0.0"

    api.deploy("clf@2.0.0", ["dev-lean"])  # a deployment does not judge fit: the device refuses it itself
    wait_until(lambda: any(e["name"] == "refused" and e["detail"].get("reason") == "missing_runtime"
                           for e in api.events("dev-lean")), 120, "the device's refusal")
    refusal = next(e for e in api.events("dev-lean") if e["detail"].get("reason") == "missing_runtime")
    assert "bundle needs runtime openvino, this device has onnxruntime" in json.dumps(refusal["detail"])
    assert _reported(fleet, "dev-lean")["running"] == "clf@1.0.0"

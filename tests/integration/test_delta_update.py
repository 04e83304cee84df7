"""An update the device can take as a weight-level delta: the server offers it against the bundle the device
reports running, the agent rebuilds and verifies the new bundle from it, and only the delta crosses the link."""

from __future__ import annotations

import pytest

from edgefleet.processes import wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration


def test_a_fine_tuned_model_arrives_as_a_delta(fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    api.push_model(fleet.bundle("1.0.0", 1))
    tuned = synthetic.channel_mean_model(bias=[0.05, 0.0, 0.0, 0.0])  # a head fine-tune: one tensor changes
    second = api.push_model(fleet.bundle("1.0.1", 2, tuned))
    fleet.provision("dev-d")
    api.deploy("clf@1.0.0", ["dev-d"])
    agent = fleet.start_agent("dev-d")
    wait_until(lambda: (api.device("dev-d")["reported"] or {}).get("active") == "clf@1.0.0", 30, "version 1")

    api.deploy("clf@1.0.1", ["dev-d"])
    wait_until(lambda: (api.device("dev-d")["reported"] or {}).get("active") == "clf@1.0.1", 30, "version 1.0.1")
    applied = [e for e in api.events("dev-d") if e["name"] == "delta_applied"]
    assert applied and applied[0]["detail"]["target"] == "clf@1.0.1"
    assert int(applied[0]["detail"]["bytes"]) < int(second["size"]) // 2
    assert agent.running

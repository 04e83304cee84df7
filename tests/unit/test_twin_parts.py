"""The twin's pure parts: rollout targeting leaves twins out unless selected, scenario group sizes, a twin's
sensor variation, the input moments a device's drift statistics give, and the groups a rehearsal builds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from edgefleet.core.rollout import TWIN_TAG, DeviceView, make_plan, select_targets
from edgefleet.server.rehearsal_api import input_moments
from edgefleet.twin.rehearsal import channel_moments, twin_groups
from edgefleet.twin.scenario import Group, SensorFaults, Synthetic, parse_scenario
from edgefleet.twin.sensors import Rows, TwinSource, Variation, synthetic_rows


def _view(device: str, tags: dict[str, str]) -> DeviceView:
    return DeviceView(id=device, tags=tags)


def test_twins_are_targets_only_of_a_plan_that_selects_the_twin_tag() -> None:
    devices = [_view("real", {"site": "a"}), _view("twin-1", {"site": "a", TWIN_TAG: "r1"})]
    assert select_targets(make_plan({"candidate": "m@2", "select": {"site": "a"}}), devices, "s") == ["real"]
    assert select_targets(make_plan({"candidate": "m@2", "select": {TWIN_TAG: "r1"}}), devices, "s") == ["twin-1"]
    assert select_targets(make_plan({"candidate": "m@2"}), devices, "s") == ["real"]


@pytest.mark.parametrize(("groups", "total", "sizes"), [
    ([{}], 7, [7]),
    ([{"share": 0.5}, {"share": 0.5}], 7, [4, 3]),
    ([{"count": 2}, {"share": 0.25}, {}], 10, [2, 2, 6]),
    ([{"count": 5}, {}], 3, [5, 0]),
])
def test_scenario_sizes_give_every_twin_one_group(groups: list[dict[str, object]], total: int,
                                                 sizes: list[int]) -> None:
    assert parse_scenario({"groups": groups}).sizes(total) == sizes


def test_a_twin_source_applies_gain_offset_drift_and_faults() -> None:
    rows = Rows(np.ones((2, 2, 4), dtype=np.float32), np.array([0, 1]))
    plain = Variation(np.array([2.0, 1.0], dtype=np.float32), 1.0, np.array([0.0, 5.0], dtype=np.float32), 0.0,
                      SensorFaults())
    source = TwinSource(rows, 1000.0, plain, seed=0)
    out = source.vary(np.ones((3, 2), dtype=np.float32), age_s=60.0)  # a minute: gain 2+1 and 1+1
    np.testing.assert_allclose(out, [[3.0, 7.0]] * 3)
    lossy = Variation(plain.gain, 0.0, plain.offset, 0.0, SensorFaults(dropout=1.0))
    assert np.isnan(TwinSource(rows, 1000.0, lossy, seed=0).vary(np.ones((3, 2)), 0.0)).all()
    stuck = Variation(plain.gain, 0.0, plain.offset, 0.0, SensorFaults(stuck_after_s=1.0))
    faulty = TwinSource(rows, 1000.0, stuck, seed=0)
    first = faulty.vary(np.array([[1.0, 2.0]]), 2.0)
    np.testing.assert_allclose(faulty.vary(np.array([[9.0, 9.0]]), 3.0), first)


def test_channel_lists_must_match_the_rows() -> None:
    from edgefleet.errors import ConfigError

    with pytest.raises(ConfigError, match="offset has 2 values for 6 channel"):
        Variation.of(Group(offset=[1.0, 2.0]), 6)


def test_input_moments_combine_batches_by_samples() -> None:
    def batch(n: int, mean_z: list[float], std_ratio: list[float]) -> SimpleNamespace:
        return SimpleNamespace(drift=SimpleNamespace(n=n, mean_z=mean_z, std_ratio=std_ratio))

    moments = input_moments([batch(100, [1.0, 0.0], [1.0, 2.0]), batch(100, [3.0, 0.0], [1.0, 2.0]),
                             SimpleNamespace(drift=None)], mean=[10.0, 0.0], std=[2.0, 1.0])
    assert moments is not None
    mean, std = moments
    np.testing.assert_allclose(mean, [14.0, 0.0])  # mean_z 2 -> 10 + 2 * 2
    np.testing.assert_allclose(std, [2.0 * np.sqrt(2.0), 2.0])  # within 1, between +-1: sqrt(2) stds
    assert input_moments([], [0.0], [1.0]) is None


def test_a_rehearsal_scales_the_rows_to_each_device_and_spreads_the_twins() -> None:
    rows = synthetic_rows(Synthetic())
    base_mean, base_std = channel_moments(rows)
    drifted = (base_mean + np.array([0, 0, 0, 0, 3.0, 0]), base_std * np.array([1, 1, 1, 1, 2.0, 1]))
    profiles: list[dict[str, Any]] = [
        {"device": "a", "tags": {"site": "x"}, "running": "m@1", "input_mean": None, "input_std": None},
        {"device": "b", "tags": {"site": "x"}, "running": "m@1", "profile": "p", "hardware": "h",
         "input_mean": list(drifted[0]), "input_std": list(drifted[1])}]
    first, second = twin_groups(profiles, rows, 5)
    assert (first.count, second.count) == (3, 2)
    assert first.gain == 1.0 and first.offset == 0.0 and first.tags == {"site": "x", "twin_of": "a"}
    assert second.model == "m@1" and second.profile == "p" and second.hardware == "h"
    assert isinstance(second.gain, list) and isinstance(second.offset, list)
    x = rows.x.transpose(1, 0, 2).reshape(6, -1)
    scaled = x * np.asarray(second.gain)[:, None] + np.asarray(second.offset)[:, None]
    np.testing.assert_allclose(scaled.mean(axis=1), drifted[0], atol=1e-4)
    np.testing.assert_allclose(scaled.std(axis=1), drifted[1], atol=1e-4)


def test_a_twin_link_without_a_broker_refuses_publishes_with_a_transport_error() -> None:
    """The agent's outbox catches TransportError and tries again later: any other error would end its thread."""
    from edgefleet.errors import TransportError
    from edgefleet.transport.mqtt_url import MqttEndpoint
    from edgefleet.transport.ports import free_port
    from edgefleet.twin.link import LinkLoop, TwinLink

    loop = LinkLoop()
    link = TwinLink(loop, MqttEndpoint("127.0.0.1", free_port()), "twin-unit", clean_session=False)
    try:
        link.start_background()
        with pytest.raises(TransportError):
            link.publish_and_wait("t/x", b"{}", timeout_s=0.5)
    finally:
        link.stop()
        loop.close()

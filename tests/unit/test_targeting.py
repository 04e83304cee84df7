"""Which selected devices a bundle fits (core.targeting): hardware ids and profiles from the manifest."""

from __future__ import annotations

import pytest

from edgefleet.core.rollout import DeviceView, make_plan, start
from edgefleet.core.targeting import fit_targets, misfit
from edgefleet.errors import ConfigError


def view(device_id: str, hardware: str = "generic", profile: str | None = None, **tags: str) -> DeviceView:
    return DeviceView(device_id, tags or {"site": "lab"}, profile, hardware=hardware)


def test_empty_manifest_lists_fit_every_device() -> None:
    assert misfit(view("a", "rpi4", "drone"), [], []) is None


def test_hardware_outside_the_bundle_list_is_a_misfit_with_the_ids_named() -> None:
    assert misfit(view("a", "rpi4"), ["rpi4", "jetson"], []) is None
    assert misfit(view("a"), ["rpi4", "jetson"], []) == "hardware generic is not among the bundle's (rpi4, jetson)"


def test_a_profile_the_bundle_does_not_fit_is_a_misfit_and_no_profile_is_not_judged() -> None:
    assert misfit(view("a", profile="microcontroller"), [], ["raspberry-pi"]) == (
        "profile microcontroller is not among those the bundle fits (raspberry-pi)")
    assert misfit(view("a", profile="raspberry-pi"), [], ["raspberry-pi", "drone"]) is None
    assert misfit(view("a"), [], ["raspberry-pi"]) is None


def test_hardware_is_judged_before_the_profile() -> None:
    reason = misfit(view("a", "x86", "microcontroller"), ["rpi4"], ["raspberry-pi"])
    assert reason is not None and reason.startswith("hardware x86")


def test_only_selected_devices_are_skipped_and_the_rest_are_kept_for_the_rollout() -> None:
    plan = make_plan({"candidate": "clf@2.0.0", "select": {"site": "lab"}})
    devices = {"pi": view("pi", "rpi4"), "x86": view("x86"), "other": view("other", site="elsewhere")}
    kept, skipped = fit_targets(plan, devices, {"hardware": ["rpi4"]})
    assert skipped == [{"device": "x86", "reason": "hardware generic is not among the bundle's (rpi4)"}]
    assert set(kept) == {"pi", "other"}  # "other" is not selected: not skipped, and start() leaves it out
    first = start(plan, "ro-1", kept, 0.0)
    assert first.state.targets == ["pi"]


def test_a_candidate_that_fits_no_selected_device_is_refused_with_the_reasons() -> None:
    plan = make_plan({"candidate": "clf@2.0.0", "select": {"site": "lab"}})
    devices = {"a": view("a", profile="microcontroller"), "b": view("b", profile="smartwatch")}
    with pytest.raises(ConfigError, match=r"fits none of the 2 selected device\(s\): a: profile microcontroller"):
        fit_targets(plan, devices, {"profiles": ["raspberry-pi"]})


def test_nothing_selected_is_left_to_start_to_say() -> None:
    plan = make_plan({"candidate": "clf@2.0.0", "select": {"site": "nowhere"}})
    kept, skipped = fit_targets(plan, {"a": view("a")}, {"hardware": ["rpi4"]})
    assert skipped == [] and set(kept) == {"a"}

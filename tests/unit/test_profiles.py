"""edgefleet.core.profiles: the built-in device table, user YAML profiles and the feasibility check."""

from __future__ import annotations

import pytest

from edgefleet.core.profiles import (
    BUILTIN_PROFILES,
    KB,
    MB,
    DeviceProfile,
    Footprint,
    check,
    estimate_latency_ms,
    parse_profiles,
    resolve,
)
from edgefleet.errors import ConfigError

SMALL = Footprint(file_bytes=20 * KB, weight_bytes=16 * KB, arena_bytes=8 * KB, macs=2_000_000, int8_fraction=1.0,
                  energy_uj=1.5)
BIG = Footprint(file_bytes=40 * MB, weight_bytes=40 * MB, arena_bytes=6 * MB, macs=5_000_000_000, int8_fraction=0.0,
                energy_uj=9000.0)


def test_builtin_table_covers_the_device_classes() -> None:
    """Seven classes from a heart monitor to a Jetson, each with memory, storage, rates, budget, power, runtimes."""
    assert set(BUILTIN_PROFILES) == {"heart-monitor", "microcontroller", "smartwatch", "smart-camera", "drone",
                                     "raspberry-pi", "jetson-orin-nano"}
    assert BUILTIN_PROFILES["heart-monitor"].ram_bytes == 256 * KB
    assert BUILTIN_PROFILES["smartwatch"].ram_bytes == 512 * MB
    for p in BUILTIN_PROFILES.values():
        assert p.storage_bytes > 0 and p.int8_macs_per_s >= p.float_macs_per_s > 0
        assert p.latency_budget_ms > 0 and p.power_w > 0 and p.runtimes


def test_latency_from_macs_by_precision() -> None:
    """2e6 int8 MACs at 2e10 MAC/s is 0.1 ms; half of them in float at 5e9 MAC/s adds 0.2 ms minus 0.05."""
    pi = BUILTIN_PROFILES["raspberry-pi"]
    assert estimate_latency_ms(pi, 2_000_000, 1.0) == pytest.approx(0.1)
    assert estimate_latency_ms(pi, 2_000_000, 0.5) == pytest.approx(0.05 + 0.2)


def test_small_model_fits_a_raspberry_pi() -> None:
    verdict = check(BUILTIN_PROFILES["raspberry-pi"], SMALL)
    assert verdict.fits and not verdict.reasons
    assert verdict.ram_needed_bytes == 24 * KB
    assert verdict.energy_uj == 1.5
    assert verdict.device_energy_mj == pytest.approx(6.0 * verdict.est_latency_ms)


def test_every_reason_is_given_when_nothing_fits() -> None:
    """A 40 MB float model on a microcontroller fails storage, RAM, latency and runtime, and says each."""
    verdict = check(BUILTIN_PROFILES["microcontroller"], BIG)
    assert not verdict.fits
    assert not (verdict.fits_storage or verdict.fits_ram or verdict.meets_latency or verdict.runtime_supported)
    assert len(verdict.reasons) == 4
    text = " ".join(verdict.reasons)
    for word in ("storage", "RAM", "latency", "runtime"):
        assert word in text


def test_only_the_failing_check_is_reported() -> None:
    """Within storage, RAM and runtime, but too slow for the drone's 20 ms budget: one reason, about latency."""
    slow = Footprint(file_bytes=10 * MB, weight_bytes=10 * MB, arena_bytes=MB, macs=200_000_000_000,
                     int8_fraction=0.0, energy_uj=1.0)
    verdict = check(BUILTIN_PROFILES["drone"], slow)
    assert not verdict.fits and verdict.fits_ram and verdict.fits_storage
    assert len(verdict.reasons) == 1 and "latency" in verdict.reasons[0]


def test_user_profiles_from_yaml_override_builtins() -> None:
    text = """
profiles:
  - name: gateway
    ram_bytes: 2147483648
    storage_bytes: 8589934592
    int8_macs_per_s: 5.0e10
    float_macs_per_s: 1.0e10
    latency_budget_ms: 5
    power_w: 10
  - name: raspberry-pi
    ram_bytes: 1024
    storage_bytes: 1024
    int8_macs_per_s: 1
    float_macs_per_s: 1
    latency_budget_ms: 1
    power_w: 1
"""
    user = parse_profiles(text)
    gateway, pi = resolve(["gateway", "raspberry-pi"], user)
    assert isinstance(gateway, DeviceProfile) and gateway.runtimes == ("onnxruntime",)
    assert check(gateway, SMALL).fits
    assert not check(pi, SMALL).fits


@pytest.mark.parametrize(
    ("text", "message"),
    [("profiles: [{name: x}]", "ram_bytes"), (": : :", "YAML"), ("42", "list"),
     ("- {name: BAD NAME, ram_bytes: 1, storage_bytes: 1, int8_macs_per_s: 1, float_macs_per_s: 1, "
      "latency_budget_ms: 1, power_w: 1}", "name")],
)
def test_bad_profile_yaml_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_profiles(text)


def test_unknown_profile_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="raspberry-pi"):
        resolve(["toaster"])

"""The preprocessing spec on the device: band-energy features equal a hand computation, missing values are
filled in as the spec says (within a per-window limit), and the demo bundles' plain spec still works."""

from __future__ import annotations

import cmath
import math
from typing import Any

import numpy as np
import pytest

from edgefleet.errors import BundleError
from edgefleet.runtime.features import BandEnergy
from edgefleet.runtime.preprocess import StreamWindower, WindowSpec

RATE = 100.0
WINDOW = 32


def spec(**extra: Any) -> dict[str, Any]:
    return {"kind": "sliding_window", "channels": 2, "window": WINDOW, "hop": 8, "sample_rate_hz": RATE,
            "mean": [1.0, -2.0], "std": [2.0, 0.5], **extra}


def hand_band_energy(x: list[float], rate: float, low: float, high: float) -> float:
    """sum over bins k with low <= f_k < high (f_k = k rate / N, k = 0..N/2) of |DFT_k|^2 / N, by the definition."""
    n = len(x)
    total = 0.0
    for k in range(n // 2 + 1):
        f = k * rate / n
        inside = low <= f < high or (high >= rate / 2 and f == rate / 2 and low <= f)
        if inside:
            dft = sum(x[t] * cmath.exp(-2j * math.pi * k * t / n) for t in range(n))
            total += abs(dft) ** 2 / n
    return total


def test_band_energy_equals_the_hand_computation() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(WINDOW) / RATE
    window = np.stack([np.sin(2 * np.pi * 12.5 * t) + 0.1 * rng.standard_normal(WINDOW),
                       0.5 * np.cos(2 * np.pi * 40.625 * t) + rng.standard_normal(WINDOW)]).astype(np.float32)
    bands = ((0.0, 10.0), (10.0, 25.0), (25.0, 50.0))
    features = BandEnergy(bands, RATE, WINDOW)(window)
    assert features.shape == (2, 3) and features.dtype == np.float32
    for c in range(2):
        for j, (low, high) in enumerate(bands):
            expected = hand_band_energy([float(v) for v in window[c]], RATE, low, high)
            assert features[c, j] == pytest.approx(expected, rel=1e-4)
    assert features[0, 1] > 10 * features[0, 0]  # the 12.5 Hz tone lands in 10..25 Hz


def test_log_band_energy_is_log10_of_the_energy() -> None:
    window = np.random.default_rng(1).standard_normal((1, WINDOW)).astype(np.float32)
    plain = BandEnergy(((0.0, 50.0),), RATE, WINDOW)(window)
    logged = BandEnergy(((0.0, 50.0),), RATE, WINDOW, log=True)(window)
    np.testing.assert_allclose(logged, np.log10(plain + 1e-12), rtol=1e-5)


def test_a_band_energy_spec_composes_after_the_window() -> None:
    parsed = WindowSpec.from_manifest(spec(features=[{"kind": "band_energy", "bands_hz": [[0, 10], [10, 50]]}]))
    assert parsed.input_shape == (1, 2, 2)
    windower = StreamWindower(parsed)
    rng = np.random.default_rng(2)
    raw = rng.standard_normal((WINDOW, 2)).astype(np.float32)
    windows = [w for row in raw if (w := windower.push(row)) is not None]
    assert len(windows) == 1
    scaled = (raw.T - parsed.mean[:, None]) / parsed.std[:, None]
    assert windows[0].samples is not None
    np.testing.assert_allclose(windows[0].samples, scaled, rtol=1e-5, atol=1e-6)
    expected = BandEnergy(((0.0, 10.0), (10.0, 50.0)), RATE, WINDOW)(scaled)
    np.testing.assert_allclose(windows[0].x[0], expected, rtol=1e-4)


def test_the_plain_sliding_window_spec_is_unchanged() -> None:
    parsed = WindowSpec.from_manifest(spec())
    assert parsed.input_shape == (1, 2, WINDOW) and parsed.missing is None and parsed.features == ()
    windower = StreamWindower(parsed)
    raw = np.arange(48 * 2, dtype=np.float32).reshape(48, 2)
    windows = [w for i, row in enumerate(raw) if (w := windower.push(row, label=i // 100)) is not None]
    assert len(windows) == 3  # at samples 32, 40, 48
    last = raw[-WINDOW:]
    np.testing.assert_allclose(windows[-1].x[0], (last.T - parsed.mean[:, None]) / parsed.std[:, None], rtol=1e-6)
    assert windows[-1].label == 0 and windows[0].fresh == WINDOW and windows[1].fresh == 8


def test_a_window_across_two_labels_has_none() -> None:
    windower = StreamWindower(WindowSpec.from_manifest(spec()))
    labels = [0] * 36 + [1] * 36
    windows = [w for label in labels if (w := windower.push(np.zeros(2, np.float32), label)) is not None]
    assert [w.label for w in windows] == [0, None, None, None, None, 1]


def push_all(windower: StreamWindower, rows: np.ndarray) -> list[Any]:
    out = []
    for row in rows:
        missing = bool(np.isnan(row).any())
        window = windower.push(row, None, missing)
        if window is not None:
            out.append(window)
    return out


def test_hold_fills_a_missing_channel_with_its_last_value() -> None:
    windower = StreamWindower(WindowSpec.from_manifest(spec(missing={"strategy": "hold", "max_fraction": 0.5})))
    rows = np.tile(np.array([[3.0, 4.0]], dtype=np.float32), (WINDOW, 1))
    rows[:, 0] = np.arange(WINDOW)
    rows[10:13, 0] = np.nan
    (window,) = push_all(windower, rows)
    raw = window.samples[0] * 2.0 + 1.0  # undo the scaling of channel 0
    assert raw[10:13].tolist() == [9.0, 9.0, 9.0]
    assert window.imputed == 3 and windower.imputed == 3


def test_mean_fills_a_missing_channel_with_the_training_mean() -> None:
    windower = StreamWindower(WindowSpec.from_manifest(spec(missing={"strategy": "mean", "max_fraction": 0.5})))
    rows = np.ones((WINDOW, 2), dtype=np.float32)
    rows[5, 1] = np.nan
    (window,) = push_all(windower, rows)
    assert window.samples[1, 5] == 0.0  # the training mean scales to zero


def test_a_window_with_too_many_missing_values_is_dropped_and_counted() -> None:
    windower = StreamWindower(WindowSpec.from_manifest(spec(missing={"strategy": "hold", "max_fraction": 0.05})))
    limit = int(0.05 * WINDOW * 2)  # 3 values
    rows = np.ones((WINDOW + 8, 2), dtype=np.float32)
    rows[0 : limit + 1, 0] = np.nan  # one too many in the first window, none in the second
    windows = push_all(windower, rows)
    assert windower.dropped == 1
    assert len(windows) == 1 and windows[0].imputed == 0


def test_missing_values_without_an_imputing_spec_are_refused() -> None:
    windower = StreamWindower(WindowSpec.from_manifest(spec()))
    with pytest.raises(ValueError):
        windower.push(np.array([np.nan, 1.0], dtype=np.float32), None, True)


@pytest.mark.parametrize("bad", [
    {"features": [{"kind": "wavelet"}]},
    {"features": [{"kind": "band_energy", "bands_hz": [[20, 10]]}]},
    {"features": [{"kind": "band_energy", "bands_hz": [[60, 70]]}]},  # above Nyquist (50 Hz)
    {"features": [{"kind": "band_energy", "bands_hz": "all"}]},
    {"features": [{"kind": "band_energy", "bands_hz": [[0, 10]], "window_fn": "kaiser"}]},
    {"missing": {"strategy": "interpolate"}},
    {"missing": {"max_fraction": 2}},
    {"sample_rate_hz": 0, "features": [{"kind": "band_energy", "bands_hz": [[0, 10]]}]},
])
def test_specs_the_device_cannot_run_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(BundleError):
        WindowSpec.from_manifest(spec(**bad))


def test_windows_stay_exact_across_buffer_compactions() -> None:
    parsed = WindowSpec.from_manifest(spec())
    windower = StreamWindower(parsed)
    raw = np.random.default_rng(5).standard_normal((3000, 2)).astype(np.float32)
    for i, row in enumerate(raw):
        window = windower.push(row)
        if window is not None:
            expected = (raw[i + 1 - WINDOW : i + 1].T - parsed.mean[:, None]) / parsed.std[:, None]
            np.testing.assert_allclose(window.x[0], expected, rtol=1e-6, atol=1e-6)
    assert windower._count == 3000

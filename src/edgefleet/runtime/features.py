"""Feature steps of the preprocessing spec, applied to a scaled window [channels, window] after windowing.

    {"kind": "band_energy", "bands_hz": [[0, 50], [50, 200], ...], "window_fn": "none" | "hann", "log": false}

``band_energy`` turns each channel's window into the energy of its spectrum in each band, so a vibration
model can take [1, channels, bands] features instead of the raw window. With ``X = rfft(w * x)`` over the
window of ``N`` samples and bin frequencies ``f_k = k * rate / N``, the energy of band ``[lo, hi)`` is
``sum(|X_k|^2 for lo <= f_k < hi) / N``; a band whose ``hi`` is at or above the Nyquist frequency also takes
the Nyquist bin. With ``log``, the step outputs ``log10(energy + 1e-12)``.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from edgefleet.errors import BundleError

LOG_FLOOR = 1e-12
MAX_BANDS = 256


class FeatureStep(Protocol):
    """Maps a scaled window [channels, window] to a feature array [channels, features]."""

    def __call__(self, window: np.ndarray) -> np.ndarray: ...

    def output_width(self, window: int) -> int: ...


class BandEnergy:
    """Spectral energy per channel in each frequency band (see the module docstring)."""

    def __init__(self, bands_hz: tuple[tuple[float, float], ...], sample_rate_hz: float, window: int,
                 taper: str = "none", log: bool = False) -> None:
        self.bands_hz = bands_hz
        self.sample_rate_hz = sample_rate_hz
        self.window = window
        self.log = log
        n_bins = window // 2 + 1
        freqs = np.arange(n_bins) * (sample_rate_hz / window)
        nyquist = sample_rate_hz / 2.0
        self._selector = np.zeros((n_bins, len(bands_hz)), dtype=np.float64)
        for j, (low, high) in enumerate(bands_hz):
            inside = (freqs >= low) & ((freqs < high) | ((high >= nyquist) & (freqs <= nyquist)))
            self._selector[inside, j] = 1.0
        self._taper = np.hanning(window).astype(np.float32) if taper == "hann" else None

    def __call__(self, window: np.ndarray) -> np.ndarray:
        signal = window * self._taper if self._taper is not None else window
        spectrum = np.fft.rfft(signal, axis=-1)
        power = (spectrum.real ** 2 + spectrum.imag ** 2) / self.window
        energy = power @ self._selector
        if self.log:
            energy = np.log10(energy + LOG_FLOOR)
        return energy.astype(np.float32)

    def output_width(self, window: int) -> int:
        return len(self.bands_hz)


def feature_step(spec: dict[str, Any], *, sample_rate_hz: float, window: int) -> FeatureStep:
    """Build one feature step from its spec; raise BundleError for anything the device cannot run."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind != "band_energy":
        raise BundleError(f"unknown feature step {kind!r}", reason="malformed")
    if sample_rate_hz <= 0:
        raise BundleError("band_energy needs the spec's sample_rate_hz", reason="malformed")
    try:
        bands = tuple((float(low), float(high)) for low, high in spec["bands_hz"])
        taper = str(spec.get("window_fn", "none"))
        log = bool(spec.get("log", False))
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"band_energy spec is invalid: {exc}", reason="malformed") from exc
    nyquist = sample_rate_hz / 2.0
    if not 1 <= len(bands) <= MAX_BANDS:
        raise BundleError(f"band_energy needs 1 to {MAX_BANDS} bands", reason="malformed")
    if any(not (0.0 <= low < high) or low >= nyquist for low, high in bands):
        raise BundleError(f"band_energy bands must satisfy 0 <= low < high and low < {nyquist:g} Hz",
                          reason="malformed")
    if taper not in ("none", "hann"):
        raise BundleError(f"band_energy window_fn must be none or hann, not {taper!r}", reason="malformed")
    return BandEnergy(bands, sample_rate_hz, window, taper, log)

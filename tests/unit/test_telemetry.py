"""Mergeable latency histograms: quantiles within the bucket resolution, merges equal to one big histogram."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram, confidence_bin


def test_quantiles_are_within_resolution_of_numpy() -> None:
    values = np.random.default_rng(1).lognormal(mean=0.0, sigma=1.0, size=5000)
    hist = LatencyHistogram()
    for v in values:
        hist.add(float(v))
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(values, q))
        assert hist.quantile(q) == pytest.approx(exact, rel=0.05)


def test_merged_halves_equal_the_whole_and_survive_json() -> None:
    values = np.random.default_rng(2).uniform(0.1, 20.0, size=1000)
    whole, first, second = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for i, v in enumerate(values):
        whole.add(float(v))
        (first if i % 2 else second).add(float(v))
    merged = LatencyHistogram.from_json(first.to_json())
    merged.merge(LatencyHistogram.from_json(second.to_json()))
    assert merged.buckets == whole.buckets and merged.count == 1000


def test_empty_histogram_and_extremes() -> None:
    hist = LatencyHistogram()
    assert hist.quantile(0.99) is None
    hist.add(float("inf"))
    hist.add(0.0)
    assert hist.count == 2
    with pytest.raises(ValueError):
        LatencyHistogram.from_json({"-1": 3})


def test_confidence_bins_cover_zero_to_one() -> None:
    assert confidence_bin(0.0) == 0
    assert confidence_bin(1.0) == CONFIDENCE_BINS - 1
    assert confidence_bin(float("nan")) == 0


def test_the_wire_form_is_dense_when_latencies_are_close_and_reads_back_exactly() -> None:
    from edgefleet.core.telemetry import LatencyHistogram
    from edgefleet.transport.schemas import TelemetryBatch

    close = LatencyHistogram()
    for i in range(600):
        close.add(0.2 + 0.3 * (i % 50) / 50)  # a model's latencies: 0.2 to 0.5 ms, dozens of 2% buckets
    wire = close.to_wire()
    assert isinstance(wire, list) and wire[0] == close.scale
    assert len(json.dumps(wire)) * 2 < len(json.dumps(close.to_json()))
    assert LatencyHistogram.from_wire(wire).to_json() == close.to_json()
    batch = TelemetryBatch.model_validate({"device": "d", "seq": 1, "ts": 1.0, "windows": 600, "latency_ms": wire})
    assert batch.latency_ms == close.to_json(), "the server keeps the sparse map whatever came on the wire"
    apart = LatencyHistogram()
    apart.add(0.01)
    apart.add(5000.0)
    assert apart.to_wire() == [1, 117, 1, -661, 1], "a run of empty buckets is one number"
    assert LatencyHistogram.from_wire(apart.to_wire()).to_json() == apart.to_json()
    assert LatencyHistogram({5: 1}, scale=0).to_wire() == {"5": 1}, "the old scale's single bucket stays a map"
    gappy = LatencyHistogram({100: 3, 101: 1, 103: 2, 140: 5}, scale=1)
    assert gappy.to_wire() == [1, 100, 3, 1, 0, 2, -36, 5]
    assert LatencyHistogram.from_wire(gappy.to_wire()).to_json() == gappy.to_json()
    for bad in ([1, 2], [9, 0, 1], [1, -1, 1], [1, 1249, 1, 1, 1]):
        with pytest.raises(ValueError):
            LatencyHistogram.from_wire(bad)

"""Integration test of the skeleton build on the real BasicMotions data (needs torch and sktime)."""

from __future__ import annotations

import pytest

from edgefleet.data.basicmotions import load_basicmotions

pytest.importorskip("torch")
pytest.importorskip("sktime")

from edgefleet.build.skeleton import build_basicmotions_model


@pytest.mark.train
def test_build_basicmotions_short_training() -> None:
    """A short training run already classifies the test windows well, int8 loses at most 5 points and is
    smaller than float, and the preprocess contract carries everything the device needs."""
    rec = load_basicmotions()
    build = build_basicmotions_model(rec, window=40, hop=5, epochs=12, seed=0)
    assert build.float_metrics.accuracy >= 0.75
    assert build.int8_metrics.accuracy >= build.float_metrics.accuracy - 0.05
    assert build.int8_metrics.size_bytes < build.float_metrics.size_bytes
    assert build.labels == ("badminton", "running", "standing", "walking")
    pre = build.preprocess
    assert set(pre) == {"kind", "channels", "window", "hop", "sample_rate_hz", "mean", "std"}
    assert (pre["kind"], pre["channels"], pre["window"], pre["hop"]) == ("sliding_window", 6, 40, 5)
    assert pre["sample_rate_hz"] == 10.0
    assert len(pre["mean"]) == len(pre["std"]) == 6

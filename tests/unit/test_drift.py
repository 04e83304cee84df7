"""Input drift against the training statistics: near zero on training-like input, rising with a shift of the
mean or the spread, PSI against a reference histogram, and the buffered tracker equals a direct computation."""

from __future__ import annotations

import numpy as np
import pytest

from edgefleet.core.drift import DriftTracker, Reference, reference_histogram


def feed(tracker: DriftTracker, z: np.ndarray, hop: int = 5) -> None:
    for start in range(0, z.shape[1], hop):
        tracker.update(z[:, start : start + hop])


def test_training_like_input_shows_no_drift() -> None:
    z = np.random.default_rng(0).standard_normal((3, 20_000)).astype(np.float32)
    tracker = DriftTracker(3)
    feed(tracker, z)
    snap = tracker.snapshot()
    assert snap is not None and snap.n == 20_000
    assert max(abs(m) for m in snap.mean_z) < 0.05
    assert all(abs(s - 1.0) < 0.05 for s in snap.std_ratio)
    assert snap.score < 0.1 and snap.psi is None


@pytest.mark.parametrize("shift", [0.5, 1.0, 2.0])
def test_the_drift_score_rises_with_a_mean_shift(shift: float) -> None:
    rng = np.random.default_rng(1)
    z = rng.standard_normal((2, 5000))
    z[1] += shift
    tracker = DriftTracker(2)
    feed(tracker, z)
    snap = tracker.snapshot()
    assert snap is not None
    assert snap.mean_z[1] == pytest.approx(shift, abs=0.1)
    assert snap.score == pytest.approx(shift, abs=0.1)
    assert abs(snap.mean_z[0]) < 0.1


def test_a_change_of_spread_shows_in_the_std_ratio() -> None:
    z = 3.0 * np.random.default_rng(2).standard_normal((1, 5000))
    tracker = DriftTracker(1)
    feed(tracker, z)
    snap = tracker.snapshot()
    assert snap is not None and snap.std_ratio[0] == pytest.approx(3.0, rel=0.05)
    assert snap.score == pytest.approx(np.log(3.0), rel=0.05)


def test_psi_against_a_reference_is_small_in_distribution_and_large_after_a_shift() -> None:
    rng = np.random.default_rng(3)
    train = rng.exponential(1.0, (2, 50_000)) - 1.0  # skewed: not a normal distribution
    reference = Reference.from_spec(reference_histogram(train), 2)
    assert reference is not None
    same, shifted = DriftTracker(2, reference), DriftTracker(2, reference)
    feed(same, rng.exponential(1.0, (2, 10_000)) - 1.0)
    feed(shifted, rng.exponential(1.0, (2, 10_000)) - 0.5)
    psi_same, psi_shifted = same.snapshot().psi, shifted.snapshot().psi  # type: ignore[union-attr]
    assert psi_same is not None and psi_shifted is not None
    assert psi_same < 0.01
    assert psi_shifted > 0.1


def test_buffering_does_not_change_the_statistics() -> None:
    z = np.random.default_rng(4).standard_normal((2, 10_000)) * 2 + 1
    small, direct = DriftTracker(2, buffer_samples=7), DriftTracker(2, buffer_samples=100_000)
    feed(small, z, hop=5)
    feed(direct, z, hop=5)
    a, b = small.snapshot(), direct.snapshot()
    assert a is not None and b is not None and a.n == b.n == 10_000
    np.testing.assert_allclose(a.mean_z, b.mean_z, rtol=1e-6)
    np.testing.assert_allclose(a.std_ratio, b.std_ratio, rtol=1e-6)


def test_reset_starts_a_new_batch_and_an_empty_one_has_no_snapshot() -> None:
    tracker = DriftTracker(1)
    assert tracker.snapshot() is None
    tracker.update(np.ones((1, 10)))
    tracker.reset()
    assert tracker.snapshot() is None


def test_an_unusable_reference_is_ignored() -> None:
    assert Reference.from_spec(None, 2) is None
    assert Reference.from_spec({"edges": [0.0], "fractions": [[0.5, 0.5]]}, 2) is None  # one channel, not two
    assert Reference.from_spec({"edges": [1.0, 0.0], "fractions": [[0.3, 0.3, 0.4]]}, 1) is None

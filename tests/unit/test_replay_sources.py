"""``npz:`` replays the test rows of the very data file given to ``edgefleet build --data``, shaped by the model
it feeds: a time series as one sample stream whose windows line up with the rows, images and vectors one row per
inference; the agent's pipeline makes of them exactly the model input the build made of the rows
(``build.io_pipeline.model_input``). The demo's recordings files keep streaming as before."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.inference import InferencePipeline
from edgefleet.agent.model import LoadedModel, load_model
from edgefleet.agent.sources import ReplaySource, open_source
from edgefleet.build.io_pipeline import model_input
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.data.basicmotions import save_npz
from edgefleet.errors import ConfigError, DataError
from edgefleet.runtime.inputs import ImageInput, SeriesInput, VectorInput, input_step
from edgefleet.runtime.preprocess import StreamWindower
from edgefleet.testing import synthetic
from edgefleet.testing.linear import linear_model, predictions

KEY = SigningKey.generate()
INF = "speed=inf"


def loaded(model: bytes, labels: list[str], preprocess: dict[str, Any] | None = None) -> LoadedModel:
    """Packed (pipeline inferred from the model unless given), signed, verified and loaded as the agent does."""
    bundle = pack_bundle(model, KEY, BundleSpec(name="clf", version="1.0.0", labels=labels,
                                                preprocess=preprocess or {}))
    return load_model(decide(bundle, TrustState(keys={KEY.public.key_id: KEY.public})))


def data_file(path: Path, test_x: np.ndarray, test_y: np.ndarray, **extra: Any) -> Path:
    """A build data file: calib_x, test_x, test_y (and labels, sample_rate_hz when given)."""
    np.savez(path, calib_x=test_x[:2], test_x=test_x, test_y=test_y, **extra)
    return path


def half_right(predicted: np.ndarray, classes: int) -> np.ndarray:
    """Labels that agree with the model's prediction on even rows only: the accuracy to expect is 1/2-ish."""
    y = predicted.copy()
    y[1::2] = (y[1::2] + 1) % classes
    return y.astype(np.int64)


def run(source: ReplaySource, model: LoadedModel) -> InferencePipeline:
    """What Agent.run does with a replay: bind it to the model's input step, then push every block."""
    pipeline = InferencePipeline(model, source=source)
    source.bind(model.pipeline.inputs)
    for block in itertools.islice(source.blocks(), 10_000):
        pipeline.push_block(block)
    return pipeline


def test_a_series_data_file_gives_one_window_per_row_with_the_rows_labels(tmp_path: Path) -> None:
    rec = synthetic.recordings(per_class=3, length=synthetic.WINDOW)  # 12 rows [6, 20]
    model = synthetic.channel_mean_model()
    y = half_right(predictions(model, rec.test_x), synthetic.CLASSES)
    path = data_file(tmp_path / "data.npz", rec.test_x, y, labels=np.array(synthetic.LABELS), sample_rate_hz=50.0)
    source = open_source(f"npz:{path}?{INF}")
    assert isinstance(source, ReplaySource) and source.waits_for_model
    assert source.labels == synthetic.LABELS
    clf = loaded(model, list(synthetic.LABELS))  # inferred pipeline: window 20, hop 20, no sample rate
    pipeline = run(source, clf)
    stats = pipeline.stats
    assert stats.windows == stats.labelled == len(y), "a window straddling two rows would carry no label"
    assert stats.correct == int((y == predictions(model, rec.test_x)).sum()) == len(y) // 2
    assert pipeline.skipped == source.skipped == 0


def test_series_windows_are_what_the_build_made_of_the_rows_when_the_pipeline_scales(tmp_path: Path) -> None:
    rec = synthetic.recordings(per_class=2, length=synthetic.WINDOW)
    spec = {**synthetic.preprocess_spec(hop=synthetic.WINDOW), "mean": [1, 2, 3, 4, 5, 6], "std": [2, 2, 3, 3, 4, 4]}
    step = input_step(spec)
    assert isinstance(step, SeriesInput)
    source = open_source(f"npz:{data_file(tmp_path / 'd.npz', rec.test_x, rec.test_y)}?{INF}")
    source.bind(step)
    windower = StreamWindower(step.window)
    windows = [w for block in source.blocks() for w in windower.push_block(block.values, block.labels)]
    assert [w.label for w in windows] == rec.test_y.tolist()
    np.testing.assert_allclose(np.concatenate([w.x for w in windows]), model_input(step, rec.test_x),
                               rtol=1e-6, atol=1e-6)


def test_the_series_rate_is_the_bundles_then_the_files_and_rate_wins(tmp_path: Path) -> None:
    rec = synthetic.recordings(per_class=1, length=10)
    path = data_file(tmp_path / "d.npz", rec.test_x, rec.test_y, sample_rate_hz=50.0)
    with_rate = input_step(synthetic.preprocess_spec(window=10, hop=10, rate_hz=20.0))
    without = input_step(synthetic.preprocess_spec(window=10, hop=10, rate_hz=0.0))
    source = open_source(f"npz:{path}")
    assert isinstance(source, ReplaySource)
    source.bind(without)
    assert source.rate_hz == 50.0
    source.bind(with_rate)
    assert source.rate_hz == 20.0
    for spec, rate in ((f"npz:{path}?rate=5&speed=2", 10.0), (f"npz:{path}?speed=3", 60.0)):
        source = open_source(spec)
        assert isinstance(source, ReplaySource)
        source.bind(with_rate)
        assert source.rate_hz == rate
    np.savez(tmp_path / "bare.npz", calib_x=rec.test_x, test_x=rec.test_x, test_y=rec.test_y)
    bare = open_source(f"npz:{tmp_path / 'bare.npz'}")
    assert isinstance(bare, ReplaySource)
    bare.bind(without)
    assert bare.rate_hz == 10.0


def test_the_replay_paces_at_the_bound_rate() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    rec = synthetic.recordings(per_class=1, length=10)  # 4 rows of 10 samples
    source = ReplaySource(rec.test_x, rec.test_y, 10.0, loop=False, clock=lambda: now[0], sleep=sleep)
    source.bind(input_step(synthetic.preprocess_spec(window=10, hop=10, rate_hz=20.0)))
    assert sum(len(b) for b in source.blocks()) == 40
    assert now[0] == pytest.approx(39 / 20)


def test_an_image_data_file_replays_rows_as_frames_the_model_sees_unchanged(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rows = rng.random((9, 3, 8, 6), dtype=np.float32)  # NCHW, as the model takes them
    model = linear_model([3, 8, 6], 4)
    y = half_right(predictions(model, rows), 4)
    path = data_file(tmp_path / "img.npz", rows, y, labels=np.array(["a", "b", "c", "d"]))
    clf = loaded(model, ["a", "b", "c", "d"])
    step = clf.pipeline.inputs
    assert isinstance(step, ImageInput) and step.layout == "NCHW"
    source = open_source(f"npz:{path}?{INF}")
    assert isinstance(source, ReplaySource)
    source.bind(step)
    assert source.rate_hz == float("inf")
    blocks = list(source.blocks())
    frames = np.concatenate([b.values for b in blocks])
    assert frames.shape == (9, 8, 6, 3), "one frame [h, w, c] per row"
    np.testing.assert_array_equal(step.apply(frames), rows)
    assert np.concatenate([b.labels for b in blocks if b.labels is not None]).tolist() == y.tolist()

    pipeline = run(open_source(f"npz:{path}?{INF}"), clf)  # type: ignore[arg-type]
    assert pipeline.stats.windows == pipeline.stats.labelled == 9
    assert pipeline.stats.correct == int((y == predictions(model, rows)).sum())


def test_image_frames_give_what_the_build_made_of_the_rows_through_colour_order_and_scaling(
        tmp_path: Path) -> None:
    rows = np.random.default_rng(2).integers(0, 256, size=(5, 3, 4, 4)).astype(np.float32)  # raw, NCHW
    step = input_step({"kind": "image", "height": 4, "width": 4, "channels": 3, "color": "bgr", "scale": 1 / 255,
                       "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.25]})
    source = open_source(f"npz:{data_file(tmp_path / 'd.npz', rows, np.zeros(5, dtype=np.int64))}?{INF}")
    source.bind(step)
    frames = np.concatenate([b.values for b in source.blocks()])
    assert frames.shape == (5, 4, 4, 3)
    np.testing.assert_array_equal(step.apply(frames), model_input(step, rows))


def test_a_vector_data_file_replays_one_row_per_inference_at_rate(tmp_path: Path) -> None:
    rows = np.random.default_rng(3).normal(size=(7, 5)).astype(np.float32)
    model = linear_model([5], 3)
    y = half_right(predictions(model, rows), 3)
    path = data_file(tmp_path / "vec.npz", rows, y)
    clf = loaded(model, ["x", "y", "z"])
    assert isinstance(clf.pipeline.inputs, VectorInput)
    source = open_source(f"npz:{path}")
    assert isinstance(source, ReplaySource)
    source.bind(clf.pipeline.inputs)
    assert source.rate_hz == 10.0
    fast = open_source(f"npz:{path}?{INF}")
    pipeline = run(fast, clf)  # type: ignore[arg-type]
    assert pipeline.stats.windows == pipeline.stats.labelled == 7
    assert pipeline.stats.correct == int((y == predictions(model, rows)).sum())

    standardized = input_step({"kind": "vector", "features": 5, "mean": [1, 2, 3, 4, 5], "std": [1, 2, 3, 4, 5]})
    source = open_source(f"npz:{path}?{INF}")
    source.bind(standardized)
    np.testing.assert_array_equal(standardized.apply(np.concatenate([b.values for b in source.blocks()])),
                                  model_input(standardized, rows))


def test_a_build_data_file_plays_once_and_a_recordings_file_loops(tmp_path: Path) -> None:
    rec = synthetic.recordings(per_class=1, length=10)
    path = data_file(tmp_path / "d.npz", rec.test_x, rec.test_y)
    assert sum(1 for _ in open_source(f"npz:{path}?{INF}").readings()) == 40
    looped = itertools.islice(open_source(f"npz:{path}?{INF}&loop=1").readings(), 100)
    assert sum(1 for _ in looped) == 100
    save_npz(rec, tmp_path / "rec.npz")
    recordings = open_source(f"npz:{tmp_path / 'rec.npz'}?{INF}")
    assert recordings.waits_for_model and recordings.labels == synthetic.LABELS
    readings = list(itertools.islice(recordings.readings(), 100))
    assert len(readings) == 100, "a recordings file loops by default, as the demo expects"
    assert [r.label for r in readings[:40:10]] == rec.test_y.tolist()
    np.testing.assert_array_equal(readings[41].values, rec.test_x[0, :, 1])
    once = open_source(f"npz:{tmp_path / 'rec.npz'}?{INF}&loop=0&shard=1/2")
    assert sum(1 for _ in once.readings()) == 20


def test_a_new_model_mid_replay_starts_at_the_next_row() -> None:
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += seconds

    rec = synthetic.recordings(per_class=1, length=10)
    source = ReplaySource(rec.test_x, rec.test_y, 10.0, loop=False, clock=lambda: now[0], sleep=sleep)
    step = input_step(synthetic.preprocess_spec(window=10, hop=10))
    source.bind(step)
    blocks = source.blocks()
    first = [next(blocks) for _ in range(4)]  # paced: one sample each, 4 of row 0's 10
    assert sum(len(b) for b in first) == 4
    source.bind(step)  # a new model (the agent binds again when it changes)
    block = next(blocks)
    assert block.labels is not None and block.labels[0] == rec.test_y[1]
    np.testing.assert_array_equal(block.values[0], rec.test_x[1, :, 0])
    assert sum(len(b) for b in blocks) + len(block) == 30


def test_non_finite_frames_are_skipped_and_counted() -> None:
    rows = np.random.default_rng(4).random((5, 4, 4, 3)).astype(np.float32)  # frames [h, w, c]
    rows[1, 2, 2, 0] = np.nan
    rows[3, 0, 0, 1] = np.inf
    source = ReplaySource(rows, np.arange(5), 10.0, speed=float("inf"), loop=False)
    kept = list(source.blocks())
    assert [b.labels.tolist() for b in kept if b.labels is not None] == [[0, 2, 4]]
    assert kept[0].values.shape == (3, 4, 4, 3) and source.skipped == 2
    frames = ReplaySource(rows, np.arange(5), 10.0, speed=float("inf"), loop=False)
    assert [r.label for r in frames.readings()] == [0, 2, 4] and frames.skipped == 2


def test_bad_replay_specs_and_files_are_one_line_errors(tmp_path: Path) -> None:
    rec = synthetic.recordings(per_class=1, length=10)
    path = data_file(tmp_path / "d.npz", rec.test_x, rec.test_y)
    for spec in (f"npz:{path}?sped=2", f"npz:{path}?loop=2", f"npz:{path}?rate=0", f"npz:{path}?shard=3/2",
                 f"npz:{path}?speed=fast"):
        with pytest.raises(ConfigError):
            open_source(spec)
    np.savez(tmp_path / "no_y.npz", calib_x=rec.test_x, test_x=rec.test_x)
    with pytest.raises(DataError, match="test_y"):
        open_source(f"npz:{tmp_path / 'no_y.npz'}")
    np.savez(tmp_path / "float_y.npz", test_x=rec.test_x, test_y=rec.test_y.astype(np.float32))
    with pytest.raises(DataError, match="integer labels"):
        open_source(f"npz:{tmp_path / 'float_y.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError):
        open_source(f"npz:{tmp_path / 'junk.npz'}")

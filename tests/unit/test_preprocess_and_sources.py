"""On-device preprocessing matches build-time windowing, and sources skip bad input without stopping."""

from __future__ import annotations

import io

import numpy as np

from edgefleet.agent.sources import CsvSource, JsonLinesSource, ReplaySource, open_source
from edgefleet.data.windows import sliding_windows
from edgefleet.runtime.preprocess import StreamWindower, WindowSpec
from edgefleet.testing import synthetic


def test_stream_windows_equal_build_time_windows_on_pure_labels() -> None:
    rec = synthetic.recordings(length=60)
    spec = WindowSpec.from_manifest(synthetic.preprocess_spec(window=20, hop=10))
    expected_x, expected_y = sliding_windows(rec.test_x, rec.test_y, 20, 10)
    windower = StreamWindower(spec)
    got = []
    source = ReplaySource(rec.test_x, rec.test_y, 10.0, speed=float("inf"), loop=False)
    for reading in source.readings():
        window = windower.push(reading.values, reading.label)
        if window is not None and window.label is not None:
            got.append((window.x[0], window.label))
    assert len(got) == len(expected_x)
    for (x, label), ex, ey in zip(got, expected_x, expected_y, strict=True):
        assert label == ey
        np.testing.assert_allclose(x, ex, rtol=1e-6)


def test_replay_paces_samples_at_the_recorded_rate() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    rec = synthetic.recordings(per_class=1, length=10)
    source = ReplaySource(rec.test_x, rec.test_y, 10.0, loop=False, clock=lambda: now[0], sleep=sleep)
    assert sum(1 for _ in source.readings()) == 40
    assert now[0] == np.float64(3.9) or abs(now[0] - 3.9) < 1e-9


def test_jsonl_source_skips_malformed_lines_and_nan() -> None:
    lines = '{"values": [1, 2]}\nnot json\n{"values": [1, NaN]}\n{"values": "x"}\n\n{"values": [3, 4], "label": 1}\n'
    source = JsonLinesSource(io.StringIO(lines))
    readings = list(source.readings())
    assert [r.values.tolist() for r in readings] == [[1.0, 2.0], [3.0, 4.0]]
    assert readings[1].label == 1
    assert source.skipped == 3


def test_csv_source_reads_a_label_column_and_skips_bad_rows() -> None:
    text = "ax,ay,label\n1,2,0\n3,oops,1\n5,6,1\n"
    source = CsvSource(io.StringIO(text))
    readings = list(source.readings())
    assert [(r.values.tolist(), r.label) for r in readings] == [([1.0, 2.0], 0), ([5.0, 6.0], 1)]
    assert source.skipped == 1


def test_unknown_source_kind_is_a_config_error() -> None:
    import pytest

    from edgefleet.errors import ConfigError

    with pytest.raises(ConfigError):
        open_source("camera:/dev/video0")
    with pytest.raises(ConfigError):
        open_source("npz:/nonexistent.npz?shard=5/2")

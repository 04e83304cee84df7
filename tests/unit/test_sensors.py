"""Sensor sources: the vibration generator puts bearing-fault frequencies where the geometry says, and every
source skips (and counts) corrupt or missing readings without stopping the stream."""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.inference import InferencePipeline
from edgefleet.agent.model import LoadedModel, load_model
from edgefleet.agent.sensors.vibration import BearingGeometry, VibrationSignal, VibrationSource, fault_frequency
from edgefleet.agent.sources import CsvSource, JsonLinesSource, Pacer, open_source
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import ConfigError
from edgefleet.testing import synthetic

RATE = 4000.0
SECONDS = 4.0
RPM = 1797.0
KEY = SigningKey.generate()


def loaded_model(preprocess: dict[str, Any] | None = None) -> LoadedModel:
    """The synthetic channel-mean classifier, signed, verified and loaded as the agent would."""
    bundle = pack_bundle(synthetic.channel_mean_model(), KEY, BundleSpec(
        name="clf", version="1.0.0", labels=list(synthetic.LABELS),
        preprocess=preprocess or synthetic.preprocess_spec()))
    return load_model(decide(bundle, TrustState(keys={KEY.public.key_id: KEY.public})))


def spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = x - x.mean()
    return np.fft.rfftfreq(len(x), 1.0 / RATE), np.abs(np.fft.rfft(x * np.hanning(len(x))))


def peak_near(freqs: np.ndarray, amps: np.ndarray, target: float, tolerance_hz: float = 1.0) -> float:
    """How far the largest bin within ``tolerance_hz`` of ``target`` stands above the median of its neighbourhood."""
    near = np.abs(freqs - target) <= tolerance_hz
    around = (np.abs(freqs - target) <= 15.0) & ~near
    return float(amps[near].max() / np.median(amps[around]))


def signal(fault: str, seed: int = 0) -> VibrationSignal:
    return VibrationSignal(RATE, RPM, fault, noise=0.05, seed=seed)


def test_fault_frequencies_match_the_cwru_bearing_table() -> None:
    # The CWRU data set lists the 6205-2RS drive-end bearing's defect frequencies as multiples of running speed.
    shaft = RPM / 60.0
    f = BearingGeometry().frequencies(shaft)
    assert f["bpfi"] / shaft == pytest.approx(5.4152, abs=1e-3)
    assert f["bpfo"] / shaft == pytest.approx(3.5848, abs=1e-3)
    assert f["ftf"] / shaft == pytest.approx(0.39828, abs=1e-3)
    assert 2 * f["bsf"] / shaft == pytest.approx(4.7135, abs=1e-3)
    assert fault_frequency("ball", shaft) == pytest.approx(2 * f["bsf"])


@pytest.mark.parametrize("fault, key", [("outer_race", "bpfo"), ("inner_race", "bpfi")])
def test_a_fault_shows_as_sidebands_around_the_shaft_harmonics_and_in_the_envelope(fault: str, key: str) -> None:
    gen = signal(fault)
    x, faulty = gen.block(int(RATE * SECONDS))
    assert faulty.all()
    freqs, amps = spectrum(x[:, 0].astype(np.float64))
    shaft, fault_hz = gen.shaft_hz, gen.frequencies[key]
    assert peak_near(freqs, amps, shaft) > 20  # 1x running speed
    assert peak_near(freqs, amps, 2 * shaft) > 20
    assert peak_near(freqs, amps, shaft + fault_hz) > 5  # upper sideband of 1x
    assert peak_near(freqs, amps, 2 * shaft + fault_hz) > 5  # upper sideband of 2x
    # envelope (squared signal) spectrum: the impact rate itself is among its two strongest lines off the shaft
    env_freqs, envelope = spectrum((x[:, 0].astype(np.float64)) ** 2)
    off_shaft = (env_freqs > 40) & (env_freqs < 400) & (np.abs(env_freqs / shaft - np.round(env_freqs / shaft)) > 0.1)
    strongest = env_freqs[off_shaft][np.argsort(envelope[off_shaft])[-2:]]
    assert np.min(np.abs(strongest - fault_hz)) < 0.5
    assert peak_near(env_freqs, envelope, fault_hz) > 5


def test_a_healthy_machine_has_no_fault_sidebands() -> None:
    gen = signal("none")
    x, faulty = gen.block(int(RATE * SECONDS))
    assert not faulty.any()
    freqs, amps = spectrum(x[:, 0].astype(np.float64))
    bpfo = gen.frequencies["bpfo"]
    assert peak_near(freqs, amps, gen.shaft_hz) > 20
    assert peak_near(freqs, amps, gen.shaft_hz + bpfo) < 4


def test_blocks_join_into_one_continuous_signal() -> None:
    whole, _ = signal("outer_race", seed=3).block(3000)
    parts = signal("outer_race", seed=3)
    joined = np.concatenate([parts.block(1000)[0], parts.block(1234)[0], parts.block(766)[0]])
    np.testing.assert_array_equal(whole, joined)  # impacts ringing across a block boundary included


def test_vibration_spec_labels_the_fault_once_it_starts() -> None:
    source = open_source("vibration:?rate=1000&fault=inner_race&fault_after=1&duration=2&speed=inf&channels=3")
    assert isinstance(source, VibrationSource)
    readings = list(source.readings())
    assert len(readings) == 2000 and readings[0].values.shape == (3,)
    assert source.labels == ("normal", "fault")
    assert [r.label for r in readings[:1000]] == [0] * 1000
    assert [r.label for r in readings[1000:]] == [1] * 1000


def test_vibration_spec_errors_are_config_errors() -> None:
    for spec in ("vibration:?fault=cracked", "vibration:?rate=-1", "vibration:?rate=abc", "vibration:?colour=red",
                 "vibration:?channels=9"):
        with pytest.raises(ConfigError):
            open_source(spec)


def test_pacer_spaces_items_at_the_rate() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    pacer = Pacer(100.0, lambda: now[0], sleep)
    for _ in range(5):
        pacer.wait()
    assert now[0] == pytest.approx(0.04)
    Pacer(math.inf, lambda: 0.0, lambda s: pytest.fail("an infinite rate must never sleep")).wait()


def test_corrupt_lines_and_nan_readings_are_skipped_counted_and_the_stream_goes_on() -> None:
    lines = "".join(['{"values": [1, 2, 3, 4, 5, 6]}\n', "{not json\n", '{"values": [1, NaN, 3, 4, 5, 6]}\n',
                     '{"values": [NaN, NaN, NaN, NaN, NaN, NaN]}\n', '{"values": "text"}\n', "\x00\xff garbage\n",
                     '{"values": [1, Infinity, 3, 4, 5, 6]}\n', '{"values": [6, 5, 4, 3, 2, 1], "label": 2}\n'])
    source = JsonLinesSource(io.StringIO(lines))
    readings = list(source.readings())
    assert [r.values.tolist() for r in readings] == [[1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1]]
    assert source.skipped == 6


def test_partially_missing_readings_pass_only_when_the_consumer_imputes() -> None:
    lines = '{"values": [1, null, 3]}\n{"values": [1, Infinity, 3]}\n{"values": [null, null, null]}\n'
    source = JsonLinesSource(io.StringIO(lines))
    source.allow_missing = True
    readings = list(source.readings())
    assert len(readings) == 2 and all(r.missing for r in readings)
    assert np.isnan(readings[1].values[1])  # infinity is treated as missing
    assert source.skipped == 1 and source.partial == 2


def test_an_empty_csv_cell_is_a_missing_value() -> None:
    source = CsvSource(io.StringIO("a,b,c\n1,,3\n4,5,6\n"))
    assert [r.values.tolist() for r in source.readings()] == [[4.0, 5.0, 6.0]]
    assert source.skipped == 1
    source = CsvSource(io.StringIO("a,b,c\n1,,3\n4,5,6\n"))
    source.allow_missing = True
    readings = list(source.readings())
    assert readings[0].missing and np.isnan(readings[0].values[1])


def test_a_pipeline_tells_its_source_whether_to_pass_missing_values() -> None:
    imputing = dict(synthetic.preprocess_spec(), missing={"strategy": "hold"})
    plain_source = JsonLinesSource(io.StringIO(""))
    InferencePipeline(loaded_model(), source=plain_source)
    assert plain_source.allow_missing is False
    imputing_source = JsonLinesSource(io.StringIO(""))
    InferencePipeline(loaded_model(preprocess=imputing), source=imputing_source)
    assert imputing_source.allow_missing is True


def test_the_loop_keeps_running_over_bad_readings_and_reports_them_as_skipped() -> None:
    rec = synthetic.recordings(per_class=1, length=40)
    good = [{"values": rec.test_x[0, :, t].tolist(), "label": 0} for t in range(40)]
    lines = []
    for i, record in enumerate(good):
        lines.append(json.dumps(record))
        if i % 10 == 5:
            lines += ["garbage", '{"values": [1, 2]}', '{"values": [NaN, 0, 0, 0, 0, 0]}']
    source = JsonLinesSource(io.StringIO("\n".join(lines) + "\n"))
    pipeline = InferencePipeline(loaded_model(), source=source)
    outcomes = [o for r in source.readings() if (o := pipeline.push(r)) is not None]
    assert len(outcomes) == 3  # windows of 20 every 10 over 40 good samples
    batch = pipeline.take_batch("d1", 0, 0.0, source.skipped)
    assert batch.skipped == 12 and batch.windows == 3 and batch.correct == 3

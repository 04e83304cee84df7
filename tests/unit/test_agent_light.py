"""The agent's light path: block windowing equals sample-by-sample windowing, blocks are validated like
readings, the compact telemetry still means the same to the server, desired states decode without pydantic,
stored bundles are re-verified in a child process, and the agent process loads no heavy module."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgefleet.agent.main import command, parse_args
from edgefleet.agent.sources import NO_LABEL, Block, Reading, SensorSource
from edgefleet.agent.stats import TelemetryReport, WindowStats
from edgefleet.agent.verify import TrustSpec, verify_stored
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.drift import DriftSnapshot
from edgefleet.core.gates import CohortStats
from edgefleet.errors import BundleError, ConfigError, TransportError
from edgefleet.runtime.preprocess import StreamWindower, WindowSpec
from edgefleet.testing import synthetic
from edgefleet.transport.messages import DesiredState, DesiredUpdate, ModelRef, TelemetryBatch, encode, parse

KEY = SigningKey.generate()


def spec(channels: int, window: int, hop: int, seed: int = 0) -> WindowSpec:
    rng = np.random.default_rng(seed)
    return WindowSpec.from_manifest({"kind": "sliding_window", "channels": channels, "window": window, "hop": hop,
                                     "mean": rng.normal(size=channels).tolist(),
                                     "std": (rng.random(channels) + 0.5).tolist()})


@pytest.mark.parametrize(("window", "hop"), [(40, 5), (7, 3), (5, 9), (1, 1), (12, 12)])
def test_block_windowing_gives_exactly_the_windows_of_sample_by_sample_windowing(window: int, hop: int) -> None:
    rng = np.random.default_rng(window * 31 + hop)
    values = rng.normal(size=(700, 3)).astype(np.float32)
    labels = np.repeat(rng.integers(0, 3, 100), 7)
    labels[rng.random(700) < 0.03] = NO_LABEL
    one, many = StreamWindower(spec(3, window, hop)), StreamWindower(spec(3, window, hop))
    expected = [w for i in range(700) if (w := one.push(values[i], None if labels[i] == NO_LABEL
                                                        else int(labels[i]))) is not None]
    got = []
    start = 0
    for size in [1, 2, 50, 3, 100, 1, 200, 343]:
        got += many.push_block(values[start : start + size], labels[start : start + size])
        start += size
    assert len(got) == len(expected) > 0
    for e, g in zip(expected, got, strict=True):
        assert np.array_equal(e.x, g.x) and g.x.flags.c_contiguous
        assert (e.label, e.fresh) == (g.label, g.fresh) and np.array_equal(e.samples, g.samples)


class _Blocks(SensorSource):
    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self._blocks = blocks

    def _raw(self) -> Iterator[Reading | None]:
        for block in self._blocks:
            for row in block.values:
                yield Reading(row)

    def _raw_blocks(self) -> Iterator[Block]:
        yield from self._blocks


@pytest.mark.parametrize("allow_missing", [False, True])
def test_blocks_are_validated_as_readings_are(allow_missing: bool) -> None:
    values = np.ones((6, 3), dtype=np.float32)
    values[1, 0] = np.nan  # partly missing
    values[2, :] = np.nan  # nothing left
    values[4, 2] = np.inf
    by_block, by_reading = _Blocks([Block(values)]), _Blocks([Block(values)])
    by_block.allow_missing = by_reading.allow_missing = allow_missing
    blocks = list(by_block.blocks())
    readings = list(by_reading.readings())
    rows = np.concatenate([b.values for b in blocks])
    assert len(rows) == len(readings) and (by_block.skipped, by_block.partial) == (by_reading.skipped,
                                                                                     by_reading.partial)
    assert np.array_equal(rows, np.stack([r.values for r in readings]), equal_nan=True)
    missing = np.concatenate([b.missing if b.missing is not None else np.zeros(len(b), bool) for b in blocks])
    assert missing.tolist() == [r.missing for r in readings]


def _batch(**fields: object) -> TelemetryReport:
    stats = WindowStats("clf@1.0.0", shadow_model=fields.pop("shadow", None))  # type: ignore[arg-type]
    for _ in range(3):
        stats.record("a", 0.9, 0.5, None)
    return stats.batch("d1", 4, 1.8e9, 0, **fields)  # type: ignore[arg-type]


def test_compact_telemetry_leaves_out_only_what_every_reader_takes_as_zero() -> None:
    batch = _batch()
    wire = json.loads(batch.to_bytes())
    assert "labelled" not in wire and "skipped" not in wire and "shadow_agree" not in wire
    assert wire["escalations"] == {} and wire["windows"] == 3  # absent escalations would read as "unavailable"
    parsed = parse(TelemetryBatch, batch.to_bytes())  # the server's decode entry
    assert parsed.windows == 3 and parsed.labelled == 0 and parsed.shadow_agree == 0 and parsed.escalations == {}
    stats = CohortStats()
    stats.add_batch(wire)
    assert stats.escalations == 0 and stats.windows == 3


def test_a_shadow_batch_always_says_how_often_the_shadow_agreed() -> None:
    wire = json.loads(_batch(shadow="clf@2.0.0").to_bytes())
    assert wire["shadow_agree"] == 0 and wire["shadow_windows"] == 0 and wire["shadow_model"] == "clf@2.0.0"
    shadow = CohortStats()
    shadow.add_batch(wire, shadow=True)
    assert shadow.shadow_agree == 0  # reported as zero, not unavailable (None)


def test_telemetry_with_drift_and_no_model_is_accepted_by_the_server_schema() -> None:
    drift = DriftSnapshot(n=10, mean_z=[0.123456, -1.0], std_ratio=[1.0, 2.0], score=0.5)
    batch = TelemetryReport(device="d1", seq=0, ts=1.8e9, model=None, drift=drift)
    parsed = parse(TelemetryBatch, batch.to_bytes())
    assert parsed.model is None and parsed.drift is not None and parsed.drift.mean_z[0] == 0.12


def test_desired_states_decode_without_pydantic_to_the_same_fields() -> None:
    ref = ModelRef(name="clf", version="1.2.0", release=3, sha256="ab" * 32, size=10, url="/a", delta_size=4)
    payload = DesiredState(device="d1", model=ref, statements=["c3Q="]).to_bytes()
    light = parse(DesiredUpdate, payload)
    assert light.device == "d1" and light.statements == ["c3Q="] and light.shadow is None
    assert light.model is not None and light.model.to_wire() == ref.model_dump(mode="json")
    assert light.model.ref == ref.ref
    for bad in (b"{}", b'{"device": "d1", "model": {"name": "x"}}', b'{"device": "d1", "extra": 1}',
                b'{"device": "d1", "model": {"name": "c", "version": "1", "release": "3", "sha256": "x", '
                b'"size": 1, "url": "/"}}', b"[1]", b"not json"):
        with pytest.raises(TransportError):
            parse(DesiredUpdate, bad)


def test_events_encode_to_what_the_server_schema_accepts() -> None:
    from edgefleet.transport.messages import Event, event_detail

    payload = encode({"device": "d1", "seq": 2, "ts": 1.0, "kind": "alert", "name": "alert",
                      "detail": event_detail({"score": float("nan"), "ok": True, "n": 3, "what": ["x"]})})
    event = parse(Event, payload)
    assert event.detail == {"score": None, "ok": 1, "n": 3, "what": "['x']"}


@pytest.fixture(scope="module")
def stored_bundle() -> bytes:
    return pack_bundle(synthetic.channel_mean_model(), KEY, BundleSpec(name="clf", version="1.0.0",
                                                                       labels=list(synthetic.LABELS)))


def test_stored_bundles_are_verified_again_in_a_child_process(stored_bundle: bytes) -> None:
    trust = TrustSpec(pinned=(KEY.public,))
    verified = verify_stored(stored_bundle, trust, in_process=False)
    here = verify_stored(stored_bundle, trust, in_process=True)
    assert verified == here and verified.info.ref == "clf@1.0.0"
    with pytest.raises(BundleError) as refused:
        verify_stored(stored_bundle, TrustSpec(pinned=(SigningKey.generate().public,)), in_process=False)
    assert refused.value.reason == "unknown_key"
    tampered = bytearray(stored_bundle)
    tampered[-5] ^= 0xFF
    with pytest.raises(BundleError):
        verify_stored(bytes(tampered), trust, in_process=False)


def test_the_agent_options_parse_without_argparse(tmp_path: Path) -> None:
    options = parse_args(["--credentials", str(tmp_path / "c.json"), "--data-dir=" + str(tmp_path), "--source",
                          "jsonl:-", "--duration", "2.5"])
    assert options.duration == 2.5 and options.telemetry_interval == 300.0 and options.data_dir == tmp_path
    with pytest.raises(ConfigError, match="needs --source"):
        parse_args(["--credentials", "c", "--data-dir", "d"])
    with pytest.raises(ConfigError, match="must be a number"):
        parse_args(["--credentials", "c", "--data-dir", "d", "--source", "s", "--duration", "soon"])
    with pytest.raises(ConfigError, match="unknown option"):
        parse_args(["--verbose"])
    assert options.hard_examples_per_hour == 2
    argv = command(tmp_path / "c.json", tmp_path, "jsonl:-", hard_examples_per_hour=25)
    assert parse_args(argv[3:]).hard_examples_per_hour == 25  # what a re-exec passes on
    with pytest.raises(ConfigError, match="--hard-examples-per-hour must be 0 or more"):
        parse_args(["--credentials", "c", "--data-dir", "d", "--source", "s", "--hard-examples-per-hour", "-1"])


def test_the_running_agent_loads_no_pydantic_cryptography_onnx_httpx_or_cli() -> None:
    code = ("import sys, edgefleet.agent.main, edgefleet.agent.agent, edgefleet.agent.sources, "
            "edgefleet.data.basicmotions; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'pydantic', 'cryptography', 'onnx', 'httpx', 'typer', 'rich', 'argparse'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"

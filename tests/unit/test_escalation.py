"""Tiered inference and edge filtering in the pipeline: the upstream answer is used when it comes in time and
the local one otherwise; escalations queue (on disk) while the upstream is down, within a token-bucket budget,
and are delivered when it is back; hard examples are capped; alerts become rate-limited events."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.agent.escalation import EscalationPolicy, EscalationQueue, Escalator, TokenBucket, UpstreamAnswer
from edgefleet.agent.inference import InferencePipeline, PipelineOptions
from edgefleet.agent.model import LoadedModel, load_model
from edgefleet.agent.sources import ReplaySource
from edgefleet.agent.stats import decode_example, encode_example
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import TransportError
from edgefleet.testing import synthetic
from edgefleet.transport.schemas import HardExample

KEY = SigningKey.generate()
FAST_RETRY = EscalationPolicy(deadline_s=5.0, rate_per_s=1000.0, burst=1000.0, retry_base_s=0.01, retry_cap_s=0.05)


def loaded_model(thresholds: dict[str, float] | None = None) -> LoadedModel:
    bundle = pack_bundle(synthetic.channel_mean_model(), KEY, BundleSpec(
        name="clf", version="1.0.0", labels=list(synthetic.LABELS), preprocess=synthetic.preprocess_spec(),
        thresholds=thresholds or {}))
    return load_model(decide(bundle, TrustState(keys={KEY.public.key_id: KEY.public})))


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


class FakeUpstream:
    """An in-memory upstream: answers "beta", or fails while ``down``; ``gate`` holds answers back."""

    def __init__(self) -> None:
        self.down = False
        self.gate: threading.Event | None = None
        self.received: list[bytes] = []

    def infer(self, body: bytes, timeout_s: float) -> UpstreamAnswer:
        if self.gate is not None:
            self.gate.wait(10)
        if self.down:
            raise TransportError("upstream down")
        self.received.append(body)
        return UpstreamAnswer("beta", 0.99, "big@1.0.0")


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def escalator(tmp_path: Path, upstream: FakeUpstream) -> Iterator[Escalator]:
    esc = Escalator(upstream, tmp_path, FAST_RETRY)
    yield esc
    esc.close()


WINDOW = np.zeros((1, 6, 20), dtype=np.float32)


def test_an_answer_in_time_is_used(escalator: Escalator, upstream: FakeUpstream) -> None:
    answer = escalator.resolve(WINDOW, "clf@1.0.0", "alpha", 0.3)
    assert answer == UpstreamAnswer("beta", 0.99, "big@1.0.0")
    assert escalator.take_counts() == {"sent": 1, "answered": 1}
    assert len(upstream.received) == 1


def test_a_late_answer_is_not_used_but_counted(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.gate = threading.Event()
    esc = Escalator(upstream, tmp_path, EscalationPolicy(deadline_s=0.05))
    try:
        assert esc.resolve(WINDOW, "clf@1.0.0", "alpha", 0.3) is None  # the local answer stands
        upstream.gate.set()
        counts: dict[str, int] = {}
        wait_for(lambda: counts.update(esc.take_counts()) or counts.get("late", 0) == 1)
        assert counts["sent"] == 1 and "answered" not in counts
    finally:
        esc.close()


def test_upstream_down_local_answers_used_escalations_queued_then_delivered(
        escalator: Escalator, upstream: FakeUpstream) -> None:
    upstream.down = True
    assert escalator.resolve(WINDOW, "clf@1.0.0", "alpha", 0.3) is None  # tried, failed, queued
    assert not escalator.upstream_up
    for _ in range(4):  # known down: straight to the queue, the sensor loop never waits on the dead peer
        assert escalator.resolve(WINDOW, "clf@1.0.0", "alpha", 0.3) is None
    counts = escalator.take_counts()
    assert counts["sent"] == 1 and counts["failed"] == 1 and counts["queued"] == 5 and counts["pending"] == 5
    upstream.down = False
    wait_for(lambda: len(escalator.queue) == 0)
    assert escalator.upstream_up
    assert escalator.take_counts() == {"delivered": 5}
    assert len(upstream.received) == 5


def test_queued_escalations_survive_a_restart(tmp_path: Path, upstream: FakeUpstream) -> None:
    upstream.down = True
    first = Escalator(upstream, tmp_path, FAST_RETRY)
    for _ in range(3):
        first.resolve(WINDOW, "clf@1.0.0", "alpha", 0.3)
    first.close()
    upstream.down = False
    second = Escalator(upstream, tmp_path, FAST_RETRY)
    try:
        assert not second.upstream_up  # a backlog: the retry thread probes before live requests are sent
        wait_for(lambda: len(second.queue) == 0)
        assert second.take_counts() == {"delivered": 3}
    finally:
        second.close()


def test_the_rate_budget_drops_escalations_beyond_it(tmp_path: Path, upstream: FakeUpstream) -> None:
    now = [0.0]
    esc = Escalator(upstream, tmp_path, EscalationPolicy(rate_per_s=1.0, burst=2.0), clock=lambda: now[0])
    try:
        results = [esc.resolve(WINDOW, "m", "a", 0.1) for _ in range(5)]
        assert sum(r is not None for r in results) == 2
        now[0] += 1.0  # one more token
        assert esc.resolve(WINDOW, "m", "a", 0.1) is not None
        assert esc.take_counts() == {"sent": 3, "answered": 3, "dropped_budget": 3}
    finally:
        esc.close()


def test_token_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, 3.0, lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    now[0] += 0.5
    assert bucket.take() and not bucket.take()
    now[0] += 100.0
    assert sum(bucket.take() for _ in range(10)) == 3


def test_the_queue_is_bounded_and_drops_its_oldest(tmp_path: Path) -> None:
    queue = EscalationQueue(tmp_path / "q.db", max_items=3)
    dropped = [queue.push(f"body-{i}".encode()) for i in range(5)]
    assert dropped == [0, 0, 0, 1, 1] and len(queue) == 3
    oldest = queue.oldest()
    assert oldest is not None and oldest[1] == b"body-2"
    queue.close()


def run_pipeline(pipeline: InferencePipeline, per_class: int = 2, offset: float = 3.0) -> list[Any]:
    rec = synthetic.recordings(per_class=per_class, length=60, offset=offset)
    source = ReplaySource(rec.test_x, rec.test_y, 10.0, speed=float("inf"), loop=False)
    return [o for r in source.readings() if (o := pipeline.push(r)) is not None]


def test_the_pipeline_uses_the_upstream_answer_for_hard_windows(escalator: Escalator) -> None:
    pipeline = InferencePipeline(loaded_model({"escalate_below": 1.01}), escalator=escalator)  # every window
    outcomes = run_pipeline(pipeline)
    assert outcomes and all(o.upstream and o.predicted == "beta" for o in outcomes)
    batch = pipeline.take_batch("d1", 0, 0.0, 0)
    assert batch.escalations == {"sent": len(outcomes), "answered": len(outcomes)}
    assert batch.classes != {"beta": len(outcomes)}  # telemetry describes the local model


def test_only_windows_under_the_confidence_threshold_are_escalated(escalator: Escalator) -> None:
    pipeline = InferencePipeline(loaded_model(), escalator=escalator)  # default: under 0.6
    outcomes = run_pipeline(pipeline)
    batch = pipeline.take_batch("d1", 0, 0.0, 0)
    under = sum(batch.confidence[:12])  # bins of width 0.05: 0.0 .. 0.6
    assert 0 < under < len(outcomes)  # windows across a class change are unsure, the rest are not
    assert sum(o.upstream for o in outcomes) == under == batch.escalations["answered"]


def test_margin_and_entropy_filters_mark_windows_hard() -> None:
    from edgefleet.agent.inference import Thresholds

    close_call = np.array([0.45, 0.44, 0.06, 0.05])
    assert Thresholds(hard_below=0.3, margin_below=0.05).is_hard(0.45, close_call)
    assert not Thresholds(hard_below=0.3).is_hard(0.45, close_call)
    assert Thresholds(hard_below=0.0, entropy_above=0.7).is_hard(0.45, close_call)
    assert not Thresholds(hard_below=0.0, entropy_above=0.7).is_hard(0.97, np.array([0.97, 0.01, 0.01, 0.01]))


def test_hard_examples_are_capped_in_count_and_bytes() -> None:
    options = PipelineOptions(hard_examples=3, hard_example_bytes=100_000, hard_examples_per_hour=None)
    pipeline = InferencePipeline(loaded_model({"escalate_below": 1.01}), options=options)
    outcomes = run_pipeline(pipeline, per_class=4)
    batch = pipeline.take_batch("d1", 0, 0.0, 0)
    assert len(outcomes) > 3 and len(batch.hard_examples) == 3
    example = decode_example(batch.hard_examples[0])
    assert example.shape == (1, 6, 20) and np.all(np.isfinite(example))
    tight = InferencePipeline(loaded_model({"escalate_below": 1.01}),
                              options=PipelineOptions(hard_examples=3, hard_example_bytes=250,
                                                      hard_examples_per_hour=None))
    run_pipeline(tight)
    batch = tight.take_batch("d1", 1, 0.0, 0)
    kept = batch.hard_examples
    assert sum(len(e.data) for e in kept) <= 250 and len(kept) < 3 and batch.hard_left_out == 3 - len(kept)
    assert tight.take_batch("d1", 2, 0.0, 0).hard_examples == []  # a new batch starts empty


def test_hard_examples_stay_under_their_hourly_budget_and_the_rest_is_counted() -> None:
    options = PipelineOptions(hard_examples=2, hard_examples_per_hour=3)
    pipeline = InferencePipeline(loaded_model({"escalate_below": 1.01}), options=options)
    sent = []
    for minute in range(0, 60, 10):  # six batches within one hour: three examples at most
        run_pipeline(pipeline, per_class=1)
        batch = pipeline.take_batch("d1", minute, 1.8e9 + 60 * minute, 0)
        sent.append(len(batch.hard_examples))
        assert len(batch.hard_examples) + batch.hard_left_out == 2
    assert sum(sent) == 3
    run_pipeline(pipeline, per_class=1)
    assert len(pipeline.take_batch("d1", 99, 1.8e9 + 3600 + 60 * 50, 0).hard_examples) == 2  # an hour later


def test_hard_examples_in_int8_are_close_to_the_input_and_float16_still_decodes() -> None:
    x = np.linspace(-3.0, 5.0, 120, dtype=np.float32).reshape(1, 6, 20)
    small = encode_example(x, "alpha", 0.4, 1.8e9)
    assert small.encoding.startswith("i8") and small.scale is not None
    assert np.max(np.abs(decode_example(small) - x)) <= small.scale / 2 + 1e-6
    exact = encode_example(x, "alpha", 0.4, 1.8e9, encoding="f16")
    assert exact.encoding.startswith("f16") and len(exact.data) > len(small.data)
    assert np.allclose(decode_example(exact), x, atol=1e-2)
    wire = HardExample.model_validate(small.to_wire())  # what the server validates the batch with
    assert np.array_equal(decode_example(wire), decode_example(small))


def test_class_alerts_become_events_at_most_once_per_cooldown() -> None:
    now = [0.0]
    options = PipelineOptions(alert_cooldown_s=60.0, clock=lambda: now[0])
    pipeline = InferencePipeline(loaded_model({"alert:gamma": 0.5}), options=options)
    outcomes = run_pipeline(pipeline)
    gamma = [o for o in outcomes if o.alert == "class:gamma"]
    assert gamma and all(o.predicted == "gamma" for o in gamma)
    events = pipeline.take_alerts()
    assert len(events) == 1 and events[0]["reason"] == "class:gamma" and events[0]["windows"] == 1
    now[0] += 61.0
    run_pipeline(pipeline)
    (later,) = pipeline.take_alerts()
    assert later["windows"] == len(gamma)  # every alert window since the last event, this one included
    assert pipeline.take_batch("d1", 0, 0.0, 0).alerts == {"class:gamma": 2 * len(gamma)}
    assert pipeline.take_alerts() == []


def test_an_anomaly_score_over_its_threshold_raises_an_alert() -> None:
    pipeline = InferencePipeline(loaded_model({"anomaly_score": 2.5}), options=PipelineOptions(alert_cooldown_s=0))
    assert not any(o.alert for o in run_pipeline(pipeline, offset=0.0))  # training-like input: RMS z ~ 0.3
    assert pipeline.take_alerts() == []
    outcomes = run_pipeline(pipeline, offset=12.0)  # one channel far off: RMS z over 2.5
    assert all(o.alert == "anomaly_score" for o in outcomes)
    alerts = pipeline.take_alerts()
    assert alerts and all(a["reason"] == "anomaly_score" and float(a["score"] or 0) >= 2.5 for a in alerts)


def test_low_confidence_windows_are_counted_uncertain_and_drift_is_reported() -> None:
    pipeline = InferencePipeline(loaded_model({"min_confidence": 0.999}))
    run_pipeline(pipeline, offset=1.0)
    batch = pipeline.take_batch("d1", 0, 0.0, 0)
    assert batch.uncertain > 0
    assert batch.drift is not None and batch.drift.n == 8 * 60  # every sample once, though windows overlap
    assert len(batch.drift.mean_z) == synthetic.CHANNELS

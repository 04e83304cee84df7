"""The upstream's answer reporter: answers with a device and time are buffered (bounded, the oldest dropped) and
posted in batches; a failed post keeps them for the next try; answers that name no device are only counted."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from edgefleet.errors import TransportError
from edgefleet.upstream.report import BATCH, AnswerReporter


class Sink:
    def __init__(self) -> None:
        self.posts: list[list[dict[str, Any]]] = []
        self.down = False

    def report_upstream_answers(self, answers: list[dict[str, Any]]) -> None:
        if self.down:
            raise TransportError("POST /api/v1/fielddata/upstream failed: connection refused")
        self.posts.append(list(answers))


def request(i: int, device: str | None = "dev-1") -> SimpleNamespace:
    return SimpleNamespace(model="clf@1.0.0", device=device, ts=1000.0 + i, shape=[1, 2], data="AAAAAAAAAAA=",
                           local={"label": "alpha", "confidence": 0.41})


def test_answers_are_posted_in_batches_kept_through_a_failed_post_and_bounded() -> None:
    sink = Sink()
    reporter = AnswerReporter(sink, max_items=BATCH + 50, interval_s=3600)  # flushed by hand here
    try:
        sink.down = True
        for i in range(BATCH + 60):
            reporter.add(request(i), {"label": "beta", "confidence": 0.93, "model": "big@1"})
        reporter.add(request(0, device=None), {"label": "beta", "confidence": 0.9})
        assert reporter.flush() is False and reporter.pending() == BATCH + 50
        assert reporter.counts == {"reported": 0, "dropped": 10, "failed_posts": 1, "anonymous": 1}
        sink.down = False
        assert reporter.flush() is True and reporter.pending() == 0
        assert [len(p) for p in sink.posts] == [BATCH, 50]
        first = sink.posts[0][0]
        assert first == {"model": "clf@1.0.0", "device": "dev-1", "ts": 1010.0, "shape": [1, 2],
                         "data": "AAAAAAAAAAA=", "local_label": "alpha", "local_confidence": 0.41, "label": "beta",
                         "confidence": 0.93, "upstream_model": "big@1"}  # the 10 oldest were dropped
        assert reporter.counts["reported"] == BATCH + 50
    finally:
        reporter.close()

"""The wire byte counters and the desired state's telemetry interval, without a network."""

from __future__ import annotations

import json

import httpx
import pytest

from edgefleet.errors import TransportError
from edgefleet.transport.messages import DesiredUpdate, parse
from edgefleet.transport.wire import WireCounter, count_http_exchange


def test_counters_add_per_channel_and_carry_over_a_snapshot() -> None:
    counter = WireCounter()
    counter.sent("mqtt", 10)
    counter.received("mqtt", 4)
    counter.sent("http", 100)
    counter.received("http", 0)  # nothing read: not a receive
    again = WireCounter()
    again.add(json.loads(json.dumps(counter.snapshot())))  # as a re-executed agent takes it over
    assert again.totals("mqtt").total == 14 and again.totals().sent == 110 and again.totals().receives == 1


def test_an_http_exchange_is_counted_as_framed_on_the_connection() -> None:
    request = httpx.Request("GET", "http://127.0.0.1:1/api/v1/artifacts/x", headers={"Range": "bytes=5-"})
    response = httpx.Response(206, headers={"Content-Length": "3"}, stream=httpx.ByteStream(b"abc"), request=request,
                              extensions={"reason_phrase": b"Partial Content"})
    response.read()
    counter = WireCounter()
    count_http_exchange(response, counter)
    head = b"GET /api/v1/artifacts/x HTTP/1.1\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in request.headers.raw)
    assert counter.totals("http").sent == len(head) + 2
    assert counter.totals("http").received == len(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 3\r\n\r\nabc")


def test_the_desired_state_carries_a_rollout_telemetry_interval_or_none() -> None:
    with_hint = parse(DesiredUpdate, json.dumps({"device": "d", "telemetry_interval_s": 15}).encode())
    assert with_hint.telemetry_interval_s == 15.0
    assert parse(DesiredUpdate, b'{"device": "d"}').telemetry_interval_s is None
    for bad in (0, -1, "15", True, 10**6):
        with pytest.raises(TransportError):
            parse(DesiredUpdate, json.dumps({"device": "d", "telemetry_interval_s": bad}).encode())

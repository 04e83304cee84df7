"""``edgefleet coap-gateway``: devices that cannot run Python or MQTT fetch their desired state and report over CoAP.

A microcontroller-class device speaks CoAP over UDP to this gateway, which runs beside the server and speaks
MQTT to the server's broker *as that device*: it logs in with the device's own user name and password, so the
broker's own password file and topic rules decide, exactly as they do for an agent on MQTT. The gateway holds
no credentials of its own and can do nothing a device could not do itself.

The resources, one per MQTT channel of the device (``edgefleet.transport.topics``)::

    GET  coap://GATEWAY/d/<device>/desired?password=<mqtt_password>    2.05: the retained DesiredState (JSON)
    POST coap://GATEWAY/d/<device>/telemetry?password=<mqtt_password>  2.04: published, QoS 1, as the agent does
    POST coap://GATEWAY/d/<device>/events?password=<mqtt_password>     2.04
    POST coap://GATEWAY/d/<device>/reported?password=<mqtt_password>   2.04: retained, as the agent does

``<device>`` and ``<mqtt_password>`` are the ``mqtt_username`` and ``mqtt_password`` of the credentials that
provisioning returns (``edgefleet device add``); the password travels in a URI-Query option named ``password``.
A POSTed body is the JSON message of that channel (the same schema as on MQTT: ``TelemetryBatch``, ``Event``,
``ReportedState``), checked here before it is published.

Answers: 4.01 when the broker refuses the login (a wrong or missing password, a revoked device, another
device's password), 4.03 when it refuses the topic, 4.04 for an unknown path or no desired state yet, 4.00 for
a malformed body, 4.05 for a method a resource does not take, 5.03 when the broker cannot be reached. Error
answers carry one line of text.

Not covered: DTLS (run the gateway where its UDP port is reachable only by the devices) and a TLS broker (the
gateway dials plain ``mqtt://``, the broker on the server's own host).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource
from paho.mqtt.client import Client, MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.errors import ConfigError, TransportError
from edgefleet.storage import atomic_write
from edgefleet.transport import topics
from edgefleet.transport.messages import MAX_MESSAGE_BYTES, Event, ReportedState, TelemetryBatch, parse
from edgefleet.transport.mqtt_url import MqttEndpoint, parse_mqtt_url

log = logging.getLogger(__name__)

PREFIX = "d"
JSON_FORMAT = 50  # CoAP Content-Format application/json
TEXT_FORMAT = 0  # text/plain; charset=utf-8
_SCHEMAS: dict[str, type[TelemetryBatch] | type[Event] | type[ReportedState]] = {
    "telemetry": TelemetryBatch, "events": Event, "reported": ReportedState}


class Refusal(Exception):
    """A request the gateway answers with an error code and one line of text."""

    def __init__(self, code: aiocoap.numbers.codes.Code, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class DeviceRequest:
    """What a CoAP request asks: a device, one of its channels, and the password it logs in with."""

    device: str
    channel: str
    password: str


def read_request(path: tuple[str, ...], query: tuple[str, ...], method: str) -> DeviceRequest:
    """The request a CoAP path and query name, or :class:`Refusal` (pure: no broker, no socket)."""
    if len(path) != 3 or path[0] != PREFIX or path[2] not in topics.CHANNELS:
        raise Refusal(aiocoap.NOT_FOUND, f"no resource /{'/'.join(path)}: use /{PREFIX}/<device>/<channel>")
    device, channel = path[1], path[2]
    if not topics.valid_device_id(device):
        raise Refusal(aiocoap.NOT_FOUND, f"not a device id: {device!r}")
    allowed = "GET" if channel == "desired" else "POST"
    if method != allowed:
        raise Refusal(aiocoap.METHOD_NOT_ALLOWED, f"/{PREFIX}/<device>/{channel} takes {allowed}")
    passwords = [q.partition("=")[2] for q in query if q.startswith("password=")]
    if not passwords or not passwords[0]:
        raise Refusal(aiocoap.UNAUTHORIZED, "the device's mqtt_password is needed in the query (?password=...)")
    return DeviceRequest(device, channel, passwords[0])


def check_body(request: DeviceRequest, payload: bytes) -> None:
    """A POSTed message must be its channel's schema and name the device it is posted for."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise Refusal(aiocoap.REQUEST_ENTITY_TOO_LARGE, f"message over {MAX_MESSAGE_BYTES} bytes")
    try:
        message = parse(_SCHEMAS[request.channel], payload)
    except TransportError as exc:
        raise Refusal(aiocoap.BAD_REQUEST, str(exc)) from exc
    if message.device != request.device:
        raise Refusal(aiocoap.FORBIDDEN, f"the message is for device {message.device!r}, not {request.device!r}")


class BrokerAsDevice:
    """One short MQTT session per request, logged in as the device: the broker authenticates and applies its ACL."""

    def __init__(self, endpoint: MqttEndpoint, *, timeout_s: float = 5.0, retained_wait_s: float = 1.0) -> None:
        if endpoint.tls is not None:
            raise ConfigError("coap-gateway dials the broker over plain mqtt:// only")
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.retained_wait_s = retained_wait_s

    def desired(self, device: str, password: str) -> bytes:
        """The device's retained desired state; Refusal when the broker refuses or none is published."""
        got: list[bytes] = []
        arrived = threading.Event()

        def on_message(_c: Client, _u: Any, message: MQTTMessage) -> None:
            got.append(bytes(message.payload))
            arrived.set()

        def work(client: Client) -> bytes:
            granted: list[list[ReasonCode]] = []
            subscribed = threading.Event()

            def on_subscribe(_c: Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Any) -> None:
                granted.append(list(codes))
                subscribed.set()

            client.on_message = on_message
            client.on_subscribe = on_subscribe
            client.subscribe(topics.desired(device), qos=1)
            if not subscribed.wait(self.timeout_s):
                raise Refusal(aiocoap.SERVICE_UNAVAILABLE, "the broker did not answer the subscription")
            if any(code.is_failure for code in granted[0]):
                raise Refusal(aiocoap.FORBIDDEN, f"the broker refused {device}'s desired state to this login")
            if not arrived.wait(self.retained_wait_s) or not got[0]:
                raise Refusal(aiocoap.NOT_FOUND, f"no desired state for {device} yet")
            return got[0]

        state: bytes = self._session(device, password, work)
        return state

    def publish(self, request: DeviceRequest, payload: bytes) -> None:
        """Publish on the device's channel as the agent would (QoS 1; ``reported`` retained)."""
        def work(client: Client) -> None:
            info = client.publish(getattr(topics, request.channel)(request.device), payload, qos=1,
                                  retain=request.channel == "reported")
            info.wait_for_publish(self.timeout_s)
            if not info.is_published():
                raise Refusal(aiocoap.SERVICE_UNAVAILABLE, "the broker did not acknowledge the message")

        self._session(request.device, request.password, work)

    def _session(self, device: str, password: str, work: Callable[[Client], Any]) -> Any:
        client = Client(CallbackAPIVersion.VERSION2, client_id=f"coap-{device}-{secrets.token_hex(4)}")
        client.username_pw_set(device, password)
        answer: list[ReasonCode] = []
        connected = threading.Event()

        def on_connect(_c: Client, _u: Any, _f: Any, code: ReasonCode, _p: Any) -> None:
            answer.append(code)
            connected.set()

        client.on_connect = on_connect
        try:
            client.connect(self.endpoint.host, self.endpoint.port, keepalive=30)
        except OSError as exc:
            raise Refusal(aiocoap.SERVICE_UNAVAILABLE, f"broker unreachable: {exc}") from exc
        client.loop_start()
        try:
            if not connected.wait(self.timeout_s):
                raise Refusal(aiocoap.SERVICE_UNAVAILABLE, "the broker did not answer the login")
            if answer[0].is_failure:
                raise Refusal(aiocoap.UNAUTHORIZED, f"the broker refused the login as {device}: {answer[0]}")
            return work(client)
        finally:
            client.disconnect()
            client.loop_stop()


class DeviceResource(aiocoap.resource.Resource):  # type: ignore[misc]
    """The gateway's whole site: reads the path itself (``/d/<device>/<channel>``)."""

    def __init__(self, broker: BrokerAsDevice) -> None:
        super().__init__()
        self.broker = broker

    async def render(self, request: aiocoap.Message) -> aiocoap.Message:
        try:
            asked = read_request(tuple(request.opt.uri_path), tuple(request.opt.uri_query), str(request.code))
            if asked.channel == "desired":
                state = await asyncio.to_thread(self.broker.desired, asked.device, asked.password)
                return aiocoap.Message(code=aiocoap.CONTENT, payload=state, content_format=JSON_FORMAT)
            payload = bytes(request.payload)
            check_body(asked, payload)
            await asyncio.to_thread(self.broker.publish, asked, payload)
            return aiocoap.Message(code=aiocoap.CHANGED)
        except Refusal as refusal:
            log.info("coap %s %s: %s %s", request.code, "/".join(request.opt.uri_path), refusal.code, refusal)
            return aiocoap.Message(code=refusal.code, payload=str(refusal).encode(), content_format=TEXT_FORMAT)


@dataclass(frozen=True)
class GatewaySettings:
    """Where the gateway listens (UDP) and which broker it speaks to."""

    mqtt_url: str
    host: str = "127.0.0.1"
    port: int = 5683
    info_file: Path | None = None


async def serve(settings: GatewaySettings, stop: asyncio.Event | None = None) -> None:
    """Serve CoAP until ``stop`` is set (or forever)."""
    broker = BrokerAsDevice(parse_mqtt_url(settings.mqtt_url))
    try:
        context = await aiocoap.Context.create_server_context(DeviceResource(broker),
                                                              bind=(settings.host, settings.port))
    except OSError as exc:
        raise ConfigError(f"cannot listen on udp {settings.host}:{settings.port}: {exc}") from exc
    url = f"coap://{settings.host}:{settings.port}"
    log.info("coap gateway on %s, broker %s", url, broker.endpoint.url)
    if settings.info_file is not None:
        atomic_write(settings.info_file, json.dumps({"coap_url": url}).encode())
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await context.shutdown()


def run_gateway(settings: GatewaySettings) -> None:
    """Blocking entry of ``edgefleet coap-gateway``: serve until interrupted."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(settings))

"""Local action: every window's outcome and every alert, delivered on the device itself within milliseconds, so
that an actuator or a local dashboard acts without the cloud.

Sinks (any combination), set by ``edgefleet agent --local-*`` flags or the ``EDGEFLEET_LOCAL_*`` variables of
:data:`LOCAL_ENV` (the flags set them: they hold across the agent's re-executions):

    --local-socket PATH [--local-socket-kind dgram|stream]   a Unix socket a local program listens on: one JSON
                                                             object per datagram, or JSON lines on a stream
    --local-mqtt mqtt://HOST:PORT [--local-mqtt-topic T]     a broker the user runs on the device: T/prediction
                                                             (QoS 0) and T/alert (QoS 1); T defaults to
                                                             edgefleet/local/DEVICE
    --local-hook PATH [--local-hook-rate R]                  an executable run per alert event, the alert's JSON on
                                                             its stdin; at most R a second (burst 5), 10 s each

Messages, one JSON object each::

    {"kind": "prediction", "seq": 7, "ts": 1.8e9, "device": "d1", "model": "clf@1.0.0", "label": "fault",
     "confidence": 0.97, "latency_ms": 0.21, "alert": "class:fault"}     (alert, upstream, failed: when so)
    {"kind": "alert", "seq": 8, "ts": ..., "device": ..., "reason": ..., "model": ..., "label": ...,
     "confidence": ..., "score": ..., "threshold": ..., "windows": ...}   (the alert event the cloud also gets)

The sensor loop never waits on a sink: it puts each message on a bounded queue (:attr:`LocalActionConfig.queue`)
and returns; one sender thread encodes and writes it to every sink. A full queue drops the message, a sink that
cannot take one (no listener, a full socket buffer, the broker down) fails it, a hook over its rate is left out:
each is counted (:meth:`LocalAction.counts`), and ``seq`` numbers every message handed over, so a consumer sees
what it missed. A sink never holds the sender for long either: a socket listener that is behind gets
:data:`SOCKET_WAIT_S` (a stream connection that cannot take a whole line in that time is closed and dialled
again), paho publishes from its own thread, hooks are started, not waited for.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    from edgefleet.agent.inference import AlertDetail, Outcome

log = logging.getLogger(__name__)
SOCKET_KINDS = ("dgram", "stream")
DEFAULT_QUEUE = 1024
HOOK_BURST = 5
HOOK_TIMEOUT_S = 10.0
HOOKS_RUNNING_MAX = 4
REDIAL_S = 0.5
"""Seconds between two attempts to reach a stream socket's listener."""
SOCKET_WAIT_S = 0.05
"""How long the sender waits for a socket listener that is behind (its queue full) before failing a message."""
LOCAL_ENV: dict[str, tuple[str, str]] = {
    "EDGEFLEET_LOCAL_SOCKET": ("socket", "--local-socket"),
    "EDGEFLEET_LOCAL_SOCKET_KIND": ("socket_kind", "--local-socket-kind"),
    "EDGEFLEET_LOCAL_MQTT_URL": ("mqtt_url", "--local-mqtt"),
    "EDGEFLEET_LOCAL_MQTT_TOPIC": ("mqtt_topic", "--local-mqtt-topic"),
    "EDGEFLEET_LOCAL_HOOK": ("hook", "--local-hook"),
    "EDGEFLEET_LOCAL_HOOK_RATE": ("hook_rate_per_s", "--local-hook-rate"),
    "EDGEFLEET_LOCAL_PREDICTIONS": ("predictions", "--local-predictions"),
    "EDGEFLEET_LOCAL_QUEUE": ("queue", "--local-queue"),
}
"""The environment variables of :class:`LocalActionConfig`, with the field and the agent flag each sets."""


@dataclass(frozen=True)
class LocalActionConfig:
    """Where outcomes and alerts go on the device (nothing configured: nowhere, and no thread runs)."""

    socket: Path | None = None
    socket_kind: str = "dgram"
    mqtt_url: str | None = None
    mqtt_topic: str | None = None
    """Topic prefix on the local broker (default ``edgefleet/local/<device>``)."""
    hook: Path | None = None
    hook_rate_per_s: float = 1.0
    predictions: bool = True
    """False: alerts only (every window's prediction stays on the loop's side)."""
    queue: int = DEFAULT_QUEUE

    @property
    def enabled(self) -> bool:
        return self.socket is not None or self.mqtt_url is not None or self.hook is not None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> LocalActionConfig:
        """The settings of the ``EDGEFLEET_LOCAL_*`` variables that are set (:data:`LOCAL_ENV`), checked."""
        values: dict[str, Any] = {}
        for name, (field_name, _flag) in LOCAL_ENV.items():
            text = environ.get(name, "").strip()
            if not text:
                continue
            try:
                if field_name in ("socket", "hook"):
                    values[field_name] = Path(text)
                elif field_name == "hook_rate_per_s":
                    values[field_name] = float(text)
                elif field_name == "queue":
                    values[field_name] = int(text)
                elif field_name == "predictions":
                    values[field_name] = text.lower() not in ("0", "false", "no", "off")
                else:
                    values[field_name] = text
            except ValueError as exc:
                raise ConfigError(f"{name} must be a number, got {text!r}") from exc
        config = cls(**values)
        config.check()
        return config

    def to_environ(self) -> dict[str, str]:
        """The variables that give these settings (the inverse of :meth:`from_environ`)."""
        out: dict[str, str] = {}
        for name, (field_name, _flag) in LOCAL_ENV.items():
            value = getattr(self, field_name)
            if value is None or value == getattr(LocalActionConfig, field_name, None):
                continue
            out[name] = ("1" if value else "0") if isinstance(value, bool) else str(value)
        return out

    def check(self) -> None:
        """ConfigError with one line for a setting the agent could not use."""
        if self.socket_kind not in SOCKET_KINDS:
            raise ConfigError(f"--local-socket-kind must be dgram or stream, got {self.socket_kind!r}")
        if self.mqtt_url is not None:
            from edgefleet.transport.mqtt_url import parse_mqtt_url

            if parse_mqtt_url(self.mqtt_url).tls is not None:
                raise ConfigError("--local-mqtt is a broker on the device itself: mqtt://, not mqtts://")
        if self.mqtt_topic is not None and (not self.mqtt_topic or any(c in self.mqtt_topic for c in "+#\0")):
            raise ConfigError(f"--local-mqtt-topic must be a topic name without wildcards, got {self.mqtt_topic!r}")
        if self.hook is not None and not (self.hook.is_file() and os.access(self.hook, os.X_OK)):
            raise ConfigError(f"--local-hook {self.hook} is not an executable file")
        if not self.hook_rate_per_s > 0:
            raise ConfigError(f"--local-hook-rate must be positive, got {self.hook_rate_per_s}")
        if self.queue < 1:
            raise ConfigError(f"the local action queue needs at least 1 message, got {self.queue}")


class LocalSink(ABC):
    """One way out of the device's local side. ``send`` counts; a failure (OSError) is counted and logged once
    per episode, never raised: the other sinks and the next message go on."""

    name: ClassVar[str] = "sink"
    alerts_only: ClassVar[bool] = False

    def __init__(self) -> None:
        self.sent = 0
        self.failed = 0
        self._failing = False

    def send(self, kind: str, line: bytes) -> None:
        """Deliver one message (``kind``: prediction or alert; ``line``: its JSON and a newline)."""
        try:
            delivered = self._send(kind, line)
        except OSError as exc:
            self.failed += 1
            if not self._failing:
                self._failing = True
                log.warning("local %s cannot deliver (counted until it can): %s", self.name, exc)
            return
        self._failing = False
        if delivered:
            self.sent += 1

    @abstractmethod
    def _send(self, kind: str, line: bytes) -> bool:
        """Write ``line`` without blocking for long; OSError when it cannot be delivered now, False when the
        sink left it out on purpose (and counted it)."""

    def close(self) -> None:  # noqa: B027 - a hook with a default, not abstract
        """Release what the sink holds."""


class MemorySink(LocalSink):
    """The in-memory twin: keeps every message (kind, decoded JSON), for tests and benchmarks; ``on_send`` is
    called with each."""

    name = "memory"

    def __init__(self, on_send: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        super().__init__()
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._on_send = on_send

    def _send(self, kind: str, line: bytes) -> bool:
        message = json.loads(line)
        self.messages.append((kind, message))
        if self._on_send is not None:
            self._on_send(kind, message)
        return True


class UnixSocketSink(LocalSink):
    """A Unix socket at ``path``: one message per datagram (``dgram``), or JSON lines on a connection dialled
    when needed (``stream``, at most every :data:`REDIAL_S` while nobody listens)."""

    name = "socket"

    def __init__(self, path: Path, kind: str = "dgram", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.path = str(path)
        self.kind = kind
        self._clock = clock
        self._sock: socket.socket | None = None
        self._next_dial = 0.0
        if kind == "dgram":
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.settimeout(SOCKET_WAIT_S)

    def _send(self, kind: str, line: bytes) -> bool:
        if self.kind == "dgram":
            assert self._sock is not None
            self._sock.sendto(line, self.path)
            return True
        sock = self._sock or self._dial()
        try:
            sock.sendall(line)
        except OSError:  # the listener went away or does not keep up: never leave half a line behind a next one
            self._drop_connection()
            raise
        return True

    def _dial(self) -> socket.socket:
        now = self._clock()
        if now < self._next_dial:
            raise ConnectionRefusedError(f"{self.path}: no listener (trying again shortly)")
        self._next_dial = now + REDIAL_S
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(SOCKET_WAIT_S)
        self._sock = sock
        return sock

    def _drop_connection(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._drop_connection()


class MqttSink(LocalSink):
    """A local broker: predictions at QoS 0 on ``TOPIC/prediction``, alerts at QoS 1 on ``TOPIC/alert``. paho
    connects, reconnects and writes from its own thread; while the broker is away, QoS 0 messages fail and at
    most ``queued`` alerts wait in paho."""

    name = "mqtt"

    def __init__(self, url: str, topic: str, client_id: str, queued: int = 1000) -> None:
        super().__init__()
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from edgefleet.transport.mqtt_url import parse_mqtt_url

        endpoint = parse_mqtt_url(url)
        self.topic = topic.rstrip("/")
        self._success = mqtt.MQTT_ERR_SUCCESS
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self._client.max_queued_messages_set(queued)
        self._client.reconnect_delay_set(min_delay=1, max_delay=10)
        if endpoint.username:
            self._client.username_pw_set(endpoint.username, endpoint.password)
        self._client.connect_async(endpoint.host, endpoint.port, keepalive=30)
        self._client.loop_start()

    def _send(self, kind: str, line: bytes) -> bool:
        alert = kind == "alert"
        info = self._client.publish(f"{self.topic}/{kind}", line[:-1], qos=1 if alert else 0)
        if info.rc != self._success:
            raise ConnectionError(f"local broker: publish failed (paho rc {info.rc})")
        return True

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class HookSink(LocalSink):
    """An executable started per alert event with the alert's JSON on its stdin (its output discarded); at most
    ``rate_per_s`` a second (token bucket, burst :data:`HOOK_BURST`) and :data:`HOOKS_RUNNING_MAX` at once (the
    rest are counted in ``limited``); one still running after :data:`HOOK_TIMEOUT_S` is killed."""

    name = "hook"
    alerts_only = True

    def __init__(self, path: Path, rate_per_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.path = str(path)
        self.rate_per_s = rate_per_s
        self.limited = 0
        self._clock = clock
        self._tokens = float(HOOK_BURST)
        self._refilled = clock()
        self._running: list[tuple[subprocess.Popen[bytes], float]] = []

    def _send(self, kind: str, line: bytes) -> bool:
        now = self._clock()
        self.reap(now)
        self._tokens = min(float(HOOK_BURST), self._tokens + (now - self._refilled) * self.rate_per_s)
        self._refilled = now
        if self._tokens < 1.0 or len(self._running) >= HOOKS_RUNNING_MAX:
            self.limited += 1
            return False
        self._tokens -= 1.0
        process = subprocess.Popen([self.path], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
        self._running.append((process, now))
        assert process.stdin is not None
        try:
            process.stdin.write(line)  # a line is far under a pipe's buffer: this does not wait for the reader
            process.stdin.close()
        except BrokenPipeError:  # the hook exited without reading its input: its choice
            pass
        return True

    def reap(self, now: float | None = None) -> None:
        """Collect finished hooks; kill those past their time."""
        now = self._clock() if now is None else now
        running = []
        for process, started in self._running:
            if process.poll() is not None:
                continue
            if now - started > HOOK_TIMEOUT_S:
                process.kill()
                process.wait(1)
                log.warning("local hook %s killed after %.0f s", self.path, HOOK_TIMEOUT_S)
                continue
            running.append((process, started))
        self._running = running

    def close(self) -> None:
        deadline = self._clock() + 2.0
        while self._running and self._clock() < deadline:
            self.reap()
            time.sleep(0.02)
        for process, _ in self._running:
            process.kill()
            process.wait(1)
        self._running = []


_Item = tuple[int, float, str, Any, Any]


class LocalAction:
    """The bounded queue and the sender thread between the sensor loop and the sinks (see the module
    docstring). Implements :class:`edgefleet.agent.inference.OutcomeSink`."""

    def __init__(self, device: str, sinks: list[LocalSink], *, queue: int = DEFAULT_QUEUE,
                 predictions: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.sinks = sinks
        self.capacity = queue
        self.predictions = predictions
        self.dropped = 0
        self._clock = clock
        self._seq = 0
        self._queue: deque[_Item] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="local-action", daemon=True)

    # the sensor loop's side: never waits ------------------------------------------------------------------
    def outcome(self, model: str, outcome: Outcome) -> None:
        if self.predictions:
            self._put("prediction", model, outcome)

    def alert(self, detail: AlertDetail) -> None:
        self._put("alert", None, detail)

    def _put(self, kind: str, model: str | None, body: Any) -> None:
        seq = self._seq
        self._seq = seq + 1
        if len(self._queue) >= self.capacity:
            self.dropped += 1
            return
        self._queue.append((seq, self._clock(), kind, model, body))
        self._wake.set()

    # the sender's side ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        """Deliver what is queued (for at most ``timeout_s``), stop the sender and close the sinks."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        for sink in self.sinks:
            sink.close()
        counts = self.counts()
        if counts["dropped"] or counts["failed"] or counts["limited"]:
            log.info("local action: %s", ", ".join(f"{k} {v}" for k, v in counts.items()))

    def counts(self) -> dict[str, int]:
        """Messages handed over, dropped on a full queue, and per sink sent, failed and left out (hooks)."""
        return {"handed": self._seq, "dropped": self.dropped, "sent": sum(s.sent for s in self.sinks),
                "failed": sum(s.failed for s in self.sinks),
                "limited": sum(s.limited for s in self.sinks if isinstance(s, HookSink))}

    def _run(self) -> None:
        queue, wake = self._queue, self._wake
        while True:
            wake.wait(1.0)
            wake.clear()
            while queue:
                self._send(*queue.popleft())
            if self._stopping and not queue:
                return
            for sink in self.sinks:
                if isinstance(sink, HookSink):
                    sink.reap()

    def _send(self, seq: int, ts: float, kind: str, model: str | None, body: Any) -> None:
        message: dict[str, Any] = {"kind": kind, "seq": seq, "ts": round(ts, 6), "device": self.device}
        if kind == "prediction":
            message.update(model=model, label=body.predicted, confidence=round(body.confidence, 4),
                           latency_ms=round(body.latency_ms, 3))
            if body.alert:
                message["alert"] = body.alert
            if body.upstream:
                message["upstream"] = True
            if body.failed:
                message["failed"] = True
        else:
            message.update(body)
        line = json.dumps(message, separators=(",", ":"), allow_nan=False, default=str).encode() + b"\n"
        for sink in self.sinks:
            if kind == "alert" or not sink.alerts_only:
                sink.send(kind, line)


def open_local_action(config: LocalActionConfig, device: str) -> LocalAction | None:
    """The configured sinks behind one :class:`LocalAction` (not started); None when none is configured."""
    if not config.enabled:
        return None
    config.check()
    sinks: list[LocalSink] = []
    if config.socket is not None:
        sinks.append(UnixSocketSink(config.socket, config.socket_kind))
    if config.mqtt_url is not None:
        sinks.append(MqttSink(config.mqtt_url, config.mqtt_topic or f"edgefleet/local/{device}",
                              f"ef-local-{device}"))
    if config.hook is not None:
        sinks.append(HookSink(config.hook, config.hook_rate_per_s))
    return LocalAction(device, sinks, queue=config.queue, predictions=config.predictions)

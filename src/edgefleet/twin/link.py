"""Many twins' MQTT sessions on one network thread.

The agent's :class:`~edgefleet.transport.link.MqttLink` runs paho-mqtt's network thread per client: one process
stops at ~340 clients (paho's ``select()`` loop cannot watch descriptors over 1024, and every thread reserves its
stack). :class:`TwinLink` is the same link (same client, callbacks, QoS 1 acknowledgements, persistent session)
with its network work done by a :class:`LinkLoop` that serves every twin of the process on one thread with an
``epoll`` selector: reads when a socket is readable, all writes (publishes from the agents' threads only queue
them and wake the loop), keepalives, and reconnects with backoff. A link can be cut (a link-loss fault): its
socket is shut down abruptly, as a lost network would, and it stays down for the time given.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edgefleet.errors import TransportError
from edgefleet.transport.link import MqttLink

log = logging.getLogger(__name__)
TICK_S = 0.25
"""How often the loop runs keepalives and reconnects."""


class LinkLoop:
    """One thread that drives the paho clients of many :class:`TwinLink` s."""

    def __init__(self, name: str = "twin-links") -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._links: set[TwinLink] = set()
        self._calls: deque[Callable[[], None]] = deque()
        self._writes: deque[TwinLink] = deque()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def links(self) -> int:
        return len(self._links)

    def call(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the loop thread (soon)."""
        self._calls.append(action)
        self.wake()

    def want_write(self, link: TwinLink) -> None:
        self._writes.append(link)
        self.wake()

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"x")

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self.wake()
        self._thread.join(timeout_s)

    # the loop thread ----------------------------------------------------------------------------
    def add(self, link: TwinLink) -> None:
        self._links.add(link)

    def discard(self, link: TwinLink) -> None:
        self._links.discard(link)
        self.unwatch(link.client.socket())

    def watch(self, link: TwinLink, sock: Any) -> None:
        try:
            self._selector.register(sock, selectors.EVENT_READ, link)
        except (KeyError, ValueError, OSError) as exc:
            log.debug("cannot watch a twin's socket: %s", exc)

    def unwatch(self, sock: Any) -> None:
        if sock is None:
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(sock)

    def _run(self) -> None:
        next_tick = 0.0
        while not self._stop.is_set():
            for key, _mask in self._selector.select(TICK_S):
                if key.data is None:
                    try:
                        while self._wake_r.recv(4096):
                            pass
                    except (BlockingIOError, OSError):
                        pass
                    continue
                self._guard(key.data, lambda c: c.loop_read())
            while self._calls:
                action = self._calls.popleft()
                try:
                    action()
                except Exception:  # one twin's bad call must not stop the others' network
                    log.exception("twin link call failed")
            while self._writes:
                self._guard(self._writes.popleft(), lambda c: c.loop_write())
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                for link in list(self._links):
                    self._guard(link, functools.partial(_tick, link, now))
        for link in list(self._links):
            self.discard(link)

    def _guard(self, link: TwinLink, action: Callable[[mqtt.Client], object]) -> None:
        try:
            action(link.client)
        except Exception:
            log.exception("twin %s: network step failed", link.client_id)


def _tick(link: TwinLink, now: float, _client: mqtt.Client) -> None:
    link.tick(now)


class TwinLink(MqttLink):
    """An :class:`MqttLink` served by a :class:`LinkLoop` instead of a thread of its own."""

    def __init__(self, loop: LinkLoop, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = loop
        self.client_id = str(args[1] if len(args) > 1 else kwargs.get("client_id", "twin"))
        self.client = self._client
        self._down_until = 0.0
        self._next_attempt = 0.0
        self._delay_s = 1.0
        self._ever_connected = False
        self._client.on_socket_open = lambda _c, _u, sock: loop.watch(self, sock)
        self._client.on_socket_close = lambda _c, _u, sock: loop.unwatch(sock)
        self._client.on_socket_register_write = lambda _c, _u, _sock: loop.want_write(self)
        self._client.on_socket_unregister_write = lambda _c, _u, _sock: None

    def start_background(self) -> None:
        if self._started:
            return
        self._started = True
        self.loop.call(self._join)

    def _join(self) -> None:
        self.loop.add(self)
        self.tick(time.monotonic())

    def stop(self) -> None:
        """Disconnect cleanly (bounded) and leave the loop."""
        if self._started:
            self._started = False
            if self.connected:
                self.loop.call(self._disconnect)
                deadline = time.monotonic() + 2.0
                while self.connected and time.monotonic() < deadline:
                    time.sleep(0.02)
            self.loop.call(self._leave)
        self._connected.clear()

    def crash(self) -> None:
        """End the session as a dying process would: no DISCONNECT, the socket just closes."""
        self._started = False
        self.loop.call(self._die)
        self._connected.clear()

    def cut(self, for_s: float) -> None:
        """A lost network: the socket dies now and no reconnect succeeds for ``for_s`` seconds."""
        self._down_until = time.monotonic() + for_s
        self.loop.call(self._shutdown)

    def _disconnect(self) -> None:
        self._client.disconnect()

    def _die(self) -> None:
        self._shutdown()
        self._leave()

    def _shutdown(self) -> None:
        sock = self._client.socket()
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the next read fails: paho handles a lost connection

    def _leave(self) -> None:
        self.loop.discard(self)
        with contextlib.suppress(OSError):
            self._client._sock_close()  # end paho's socket without a DISCONNECT

    def tick(self, now: float) -> None:
        """Keepalive, or a (re)connect attempt once due (loop thread only)."""
        if not self._started:
            return
        if self._client.socket() is not None:
            self._client.loop_misc()
            if self._client.want_write():  # a write request lost across a reconnect
                self._client.loop_write()
            return
        self._connected.clear()
        if now < self._next_attempt or now < self._down_until:
            return
        try:
            if self._ever_connected:
                self._client.reconnect()
            else:
                self._client.connect(self.endpoint.host, self.endpoint.port, keepalive=self._keepalive_s)
                self._ever_connected = True
            self._delay_s = 1.0
        except (OSError, ValueError) as exc:
            self._next_attempt = now + self._delay_s
            self._delay_s = min(30.0, self._delay_s * 2)
            log.debug("twin %s cannot reach the broker: %s", self.client_id, exc)

    def publish_and_wait(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
                         timeout_s: float = 10.0) -> None:
        """Publish and block until the broker acknowledged it (the loop thread does the writing); TransportError
        when it is not (not connected, lost on the way, or no acknowledgement within ``timeout_s``)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if info.is_published():
                    return
                if time.monotonic() >= deadline or not self.connected:
                    raise TransportError(f"publish to {topic} not acknowledged within {timeout_s:.0f} s")
                info.wait_for_publish(min(0.5, max(0.01, deadline - time.monotonic())))
            except (RuntimeError, ValueError) as exc:  # paho: not connected, or the queue refused it
                raise TransportError(f"publish to {topic} failed: {exc}") from exc

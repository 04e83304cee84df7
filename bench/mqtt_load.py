"""A load generator for the ingest benchmark: many MQTT 3.1.1 connections publishing QoS 1 at a set rate.

Each connection is one device (its own client id and telemetry topic) on a plain socket: its PUBLISH packets are
encoded before the clock starts and written in 5 ms slices, and a reader thread counts the broker's PUBACKs.
A Python MQTT client costs 25-50 us of CPU per message (MEASURED.md), which on a 2-core machine would take
the cores the broker and the server are being measured on; this costs a few microseconds. Each connection
keeps at most ``window`` messages unacknowledged, as a device's client does. ``mosquitto_pub -l`` cannot
stand in: it drops what is still queued when its input ends.

A device may log in (:class:`Login`): a user name and password in its CONNECT, and/or TLS (an ``SSLContext``
holding the device's certificate, for a broker with mutual TLS). Over TLS the writer and the reader share the
socket under a lock (one ``SSLObject`` must not be used by two threads at once) and the reader only reads what
``select`` says has arrived.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

SLICE_S = 0.005


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, keepalive_s: int = 0, username: str | None = None,
                   password: str | None = None) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session; credentials if given (else an anonymous broker's)."""
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive_s) + _string(client_id)
    body += (_string(username) if username is not None else b"") + (_string(password) if password is not None else b"")
    return b"\x10" + _varint(len(body)) + body


@dataclass(frozen=True)
class Login:
    """How one device connects: credentials in its CONNECT, and/or TLS with its own certificate."""

    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None


def publish_packet(topic: str, packet_id: int, payload: bytes) -> bytes:
    """PUBLISH, QoS 1, not retained."""
    body = _string(topic) + struct.pack("!H", packet_id) + payload
    return b"\x32" + _varint(len(body)) + body


@dataclass
class Offered:
    """What one run of :func:`offer` did."""

    sent: int
    acked: int
    started_at: float  # wall clock of the first publish
    seconds: float  # until the last PUBACK (or the deadline)

    @property
    def finished_at(self) -> float:
        return self.started_at + self.seconds


class _Connection:
    def __init__(self, host: str, port: int, client_id: str, packets: list[bytes], login: Login | None = None) -> None:
        self.packets = packets
        self.written = 0
        self.acked = 0
        self._lock = threading.Lock() if login is not None and login.tls is not None else None
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if login is not None and login.tls is not None:
            sock = login.tls.wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self.sock.sendall(connect_packet(client_id, 0, login.username if login else None,
                                         login.password if login else None))
        connack = self._read(4)
        if len(connack) != 4 or connack[0] != 0x20 or connack[3] != 0:
            raise ConnectionError(f"{client_id}: CONNECT refused ({connack.hex()})")
        if self._lock is None:
            self.sock.settimeout(None)
        self._reader = threading.Thread(target=self._count_acks if self._lock is None else self._count_acks_tls,
                                        daemon=True)
        self._reader.start()

    def send(self, data: bytes) -> None:
        if self._lock is None:
            self.sock.sendall(data)
            return
        with self._lock:
            self.sock.sendall(data)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def _count_acks(self) -> None:
        pending = b""
        try:
            while self.acked < len(self.packets):
                chunk = self.sock.recv(65536)
                if not chunk:
                    return
                pending += chunk
                whole = len(pending) // 4  # PUBACK is 4 bytes; nothing else comes on a connection that only publishes
                self.acked += whole
                pending = pending[whole * 4:]
        except OSError:
            return

    def _count_acks_tls(self) -> None:
        assert self._lock is not None and isinstance(self.sock, ssl.SSLSocket)
        pending = b""
        try:
            while self.acked < len(self.packets):
                if not self.sock.pending():
                    readable, _, _ = select.select([self.sock], [], [], 0.2)
                    if not readable:
                        continue
                with self._lock:  # never blocks while holding the lock: a record not yet whole is read later
                    self.sock.setblocking(False)
                    try:
                        chunk = self.sock.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        chunk = None
                    finally:
                        self.sock.settimeout(10)
                if chunk is None:
                    time.sleep(0.001)
                    continue
                if not chunk:
                    return
                pending += chunk
                whole = len(pending) // 4
                self.acked += whole
                pending = pending[whole * 4:]
        except (OSError, ValueError):
            return

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send(b"\xe0\x00")  # DISCONNECT
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader if the broker never answers
        self.sock.close()
        self._reader.join(5)


def offer(host: str, port: int, devices: Sequence[str], topic: Callable[[str], str],
          payload: Callable[[str, int], bytes], rate: float, per_device: int, *, window: int = 1000,
          timeout_s: float = 120.0, logins: Mapping[str, Login] | None = None) -> Offered:
    """Publish ``per_device`` messages from each device, ``rate`` messages per second in all, and wait (bounded)
    for every PUBACK. ``payload(device, k)`` is the k-th message of a device; ``logins`` how each connects."""
    connections = [_Connection(host, port, f"loadgen-{d}-{time.monotonic_ns()}",
                               [publish_packet(topic(d), k % 65535 + 1, payload(d, k)) for k in range(per_device)],
                               (logins or {}).get(d))
                   for d in devices]
    per_s = rate / len(devices)
    started, started_at = time.monotonic(), time.time()
    deadline = started + timeout_s
    try:
        while any(c.written < per_device for c in connections) and time.monotonic() < deadline:
            due = min(per_device, int((time.monotonic() - started) * per_s) + 1)
            for c in connections:
                upto = min(due, c.acked + window)  # never more than the window unacknowledged
                if upto > c.written:
                    c.send(b"".join(c.packets[c.written:upto]))
                    c.written = upto
            time.sleep(SLICE_S)
        while time.monotonic() < deadline and any(c.acked < c.written for c in connections):
            time.sleep(SLICE_S)
        seconds = time.monotonic() - started
        return Offered(sum(c.written for c in connections), sum(min(c.acked, c.written) for c in connections),
                       started_at, seconds)
    finally:
        for c in connections:
            c.close()

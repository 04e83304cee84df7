"""The compact wire form of what a device sends: JSON deflated against a dictionary made from the schemas.

A device's messages are short JSON documents whose bytes are mostly field names (``"latency_ms":``,
``"hard_examples":``, ``"active_sha256":``) that every message repeats. :func:`pack` deflates the JSON (raw
DEFLATE, RFC 1951) with a preset dictionary of its channel's field names and default values
(:data:`edgefleet.transport.wire_table.DICTIONARIES`, generated from :mod:`edgefleet.transport.schemas`), and
prefixes one byte naming the dictionary's version; it keeps the JSON where that is not shorter. :func:`unpack`
turns either form back into the JSON the schemas validate, so a message from an agent that sends plain JSON (every
agent before this form) reads as before, and the server stores the same JSON either way.

A version byte never starts JSON (``{``), so the two forms cannot be confused. A dictionary version, once
released, is never changed: a schema change that changes the dictionary adds a version, and the server keeps
decoding the old ones (``tests/unit/test_wire_table.py`` holds the generated table to the schemas).

Reported states also travel as changes (:class:`ReportChanges`): after a full report on a connection, a report
that changes only where an update stands (``update_state``, ``last_error``) carries just those fields with
``"changes": 1``, and the server merges it into the device's last full report.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from typing import Any

from edgefleet.errors import TransportError
from edgefleet.transport.wire_table import DICTIONARIES, DICTIONARY_VERSION

MAX_UNPACKED_BYTES = 256 * 1024
"""The largest message :func:`unpack` inflates (the schemas' ``MAX_MESSAGE_BYTES``): a small payload that would
inflate beyond it is refused, not inflated."""
CHANGES_KEY = "changes"
"""Marks a reported state that carries only what changed since the last full one (see :class:`ReportChanges`)."""
_CHANGE_ONLY = frozenset({"update_state", "last_error"})
"""Reported fields that may change without a full report (the step of an update and its error)."""
_KEPT_IN_CHANGES = ("device", "ts")
STICKY = ("facts",)
"""Reported fields sent only when they changed since this agent process last sent them (the device's facts):
the server keeps the stored value when a report leaves them out (:func:`keep_sticky`)."""


def pack(channel: str, payload: bytes, *, version: int = DICTIONARY_VERSION) -> bytes:
    """The compact form of a JSON message on ``channel`` (telemetry, events, reported), or the JSON itself when
    that is as short."""
    dictionary = DICTIONARIES[version].get(channel)
    if dictionary is None:
        return payload
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_DEFAULT_STRATEGY, dictionary)
    packed = bytes([version]) + deflater.compress(payload) + deflater.flush()
    return packed if len(packed) < len(payload) else payload


def unpack(channel: str, payload: bytes) -> bytes:
    """The JSON of a message in either form; TransportError (one line) for an unknown version, a corrupt stream,
    or one that inflates beyond :data:`MAX_UNPACKED_BYTES`."""
    if not payload or payload[0] >= 0x20:  # JSON (a device that sends it, or a message too short to pack)
        return payload
    dictionaries = DICTIONARIES.get(payload[0])
    if dictionaries is None or channel not in dictionaries:
        raise TransportError(f"compact message of unknown version {payload[0]} on {channel}")
    inflater = zlib.decompressobj(-15, zdict=dictionaries[channel])
    try:
        data = inflater.decompress(payload[1:], MAX_UNPACKED_BYTES + 1)
    except zlib.error as exc:
        raise TransportError(f"corrupt compact message on {channel}: {exc}") from exc
    if len(data) > MAX_UNPACKED_BYTES or inflater.unconsumed_tail:
        raise TransportError(f"compact message on {channel} inflates beyond {MAX_UNPACKED_BYTES} bytes")
    if not inflater.eof:
        raise TransportError(f"truncated compact message on {channel}")
    return data


class ReportChanges:
    """The agent's side of reported-state changes: :meth:`encode` gives the full report the first time (and
    whenever the model, the device's identity or anything but the update's step changed), else only the
    changed step fields; :meth:`reset` after a reconnect makes the next report full again."""

    def __init__(self) -> None:
        self._last: dict[str, Any] | None = None
        self._sticky_sent: dict[str, Any] = {}

    def reset(self) -> None:
        self._last = None
        self._sticky_sent = {}

    def encode(self, report: Mapping[str, Any]) -> bytes:
        """The JSON to publish for ``report`` (None values are absent fields): the full report, or its changes
        (a cleared field as null; only ``device`` and ``ts`` when nothing else changed: the server still learns
        that the device is there)."""
        current = {k: v for k, v in report.items() if v is not None and k not in STICKY}
        sticky = {k: report[k] for k in STICKY if report.get(k) is not None and report[k] != self._sticky_sent.get(k)}
        self._sticky_sent.update(sticky)
        last, self._last = self._last, current
        if last is not None:
            changed = {k for k in set(current) | set(last) if k != "ts" and current.get(k) != last.get(k)}
            if changed <= _CHANGE_ONLY:
                out = {k: current[k] for k in _KEPT_IN_CHANGES if k in current}
                out.update({k: current.get(k) for k in sorted(changed)})
                out.update(sticky)
                out[CHANGES_KEY] = 1
                return _json(out)
        return _json({**current, **sticky})


def _json(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), allow_nan=False).encode()


def merge_changes(base: Mapping[str, Any] | None, changes: Mapping[str, Any]) -> dict[str, Any] | None:
    """A reported state's changes applied to the device's last full report (None when there is none to apply them
    to: the server then waits for the next full one)."""
    if base is None:
        return None
    merged = {**base, **{k: v for k, v in changes.items() if k != CHANGES_KEY}}
    return {k: v for k, v in merged.items() if v is not None}


def keep_sticky(base: Mapping[str, Any] | None, report: dict[str, Any]) -> dict[str, Any]:
    """A full report with the sticky fields it leaves out taken from the device's last one."""
    for key in STICKY:
        if key not in report and base is not None and base.get(key) is not None:
            report[key] = base[key]
    return report


def is_changes(data: Mapping[str, Any]) -> bool:
    return bool(data.get(CHANGES_KEY))


def loads(channel: str, payload: bytes) -> Any:
    """A message in either form as JSON data (for tools and tests that watch the device topics)."""
    return json.loads(unpack(channel, payload))

"""MQTT topic names, version 1, shared by the agent and the server."""

from __future__ import annotations

import re

PREFIX = "ef/v1"
DEVICE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CHANNELS = ("desired", "reported", "telemetry", "events")


def desired(device: str) -> str:
    """Server -> device, retained: the model the device should run."""
    return f"{PREFIX}/{device}/desired"


def reported(device: str) -> str:
    """Device -> server, retained: what the device runs now."""
    return f"{PREFIX}/{device}/reported"


def telemetry(device: str) -> str:
    """Device -> server, QoS 1: batched inference statistics."""
    return f"{PREFIX}/{device}/telemetry"


def events(device: str) -> str:
    """Device -> server, QoS 1: update progress and alerts."""
    return f"{PREFIX}/{device}/events"


def device_filter(channel: str) -> str:
    """Subscription filter for one channel of every device."""
    if channel not in CHANNELS:
        raise ValueError(f"unknown channel {channel!r}")
    return f"{PREFIX}/+/{channel}"


def split(topic: str) -> tuple[str, str] | None:
    """``ef/v1/<device>/<channel>`` -> (device, channel); None for anything else."""
    parts = topic.split("/")
    if len(parts) != 4 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[3] not in CHANNELS:
        return None
    if not DEVICE_ID.match(parts[2]):
        return None
    return parts[2], parts[3]


def valid_device_id(device: str) -> bool:
    return bool(DEVICE_ID.match(device))

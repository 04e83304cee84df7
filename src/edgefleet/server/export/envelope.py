"""What an exported message looks like: a versioned JSON envelope around the stored row.

Every topic has a JSON Schema per version in ``schemas/TOPIC.vN.json`` (the envelope, and what ``data`` holds
when it conforms). A row is exported with the version it was queued under, whatever it holds: one queued under
an older or unknown version, or whose data lacks that version's required fields, goes out with ``conforms``
false (and stored text that is not a JSON object goes out as ``raw``); nothing is dropped.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from edgefleet.server.store.export import Queued

TOPICS = ("telemetry", "events", "alerts", "decisions", "hard_examples")
"""The export streams (the outbox's topics); the Kafka topic is the settings' prefix + the stream name."""
CURRENT_VERSION = {topic: 1 for topic in TOPICS}
"""The schema version rows are queued under now (the store's triggers write it)."""


@functools.cache
def schema(topic: str, version: int) -> dict[str, Any] | None:
    """The JSON Schema of a stream at a version; None for a version that has no schema file."""
    if topic not in TOPICS:
        return None
    path = resources.files("edgefleet.server.export").joinpath("schemas", f"{topic}.v{version}.json")
    if not path.is_file():
        return None
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


@functools.cache
def _required(topic: str, version: int) -> tuple[str, ...] | None:
    found = schema(topic, version)
    if found is None:
        return None
    return tuple(found["then"]["properties"]["data"]["required"])


def envelope(row: Queued) -> tuple[bytes, bool]:
    """The message value of an outbox row, and whether its data conforms to the version it carries."""
    try:
        data = json.loads(row.data)
    except ValueError:
        data = None
    required = _required(row.topic, row.version)
    conforms = isinstance(data, dict) and required is not None and all(k in data for k in required)
    # written out field by field (the same compact JSON json.dumps gives): this runs once per exported message
    head = (f'{{"schema":{_text("edgefleet." + row.topic)},"version":{int(row.version)},"id":{_text(row.msg_id)},'
            f'"key":{_text(row.key)},"seq":{int(row.seq)},"export_seq":{int(row.id)},'
            f'"queued":{float(row.created)!r},"conforms":{"true" if conforms else "false"}')
    body = f',"data":{row.data}}}' if isinstance(data, dict) else f',"data":null,"raw":{_text(row.data)}}}'
    return (head + body).encode(), conforms


_text = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
"""A JSON string literal (json.dumps's own C encoder for str)."""


def headers(row: Queued) -> list[tuple[str, bytes]]:
    """Kafka record headers: the schema and version, and the id to deduplicate on, readable without the value."""
    return [("schema", f"edgefleet.{row.topic}".encode()), ("version", str(row.version).encode()),
            ("id", row.msg_id.encode())]

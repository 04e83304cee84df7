"""Read the export back: the consumer a data team starts from (``edgefleet export tail``).

Messages come as their envelopes (see :mod:`.envelope`); with ``dedupe`` a message whose (schema, id) was seen
before is dropped, which turns the at-least-once stream into the store's rows once each. The seen ids are kept in
memory for the run: a consumer that restarts and must not repeat itself keeps them (or its own keys) elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from edgefleet.errors import TransportError
from edgefleet.server.export.envelope import TOPICS
from edgefleet.server.export.settings import KafkaSettings


@dataclass(frozen=True)
class TailOptions:
    """What to read and when to stop."""

    streams: tuple[str, ...] = TOPICS
    from_beginning: bool = True
    dedupe: bool = False
    group: str | None = None
    """A consumer group to commit offsets in (None: read without one, from the start or the end)."""
    max_messages: int | None = None
    idle_exit_s: float | None = None
    """Stop once no message came for this long (None: run until interrupted or ``max_messages``)."""
    connect_timeout_s: float = 15.0


def tail(settings: KafkaSettings, options: TailOptions, emit: Callable[[dict[str, Any]], None]) -> dict[str, int]:
    """Read the export's topics and hand each message (its envelope, parsed) to ``emit``; returns counts of
    messages read, emitted and dropped as duplicates. TransportError (one line) when the broker is unreachable."""
    return asyncio.run(_tail(settings, options, emit))


async def _tail(settings: KafkaSettings, options: TailOptions, emit: Callable[[dict[str, Any]], None]
                ) -> dict[str, int]:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # a failure is raised as one line instead
    consumer = AIOKafkaConsumer(*(settings.topic(s) for s in options.streams), **settings.client_kwargs(),
                                group_id=options.group, enable_auto_commit=options.group is not None,
                                auto_offset_reset="earliest" if options.from_beginning else "latest",
                                request_timeout_ms=int(options.connect_timeout_s * 1000),
                                client_id="edgefleet-export-tail")
    counts = {"read": 0, "emitted": 0, "duplicates": 0, "unreadable": 0}
    seen: set[tuple[str, str]] = set()
    try:
        await asyncio.wait_for(consumer.start(), options.connect_timeout_s)
    except (KafkaError, OSError, TimeoutError) as exc:
        await _stop(consumer)
        raise TransportError(f"cannot reach Kafka at {settings.bootstrap}: {_line(exc)}") from exc
    try:
        last = time.monotonic()
        while options.max_messages is None or counts["emitted"] < options.max_messages:
            batches = await consumer.getmany(timeout_ms=200, max_records=5000)
            records = [r for _, found in sorted(batches.items()) for r in found]
            if not records:
                if options.idle_exit_s is not None and time.monotonic() - last >= options.idle_exit_s:
                    break
                continue
            last = time.monotonic()
            for record in records:
                counts["read"] += 1
                message = _decode(record.value)
                if message is None:
                    counts["unreadable"] += 1
                    message = {"schema": None, "id": None, "raw": (record.value or b"").decode(errors="replace")}
                ident = (str(message.get("schema")), str(message.get("id")))
                if options.dedupe and message.get("id") is not None:
                    if ident in seen:
                        counts["duplicates"] += 1
                        continue
                    seen.add(ident)
                emit(message)
                counts["emitted"] += 1
                if options.max_messages is not None and counts["emitted"] >= options.max_messages:
                    break
    except KafkaError as exc:
        raise TransportError(f"Kafka at {settings.bootstrap}: {_line(exc)}") from exc
    finally:
        await _stop(consumer)
    return counts


def dedupe_view(messages: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Messages keyed by (schema, id), the first of each kept: what a deduplicating consumer ends up with."""
    view: dict[tuple[str, str], dict[str, Any]] = {}
    for message in messages:
        view.setdefault((str(message.get("schema")), str(message.get("id"))), message)
    return view


def _decode(value: bytes | None) -> dict[str, Any] | None:
    try:
        message = json.loads(value or b"")
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


async def _stop(consumer: Any) -> None:
    try:
        await asyncio.wait_for(consumer.stop(), 5.0)
    except (Exception, asyncio.CancelledError):  # closing after a failure: nothing more to report
        return


def _line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

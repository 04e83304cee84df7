"""What the device's trust remembers besides its keyring and release counters: a time floor, and one version per
release counter. Both live in the agent's key-value state.

Time floor (``time_floor``). A device's clock can be wrong: no battery-backed clock, NTP not yet synced, set
back by hand or by someone on its network. Every bundle carries its signed ``created`` time and every key
statement its ``issued`` time; one the device has verified proves the present is no earlier than that. The
agent keeps the newest such time and trust decisions judge expiry at ``max(clock, floor)``
(:func:`edgefleet.core.update.effective_time`), so a clock that goes back cannot make an expired bundle valid
again. The floor only rises.

Accepted versions (``release_versions``). Per model name, the version the device accepted at its highest
release counter, so that another bundle under the same counter must carry the same version
(:class:`edgefleet.core.update.TrustState` ``accepted_versions``).

``EDGEFLEET_FAKE_CLOCK_OFFSET_S`` (seconds, negative for a clock behind) shifts the clock the agent's trust
decisions read. It exists for the tests that set a device's clock years back, where libfaketime is not
installed; nothing else sets it.

This module is on the agent's start path: standard library only (no pydantic, no ``cryptography``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from edgefleet.agent.state import AgentState
from edgefleet.agent.verify import created_time
from edgefleet.bundle.container import MANIFEST, Limits, read_container
from edgefleet.errors import BundleError

FLOOR_KEY = "time_floor"
VERSIONS_KEY = "release_versions"
FAKE_CLOCK_ENV = "EDGEFLEET_FAKE_CLOCK_OFFSET_S"


def device_clock() -> datetime:
    """The wall clock as the agent's trust decisions read it (UTC; shifted by the test variable when set)."""
    now = datetime.now(UTC)
    offset = os.environ.get(FAKE_CLOCK_ENV)
    return now + timedelta(seconds=float(offset)) if offset else now


def parse_time(text: object) -> datetime | None:
    """An ISO 8601 time (UTC when it names no zone), or None for anything else."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def time_floor(state: AgentState) -> datetime | None:
    """The newest signed time the device has verified, or None before the first."""
    return parse_time(state.get(FLOOR_KEY))


def raise_floor(state: AgentState, times: Iterable[object]) -> datetime | None:
    """Raise the floor to the newest of ``times`` (ISO texts from verified bundles or statements) if that is later;
    returns the new floor when it rose, else None."""
    current = time_floor(state)
    newest = max((moment for text in times if (moment := parse_time(text)) is not None), default=None)
    if newest is None or (current is not None and newest <= current):
        return None
    state.put(FLOOR_KEY, newest.isoformat())
    return newest


def accepted_versions(state: AgentState) -> dict[str, tuple[int, str]]:
    """Per model name, the (release counter, version) accepted at its highest release counter."""
    stored = state.get(VERSIONS_KEY) or {}
    highest = state.highest_releases()
    versions: dict[str, tuple[int, str]] = {}
    for name, entry in dict(stored).items():
        try:
            release, version = int(entry[0]), str(entry[1])
        except (TypeError, ValueError, IndexError, KeyError):
            continue
        if release == highest.get(name, release):
            versions[str(name)] = (release, version)
    return versions


def remember_version(state: AgentState, name: str, release: int, version: str) -> None:
    """Record ``version`` as the one for ``release`` of ``name`` when that is the highest release accepted."""
    if release < state.highest_releases().get(name, 0):
        return
    stored = dict(state.get(VERSIONS_KEY) or {})
    if stored.get(name) == [release, version]:
        return
    stored[name] = [release, version]
    state.put(VERSIONS_KEY, stored)


def remember_bundle(state: AgentState, sha256: str, name: str, release: int, version: str, *,
                    active: bool = True) -> None:
    """A verified update was taken (activated, or shadowed when not ``active``): keep its version under its release
    counter (an activation only) and raise the floor to its signed creation time (read from the stored bundle)."""
    if active:
        remember_version(state, name, release, version)
    try:
        manifest = read_container(state.bundle_path(sha256).read_bytes(), Limits())[MANIFEST]
    except (OSError, BundleError, KeyError):
        return
    raise_floor(state, [created_time(manifest)])

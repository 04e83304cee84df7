"""Many ``device add`` calls through the API leave a correct broker password file, with the rewrites batched:
adds made while a sync runs share the next one (server.broker_sync), so provisioning N devices is not N
rewrites of the whole file. A revocation is written before its answer returns."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet.bundle.signing import SigningKey
from edgefleet.server.app import ServerContext, create_app
from edgefleet.server.artifacts import ArtifactStore
from edgefleet.server.broker_auth import SERVER_USER, BrokerAccess, verify_password
from edgefleet.server.broker_sync import BrokerSync
from edgefleet.server.metrics import Metrics
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store

pytestmark = pytest.mark.integration
TOKEN = "operator-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
DEVICES = 120


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServerContext]:
    key = SigningKey.generate()
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    context = ServerContext(store=store, artifacts=ArtifactStore(tmp_path / "artifacts"),
                            trusted_keys={key.public.key_id: key.public}, operator_token=TOKEN,
                            public_url="http://127.0.0.1:1", device_mqtt_url="mqtt://127.0.0.1:1",
                            orchestrator=Orchestrator(store, lambda _states: None), metrics=Metrics(),
                            access=BrokerAccess(tmp_path / "auth", "server-secret"))
    yield context
    if context.syncer is not None:
        context.syncer.close()
    store.close()


def passwd(ctx: ServerContext) -> dict[str, str]:
    assert ctx.access is not None
    lines = ctx.access.passwd_path.read_text().splitlines()
    return dict(line.split(":", 1) for line in lines)


def add_all(ctx: ServerContext, ids: list[str], threads: int) -> dict[str, dict[str, Any]]:
    """Add ``ids`` through the API from ``threads`` clients at once; the credentials each got."""
    app = create_app(ctx)
    got: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    def worker(share: list[str]) -> None:
        with TestClient(app) as http:
            for device in share:
                response = http.post("/api/v1/devices", json={"id": device}, headers=AUTH)
                if response.status_code != 201:
                    errors.append(response.text)
                else:
                    got[device] = response.json()

    workers = [threading.Thread(target=worker, args=(ids[i::threads],)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert not errors and not any(w.is_alive() for w in workers)
    return got


def test_many_concurrent_adds_leave_every_device_in_the_password_file(ctx: ServerContext) -> None:
    ids = [f"dev-{i:04d}" for i in range(DEVICES)]
    creds = add_all(ctx, ids, threads=6)
    ctx.sync_broker()  # whatever is still batched
    users = passwd(ctx)
    assert set(users) == {SERVER_USER, *ids}
    assert all(verify_password(creds[d]["mqtt_password"], users[d]) for d in ids)
    assert verify_password("server-secret", users[SERVER_USER])


def test_adds_during_a_slow_sync_are_batched_into_one_rewrite(ctx: ServerContext) -> None:
    """With syncs known to be expensive, an add does not wait for one; every add made while a sync runs is
    written by the next one: here two rewrites for all the adds."""
    assert ctx.access is not None
    access = ctx.access
    gate = threading.Event()
    rewrites: list[int] = []

    def slow_sync() -> None:
        gate.wait(30)  # the first sync is held until every add has returned
        access.sync((d.id, d.mqtt_password_hash, d.revoked) for d in ctx.store.list_devices())
        rewrites.append(len(ctx.store.list_devices()))

    ctx.syncer = BrokerSync(slow_sync, cheap_s=0.0)  # adds never wait
    ids = [f"dev-{i:04d}" for i in range(DEVICES)]
    creds = add_all(ctx, ids, threads=1)
    assert len(creds) == DEVICES and rewrites == []
    gate.set()
    ctx.sync_broker()
    assert len(rewrites) <= 2 and rewrites[-1] == DEVICES
    users = passwd(ctx)
    assert set(users) == {SERVER_USER, *ids}
    assert all(verify_password(creds[d]["mqtt_password"], users[d]) for d in ids)


def test_a_revocation_is_written_before_its_answer(ctx: ServerContext) -> None:
    """Even where adds do not wait for their rewrite, a revocation does."""
    assert ctx.access is not None
    access = ctx.access
    ctx.syncer = BrokerSync(lambda: access.sync((d.id, d.mqtt_password_hash, d.revoked)
                                                for d in ctx.store.list_devices()), cheap_s=0.0)
    add_all(ctx, ["dev-a", "dev-b"], threads=1)
    with TestClient(create_app(ctx)) as http:
        assert http.post("/api/v1/devices/dev-b/revoke", headers=AUTH).status_code == 200
    assert set(passwd(ctx)) == {SERVER_USER, "dev-a"}
    assert "user dev-b\ntopic deny #" in access.acl_path.read_text()

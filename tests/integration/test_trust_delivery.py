"""Trust operations delivered through the server, end to end with a real server and real agents: a key rotation
published with `keys publish` lets bundles signed by the new key install; a revoked key is refused by the server
at `model push` and by a device that was offline when the revocation was published; a signed rollback order moves
a fleet to an older release, which is refused without one; bad statements are one line and store nothing."""

from __future__ import annotations

import functools
import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey, load_signing_key
from edgefleet.core.keys import revocation_statement, rollback_order, rotation_statement
from edgefleet.errors import TransportError
from edgefleet.processes import ManagedProcess, wait_until
from edgefleet.testing import synthetic
from edgefleet.testing.fleet import LocalFleet

pytestmark = pytest.mark.integration
DEVICES = ["dev-0", "dev-1"]


def signed(key: SigningKey, version: str, release: int) -> bytes:
    return pack_bundle(synthetic.channel_mean_model(), key, BundleSpec(
        name="clf", version=version, release=release, labels=list(synthetic.LABELS),
        preprocess=synthetic.preprocess_spec()))


def active(fleet: LocalFleet, device: str) -> str | None:
    assert fleet.api is not None
    return (fleet.api.device(device)["reported"] or {}).get("active")  # type: ignore[no-any-return]


def everywhere(fleet: LocalFleet, model: str) -> bool:
    return all(active(fleet, d) == model for d in DEVICES)


def events(fleet: LocalFleet, device: str, name: str) -> list[dict[str, Any]]:
    assert fleet.api is not None
    return [e["detail"] for e in fleet.api.events(device) if e["name"] == name]


def one_line_refusal(result: subprocess.CompletedProcess[str], needle: str) -> None:
    assert result.returncode != 0, result.stdout
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def ok(fleet: LocalFleet, *args: str) -> str:
    result = fleet.cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def start_fleet_on(fleet: LocalFleet, model: str) -> dict[str, ManagedProcess]:
    assert fleet.api is not None
    for device in DEVICES:
        fleet.provision(device, tags={"site": "lab"})
    fleet.api.deploy(model, DEVICES)
    agents = {device: fleet.start_agent(device, shard=f"{i}/{len(DEVICES)}") for i, device in enumerate(DEVICES)}
    wait_until(functools.partial(everywhere, fleet, model), 60, f"{model} everywhere")
    return agents


def test_a_rotation_and_a_revocation_published_through_the_server(fleet: LocalFleet) -> None:
    api, keys = fleet.api, fleet.root / "keys"
    assert api is not None and fleet.key is not None
    old = fleet.key
    api.push_model(fleet.bundle("1.0.0", 1))
    api.push_model(fleet.bundle("9.0.0", 9))  # signed by the old key while it was trusted
    agents = start_fleet_on(fleet, "clf@1.0.0")

    rotated = ok(fleet, "keys", "rotate", "--dir", str(keys))
    new = load_signing_key(keys / "signing.key")
    rotation = keys / f"rotation-{old.public.key_id}-{new.public.key_id}.json"
    assert "edgefleet keys publish" in rotated and rotation.exists()
    with pytest.raises(TransportError, match="unknown_key"):  # not published yet: the server does not know it
        api.push_model(signed(new, "2.0.0", 2))
    assert "published to every device" in ok(fleet, "keys", "publish", str(rotation))
    api.push_model(signed(new, "2.0.0", 2))
    ok(fleet, "rollout", "create", "clf@2.0.0", "--select", "site=lab", "--window", "2", "--install-timeout", "60")
    wait_until(lambda: all(active(fleet, d) == "clf@2.0.0" for d in DEVICES), 60, "the new key's bundle everywhere")

    offline = DEVICES[1]
    wait_until(lambda: events(fleet, offline, "keyring_changed"), 30, "the rotation in the device's events")
    changes = len(events(fleet, offline, "keyring_changed"))
    assert agents[offline].stop() == 0
    revoke = fleet.root / "revoke.json"
    ok(fleet, "keys", "revoke", old.public.key_id, "--key", str(keys / "signing.key"), "--out", str(revoke))
    ok(fleet, "keys", "publish", str(revoke))
    (fleet.root / "old.bundle").write_bytes(signed(old, "3.0.0", 3))
    one_line_refusal(fleet.cli("model", "push", str(fleet.root / "old.bundle")), "revoked_key")
    one_line_refusal(fleet.cli("rollout", "create", "clf@9.0.0"), "revoked")
    assert json.loads(ok(fleet, "keys", "list", "--json"))["revoked"] == [old.public.key_id]

    fleet.start_agent(offline, shard="1/2")  # it finds the revocation in its retained desired state
    wait_until(lambda: len(events(fleet, offline, "keyring_changed")) > changes, 60, "the revocation on the device")
    api.deploy("clf@9.0.0", [offline])  # straight to the device, past the rollout checks
    wait_until(lambda: any(e.get("reason") == "revoked_key" for e in events(fleet, offline, "refused")), 60,
               "the device to refuse a bundle signed by the revoked key")
    assert active(fleet, offline) == "clf@2.0.0"


def test_a_rollback_order_sends_the_fleet_back_and_without_one_the_older_release_is_refused(
        fleet: LocalFleet) -> None:
    api = fleet.api
    assert api is not None
    for version, release in (("1.0.0", 1), ("2.0.0", 2), ("3.0.0", 3)):
        api.push_model(fleet.bundle(version, release))
    start_fleet_on(fleet, "clf@1.0.0")
    for model in ("clf@2.0.0", "clf@3.0.0"):  # release 1 is no longer the devices' previous model
        api.deploy(model, DEVICES)
        wait_until(functools.partial(everywhere, fleet, model), 60, f"{model} everywhere")

    one_line_refusal(fleet.cli("rollout", "create", "clf@1.0.0", "--select", "site=lab"), "--rollback")
    api.deploy("clf@1.0.0", [DEVICES[0]])  # past the server's check: the device refuses it by itself
    wait_until(lambda: any(e.get("reason") == "rollback" for e in events(fleet, DEVICES[0], "refused")), 60,
               "the device to refuse the older release")
    assert active(fleet, DEVICES[0]) == "clf@3.0.0"

    order = fleet.root / "order.json"
    ok(fleet, "bundle", "rollback-order", "--name", "clf", "--release", "1", "--key",
       str(fleet.root / "keys" / "signing.key"), "--out", str(order))
    ok(fleet, "rollout", "create", "clf@1.0.0", "--select", "site=lab", "--rollback", str(order), "--window", "2",
       "--install-timeout", "60")
    wait_until(lambda: all(active(fleet, d) == "clf@1.0.0" for d in DEVICES), 60, "the fleet back on release 1")


def test_bad_statements_and_orders_are_one_line_and_store_nothing(fleet: LocalFleet, tmp_path: Path) -> None:
    assert fleet.api is not None and fleet.key is not None
    fleet.api.push_model(fleet.bundle("1.0.0", 1))
    fleet.api.push_model(fleet.bundle("2.0.0", 2))
    fleet.provision("dev-0", tags={"site": "lab"})
    fleet.api.deploy("clf@2.0.0", ["dev-0"])
    stranger, successor = SigningKey.generate(), SigningKey.generate()
    bad = {"tampered.json": rotation_statement(fleet.key, successor).replace(b'"sig": "', b'"sig": "AAAA', 1),
           "garbage.json": b'{"signed": {"type": "rotate"', "stranger.json": revocation_statement(
               fleet.key.public.key_id, stranger)}
    for (name, data), needle in zip(bad.items(), ("bad_signature", "malformed", "unknown_key"), strict=True):
        (tmp_path / name).write_bytes(data)
        one_line_refusal(fleet.cli("keys", "publish", str(tmp_path / name)), needle)
    one_line_refusal(fleet.cli("keys", "publish", str(tmp_path / "missing.json")), "cannot read")
    ok(fleet, "bundle", "rollback-order", "--name", "clf", "--release", "1", "--key",
       str(fleet.root / "keys" / "signing.key"), "--out", str(tmp_path / "order.json"))
    one_line_refusal(fleet.cli("keys", "publish", str(tmp_path / "order.json")), "rollout create --rollback")
    (tmp_path / "stranger-order.json").write_bytes(rollback_order("clf", 1, stranger,
                                                                  expires=datetime.now(UTC) + timedelta(hours=1)))
    one_line_refusal(fleet.cli("rollout", "create", "clf@1.0.0", "--rollback", str(tmp_path / "stranger-order.json")),
                     "unknown_key")
    ring = json.loads(ok(fleet, "keys", "list", "--json"))
    assert list(ring["trusted"]) == [fleet.key.public.key_id] and ring["log"] == [] and ring["revoked"] == []
    assert fleet.api.rollouts() == []

"""Attacks on the update path, each refused with its reason while the device keeps its active model.

Every case is checked twice: by the pure decision (``core.update.decide``) and through the agent's real
``Updater`` (in-memory fetcher, real state directory), which must leave the active slot untouched.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import onnx
import pytest

from edgefleet.agent.fetch import InMemoryFetcher
from edgefleet.agent.model import LoadedModel
from edgefleet.agent.state import AgentState
from edgefleet.agent.updater import Updater
from edgefleet.bundle.container import MAGIC, MANIFEST, MODEL, SIGNATURES, read_container, write_container
from edgefleet.bundle.manifest import Manifest, MemberDigest, TensorSpec, canonical_json
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.keys import Keyring, revocation_statement
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import BundleError
from edgefleet.testing.synthetic import CHANNELS, CLASSES, LABELS, WINDOW, channel_mean_model, preprocess_spec
from edgefleet.transport.messages import ModelRef

KEY = SigningKey.generate()
RETIRED = SigningKey.generate()
ACTIVE_RELEASE = 5
MODEL_BYTES = channel_mean_model()


def packed(version: str = "2.0.0", release: int = ACTIVE_RELEASE + 1, key: SigningKey = KEY,
           model: bytes = MODEL_BYTES, **spec: Any) -> bytes:
    return pack_bundle(model, key, BundleSpec(name="clf", version=version, release=release, labels=list(LABELS),
                                              preprocess=preprocess_spec(), **spec))


def forged(model: bytes, *, key: SigningKey = KEY, release: int = ACTIVE_RELEASE + 1) -> bytes:
    """A correctly signed bundle around ``model`` that skips the packer's own checks (an insider's bundle)."""
    manifest = Manifest(
        name="clf", version="2.0.0", release=release, labels=list(LABELS), preprocess=preprocess_spec(),
        members={MODEL: MemberDigest(size=len(model), sha256=hashlib.sha256(model).hexdigest())},
        inputs=[TensorSpec(name="x", dtype="float", shape=[None, CHANNELS, WINDOW])],
        outputs=[TensorSpec(name="probs", dtype="float", shape=[None, CLASSES])],
    ).canonical_bytes()
    signatures = {"signatures": [{"keyid": key.public.key_id, "sig": base64.b64encode(key.sign(manifest)).decode()}]}
    return write_container({MANIFEST: manifest, SIGNATURES: json.dumps(signatures).encode(), MODEL: model})


def raw_container(members: list[tuple[str, bytes]], declared: dict[str, int] | None = None) -> bytes:
    """Container bytes written by hand, so names and sizes can be anything."""
    parts = [struct.pack(">8sBH", MAGIC, 1, len(members))]
    for name, data in members:
        encoded = name.encode()
        size = (declared or {}).get(name, len(data))
        parts += [struct.pack(">H", len(encoded)), encoded, struct.pack(">Q", size), data]
    return b"".join(parts)


def external_data_model(location: str) -> bytes:
    """The test model with its weight matrix moved to external data at ``location``."""
    proto = onnx.load_model_from_string(MODEL_BYTES)
    weight = next(t for t in proto.graph.initializer if t.name == "W")
    weight.ClearField("raw_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "96")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def torch_like_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weights": [1.0, 2.0]}))
    return buffer.getvalue()


class Exploit:
    """``pickle.loads`` of this calls ``print``: proof that a pickle member runs code when loaded."""

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[str]]:
        return print, ("pwned",)


def tampered_manifest() -> bytes:
    members = read_container(packed())
    manifest = json.loads(members[MANIFEST])
    manifest["hardware"] = ["any-hardware-at-all"]
    return write_container({**members, MANIFEST: canonical_json(manifest)})


def tampered_model() -> bytes:
    members = read_container(packed())
    model = bytearray(members[MODEL])
    model[len(model) // 2] ^= 0x01
    return write_container({**members, MODEL: bytes(model)})


def swapped_model() -> bytes:
    members = read_container(packed())
    other = read_container(packed(model=channel_mean_model(scale=9.0)))[MODEL]
    return write_container({**members, MODEL: other})


def too_long() -> bytes:
    members = read_container(packed())
    return raw_container([(MANIFEST, members[MANIFEST]), (SIGNATURES, members[SIGNATURES]), (MODEL, b"")],
                         declared={MODEL: 1 << 40})


def past() -> str:
    return (datetime.now(UTC) - timedelta(minutes=1)).isoformat()


@dataclass(frozen=True)
class Attack:
    make: Callable[[], bytes]
    reason: str
    trust: dict[str, Any] = field(default_factory=dict)


REVOKED_RING = Keyring.pinned([KEY.public, RETIRED.public]).apply_statement(
    revocation_statement(RETIRED.public.key_id, KEY))

ATTACKS = {
    "tampered manifest field": Attack(tampered_manifest, "bad_signature"),
    "tampered model bytes": Attack(tampered_model, "hash_mismatch"),
    "model swapped under the same manifest": Attack(swapped_model, "hash_mismatch"),
    "replayed older signed release": Attack(lambda: packed("0.9.0", release=ACTIVE_RELEASE - 2), "rollback"),
    "bundle for other hardware": Attack(lambda: packed(hardware=["jetson-orin"]), "wrong_hardware"),
    "expired bundle": Attack(lambda: packed(expires=past()), "expired"),
    "unknown key": Attack(lambda: packed(key=SigningKey.generate()), "unknown_key"),
    "revoked key, even though pinned": Attack(lambda: packed(key=RETIRED), "revoked_key",
                                              {"revoked": REVOKED_RING.revoked}),
    "external data ../../x": Attack(lambda: forged(external_data_model("../../x")), "external_data"),
    "external data /etc/passwd": Attack(lambda: forged(external_data_model("/etc/passwd")), "external_data"),
    "external data at a symlink": Attack(lambda: forged(external_data_model("weights.bin")), "external_data"),
    "member name with ..": Attack(lambda: raw_container([(MANIFEST, b"{}"), ("../model.onnx", MODEL_BYTES)]),
                                  "unexpected_member"),
    "duplicate member names": Attack(lambda: raw_container([(MANIFEST, b"{}"), (MANIFEST, b"{}")]),
                                     "duplicate_member"),
    "truncated file": Attack(lambda: packed()[:-7], "truncated"),
    "oversized member": Attack(too_long, "oversized"),
    "pickle member": Attack(lambda: forged(pickle.dumps(Exploit(), protocol=4)), "unsafe_format"),
    "pickle protocol 2 (legacy torch.save)": Attack(lambda: forged(pickle.dumps([1.0], protocol=2)), "unsafe_format"),
    "torch zip with data.pkl": Attack(lambda: forged(torch_like_zip()), "unsafe_format"),
    "gzip-compressed pickle (joblib)": Attack(lambda: forged(gzip.compress(pickle.dumps([1.0]))), "unsafe_format"),
    "not a model at all": Attack(lambda: forged(b"\x08\x07" + b"\xff" * 40), "invalid_model"),
}


class Harness:
    """The agent's updater over a real state directory, with a trust state tests can adjust."""

    def __init__(self, tmp: Path) -> None:
        self.state = AgentState(tmp)
        self.fetcher = InMemoryFetcher()
        self.activated: list[LoadedModel] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.trust: dict[str, Any] = {}
        self.updater = Updater(self.state, self.fetcher, self._trust, self.activated.append,
                               lambda name, detail: self.events.append((name, detail)), lambda: None)

    def _trust(self) -> TrustState:
        return TrustState(**{"keys": {KEY.public.key_id: KEY.public, RETIRED.public.key_id: RETIRED.public},
                             "highest_release": self.state.highest_releases(), **self.trust})

    def install(self, data: bytes, version: str = "2.0.0", release: int = ACTIVE_RELEASE + 1) -> None:
        digest = hashlib.sha256(data).hexdigest()
        target = ModelRef(name="clf", version=version, release=release, sha256=digest, size=len(data),
                          url=f"/artifacts/{digest}")
        self.fetcher.artifacts[target.url] = data
        self.updater.install(target)

    def active_ref(self) -> str | None:
        slot = self.state.slot("active")
        return None if slot is None else slot.ref


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    harness = Harness(tmp_path_factory.mktemp("device"))
    harness.install(packed("1.0.0", release=ACTIVE_RELEASE), "1.0.0", ACTIVE_RELEASE)
    assert harness.active_ref() == "clf@1.0.0", harness.events
    yield harness
    harness.state.close()


def test_the_device_accepts_a_good_update_in_principle() -> None:
    assert decide(packed(), TrustState(keys={KEY.public.key_id: KEY.public})).manifest.ref == "clf@2.0.0"


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_refused_with_its_reason_and_the_active_model_stays(name: str, device: Harness) -> None:
    attack = ATTACKS[name]
    data = attack.make()
    state = TrustState(**{"keys": {KEY.public.key_id: KEY.public, RETIRED.public.key_id: RETIRED.public},
                          "highest_release": {"clf": ACTIVE_RELEASE}, **attack.trust})
    with pytest.raises(BundleError) as caught:
        decide(data, state)
    assert caught.value.reason == attack.reason, caught.value

    device.trust = attack.trust
    activations = len(device.activated)
    try:
        device.install(data)
    finally:
        device.trust = {}
    event, detail = device.events[-1]
    assert (event, detail.get("reason")) == ("refused", attack.reason)
    assert device.active_ref() == "clf@1.0.0"
    assert device.state.slot("candidate") is None
    assert len(device.activated) == activations


def test_a_pickle_member_is_refused_without_being_unpickled(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(BundleError, match="pickle"):
        decide(forged(pickle.dumps(Exploit())), TrustState(keys={KEY.public.key_id: KEY.public}))
    assert "pwned" not in capsys.readouterr().out


def test_external_data_is_refused_even_where_the_named_file_exists(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x00" * 96)
    (tmp_path / "weights.bin").symlink_to(secret)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BundleError) as caught:
        decide(forged(external_data_model("weights.bin")), TrustState(keys={KEY.public.key_id: KEY.public}))
    assert caught.value.reason == "external_data"
    assert "symlink" in str(caught.value)


def test_the_packer_refuses_what_devices_refuse() -> None:
    with pytest.raises(BundleError) as caught:
        packed(model=external_data_model("../../x"))
    assert caught.value.reason == "external_data"
    with pytest.raises(BundleError) as caught:
        packed(model=pickle.dumps([1.0]))
    assert caught.value.reason == "unsafe_format"


def test_deeply_nested_json_members_are_refused_as_malformed() -> None:
    members = read_container(packed())
    for name, nested in ((SIGNATURES, b"[" * 60000), (MANIFEST, b'{"a":' * 60000)):
        with pytest.raises(BundleError) as caught:
            decide(write_container({**members, name: nested}), TrustState(keys={KEY.public.key_id: KEY.public}))
        assert caught.value.reason in ("malformed", "bad_signature")

"""Garbage collection of the updater: partial downloads, health-check leftovers and bundles that no slot or
pending target holds are removed when the updater starts and after each update; what is held stays."""

from __future__ import annotations

from pathlib import Path

from edgefleet.agent.updater import PENDING_KEY, STEP_KEY
from edgefleet.bundle.signing import SigningKey
from edgefleet.processes import wait_until
from edgefleet.testing.agents import UpdaterHarness, model_ref, signed_bundle

KEY = SigningKey.generate()
V1, V2, V3 = (signed_bundle(KEY, f"{n}.0.0", n) for n in (1, 2, 3))


def test_unused_files_go_and_held_ones_stay_at_start_and_after_an_update(tmp_path: Path) -> None:
    harness = UpdaterHarness(tmp_path, KEY)
    harness.install(V1, "1.0.0", 1)
    state, t3 = harness.state, model_ref(V3, "3.0.0", 3)
    active = state.bundle_path(model_ref(V1, "1.0.0", 1).sha256)
    downloads, health = tmp_path / "downloads", tmp_path / "health"
    downloads.mkdir(exist_ok=True)
    health.mkdir(exist_ok=True)
    stray = [downloads / f"{'a' * 64}.part", downloads / f"{'b' * 64}.delta.part", health / "candidate.onnx",
             state.bundles_dir / f"{'c' * 64}.bundle", state.bundles_dir / f".{'d' * 64}.bundle.tmp1234"]
    for path in stray:
        path.write_bytes(b"left behind by a kill -9")
    resumable = downloads / f"{t3.sha256}.part"
    resumable.write_bytes(V3[:100])
    state.put(PENDING_KEY, {**t3.model_dump(), "url": "/nowhere"})  # pending (its download will fail)

    harness.updater.start()  # collects at start, then tries the pending update: a transport error, kept
    wait_until(lambda: not any(path.exists() for path in stray), 10, "the stray files to go")
    assert active.exists() and resumable.exists()

    t2 = model_ref(V2, "2.0.0", 2)
    harness.fetcher.artifacts[t2.url] = V2
    harness.updater.request(t2)  # a newer desired state: v3 is no longer wanted
    wait_until(lambda: harness.active_ref() == "clf@2.0.0" and state.get(STEP_KEY) == "idle", 30, "version 2")
    wait_until(lambda: not resumable.exists(), 10, "v3's partial download to go after the update")
    assert active.exists() and state.bundle_path(t2.sha256).exists()  # the previous and the active slot
    harness.updater.stop()
    state.close()

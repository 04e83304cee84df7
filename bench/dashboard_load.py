"""The dashboard under load: how long the fleet page takes with 10,000 devices in the store (target <= 1 s).

A real ``edgefleet server`` (SQLite, embedded broker) is started; the devices are written straight into its
store in one transaction (provisioning 10,000 through the API takes a minute and measures something else),
each with tags, a profile, a reported state and a last-seen time, and the model version it is told to run.
Then an operator logs in (session cookie) and fetches ``/ui/fleet`` (100 devices a page, the whole fleet's
counts): :func:`fleet_page_ms` is the median over the fetches of the time from request to the last byte of the
rendered page. ``bench/bench_twin.py`` publishes it as ``ui_fleet_page_ms``.

Run alone: ``python -m bench.dashboard_load [N_DEVICES]``.
"""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.testing.fleet import LocalFleet

FETCHES = 9
WARMUP = 2
PROFILES = ("raspberry-pi", "jetson-nano", "esp32-s3")


def populate(store: Store, n_devices: int, model_id: int, model_ref: str, now: float) -> None:
    """``n_devices`` devices in one transaction: 20 sites, 3 profiles, 9 in 10 online, all told to run the model."""
    rng = random.Random(0)
    digest = hashlib.sha256(b"not a real secret").hexdigest()
    with store.session() as s:
        s.add_all(Device(
            id=f"dev-{i:05d}", token_sha256=digest, mqtt_password_sha256=digest, tags={"site": f"site-{i % 20}"},
            profile=PROFILES[i % len(PROFILES)], hardware="generic", created=now - 86400, revoked=False,
            desired_model_id=model_id, last_seen=now - (rng.uniform(0, 60) if i % 10 else rng.uniform(600, 7200)),
            reported={"device": f"dev-{i:05d}", "agent_version": "0.1.0", "active": model_ref, "running": model_ref,
                      "update_state": "idle", "ts": now}) for i in range(n_devices))


def fleet_page_ms(n_devices: int = 10_000, *, query: str = "") -> float:
    """Median milliseconds to fetch the rendered fleet page (``/ui/fleet?QUERY``) from a real server whose store
    holds ``n_devices`` devices."""
    with tempfile.TemporaryDirectory(prefix="dashboard-load-") as tmp:
        fleet = LocalFleet(Path(tmp))
        try:
            api = fleet.start_server()
            model = api.push_model(fleet.bundle("1.0.0", 1))
            store = Store(f"sqlite:///{Path(tmp) / 'server' / 'edgefleet.db'}")
            try:
                row = store.find_model(model["name"], model["version"])
                assert row is not None
                populate(store, n_devices, row.id, f"{row.name}@{row.version}", time.time())
            finally:
                store.close()
            assert fleet.server_url is not None and fleet.operator_token is not None
            with httpx.Client(base_url=fleet.server_url, timeout=60.0) as http:
                login = http.post("/ui/login", headers={"Authorization": f"Bearer {fleet.operator_token}"})
                login.raise_for_status()
                samples = []
                for n in range(WARMUP + FETCHES):
                    start = time.perf_counter()
                    page = http.get(f"/ui/fleet?{query}")
                    elapsed = (time.perf_counter() - start) * 1000.0
                    page.raise_for_status()
                    assert f"{n_devices}</span> devices" in page.text, "the page does not count the whole fleet"
                    if n >= WARMUP:
                        samples.append(elapsed)
            return statistics.median(samples)
        finally:
            fleet.close()


if __name__ == "__main__":
    devices = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    print(f"fleet page, {devices} devices: {fleet_page_ms(devices):.1f} ms (median of {FETCHES}; target <= 1000; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"fleet page filtered by tag: {fleet_page_ms(devices, query='tag=site%3Dsite-3'):.1f} ms")

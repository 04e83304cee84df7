"""One process running many twins: ``python -m edgefleet.twin.host SPEC.json``.

Each twin is the agent's own :class:`~edgefleet.agent.agent.Agent` (updater, restore, inference pipeline, stats,
outbox, its SQLite state and data directory) on its own credentials, fed by a :class:`~edgefleet.twin.sensors.
TwinSource`. Only what a device's hardware would be is stood in for:

- the network: every twin's MQTT session on one shared thread (:mod:`edgefleet.twin.link`); link loss cuts the
  socket, a slow link throttles downloads (:class:`TwinFetcher`);
- the disk: free space is the twin's ``disk_mb`` less what its data directory holds, and none while a
  ``disk_full`` fault lasts (the agent's download then refuses with ``disk_full``, as on a full device);
- the health check's child process: the agent checks each candidate in a child process; twins of one process
  share that check per bundle (one child per bundle and latency budget, the same verdict for each twin), since
  N identical children would measure nothing but this machine's process start-up;
- a crash: the twin's agent stops without draining its outbox or saying goodbye to the broker, and a new agent
  starts on the same data directory after ``restart_after_s`` (as a supervisor restarts a device's agent).

The spec (written by :class:`edgefleet.twin.fleet.TwinFleet`): ``{"scenario": {...}, "twins": [{"credentials",
"data_dir", "group", "seed"}], "duration_s": null, "ready_file": PATH}``.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from edgefleet.agent import updater as updater_module
from edgefleet.agent.agent import Agent
from edgefleet.agent.config import load_config
from edgefleet.agent.fetch import ArtifactFetcher, Body
from edgefleet.agent.healthcheck import run_health_check
from edgefleet.errors import EdgefleetError, TransportError
from edgefleet.storage import atomic_write
from edgefleet.twin.link import LinkLoop, TwinLink
from edgefleet.twin.scenario import Crash, DiskFull, Group, LinkLoss, Scenario, SlowLink
from edgefleet.twin.sensors import Rows, TwinSource, Variation, scenario_rows

if TYPE_CHECKING:
    from edgefleet.bundle.manifest import Manifest

log = logging.getLogger(__name__)
MIB = 1024 * 1024
FAULT_TICK_S = 0.25
BOOT_THREADS = 16
"""Twins that start at once in a host (each start waits for its broker connection)."""


class SharedHealthCheck:
    """The agent's health check (in a child process) once per bundle and budget; every twin gets its verdict."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: dict[tuple[str, float | None], threading.Lock] = {}
        self._verdicts: dict[tuple[str, float | None], float | EdgefleetError] = {}
        self._check = run_health_check
        self.children = 0

    def __call__(self, model: bytes, manifest: Manifest, *, latency_budget_ms: float | None = None,
                 **options: Any) -> float:
        key = (hashlib.sha256(model).hexdigest(), latency_budget_ms)
        with self._lock:
            gate = self._keys.setdefault(key, threading.Lock())
        with gate:
            if key not in self._verdicts:
                self.children += 1
                try:
                    self._verdicts[key] = self._check(model, manifest, latency_budget_ms=latency_budget_ms, **options)
                except EdgefleetError as exc:
                    self._verdicts[key] = exc
        verdict = self._verdicts[key]
        if isinstance(verdict, EdgefleetError):
            raise copy.copy(verdict)
        return verdict


@dataclass
class Conditions:
    """What the twin's faults make of its network and disk now."""

    group: Group
    born: float = field(default_factory=time.monotonic)

    def age(self) -> float:
        return time.monotonic() - self.born

    def disk_full(self) -> bool:
        age = self.age()
        return any(isinstance(f, DiskFull) and f.at_s <= age and (f.for_s is None or age < f.at_s + f.for_s)
                   for f in self.group.faults)

    def link_down(self) -> bool:
        age = self.age()
        return any(isinstance(f, LinkLoss) and f.at_s <= age < f.at_s + f.for_s for f in self.group.faults)

    def rate_bps(self) -> float | None:
        return next((f.rate_bps for f in self.group.faults if isinstance(f, SlowLink)), None)


class TwinFetcher(ArtifactFetcher):
    """The agent's fetcher over this twin's network and disk (see the module docstring)."""

    def __init__(self, conditions: Conditions, data_dir: Path, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._conditions = conditions
        self._data_dir = data_dir

    def free_bytes(self, directory: Path) -> int:
        if self._conditions.disk_full():
            return 0
        used = sum(p.stat().st_size for p in self._data_dir.rglob("*") if p.is_file())
        return max(0, min(super().free_bytes(directory), int(self._conditions.group.disk_mb * MIB) - used))

    @contextmanager
    def _open(self, url: str, offset: int, timeout_s: float) -> Iterator[Body]:
        if self._conditions.link_down():
            raise TransportError(f"download of {url} failed: the network is down")
        with super()._open(url, offset, timeout_s) as body:
            rate = self._conditions.rate_bps()
            if rate is None:
                yield body
                return
            yield Body(body.resumed, self._throttled(body.chunks, rate), body.length)

    def _throttled(self, chunks: Iterator[bytes], rate_bps: float) -> Iterator[bytes]:
        started, sent = time.monotonic(), 0
        for chunk in chunks:
            if self._conditions.link_down():
                raise TransportError("the network went down during the download")
            sent += len(chunk)
            delay = started + sent / rate_bps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            yield chunk


class Twin:
    """One twin: an agent on its data directory, its source, and its faults."""

    def __init__(self, spec: dict[str, Any], scenario: Scenario, rows: Rows, loop: LinkLoop) -> None:
        self.credentials = Path(spec["credentials"])
        self.data_dir = Path(spec["data_dir"])
        self.group = scenario.groups[int(spec.get("group", 0))]
        self.seed = int(spec.get("seed", 0))
        self.scenario, self.rows, self.loop = scenario, rows, loop
        self.conditions = Conditions(self.group)
        self.agent: Agent | None = None
        self.source: TwinSource | None = None
        self.thread: threading.Thread | None = None
        self.crashes = 0
        self._faults_done: set[int] = set()
        self._restart_at: float | None = None
        self._link_cut_until = 0.0

    @property
    def alive(self) -> bool:
        return self.agent is not None

    def boot(self) -> None:
        """Start the agent (as a device's supervisor starts it) and its sensor loop."""
        config = load_config(self.credentials, self.data_dir, telemetry_interval_s=self.scenario.telemetry_interval_s)
        fetcher = TwinFetcher(self.conditions, self.data_dir, config.server_url, config.token,
                              limits=config.downloads, tls=config.tls)
        agent = Agent(config, fetcher, link_factory=functools.partial(TwinLink, self.loop))
        channels = self.rows.x.shape[1] if self.rows.x.ndim == 3 else self.rows.x.shape[-1]
        self.source = TwinSource(self.rows, self.scenario.rate_hz, Variation.of(self.group, channels),
                                 seed=self.seed * 7919 + self.crashes)
        agent.start(connect_timeout_s=10.0)
        self.agent = agent
        self.thread = threading.Thread(target=self._run, args=(agent, self.source), name=f"twin-{config.device_id}",
                                       daemon=True)
        self.thread.start()

    def _run(self, agent: Agent, source: TwinSource) -> None:
        try:
            agent.run(source)
        except Exception:  # a twin's failure is its own: the others run on
            log.exception("twin %s stopped", agent.device)

    def stop(self, *, crash: bool = False) -> None:
        """Stop the agent: drained and disconnected, or (``crash``) as a killed process would end."""
        agent, source, thread = self.agent, self.source, self.thread
        if agent is None or source is None:
            return
        self.agent = None
        if crash:
            link = agent.link
            if isinstance(link, TwinLink):
                link.crash()
        agent.request_stop()
        source.close()
        if thread is not None:
            thread.join(10.0)
        agent.stop(drain_timeout_s=0.0 if crash else 5.0)

    def tick(self) -> None:
        """Apply the faults that are due (called every :data:`FAULT_TICK_S`)."""
        now = time.monotonic()
        if self._restart_at is not None:
            if now >= self._restart_at:
                self._restart_at = None
                self.boot()
            return
        agent = self.agent
        if agent is None:
            return
        age = self.conditions.age()
        for index, fault in enumerate(self.group.faults):
            if index in self._faults_done:
                continue
            if isinstance(fault, LinkLoss) and age >= fault.at_s:
                self._faults_done.add(index)
                if isinstance(agent.link, TwinLink):
                    agent.link.cut(fault.for_s)
            elif isinstance(fault, Crash) and age >= fault.at_s:
                self._faults_done.add(index)
                self.crashes += 1
                log.info("twin %s crashes", agent.device)
                self.stop(crash=True)
                self._restart_at = time.monotonic() + fault.restart_after_s
                return


class Host:
    """The twins of this process, their shared network thread, and their faults."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.scenario = Scenario.model_validate(spec["scenario"])
        self.rows = scenario_rows(self.scenario)
        self.loop = LinkLoop()
        self.twins = [Twin(t, self.scenario, self.rows, self.loop) for t in spec["twins"]]
        self.duration_s = spec.get("duration_s")
        self.ready_file = Path(spec["ready_file"]) if spec.get("ready_file") else None
        self._stop = threading.Event()
        self.health = SharedHealthCheck()
        setattr(updater_module, "run_health_check", self.health)  # noqa: B010  # see the module docstring

    def request_stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        started = time.monotonic()

        def boot(twin: Twin) -> None:
            if self._stop.is_set():
                return
            try:
                twin.boot()
            except EdgefleetError as exc:
                log.error("twin %s cannot start: %s", twin.credentials.stem, exc)

        with ThreadPoolExecutor(max_workers=BOOT_THREADS, thread_name_prefix="boot") as pool:
            list(pool.map(boot, self.twins))  # a boot waits for its broker connection: overlap those waits
        if self.ready_file is not None:
            atomic_write(self.ready_file, json.dumps({"pid": os.getpid(), "twins": len(self.twins),
                                                      "alive": sum(t.alive for t in self.twins)}).encode())
        while not self._stop.wait(FAULT_TICK_S):
            if self.duration_s is not None and time.monotonic() - started >= self.duration_s:
                break
            for twin in self.twins:
                try:
                    twin.tick()
                except Exception:
                    log.exception("twin fault step failed")
        stoppers = [threading.Thread(target=t.stop, daemon=True) for t in self.twins]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(30.0)
        self.loop.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=os.environ.get("EDGEFLEET_TWIN_LOG", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(args) != 1:
        print("usage: python -m edgefleet.twin.host SPEC.json", file=sys.stderr)
        return 2
    try:
        host = Host(json.loads(Path(args[0]).read_text()))
    except (OSError, ValueError, EdgefleetError) as exc:
        print(f"edgefleet: error: twin host: {exc}", file=sys.stderr)
        return 2

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        host.request_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    host.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

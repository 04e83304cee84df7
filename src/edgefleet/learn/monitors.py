"""Monitors after rollout: a gate expression over a model's fleet, judged continuously by the server.

A monitor names a model (every version of it), optionally a tag selection, and an expression in the rollout
gate language (:mod:`edgefleet.core.gates`) with the one-cohort metrics (``accuracy < 90%``,
``error_rate > 5%``, ``latency_p95_ms > 50``), drift (``drift_psi > 0.2``, ``drift_score > 1``) and silence
(``silent_for > 15m``: the quietest device's time since it last reported). It is judged by
:func:`~edgefleet.core.gates.judge_cohorts`, the rollouts' own implementation, with a sequential judge (looked
at again and again), over the last ``window_s`` of the fleet's telemetry plus the labelled field data
(delayed labels, :mod:`edgefleet.learn.fielddata`).

States: ``unknown`` (no decision yet), ``firing`` (the expression holds on evidence), ``ok``. Going to firing
raises a fleet alert (stored, counted, optionally POSTed to a webhook by a background sender, never blocking)
and, with ``pause_rollouts``, pauses the running rollouts of the model; going back to ok clears it. An
unknown or inconclusive evaluation keeps the state. States change by compare-and-set in the store, so that of
several replicas exactly one raises each alert.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgefleet.core.cohorts import CohortStats
from edgefleet.core.gates import Gate, GateResult, Judge, judge_cohorts, parse_gate
from edgefleet.core.rollout import TWIN_TAG
from edgefleet.errors import ConfigError, EdgefleetError
from edgefleet.learn.fielddata import label_stats
from edgefleet.server.store import Store
from edgefleet.server.store.learn_tables import AlertRow, MonitorRow

if TYPE_CHECKING:
    from edgefleet.server.orchestrator import Orchestrator

log = logging.getLogger(__name__)
MONITOR_INTERVAL_S = 1.0
"""How often the server judges its monitors (at most)."""
DEFAULT_WINDOW_S = 300.0
WEBHOOK_TIMEOUT_S = 5.0
WEBHOOK_QUEUE = 100


@dataclass(frozen=True)
class MonitorSpec:
    """What an operator asks to be watched; :meth:`check` raises ConfigError naming what is wrong."""

    expr: str
    model: str
    select: Mapping[str, str] = field(default_factory=dict)
    webhook: str | None = None
    pause_rollouts: bool = False
    window_s: float = DEFAULT_WINDOW_S

    def check(self) -> Gate:
        gate = parse_gate(self.expr)
        if not self.model or "@" in self.model:
            raise ConfigError(f"a monitor watches a model NAME (every version), not {self.model!r}")
        if self.webhook is not None and not self.webhook.startswith(("http://", "https://")):
            raise ConfigError(f"webhook must be an http:// or https:// URL, not {self.webhook!r}")
        if not 0 < self.window_s <= 30 * 86400:
            raise ConfigError(f"window_s must be in (0, 30 days], not {self.window_s!r}")
        return gate


def judge_fleet(gate: Gate, cohort: CohortStats, silent_for: float | None,
                judge: Judge = Judge(sequential=True)) -> GateResult:
    """A monitor's verdict: ``gate`` on one cohort, with ``silent_for`` (seconds, None: no device) beside it."""
    return judge_cohorts(gate, cohort, None, judge, extra={"silent_for": silent_for})


class WebhookSender:
    """POSTs alerts as JSON from one background thread, each with a timeout; a full queue drops (counted)."""

    def __init__(self, timeout_s: float = WEBHOOK_TIMEOUT_S, capacity: int = WEBHOOK_QUEUE) -> None:
        self.timeout_s = timeout_s
        self.sent = self.failed = self.dropped = 0
        self._queue: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue(capacity)
        self._thread: threading.Thread | None = None

    def send(self, url: str, body: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((url, body))
        except queue.Full:
            self.dropped += 1
            return
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="monitor-webhooks", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import httpx

        while True:
            try:
                url, body = self._queue.get(timeout=30.0)
            except queue.Empty:
                return
            try:
                httpx.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"},
                           timeout=self.timeout_s).raise_for_status()
                self.sent += 1
            except httpx.HTTPError as exc:
                self.failed += 1
                log.warning("alert webhook %s failed: %s", url, exc)


class MonitorRunner:
    """Judges every monitor over the store's recent telemetry and acts on state changes."""

    def __init__(self, store: Store, *, pause: Callable[[str, str], object] | None = None,
                 on_alert: Callable[[AlertRow], None] | None = None, webhooks: WebhookSender | None = None,
                 clock: Callable[[], float] = time.time, interval_s: float = MONITOR_INTERVAL_S) -> None:
        self.store = store
        self.pause = pause
        self.on_alert = on_alert
        self.webhooks = webhooks or WebhookSender()
        self.clock = clock
        self.interval_s = interval_s
        self._last = float("-inf")

    def maybe_run(self) -> None:
        """Run when ``interval_s`` has passed since the last run; errors are logged, never raised."""
        now = self.clock()
        if now - self._last < self.interval_s:
            return
        self._last = now
        try:
            self.run_once(now)
        except EdgefleetError as exc:
            log.warning("monitors not evaluated: %s", exc)

    def run_once(self, now: float | None = None) -> dict[str, str]:
        """Judge every monitor once; each monitor's state afterwards."""
        now = self.clock() if now is None else now
        monitors = self.store.list_monitors()
        if not monitors:
            return {}
        models = {m.id: m.name for m in self.store.list_models()}
        devices = [d for d in self.store.list_devices() if not d.revoked and TWIN_TAG not in (d.tags or {})]
        out = {}
        for monitor in monitors:
            fleet = [d for d in devices if _runs(d, monitor.model, models)
                     and all((d.tags or {}).get(k) == v for k, v in (monitor.select or {}).items())]
            result = self.judge(monitor, [d.id for d in fleet], _silent_for(fleet, now), now)
            out[monitor.id] = self._apply(monitor, result, now)
        return out

    def judge(self, monitor: MonitorRow, device_ids: list[str], silent_for: float | None, now: float
              ) -> GateResult:
        cohort = CohortStats()
        if device_ids:
            primary, _ = self.store.device_model_stats(device_ids, now - monitor.window_s)
            for per_model in primary.values():
                for ref, stats in per_model.items():
                    if ref.partition("@")[0] == monitor.model:
                        cohort.add(stats)
            for stats in label_stats(self.store.field_labels(monitor.model, device_ids)).values():
                cohort.labelled += stats.labelled
                cohort.correct += stats.correct
        return judge_fleet(parse_gate(monitor.expr), cohort, silent_for)

    def _apply(self, monitor: MonitorRow, result: GateResult, now: float) -> str:
        values: dict[str, Any] = {k: v for k, v in result.values.items()}
        state = {"fail": "firing", "pass": "ok"}.get(result.outcome, monitor.state)
        if not self.store.transition_monitor(monitor.id, monitor.state, state, result.explanation, values, now):
            return monitor.state  # another replica judged it first
        if state == monitor.state:
            return state
        if state == "firing":
            self._fire(monitor, result, values, now)
        elif monitor.state == "firing":
            cleared = self.store.clear_alerts(monitor.id, now)
            log.info("monitor %s cleared (%d alert(s)): %s", monitor.id, cleared, result.explanation)
            if monitor.webhook:
                self.webhooks.send(monitor.webhook, {"event": "cleared", "monitor": monitor.id,
                                                     "model": monitor.model, "expr": monitor.expr, "at": now,
                                                     "explanation": result.explanation, "values": values})
        return state

    def _fire(self, monitor: MonitorRow, result: GateResult, values: dict[str, Any], now: float) -> None:
        alert = self.store.raise_alert(monitor, result.explanation, values, now)
        log.warning("monitor %s fired on %s: %s", monitor.id, monitor.model, result.explanation)
        if self.on_alert is not None:
            self.on_alert(alert)
        paused: list[str] = []
        if monitor.pause_rollouts and self.pause is not None:
            for rollout in self.store.active_rollouts():
                if rollout.phase != "paused" and rollout.candidate.partition("@")[0] == monitor.model:
                    try:
                        self.pause(rollout.id, f"monitor {monitor.id}: {monitor.expr}")
                        paused.append(rollout.id)
                    except EdgefleetError as exc:
                        log.warning("monitor %s could not pause rollout %s: %s", monitor.id, rollout.id, exc)
            if paused:
                self.store.note_paused(alert.id, paused)
        if monitor.webhook:
            self.webhooks.send(monitor.webhook, {"event": "firing", "alert": alert.id, "monitor": monitor.id,
                                                 "model": monitor.model, "expr": monitor.expr, "at": now,
                                                 "explanation": result.explanation, "values": values,
                                                 "paused_rollouts": paused})


def _runs(device: Any, name: str, models: Mapping[int, str]) -> bool:
    """Whether ``device`` is meant to run (or reports running) a version of model ``name``."""
    if device.desired_model_id is not None and models.get(device.desired_model_id) == name:
        return True
    reported = device.reported or {}
    running = reported.get("running") or reported.get("active")
    return isinstance(running, str) and running.partition("@")[0] == name


def _silent_for(devices: list[Any], now: float) -> float | None:
    """Seconds since the quietest device last reported (since it was added, if never); None without devices."""
    if not devices:
        return None
    return max(0.0, max(now - float(d.last_seen if d.last_seen is not None else d.created) for d in devices))


# -- wiring into the server ----------------------------------------------------------------------------------
_RUNNERS: weakref.WeakKeyDictionary[Orchestrator, MonitorRunner] = weakref.WeakKeyDictionary()


def attach(orchestrator: Orchestrator, runner: MonitorRunner) -> None:
    """Let ``orchestrator``'s tick judge monitors with ``runner`` (:func:`evaluate_monitors`)."""
    _RUNNERS[orchestrator] = runner


def evaluate_monitors(orchestrator: Orchestrator) -> None:
    """Called from the orchestrator's tick: judge monitors when due (a no-op without an attached runner)."""
    runner = _RUNNERS.get(orchestrator)
    if runner is not None:
        runner.maybe_run()


def runner_of(orchestrator: Orchestrator) -> MonitorRunner | None:
    """The runner attached to ``orchestrator``, if any."""
    return _RUNNERS.get(orchestrator)

"""What each dashboard page shows, assembled from the store: plain data and SVG, no HTTP here."""

from __future__ import annotations

import contextlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from markupsafe import Markup
from sqlalchemy import select

from edgefleet.core.gates import BoolOp, Compare, Node, Not, parse_gate
from edgefleet.core.telemetry import CONFIDENCE_BINS, LatencyHistogram
from edgefleet.errors import EdgefleetError
from edgefleet.server.orchestrator import rollout_json
from edgefleet.server.schema import Device
from edgefleet.server.store import Store
from edgefleet.server.ui.svg import PALETTE, Series, bar_chart, gate_bar, line_chart, pareto_chart, timeline

SILENT_AFTER_S = 120.0
"""A device that sent nothing (report or telemetry) for this long is shown as silent."""
MAX_PER_PAGE = 500
TIME_BUCKETS = 60


@dataclass(frozen=True)
class FleetFilter:
    tag: str = ""
    profile: str = ""
    status: str = ""
    model: str = ""
    q: str = ""

    def matches(self, d: FleetRow, online: bool, running: str | None, desired: str | None) -> bool:
        if self.tag:
            key, _, value = self.tag.partition("=")
            if (d.tags or {}).get(key) != value:
                return False
        if self.profile and (d.profile or "") != self.profile:
            return False
        if self.status == "online" and (d.revoked or not online):
            return False
        if self.status == "silent" and (d.revoked or online):
            return False
        if self.status == "revoked" and not d.revoked:
            return False
        if self.model and self.model not in (running, desired):
            return False
        return not self.q or self.q in d.id

    def query(self) -> dict[str, str]:
        return {k: v for k, v in (("tag", self.tag), ("profile", self.profile), ("status", self.status),
                                  ("model", self.model), ("q", self.q)) if v}


@dataclass
class FleetPage:
    rows: list[dict[str, Any]]
    total: int
    matched: int
    page: int
    pages: int
    per_page: int
    counts: dict[str, int]
    versions: list[tuple[str, int, int]]
    tags: list[str]
    profiles: list[str]
    models: list[str]
    alerts: list[dict[str, Any]] = field(default_factory=list)


def model_names(store: Store) -> dict[int, str]:
    return {m.id: f"{m.name}@{m.version}" for m in store.list_models()}


class FleetRow(NamedTuple):
    id: str
    tags: dict[str, str] | None
    profile: str | None
    revoked: bool
    hardware: str | None
    desired_model_id: int | None
    last_seen: float | None
    running: str | None
    active: str | None
    update_state: str | None
    last_error: str | None


def fleet_rows(store: Store) -> list[FleetRow]:
    """Every device with only what the fleet page shows, read fast: plain columns over a Core connection (no ORM
    objects), and the few fields of the reported state read by the database (JSON paths, SQLite and PostgreSQL
    alike), not the whole state decoded in Python."""
    reported = Device.reported
    query = select(Device.id, Device.tags, Device.profile, Device.revoked, Device.hardware, Device.desired_model_id,
                   Device.last_seen, reported["running"].as_string(), reported["active"].as_string(),
                   reported["update_state"].as_string(), reported["last_error"].as_string()).order_by(Device.id)
    with store.engine.connect() as connection:
        return [FleetRow(*row) for row in connection.execute(query)]


def fleet_page(store: Store, flt: FleetFilter, *, page: int, per_page: int, now: float) -> FleetPage:
    """One page of the fleet after the filters, with the whole fleet's counts and filter choices."""
    names = model_names(store)
    devices = fleet_rows(store)
    online_since = now - SILENT_AFTER_S
    counts = Counter[str]()
    running_n, desired_n = Counter[str](), Counter[int | None]()
    tags: set[str] = set()
    profiles: set[str] = set()
    matched: list[FleetRow] = []
    filtering = bool(flt.query())
    for d in devices:
        running = d.running or d.active
        online = d.last_seen is not None and d.last_seen > online_since
        counts["revoked" if d.revoked else "online" if online else "silent"] += 1
        running_n[running or "(none)"] += 1
        desired_n[d.desired_model_id] += 1
        if d.tags:
            tags.update(f"{k}={v}" for k, v in d.tags.items())
        profiles.add(d.profile or "")
        if not filtering or flt.matches(d, online, running, names.get(d.desired_model_id or -1)):
            matched.append(d)
    per_page = max(1, min(per_page, MAX_PER_PAGE))
    pages = max(1, math.ceil(len(matched) / per_page))
    page = max(1, min(page, pages))
    rows = [{"id": d.id, "tags": d.tags or {}, "profile": d.profile, "hardware": d.hardware or "generic",
             "online": d.last_seen is not None and d.last_seen > online_since, "revoked": d.revoked,
             "running": d.running or d.active, "desired": names.get(d.desired_model_id or -1),
             "update_state": d.update_state, "last_error": d.last_error,
             "age": None if d.last_seen is None else max(0.0, now - d.last_seen)}
            for d in matched[(page - 1) * per_page: page * per_page]]
    told = Counter[str]()
    for model_id, n in desired_n.items():
        if model_id is not None and model_id in names:
            told[names[model_id]] += n
    versions = sorted({*running_n, *told} - {"(none)"})
    return FleetPage(rows=rows, total=len(devices), matched=len(matched), page=page, pages=pages,
                     per_page=per_page, counts=dict(counts), versions=[(v, told[v], running_n[v]) for v in versions],
                     tags=sorted(tags), profiles=sorted(profiles - {""}), models=versions,
                     alerts=[{"model": a.model, "expr": a.expr, "raised": a.raised, "explanation": a.explanation}
                             for a in store.list_alerts(active=True, limit=50)])


def device_charts(store: Store, device_id: str, since: float) -> dict[str, Markup]:
    """A device's telemetry since ``since`` as charts: latency p50/p99 and drift over time, the confidence
    histogram and the class counts (summed)."""
    batches = store.telemetry(device_id, since)
    confidence = [0] * CONFIDENCE_BINS
    classes: Counter[str] = Counter()
    alerts: Counter[str] = Counter()
    if batches:
        t0, t1 = batches[0].ts, batches[-1].ts
        width = max((t1 - t0) / TIME_BUCKETS, 1e-9)
    buckets: dict[int, tuple[LatencyHistogram, list[float], int]] = {}
    for b in batches:
        for i, n in enumerate(b.confidence[:CONFIDENCE_BINS]):
            confidence[i] += n
        classes.update(b.classes)
        alerts.update(b.alerts)
        k = min(int((b.ts - t0) / width), TIME_BUCKETS - 1)
        hist, drift, windows = buckets.setdefault(k, (LatencyHistogram(), [], 0))
        with contextlib.suppress(ValueError):  # a malformed histogram is left out of the chart
            hist.merge(LatencyHistogram.from_wire(b.latency_ms))
        if b.drift is not None:
            drift.append(b.drift.psi if b.drift.psi is not None else b.drift.score)
        buckets[k] = (hist, drift, windows + b.windows)
    p50, p99, drift_pts, rate = [], [], [], []
    for k in sorted(buckets):
        hist, drift, windows = buckets[k]
        ts = t0 + (k + 0.5) * width
        q50, q99 = hist.quantile(0.5), hist.quantile(0.99)
        if q50 is not None and q99 is not None:
            p50.append((ts, q50))
            p99.append((ts, q99))
        if drift:
            drift_pts.append((ts, sum(drift) / len(drift)))
        rate.append((ts, float(windows)))
    bins = [f"{i / CONFIDENCE_BINS:.2f}" for i in range(CONFIDENCE_BINS)]
    top = classes.most_common(24)
    raised = alerts.most_common(24)
    return {
        "latency": line_chart([Series("p50", p50, PALETTE[0]), Series("p99", p99, PALETTE[1])],
                              label="latency p50 and p99 over time", y_unit="ms"),
        "drift": line_chart([Series("drift (PSI or score)", drift_pts, PALETTE[3])], label="input drift over time"),
        "windows": line_chart([Series("windows inferred", rate, PALETTE[2])], label="windows per interval"),
        "confidence": bar_chart(bins, confidence, label="confidence histogram", color=PALETTE[2]),
        "classes": bar_chart([c for c, _ in top], [n for _, n in top], label="class counts", color=PALETTE[4]),
        "alerts": bar_chart([c for c, _ in raised], [n for _, n in raised], label="alert windows by reason",
                            color=PALETTE[1]),
    }


def _compares(node: Node) -> list[Compare]:
    if isinstance(node, Compare):
        return [node]
    if isinstance(node, Not):
        return _compares(node.inner)
    if isinstance(node, BoolOp):
        return [c for part in node.parts for c in _compares(part)]
    return []


def gate_panels(gates: list[dict[str, Any]], values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each gate of a decision with, for each comparison in it, the metric's value and interval drawn against
    the threshold."""
    metrics = values.get("metrics") or {}
    intervals = values.get("intervals") or {}
    panels = []
    for g in gates:
        bars = []
        try:
            tree = parse_gate(g["expr"]).tree
        except EdgefleetError:
            tree = None
        for c in _compares(tree) if tree is not None else []:
            if c.left.metric is None or c.right.value is None:
                continue
            m = c.left.metric
            iv = intervals.get(m) or {}
            bars.append({"metric": m, "value": metrics.get(m), "threshold": c.right.value, "op": c.op,
                         "svg": gate_bar(metrics.get(m), iv.get("low"), iv.get("high"), c.right.value, c.op,
                                         label=f"{m} against {c.op} {c.right.value}")})
        panels.append({**g, "bars": bars})
    return panels


def rollout_detail(store: Store, rollout_id: str, now: float) -> dict[str, Any] | None:
    row = store.get_rollout(rollout_id)
    if row is None:
        return None
    data = rollout_json(row, store)
    waves = store.waves(rollout_id)
    decisions = data["decisions"]
    end = now if data["phase"] not in ("done", "aborted", "shadow-passed") else max(
        [row.updated, *(d["at"] for d in decisions)])
    judged = [d for d in decisions if (d["values"] or {}).get("gates")]
    latest = judged[-1] if judged else None
    data["timeline"] = timeline(row.created, end, [(w.started, f"wave {w.wave + 1} ({len(w.devices)})") for w in waves],
                                [(d["at"], d["kind"], d["reason"]) for d in decisions],
                                label="waves and decisions over time")
    data["gate_panels"] = gate_panels(latest["values"]["gates"], latest["values"]) if latest else []
    data["gates_from"] = latest
    data["final"] = data["phase"] in ("done", "aborted", "shadow-passed")
    return data


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats (lower x and higher y), sorted by x."""
    front: list[int] = []
    best = float("-inf")
    for i in sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1])):
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def pareto_panels(report: Mapping[str, Any]) -> list[Markup]:
    """The build report's candidates: accuracy against size and against batch-1 latency, Pareto front joined."""
    baseline = report.get("baseline") or {}
    cands = [c if isinstance(c, dict) else {} for c in [baseline, *(report.get("candidates") or [])]]
    gate = None
    if baseline.get("accuracy") is not None and report.get("max_accuracy_drop_pp") is not None:
        gate = 100 * float(baseline["accuracy"]) - float(report["max_accuracy_drop_pp"])

    def kind(c: Mapping[str, Any]) -> str:
        if c is baseline:
            return "baseline"
        if c.get("label") == report.get("chosen"):
            return "chosen"
        return "passed" if c.get("passed") else "failed"

    def latency(c: Mapping[str, Any]) -> float:
        b1 = (c.get("latency_ms") or {}).get("b1") or {}
        return float(b1.get("median_ms") or math.nan)

    out = []
    for x_label, xof in (("model size (KB)", lambda c: float(c.get("size_bytes") or 0) / 1024),
                         ("latency, batch 1 (ms, median)", latency)):
        pts = [(xof(c), math.nan if c.get("accuracy") is None else 100 * float(c["accuracy"]), str(c.get("label", "?")),
                kind(c)) for c in cands]  # numbered as in the report's table; unmeasured ones are not drawn
        finite = [i for i, p in enumerate(pts) if math.isfinite(p[0]) and p[0] > 0 and math.isfinite(p[1])]
        front = [finite[i] for i in pareto([(pts[j][0], pts[j][1]) for j in finite])]
        out.append(pareto_chart(pts, front, gate, label=f"accuracy against {x_label}", x_label=x_label))
    return out


def where_runs(store: Store) -> tuple[dict[str, list[str]], dict[str, int]]:
    """For each model version, the devices that report running it, and how many are told to run it."""
    names = model_names(store)
    running: dict[str, list[str]] = {}
    desired: Counter[str] = Counter()
    for d in fleet_rows(store):
        ref = d.running or d.active
        if ref:
            running.setdefault(ref, []).append(d.id)
        if d.desired_model_id is not None and d.desired_model_id in names:
            desired[names[d.desired_model_id]] += 1
    return running, dict(desired)

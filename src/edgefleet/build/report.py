"""The build report: a rich table for the terminal, REPORT.json, and a Pareto plot (PNG)."""

from __future__ import annotations

import json
import platform
import zlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from edgefleet.build.energy import ASSUMPTIONS
from edgefleet.build.pipeline import BuildOutcome, Candidate
from edgefleet.errors import ConfigError
from edgefleet.storage import atomic_write

REPORT_FORMAT = 1


def candidate_json(cand: Candidate, baseline_size: int, *, nodes: bool = False) -> dict[str, Any]:
    """One candidate as plain JSON values."""
    out: dict[str, Any] = {
        "label": cand.label, "pass": cand.pass_name, "config": cand.config, "error": cand.error,
        "accuracy": cand.accuracy, "drop_pp": cand.drop_pp, "passed": cand.passed, "notes": cand.notes,
        "size_bytes": cand.size_bytes, "size_ratio": cand.size_bytes / baseline_size if baseline_size else None,
        "build_s": round(cand.build_s, 3), "train_s": round(cand.train_s, 3),
        "compressed_bytes": len(zlib.compress(cand.model, 9)) if cand.model else 0,
        "latency_ms": {f"b{b}": asdict(s) for b, s in sorted(cand.latency.items())},
        "runtime_latency_ms": {name: asdict(s) for name, s in sorted(cand.runtime_latency.items())},
        "profiles": [asdict(v) for v in cand.verdicts],
    }
    a = cand.analysis
    if a is not None:
        macs: dict[str, int] = {}
        for n in a.nodes:
            macs[n.precision] = macs.get(n.precision, 0) + n.macs
        out.update({
            "params": a.params, "weight_bytes": a.weight_bytes, "macs": a.macs, "macs_by_precision": macs,
            "int8_mac_fraction": a.int8_fraction, "arena_bytes": a.arena.arena_bytes,
            "peak_live_bytes": a.arena.peak_live_bytes, "float_compute_nodes": a.float_compute_nodes,
            "energy_estimate_uj": {"total": a.energy.total_uj, "compute": a.energy.compute_uj,
                                   "dram": a.energy.dram_uj, "sram": a.energy.sram_uj},
        })
        if a.unknown_shapes:
            out["not_counted"] = a.unknown_shapes
        if a.notes:
            out["analysis_notes"] = a.notes
        if nodes:
            out["nodes"] = [asdict(n) for n in a.nodes]
    return out


def report_json(outcome: BuildOutcome, *, name: str = "", version: str = "") -> dict[str, Any]:
    """The whole report as JSON: baseline, every candidate, the choice and why, rescue trials, assumptions."""
    import onnxruntime

    size = outcome.baseline.size_bytes
    return {
        "format": REPORT_FORMAT, "name": name, "version": version,
        "max_accuracy_drop_pp": outcome.max_accuracy_drop,
        "passed": outcome.chosen is not None,
        "chosen": outcome.chosen.label if outcome.chosen else None,
        "float_shipped": outcome.float_shipped,
        "reason": outcome.reason,
        "baseline": candidate_json(outcome.baseline, size, nodes=True),
        "candidates": [candidate_json(c, size, nodes=c is outcome.chosen) for c in outcome.candidates],
        "rescue_trials": outcome.rescue_trials,
        "latency_method": (f"ONNX Runtime {onnxruntime.__version__} CPU on this host ({platform.machine()}), "
                           "median and p10/p90 of timed runs after warm-up"),
        "energy_method": list(ASSUMPTIONS),
        "memory_method": ("arena: greedy-by-size first-fit offsets over tensor lifetimes in topological order "
                          "(TFLite's arena planner), 16-byte aligned, batch 1; Q/DQ folded into int8 kernels"),
    }


def write_json(path: Path, report: dict[str, Any]) -> None:
    """Write REPORT.json crash-safely."""
    atomic_write(path, (json.dumps(report, indent=2, default=str) + "\n").encode())


def _ms(cand: Candidate, batch: int) -> str:
    stats = cand.latency.get(batch)
    if stats is None:
        return "-"
    return f"{stats.median_ms:.3g} ({stats.p10_ms:.2g}-{stats.p90_ms:.2g})"


def _mark(outcome: BuildOutcome, cand: Candidate) -> str:
    if cand is outcome.chosen:
        return "chosen"
    if cand is outcome.baseline:
        return "base"
    if cand.error:
        return "same" if cand.error.startswith("identical to") else "error"
    return "pass" if cand.passed else "FAIL"


def print_table(outcome: BuildOutcome, console: Console | None = None) -> None:
    """Candidates side by side, then the choice, the reason and the chosen model's profile verdicts."""
    console = console or Console(width=None if Console().is_terminal else 170)
    size = outcome.baseline.size_bytes or 1
    table = Table(title=f"edgefleet build (gate: drop <= {outcome.max_accuracy_drop:g} pp)")
    for col in ("candidate", "acc %", "drop pp", "gate", "size KB", "x f32", "MMACs", "arena KB",
                "b1 ms (p10-p90)", "b32 ms", "energy uJ*", "train s"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for cand in [outcome.baseline, *outcome.candidates]:
        a = cand.analysis
        mark = _mark(outcome, cand)
        table.add_row(
            cand.label, f"{100 * cand.accuracy:.2f}" if cand.accuracy is not None else "-",
            f"{cand.drop_pp:.2f}" if cand.drop_pp is not None else "-", mark,
            f"{cand.size_bytes / 1024:.1f}", f"{cand.size_bytes / size:.2f}",
            f"{a.macs / 1e6:.3g}" if a else "-", f"{a.arena.arena_bytes / 1024:.1f}" if a else "-",
            _ms(cand, 1), _ms(cand, 32), f"{a.energy.total_uj:.3g}" if a else "-",
            f"{cand.train_s:.1f}" if cand.train_s else "-",
            style="bold green" if cand is outcome.chosen else ("dim" if cand.error or not cand.passed else None),
        )
    console.print(table)
    console.print("* energy is an estimate from a 45 nm per-operation table (see REPORT.json)", style="dim")
    console.print(("chosen: " if outcome.chosen else "[red]no bundle:[/red] ") + outcome.reason, highlight=False)
    for cand in [outcome.chosen] if outcome.chosen else []:
        for note in [*cand.notes, *(cand.analysis.notes if cand.analysis else [])]:
            console.print(f"  note: {note}", highlight=False)
        if cand.verdicts:
            verdicts = Table(title=f"device profiles: {cand.label}")
            for col in ("profile", "fits", "RAM need/avail", "est. latency ms", "budget ms", "device mJ", "why not"):
                verdicts.add_column(col)
            for v in cand.verdicts:
                verdicts.add_row(v.profile, "yes" if v.fits else "no",
                                 f"{v.ram_needed_bytes / 1024:.0f} / {v.ram_available_bytes / 1024:.0f} KB",
                                 f"{v.est_latency_ms:.3g}{' (measured)' if v.latency_source == 'measured' else ''}",
                                 f"{v.latency_budget_ms:g}", f"{v.device_energy_mj:.3g}",
                                 "; ".join(v.reasons) or "-")
            console.print(verdicts)


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x and higher y; sorted by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front: list[int] = []
    best = float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def plot(outcome: BuildOutcome, path: Path) -> None:
    """Accuracy against size and against batch-1 latency for every measured model, Pareto front marked."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError("the plot needs matplotlib: pip install 'edgefleet[report]'") from exc

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    cands = [c for c in [outcome.baseline, *outcome.candidates] if c.accuracy is not None and c.model]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    gate = 100 * (outcome.baseline.accuracy or 0.0) - outcome.max_accuracy_drop
    panels: list[tuple[str, Callable[[Candidate], float]]] = [
        ("model size (KB)", lambda c: c.size_bytes / 1024),
        ("latency, batch 1 (ms, median)", lambda c: c.latency_ms(1)),
    ]
    for ax, (xlabel, xof) in zip(axes, panels, strict=True):
        pts = [(xof(c), 100 * (c.accuracy or 0.0)) for c in cands]
        front = pareto(pts)
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="tab:orange", lw=1.5,
                zorder=1)
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=150, marker="D", facecolors="none",
                   edgecolors="tab:orange", linewidths=1.5, zorder=1, label="Pareto front")
        seen: dict[tuple[float, float], int] = {}
        for number, (c, (x, y)) in enumerate(zip(cands, pts, strict=True)):
            style = {"marker": "*", "s": 180, "color": "black"} if c is outcome.baseline else \
                {"marker": "o", "s": 50, "color": "tab:blue" if c.passed else "tab:gray"}
            ax.scatter([x], [y], zorder=2, **style)
            if c is outcome.chosen:
                ax.scatter([x], [y], s=320, facecolors="none", edgecolors="tab:green", linewidths=2, zorder=3,
                           label="chosen")
            spot = (round(x, 3), round(y, 2))
            stacked = seen.get(spot, 0)
            seen[spot] = stacked + 1
            ax.annotate(str(number), (x, y), textcoords="offset points", xytext=(5 + 8 * stacked, 5), fontsize=8)
        ax.axhline(gate, color="tab:red", ls="--", lw=1, label=f"gate (-{outcome.max_accuracy_drop:g} pp)")
        xs = [p[0] for p in pts if p[0] > 0 and p[0] != float("inf")]
        if xs and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # type: ignore[no-untyped-call]
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (%)")
        low, high = ax.get_ylim()
        ax.set_ylim(low, min(high, 100.5))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    key = "   ".join(f"{i}: {c.label}" for i, c in enumerate(cands))
    fig.text(0.01, 0.01, key, fontsize=7, wrap=True, va="bottom")
    fig.suptitle("edgefleet build: accuracy vs size and latency (grey: fails the gate, star: float baseline)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""The candidate's health check, run in a child process so that a crashing or hanging model cannot take the
agent down. ``python -m edgefleet.agent.healthcheck`` reads the manifest JSON (one line) and then the model bytes
on its stdin, prints one JSON line and exits 0. The model goes through the pipe, never through a file: a
decrypted model (:mod:`edgefleet.bundle.encrypt`) never touches the disk, and no model does.

The parent (:func:`run_health_check`) turns a crash (signal or non-zero exit), a hang (time limit), NaN/Inf
outputs, outputs off the golden samples beyond tolerance, or latency over budget into a ModelError.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgefleet.errors import EdgefleetError, ModelError

if TYPE_CHECKING:
    from edgefleet.bundle.manifest import Manifest

DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-m", "edgefleet.agent.healthcheck")
LATENCY_BUDGET_KEY = "max_latency_ms"


def run_health_check(model: bytes, manifest: Manifest, *, timeout_s: float = 30.0,
                     latency_budget_ms: float | None = None,
                     command: Sequence[str] = DEFAULT_COMMAND) -> float:
    """Check the candidate in a child process (the model through its stdin); return its median latency in ms or
    raise ModelError. OSError when the child cannot be started."""
    request = manifest.model_dump_json().encode() + b"\n" + model
    try:
        result = subprocess.run(list(command), input=request, capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"health check: the model hung (no answer within {timeout_s:.0f} s)") from exc
    if result.returncode < 0:
        raise ModelError(f"health check: the model crashed the runtime (signal {-result.returncode})")
    try:
        report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        tail = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"health check: the checker exited {result.returncode}: {tail[0][:200]}") from exc
    if not report.get("ok"):
        raise ModelError(f"health check: {report.get('error', 'failed')}")
    latency = float(report["latency_ms"])
    budget = latency_budget_ms if latency_budget_ms is not None else manifest.thresholds.get(LATENCY_BUDGET_KEY)
    if budget is not None and latency > budget:
        raise ModelError(f"health check: latency {latency:.2f} ms is over the {budget:g} ms budget")
    return latency


def check(model_path: Path, manifest_path: Path, runs: int = 20) -> float:
    """:func:`check_model` on a model and a manifest in files (for tools and tests)."""
    return check_model(model_path.read_bytes(), manifest_path.read_bytes(), runs)


def check_model(model: bytes, manifest_json: bytes, runs: int = 20) -> float:
    """Load and run the model through its manifest's pipeline: the pipeline fits the model, golden samples within
    tolerance, finite scores for a neutral input; the median latency in ms."""
    from edgefleet.bundle.manifest import Manifest, check_golden
    from edgefleet.runtime.runner import make_runner
    from edgefleet.runtime.spec import ModelPipeline

    manifest = Manifest.model_validate_json(manifest_json)
    runner = make_runner(model, manifest.runtime)
    pipeline = ModelPipeline.from_manifest(manifest.preprocess, manifest.postprocess)
    pipeline.check(manifest.inputs, manifest.outputs, manifest.labels)
    score = pipeline.outputs.scorer(runner)
    check_golden(manifest, score)
    probe = pipeline.inputs.example()
    output = score(probe)
    labels = manifest.labels
    if output.ndim != 2 or output.shape[0] != 1 or (labels and pipeline.outputs.classifies
                                                     and output.shape[1] != len(labels)):
        raise ModelError(f"output shape {output.shape} does not match {len(labels)} labels")
    if not np.all(np.isfinite(output)):
        raise ModelError("the model returned NaN or Inf")
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        score(probe)
        timings.append((time.perf_counter() - started) * 1000.0)
    return float(np.median(timings))


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(json.dumps({"ok": False, "error": "usage: healthcheck < MANIFEST-LINE MODEL-BYTES"}))
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    manifest_json, _, model = sys.stdin.buffer.read().partition(b"\n")
    try:
        latency = check_model(model, manifest_json)
    except (EdgefleetError, OSError, ValueError) as exc:
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 0
    print(json.dumps({"ok": True, "latency_ms": latency}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

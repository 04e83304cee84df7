"""From build inputs to a signed bundle: the build search under the accuracy gate, the chosen model's metrics,
its golden samples and input/output pipeline, packed and signed. ``edgefleet build`` and ``edgefleet demo`` both
build through :func:`build_bundle`, so what the demo ships is what a user's build ships.

The bundle names the runtime it runs on: ONNX Runtime by default (every agent has it), another one when asked,
or with ``auto`` the fastest measured runtime of every target profile (:func:`edgefleet.build.runtimes.bundle_runtime`).
For LiteRT the float model is exported to ``.tflite`` (:mod:`edgefleet.build.tflite`), int8 calibrated on the
calibration rows where its accuracy on the test rows stays within the gate, float32 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgefleet.build.inputs import BuildInputs
from edgefleet.build.io_pipeline import INT8_TOLERANCE, golden_tolerance
from edgefleet.build.pipeline import BuildOutcome, BuildSearch, Candidate, Progress
from edgefleet.build.recipe import Recipe
from edgefleet.build.runtimes import bundle_runtime, runtime_per_profile
from edgefleet.bundle.pack import BundleSpec, pack_bundle
from edgefleet.bundle.runtimes import MODEL_FORMATS
from edgefleet.bundle.signing import SigningKey
from edgefleet.core.profiles import DeviceProfile
from edgefleet.errors import ModelError


@dataclass(frozen=True)
class BuiltBundle:
    """The search's outcome, the signed bundle and what its manifest says about the shipped model."""

    outcome: BuildOutcome
    bundle: bytes
    name: str
    version: str
    metrics: dict[str, float]
    profiles: list[str] = field(default_factory=list)
    """The device profiles the shipped model fits."""
    labels: list[str] = field(default_factory=list)
    preprocess: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    """The runtime the bundle names."""
    runtime_reason: str = ""
    runtimes_by_profile: dict[str, str | None] = field(default_factory=dict)
    """Each target profile's fastest measured runtime (None: none it lists was measured here)."""

    @property
    def ref(self) -> str:
        """``NAME@VERSION``, as the server and the telemetry name the model."""
        return f"{self.name}@{self.version}"

    @property
    def chosen(self) -> Candidate:
        """The shipped candidate."""
        assert self.outcome.chosen is not None
        return self.outcome.chosen

    @property
    def accuracy(self) -> float:
        """Build-time accuracy of the shipped model on the test rows."""
        return self.metrics["accuracy"]


def build_bundle(inputs: BuildInputs, recipe: Recipe, profiles: list[DeviceProfile], key: SigningKey, *,
                 name: str | None = None, version: str = "1.0.0", release: int = 1,
                 progress: Progress | None = None,
                 on_outcome: Callable[[BuildOutcome], None] | None = None, runtime: str = "onnxruntime",
                 measured_scaling: dict[str, float] | None = None) -> BuiltBundle:
    """Run the build search on ``inputs`` and sign the chosen model as a bundle (``name`` defaults to the inputs')
    for ``runtime`` (a runtime name, or ``auto``).

    ``on_outcome`` sees the outcome before the gate's verdict is applied (the CLI prints and reports it, also
    when nothing passes); ModelError with the reason when no candidate passes the gate. ``measured_scaling``:
    per profile, the device latency over the build host's that its devices measured (``edgefleet device
    profiles``); those profiles' verdicts take the candidate's host latency times it, marked ``measured``.
    """
    outcome = BuildSearch(inputs.model, inputs.data, recipe, profiles, progress=progress).run()
    if measured_scaling:
        apply_measured_scaling(outcome, profiles, measured_scaling)
    if on_outcome is not None:
        on_outcome(outcome)
    chosen = outcome.chosen
    if chosen is None or chosen.model is None or chosen.analysis is None:
        raise ModelError(f"no bundle written: {outcome.reason}")
    name = name or inputs.name
    metrics = bundle_metrics(outcome, chosen)
    fitting = [v.profile for v in chosen.verdicts if v.fits]
    targets = [p for p in profiles if p.name in fitting] or list(profiles)
    chosen_runtime, why = bundle_runtime(runtime, targets, chosen.runtime_latency)
    metrics.update({f"latency_b1_ms_{n}": s.median_ms for n, s in sorted(chosen.runtime_latency.items())})
    tolerance = golden_tolerance(chosen.pass_name)
    shipped = chosen.model
    if MODEL_FORMATS[chosen_runtime] == "tflite":
        shipped, int8, accuracy = litert_model(inputs, recipe, outcome, progress)
        metrics.update({"litert_accuracy": accuracy, "litert_int8": float(int8), "litert_size_bytes": len(shipped)})
        tolerance = INT8_TOLERANCE if int8 else golden_tolerance("none")
        why += f"; ships the TFLite export ({'int8' if int8 else 'float32'}, accuracy {100 * accuracy:.2f}%)"
    bundle = pack_bundle(shipped, key, BundleSpec(
        name=name, version=version, release=release, labels=inputs.labels, preprocess=inputs.preprocess,
        postprocess=inputs.postprocess, thresholds=inputs.thresholds, metrics=metrics, profiles=fitting,
        golden=inputs.golden, golden_atol=tolerance, golden_rtol=tolerance,
        runtime=None if chosen_runtime == "onnxruntime" else chosen_runtime))
    return BuiltBundle(outcome=outcome, bundle=bundle, name=name, version=version, metrics=metrics,
                       profiles=fitting, labels=list(inputs.labels), preprocess=dict(inputs.preprocess),
                       runtime=chosen_runtime, runtime_reason=why,
                       runtimes_by_profile=runtime_per_profile(targets, chosen.runtime_latency))


def apply_measured_scaling(outcome: BuildOutcome, profiles: list[DeviceProfile], scaling: dict[str, float]) -> None:
    """Every timed candidate's verdict for a profile with a measured scaling: its batch-1 host latency times the
    scaling, in place of the estimate from MACs."""
    from edgefleet.build.pipeline import _footprint
    from edgefleet.core.profiles import check

    by_name = {p.name: p for p in profiles}
    for cand in [outcome.baseline, *outcome.candidates]:
        host = cand.latency.get(1)
        if host is None or cand.analysis is None:
            continue
        footprint = _footprint(cand.analysis)
        cand.verdicts = [check(by_name[v.profile], footprint, host.median_ms * scaling[v.profile])
                         if v.profile in scaling and v.profile in by_name else v for v in cand.verdicts]


def litert_model(inputs: BuildInputs, recipe: Recipe, outcome: BuildOutcome, progress: Progress | None = None
                 ) -> tuple[bytes, bool, float]:
    """The float model exported for LiteRT: (model, whether int8, its test accuracy); int8 where its drop from
    the float baseline is within the recipe's gate, else float32 within it; ModelError when neither is."""
    from edgefleet.build.tflite import export_onnx_tflite, litert_accuracy

    data = inputs.data
    (progress or (lambda _m: None))("exporting the float model to TFLite (float32 and int8) for LiteRT")
    models = export_onnx_tflite(inputs.model, data.test_x[:1], data.calib_x[: recipe.calibration_samples])
    baseline = float(outcome.baseline.accuracy or 0.0)
    tried = []
    for model, int8 in ((models.int8, True), (models.float32, False)):
        if model is None:
            continue
        accuracy = litert_accuracy(model, data.test_x, data.test_y, data.postprocess)
        drop = 100.0 * (baseline - accuracy)
        if drop <= recipe.max_accuracy_drop + 1e-9:
            return model, int8, accuracy
        tried.append(f"{'int8' if int8 else 'float32'} drops {drop:.2f} pp")
    raise ModelError(f"no bundle written: no TFLite export meets the {recipe.max_accuracy_drop:g} pp gate "
                     f"({'; '.join(tried)})")


def bundle_metrics(outcome: BuildOutcome, chosen: Candidate) -> dict[str, float]:
    """The manifest's metrics of the chosen candidate: accuracy (and the float baseline's), drop, size, MACs,
    parameters, arena, estimated energy and the median latency per timed batch size."""
    assert chosen.analysis is not None
    metrics = {"accuracy": float(chosen.accuracy or 0.0), "float_accuracy": float(outcome.baseline.accuracy or 0.0),
               "accuracy_drop_pp": float(chosen.drop_pp or 0.0), "size_bytes": float(chosen.size_bytes),
               "macs": float(chosen.analysis.macs), "params": float(chosen.analysis.params),
               "arena_bytes": float(chosen.analysis.arena.arena_bytes),
               "energy_uj_estimate": chosen.analysis.energy.total_uj}
    metrics.update({f"latency_b{b}_ms": s.median_ms for b, s in chosen.latency.items()})
    return metrics

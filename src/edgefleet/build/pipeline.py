"""The build search: candidates from a recipe, an accuracy gate, outlier-robust int8 candidates (channel scaling
and bias correction) when no plain int8 one meets the gate, then a rescue that keeps sensitive nodes in float,
and a choice (smallest passing candidate, then fastest), every step recorded for the report.

A pass output that computes nothing in a lower precision (ONNX Runtime's quantizer leaves a tree ensemble, an
SVM or a linear classifier of ONNX-ML in float) is no candidate. When no pass gives a candidate at all, the
float model is the candidate and is chosen: the outcome says "no pass quantizes this model: float model shipped".
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx

from edgefleet.build.analyze import ModelAnalysis, analyze
from edgefleet.build.compact import compact
from edgefleet.build.evaluate import accuracy
from edgefleet.build.latency import LatencyStats, compare_latency, measure_latency
from edgefleet.build.passes import PassConfig, get_pass
from edgefleet.build.recipe import Recipe, describe
from edgefleet.build.sensitivity import rank_tensors
from edgefleet.build.training.data import TrainingSet
from edgefleet.core.profiles import DeviceProfile, Footprint, Verdict, check
from edgefleet.errors import EdgefleetError

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildData:
    """Validated arrays: calibration inputs, test inputs and integer test labels."""

    calib_x: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    postprocess: dict[str, Any] | None = None
    """How class scores are read from the model's outputs (runtime.outputs); None: inferred from the model."""
    train: TrainingSet | None = None
    """Training rows (and the user's torch model): the search adds training-time candidates (build.training)."""


@dataclass
class Candidate:
    """One model the build produced (or the float baseline) and everything measured on it."""

    label: str
    pass_name: str
    config: dict[str, Any]
    model: bytes | None = None  # what ships: compacted (short names) for candidates
    raw: bytes | None = None  # the pass's output, node names intact (the rescue needs them)
    accuracy: float | None = None
    drop_pp: float | None = None
    passed: bool = False
    analysis: ModelAnalysis | None = None
    latency: dict[int, LatencyStats] = field(default_factory=dict)
    build_s: float = 0.0
    train_s: float = 0.0  # training-time candidates: seconds spent training (part of build_s)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    runtime_latency: dict[str, LatencyStats] = field(default_factory=dict)
    """Batch-1 latency on each runtime installed here, timed side by side (build.runtimes)."""

    @property
    def size_bytes(self) -> int:
        """Serialized size of the model (0 if it failed)."""
        return len(self.model) if self.model else 0

    def latency_ms(self, batch: int = 1) -> float:
        """Median latency at ``batch`` (inf when not measured)."""
        stats = self.latency.get(batch)
        return stats.median_ms if stats else float("inf")


@dataclass
class BuildOutcome:
    """The baseline, every candidate, the rescue trials and the choice, with the reason for it."""

    baseline: Candidate
    candidates: list[Candidate]
    chosen: Candidate | None
    reason: str
    max_accuracy_drop: float
    rescue_trials: list[dict[str, Any]] = field(default_factory=list)
    float_shipped: bool = False
    """True when no pass quantizes the model and the float model is the chosen candidate."""


def _footprint(analysis: ModelAnalysis) -> Footprint:
    return Footprint(file_bytes=analysis.file_bytes, weight_bytes=analysis.weight_bytes,
                     arena_bytes=analysis.arena.arena_bytes, macs=analysis.macs,
                     int8_fraction=analysis.int8_fraction, energy_uj=analysis.energy.total_uj)


class BuildSearch:
    """Runs one recipe on one float model; ``run()`` returns the BuildOutcome."""

    def __init__(self, float_model: bytes, data: BuildData, recipe: Recipe, profiles: list[DeviceProfile],
                 progress: Progress | None = None) -> None:
        self.float_model, self.data, self.recipe, self.profiles = float_model, data, recipe, profiles
        self.progress = progress or (lambda _msg: None)
        rng = np.random.default_rng(recipe.seed)
        n = min(recipe.calibration_samples, len(data.calib_x))
        self.calib = data.calib_x[np.sort(rng.choice(len(data.calib_x), size=n, replace=False))]
        self._stats: dict[tuple[str, Hashable], Any] = {}
        self.baseline_accuracy = 0.0

    def accuracy(self, model: bytes) -> float:
        """Test accuracy of ``model``, its scores read through the build's output spec."""
        return accuracy(model, self.data.test_x, self.data.test_y, self.data.postprocess)

    def measure(self, cand: Candidate, *, timing: bool = True) -> Candidate:
        """Accuracy, drop, gate, static analysis, latency and profile verdicts of ``cand.model``."""
        assert cand.model is not None
        cand.accuracy = self.accuracy(cand.model)
        cand.drop_pp = 100.0 * (self.baseline_accuracy - cand.accuracy)
        cand.passed = cand.drop_pp <= self.recipe.max_accuracy_drop + 1e-9
        cand.analysis = replace(analyze(cand.raw or cand.model), file_bytes=len(cand.model))
        if timing:
            spec = self.recipe.latency
            for batch in spec.batches:
                cand.latency[batch] = measure_latency(cand.model, self.data.test_x, batch, warmup=spec.warmup,
                                                      min_runs=spec.min_runs, max_runs=spec.max_runs,
                                                      budget_s=spec.budget_s, threads=spec.threads)
            from edgefleet.build.runtimes import time_runtimes

            cand.runtime_latency = time_runtimes(cand.model, self.data.test_x, threads=spec.threads)
        cand.verdicts = [check(p, _footprint(cand.analysis)) for p in self.profiles]
        return cand

    def quantize(self, pass_name: str, config: PassConfig) -> Candidate:
        """Run one pass (reusing collected statistics) and return the unmeasured candidate."""
        label = describe(pass_name, config)
        cand = Candidate(label=label, pass_name=pass_name, config=config.model_dump(mode="json"))
        step = get_pass(pass_name)
        start = time.perf_counter()
        try:
            key = step.stats_key(config)
            if key is not None and (pass_name, key) not in self._stats:
                try:
                    self._stats[(pass_name, key)] = step.collect(self.float_model, self.calib, config)
                except EdgefleetError as exc:  # remembered: the same statistics would fail the same way
                    self._stats[(pass_name, key)] = exc
            stats = self._stats.get((pass_name, key)) if key is not None else None
            if isinstance(stats, EdgefleetError):
                raise stats
            result = step.apply(self.float_model, stats, config)
        except EdgefleetError as exc:
            cand.error = str(exc)
            return cand
        if not lowered(result.model):
            kept = "; ".join(result.notes)
            cand.error = "computes nothing in a lower precision: left in float" + (f" ({kept})" if kept else "")
            return cand
        cand.raw, cand.model, cand.notes = result.model, compact(result.model), list(result.notes)
        cand.build_s = time.perf_counter() - start
        return cand

    def run(self) -> BuildOutcome:
        """Baseline, every candidate, the rescue when none passes, then the choice."""
        self.progress("measuring the float baseline")
        baseline = Candidate(label="float32 (baseline)", pass_name="none", config={}, model=self.float_model)
        self.baseline_accuracy = self.accuracy(self.float_model)
        self.measure(baseline)
        baseline.passed = True
        candidates: list[Candidate] = []
        for pass_name, config in self.recipe.configs():
            self.try_candidate(pass_name, config, candidates)
        if not any(c.passed and c.pass_name in INT8_PASSES for c in candidates) and self.recipe.outlier_candidates:
            self.progress("no int8 candidate meets the gate: trying outlier-robust int8 (channel scaling)")
            for pass_name, config in self.recipe.outlier_configs():
                self.try_candidate(pass_name, config, candidates)
        candidates += self.trained()
        trials: list[dict[str, Any]] = []
        if self.recipe.rescue.enabled and not any(c.passed and c.pass_name in INT8_PASSES for c in candidates):
            rescued = self.rescue(candidates, trials)
            if rescued is not None:
                candidates.append(rescued)
        if not any(c.model is not None for c in candidates):
            self.progress("no pass quantizes this model: the float model is the candidate")
            shipped = self.float_candidate(baseline, candidates)
            reason = FLOAT_SHIPPED + _tried(candidates)
            return BuildOutcome(baseline=baseline, candidates=[*candidates, shipped], chosen=shipped, reason=reason,
                                max_accuracy_drop=self.recipe.max_accuracy_drop, rescue_trials=trials,
                                float_shipped=True)
        close = finalists(candidates, self.recipe.size_tolerance)
        if len(close) > 1:  # the choice among these rests on latency: time them again, side by side
            self.progress(f"timing {len(close)} finalists side by side")
            spec = self.recipe.latency
            stats = compare_latency([c.model for c in close if c.model], self.data.test_x, 1, threads=spec.threads)
            for cand, fresh in zip(close, stats, strict=True):
                cand.latency[1] = fresh
        chosen, reason = choose(candidates, self.recipe.max_accuracy_drop, self.recipe.size_tolerance,
                                self.recipe.latency_tolerance)
        return BuildOutcome(baseline=baseline, candidates=candidates, chosen=chosen, reason=reason,
                            max_accuracy_drop=self.recipe.max_accuracy_drop, rescue_trials=trials)

    def try_candidate(self, pass_name: str, config: PassConfig, candidates: list[Candidate]) -> None:
        """Run one pass, measure its model unless an earlier candidate made the same one, append it."""
        cand = self.quantize(pass_name, config)
        twin = next((c for c in candidates if c.model is not None and c.model == cand.model), None)
        if twin is not None:
            cand.error, cand.model = f"identical to {twin.label}", None
        self.progress(f"candidate {cand.label}" + (f": {cand.error}" if cand.error else ""))
        if cand.model is not None:
            try:
                self.measure(cand)
            except EdgefleetError as exc:
                cand.error, cand.model = str(exc), None
        candidates.append(cand)

    def trained(self) -> list[Candidate]:
        """Training-time candidates (pruning, distillation, QAT) when the data has training rows, measured."""
        from edgefleet.build.training.candidates import training_candidates

        trained = training_candidates(self.float_model, self.data.train, self.calib, self.recipe.training,
                                      seed=self.recipe.seed, progress=self.progress)
        for cand in trained:
            if cand.model is not None:
                try:
                    self.measure(cand)
                except EdgefleetError as exc:
                    cand.error, cand.model = str(exc), None
            self.progress(f"candidate {cand.label}" + (f": {cand.error}" if cand.error else
                                                       f" (trained {cand.train_s:.1f} s)"))
        return trained

    def float_candidate(self, baseline: Candidate, candidates: list[Candidate]) -> Candidate:
        """The float model as the one candidate (compacted like every shipped model), measured as the baseline."""
        shipped = compact(self.float_model)
        analysis = None if baseline.analysis is None else replace(baseline.analysis, file_bytes=len(shipped))
        return Candidate(label="float32 (no pass quantizes it)", pass_name="none", config={}, model=shipped,
                         raw=self.float_model, accuracy=baseline.accuracy, drop_pp=0.0, passed=True,
                         analysis=analysis, latency=dict(baseline.latency), verdicts=list(baseline.verdicts),
                         notes=[f"{FLOAT_SHIPPED} ({len(candidates)} pass configuration(s) tried)"])

    def rescue(self, candidates: list[Candidate], trials: list[dict[str, Any]]) -> Candidate | None:
        """Keep the most sensitive tensors of the best int8 candidate in float until the gate passes."""
        bases = [c for c in candidates if c.pass_name == "static_int8" and c.raw is not None and c.model is not None]
        if not bases:
            return None
        base = max(bases, key=lambda c: (c.accuracy or 0.0, c.config.get("per_channel", False)))
        step = get_pass("static_int8")
        config = step.config_type.model_validate(base.config)
        stats = self._stats[("static_int8", step.stats_key(config))]
        assert base.raw is not None
        ranked = rank_tensors(base.raw, stats.model, self.calib[: self.recipe.rescue.samples])
        compute = {n for e in ranked for n in e.nodes}
        limit = max(2, math.ceil(self.recipe.rescue.max_float_fraction * len(compute)))
        self.progress(f"rescue: ranking {len(ranked)} quantized tensors of {base.label}")

        def excluded(k: int) -> tuple[str, ...]:
            names: list[str] = []
            for e in ranked[:k]:
                names += [n for n in e.nodes if n not in names]
            return tuple(names)

        def attempt(k: int) -> Candidate | None:
            nodes = excluded(k)
            if len(nodes) > limit:
                return None
            cand = self.quantize("static_int8", config.model_copy(update={"nodes_to_exclude": nodes}))
            if cand.model is None:
                return None
            cand.accuracy = self.accuracy(cand.model)
            cand.drop_pp = 100.0 * (self.baseline_accuracy - cand.accuracy)
            cand.passed = cand.drop_pp <= self.recipe.max_accuracy_drop + 1e-9
            trials.append({"tensors_in_float": [e.tensor for e in ranked[:k]], "nodes_in_float": list(nodes),
                           "accuracy": cand.accuracy, "drop_pp": cand.drop_pp, "passed": cand.passed})
            self.progress(f"rescue: {len(nodes)} node(s) in float -> drop {cand.drop_pp:.2f} pp")
            return cand

        schedule, k = [], 1
        while k < len(ranked):  # double until it passes, then bisect down to the fewest tensors
            schedule.append(k)
            k *= 2
        schedule.append(len(ranked))
        best: tuple[int, Candidate] | None = None
        low = 0
        for k in schedule:
            cand = attempt(k)
            if cand is None:
                break
            if cand.passed:
                best = (k, cand)
                break
            low = k
        if best is None:
            return None
        high = best[0]
        while high - low > 1:
            mid = (low + high) // 2
            cand = attempt(mid)
            if cand is not None and cand.passed:
                best, high = (mid, cand), mid
            else:
                low = mid
        chosen = best[1]
        chosen.notes.insert(0, f"rescued: kept in float the {best[0]} most sensitive tensor(s) of {base.label}: "
                               + ", ".join(e.tensor for e in ranked[: best[0]]))
        return self.measure(chosen)


FLOAT_SHIPPED = "no pass quantizes this model: float model shipped"
INT8_PASSES = ("static_int8", "robust_int8")
"""Passes whose passing candidate makes the outlier-robust candidates and the rescue unnecessary."""
_LOWERED_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                "MatMulInteger", "QGemm", "MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
_LOW_TYPES = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
              onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def lowered(model: bytes) -> bool:
    """Whether the model computes anything in a lower precision than float32: int8/float16 weights, a
    quantize or integer operator, or a cast to float16/int8."""
    proto = onnx.load_from_string(model)
    graph = proto.graph
    if any(t.data_type in _LOW_TYPES for t in graph.initializer):
        return True
    for node in graph.node:
        if node.op_type in _LOWERED_OPS or node.op_type.startswith("QLinear"):
            return True
        if node.op_type == "Cast" and any(a.name == "to" and a.i in _LOW_TYPES for a in node.attribute):
            return True
    return False


def _tried(candidates: list[Candidate]) -> str:
    errors: dict[str, list[str]] = {}
    for c in candidates:
        if c.error is not None:
            errors.setdefault(c.error, []).append(c.label)
    return "".join(f"; {', '.join(labels)}: {error}" for error, labels in errors.items())


def finalists(candidates: list[Candidate], size_tolerance: float) -> list[Candidate]:
    """Passing candidates within ``size_tolerance`` of the smallest passing one."""
    passing = [c for c in candidates if c.passed and c.model is not None]
    if not passing:
        return []
    smallest = min(c.size_bytes for c in passing)
    return [c for c in passing if c.size_bytes <= smallest * (1 + size_tolerance)]


def choose(candidates: list[Candidate], max_drop: float, size_tolerance: float,
           latency_tolerance: float = 0.05) -> tuple[Candidate | None, str]:
    """The smallest passing candidate; among those within ``size_tolerance`` of it, the fastest at batch 1;
    among those within ``latency_tolerance`` of the fastest (timing noise), the most accurate."""
    passing = [c for c in candidates if c.passed and c.model is not None]
    close = finalists(candidates, size_tolerance)
    if not passing:
        drops = [f"{c.label} ({c.drop_pp:.2f} pp)" for c in candidates if c.drop_pp is not None]
        errors: dict[str, list[str]] = {}
        for c in candidates:
            if c.error is not None and not c.error.startswith("identical to"):
                errors.setdefault(c.error, []).append(c.label)
        tried = [", ".join(drops)] if drops else []
        tried += [f"{', '.join(labels)}: {error}" for error, labels in errors.items()]
        return None, f"no candidate met the gate (accuracy drop <= {max_drop:g} pp): {'; '.join(tried) or 'none ran'}"
    smallest = min(c.size_bytes for c in passing)
    fastest = min(c.latency_ms(1) for c in close)
    quick = [c for c in close if c.latency_ms(1) <= fastest * (1 + latency_tolerance)]
    best = max(quick, key=lambda c: (c.accuracy or 0.0, -c.size_bytes, -c.latency_ms(1)))
    others = [c.label for c in close if c is not best]
    reason = (f"{best.label}: passes the gate (drop {best.drop_pp:.2f} pp <= {max_drop:g} pp); "
              f"the smallest passing model is {smallest:,} bytes and this one is {best.size_bytes:,}")
    if others:
        reason += (f"; among candidates within {100 * size_tolerance:g}% of that size ({', '.join(others)}) "
                   f"it is the fastest at batch 1 ({best.latency_ms(1):.3f} ms, timed side by side)")
        if len(quick) > 1:
            reason += (f", the most accurate of the {len(quick)} within {100 * latency_tolerance:g}% of the "
                       "fastest time")
    same = [c.label for c in candidates if (c.error or "").startswith("identical to")]
    failed = [c.label for c in candidates if not c.passed and c.label not in same]
    if failed:
        reason += f"; rejected by the gate or failed: {', '.join(failed)}"
    if same:
        reason += f"; identical to an earlier candidate: {', '.join(same)}"
    return best, reason

"""The build recipe: which candidates to try, the accuracy gate, the rescue search and how to measure.

A recipe is YAML validated by pydantic; every field has a default, so an empty file is the default recipe::

    max_accuracy_drop: 1.0        # percentage points, absolute
    calibration_samples: 256
    candidates:
      - pass: static_int8
        grid: {calibration: [minmax, entropy, percentile], per_channel: [false, true]}
      - pass: static_int8       # the input convolution kept in float: often faster on CPU
        options: {float_stem: true}
        grid: {per_channel: [false, true]}
      - pass: fp16
    outlier_candidates:           # tried when no int8 candidate above meets the gate, before the rescue
      - pass: robust_int8         # channel scaling, then int8, then bias correction
        grid: {equalize: [cle, smooth_quant], per_channel: [false, true]}
      - pass: robust_int8
        options: {equalize: cle, float_stem: true, per_channel: false}
    rescue: {enabled: true, max_float_fraction: 0.5, samples: 64}
    size_tolerance: 0.05          # sizes within 5% of the smallest count as equal; then the fastest wins
    latency_tolerance: 0.05       # times within 5% of the fastest count as equal; then the most accurate wins
    latency: {batches: [1, 32], warmup: 5, budget_s: 0.5, min_runs: 10, max_runs: 200, threads: 1}
"""

from __future__ import annotations

import itertools
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgefleet.build.passes import PassConfig, get_pass, make_config
from edgefleet.build.training.config import TrainingSpec
from edgefleet.errors import ConfigError


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class CandidateSpec(_Frozen):
    """One pass with fixed ``options`` and a ``grid`` of option lists expanded as a cartesian product."""

    pass_name: str = Field(alias="pass")
    options: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)

    def expand(self) -> list[PassConfig]:
        """Every config of the grid, validated against the pass's config type."""
        keys = list(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys)) if keys else [()]
        return [make_config(self.pass_name, {**self.options, **dict(zip(keys, values, strict=True))})
                for values in combos]


class RescueSpec(_Frozen):
    """Keep the most sensitive nodes in float when no candidate meets the gate."""

    enabled: bool = True
    max_float_fraction: float = Field(default=0.5, gt=0, le=1)
    samples: int = Field(default=64, ge=1)


class LatencySpec(_Frozen):
    """How latency is timed with ONNX Runtime on this host."""

    batches: tuple[int, ...] = (1, 32)
    warmup: int = Field(default=5, ge=0)
    budget_s: float = Field(default=0.5, gt=0)
    min_runs: int = Field(default=10, ge=1)
    max_runs: int = Field(default=200, ge=1)
    threads: int = Field(default=1, ge=1)


def _default_candidates() -> list[CandidateSpec]:
    return [
        CandidateSpec.model_validate({"pass": "static_int8", "grid": {
            "calibration": ["minmax", "entropy", "percentile"], "per_channel": [False, True]}}),
        CandidateSpec.model_validate({"pass": "static_int8", "options": {"float_stem": True},
                                      "grid": {"per_channel": [False, True]}}),
        CandidateSpec.model_validate({"pass": "fp16"}),
    ]


def _default_outlier_candidates() -> list[CandidateSpec]:
    return [CandidateSpec.model_validate({"pass": "robust_int8", "grid": {
        "equalize": ["cle", "smooth_quant"], "per_channel": [False, True]}}),
        CandidateSpec.model_validate({"pass": "robust_int8", "options": {
            "equalize": "cle", "float_stem": True, "per_channel": False}})]


class Recipe(_Frozen):
    """What a build tries and how it decides."""

    max_accuracy_drop: float = Field(default=1.0, ge=0, description="percentage points, absolute")
    calibration_samples: int = Field(default=256, ge=1)
    candidates: list[CandidateSpec] = Field(default_factory=_default_candidates)
    outlier_candidates: list[CandidateSpec] = Field(
        default_factory=_default_outlier_candidates,
        description="tried when no int8 candidate meets the gate, before the rescue keeps nodes in float")
    rescue: RescueSpec = RescueSpec()
    size_tolerance: float = Field(default=0.05, ge=0)
    latency_tolerance: float = Field(default=0.05, ge=0, description="timings this close count as equal")
    latency: LatencySpec = LatencySpec()
    seed: int = 0
    training: TrainingSpec = TrainingSpec()
    """Training-time candidates when the data has training rows (build.training.config)."""

    def configs(self) -> list[tuple[str, PassConfig]]:
        """(pass name, config) of every candidate, in recipe order."""
        return [(spec.pass_name, config) for spec in self.candidates for config in spec.expand()]

    def outlier_configs(self) -> list[tuple[str, PassConfig]]:
        """(pass name, config) of every outlier-robust candidate, in recipe order."""
        return [(spec.pass_name, config) for spec in self.outlier_candidates for config in spec.expand()]


def describe(pass_name: str, config: PassConfig) -> str:
    """A short human label for one candidate, e.g. ``int8 entropy per-channel``."""
    options = config.model_dump()
    if pass_name in ("static_int8", "robust_int8"):
        label = f"int8 {options['calibration']} {'per-channel' if options['per_channel'] else 'per-tensor'}"
        if options["activation_type"] != "uint8":
            label += " s8-act"
        if options["float_stem"]:
            label += " float-stem"
        if options["nodes_to_exclude"]:
            label += f" +{len(options['nodes_to_exclude'])} float"
        if pass_name == "robust_int8":
            scaling = {"cle": " +cle", "smooth_quant": f" +smoothquant({options['alpha']:g})"}
            label += scaling.get(options["equalize"], "")
            label += " +bias-corr" if options["bias_correction"] else ""
        return label
    if pass_name == "dynamic_int8":
        return f"dynamic int8 {'per-channel' if options['per_channel'] else 'per-tensor'}"
    return pass_name


def load_recipe(text: str | None) -> Recipe:
    """Parse recipe YAML (None or empty: the default recipe); ConfigError naming the bad field."""
    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe is not valid YAML: {exc}") from exc
    if data is not None and not isinstance(data, dict):
        raise ConfigError("recipe must be a YAML mapping")
    try:
        recipe = Recipe.model_validate(data or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(f"recipe {'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from exc
    for spec in [*recipe.candidates, *recipe.outlier_candidates]:
        get_pass(spec.pass_name)
        spec.expand()
    return recipe

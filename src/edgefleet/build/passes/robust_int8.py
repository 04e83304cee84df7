"""Outlier-robust static int8: channel scaling (cross-layer equalization or SmoothQuant-style smoothing) on the
float model, then the static int8 pass with its calibration, then bias correction.

The build search tries it when no plain int8 candidate meets the accuracy gate, before keeping nodes in float
or falling back to fp16: a model whose channels differ in scale by orders of magnitude then ships at int8's
size. Statistics (scaling, calibration ranges) are collected once per scaling method and calibration method;
granularity and types vary in ``apply`` as in ``static_int8``.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydantic import Field

from edgefleet.build.passes import Pass, PassConfig, PassResult, register
from edgefleet.build.passes.bias_correction import correct_biases
from edgefleet.build.passes.channel_scaling import prepare
from edgefleet.build.passes.cle import CleConfig, CrossLayerEqualization
from edgefleet.build.passes.smooth_quant import SmoothQuant, SmoothQuantConfig
from edgefleet.build.passes.static_int8 import StaticInt8, StaticInt8Config, StaticStats


class RobustInt8Config(StaticInt8Config):
    """Every ``static_int8`` option, plus the channel scaling applied first and the bias correction after."""

    equalize: Literal["none", "cle", "smooth_quant"] = "cle"
    alpha: float = Field(default=0.5, ge=0, le=1)
    bias_correction: bool = True
    bias_samples: int = Field(default=32, ge=1)


@dataclass(frozen=True)
class RobustStats:
    """The static pass's statistics on the rescaled model, the inputs for bias correction, and notes."""

    static: StaticStats
    calib: np.ndarray
    notes: list[str]


@register
class RobustInt8(Pass):
    """Channel scaling + static int8 + bias correction."""

    name = "robust_int8"
    config_type = RobustInt8Config

    def stats_key(self, config: PassConfig) -> Hashable:
        assert isinstance(config, RobustInt8Config)
        alpha = config.alpha if config.equalize == "smooth_quant" else None
        return (config.equalize, alpha, config.calibration, config.percentile, config.preprocess,
                config.bias_samples)

    def collect(self, model: bytes, calib_x: np.ndarray, config: PassConfig) -> RobustStats:
        assert isinstance(config, RobustInt8Config)
        scaled, notes = prepare(model) if config.preprocess else model, []
        if config.equalize == "cle":
            result = CrossLayerEqualization().apply(scaled, None, CleConfig(preprocess=False))
            scaled, notes = result.model, result.notes
        elif config.equalize == "smooth_quant":
            result = SmoothQuant().run(scaled, calib_x, SmoothQuantConfig(alpha=config.alpha, preprocess=False))
            scaled, notes = result.model, result.notes
        static = StaticInt8().collect(scaled, calib_x, config)
        return RobustStats(static, np.ascontiguousarray(calib_x[: config.bias_samples], dtype=np.float32), notes)

    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        assert isinstance(config, RobustInt8Config) and isinstance(stats, RobustStats)
        result = StaticInt8().apply(model, stats.static, config)
        if not config.bias_correction:
            return PassResult(result.model, [*stats.notes, *result.notes])
        corrected, notes = correct_biases(result.model, stats.static.model, stats.calib)
        return PassResult(corrected, [*stats.notes, *notes, *result.notes])

"""Activation-aware channel scaling (SmoothQuant, Xiao et al. 2023): move activation outliers into weights.

Where one channel of a layer's input is far larger than the others, a per-tensor int8 range for that input
spends its levels on the outlier and flattens every other channel. For every pair of consecutive linear layers
(see :mod:`channel_scaling`) the channel ``j`` between them is divided by
``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)`` (the first layer's output channel is rescaled, so no
operator is added) and the second layer's weights for that channel multiplied by it: activations and weights
share the range. ``collect`` measures ``max|X_j|`` on the calibration inputs; ``apply`` rescales.
The float model's function is unchanged (up to float rounding).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field

from edgefleet.build.passes import Pass, PassConfig, PassResult, register
from edgefleet.build.passes.channel_scaling import (
    Weights,
    activation_axis,
    channel_range,
    channel_statistics,
    find_pairs,
    prepare,
    rescale,
)
from edgefleet.build.quantize import check_calibration, load_checked


class SmoothQuantConfig(PassConfig):
    """Migration strength ``alpha`` (0: weights keep their range, 1: activations are fully flattened)."""

    alpha: float = Field(default=0.5, ge=0, le=1)
    preprocess: bool = True
    samples: int = Field(default=128, ge=1)


@dataclass(frozen=True)
class ActivationRanges:
    """The model the ranges belong to and every pair's per-channel largest absolute activation."""

    model: bytes
    ranges: dict[str, np.ndarray]


@register
class SmoothQuant(Pass):
    """Float model in, smoothed float model out (quantize it afterwards: see ``robust_int8``)."""

    name = "smooth_quant"
    config_type = SmoothQuantConfig

    def stats_key(self, config: PassConfig) -> Hashable:
        assert isinstance(config, SmoothQuantConfig)
        return (config.preprocess, config.samples)

    def collect(self, model: bytes, calib_x: np.ndarray, config: PassConfig) -> ActivationRanges:
        assert isinstance(config, SmoothQuantConfig)
        prepared = prepare(model) if config.preprocess else model
        proto = load_checked(prepared)
        _, x = check_calibration(calib_x, proto)
        tensors = {p.between: activation_axis(p) for p in find_pairs(proto)}
        return ActivationRanges(prepared, channel_statistics(prepared, tensors, x[: config.samples]))

    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        assert isinstance(config, SmoothQuantConfig) and isinstance(stats, ActivationRanges)
        proto = load_checked(stats.model)
        pairs = find_pairs(proto)
        weights = Weights(proto)
        largest = 1.0
        for pair in pairs:
            act = stats.ranges.get(pair.between)
            wmax = channel_range(weights.get(pair.second.weight), pair.second.in_axis)
            if act is None or act.shape != wmax.shape:
                continue
            ok = (act > 0) & (wmax > 0)
            scale = np.where(ok, np.power(np.where(ok, act, 1.0), config.alpha)
                             / np.power(np.where(ok, wmax, 1.0), 1 - config.alpha), 1.0)
            rescale(weights, pair, scale)
            largest = max(largest, float(np.max(np.maximum(scale, 1 / scale))) if scale.size else 1.0)
        weights.store()
        note = (f"smooth_quant: alpha {config.alpha:g} on {len(pairs)} layer pair(s), largest channel scale "
                f"{largest:.3g}") if pairs else "smooth_quant: no pair of consecutive linear layers to smooth"
        return PassResult(model=bytes(proto.SerializeToString()), notes=[note])

"""Compression passes: a registry of one module per pass.

Each pass has a typed config (a pydantic model with defaults) and one ``run`` that returns a new model.
Passes that calibrate split the work as NNCF does: ``collect`` gathers statistics once per statistics key
(for static int8: the calibration method), ``apply`` turns statistics and a config into a model, so a search
over granularities or excluded nodes calibrates each method only once. Heavy libraries are imported inside
the pass that needs them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet.errors import ConfigError


class PassConfig(BaseModel):
    """Base of every pass config: frozen, unknown keys refused."""

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True)
class PassResult:
    """A pass's output model and what the user should know about it."""

    model: bytes
    notes: list[str] = field(default_factory=list)


class Pass(ABC):
    """One compression step: ``run(model, calib_x, config)`` returns a new serialized ONNX model."""

    name: ClassVar[str]
    config_type: ClassVar[type[PassConfig]]

    def stats_key(self, config: PassConfig) -> Hashable | None:
        """Configs with equal keys share statistics; None: this pass collects none."""
        return None

    def collect(self, model: bytes, calib_x: np.ndarray, config: PassConfig) -> Any:
        """Gather the statistics ``apply`` needs (default: none)."""
        return None

    @abstractmethod
    def apply(self, model: bytes, stats: Any, config: PassConfig) -> PassResult:
        """Transform ``model`` using ``stats`` from ``collect``."""

    def run(self, model: bytes, calib_x: np.ndarray, config: PassConfig) -> PassResult:
        """collect + apply in one call."""
        return self.apply(model, self.collect(model, calib_x, config), config)


PASSES: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available to recipes under ``cls.name``."""
    PASSES[cls.name] = cls
    return cls


def get_pass(name: str) -> Pass:
    """An instance of the pass registered as ``name``; ConfigError if none is."""
    _load_builtin()
    if name not in PASSES:
        raise ConfigError(f"unknown pass {name!r}; known: {', '.join(sorted(PASSES))}")
    return PASSES[name]()


def make_config(name: str, options: dict[str, Any]) -> PassConfig:
    """Validate ``options`` against the pass's config type; ConfigError naming the bad field."""
    cls = get_pass(name).config_type
    try:
        return cls.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"pass {name}: {where}: {first['msg']}") from exc


def _load_builtin() -> None:
    from edgefleet.build.passes import (  # noqa: F401  (registers them)
        cle,
        dynamic_int8,
        fp16,
        robust_int8,
        smooth_quant,
        static_int8,
    )

"""The pipeline file (``--pipeline FILE.yaml`` of ``edgefleet build`` and ``edgefleet bundle pack``)::

    input:                      # a preprocess spec (runtime.inputs), merged over the one inferred from the model
      kind: sliding_window
      sample_rate_hz: 100
      mean: [0.1, 0.2, 9.8]
      std: [1.0, 1.0, 1.0]
    output:                     # a postprocess spec (runtime.outputs); default: inferred from the model
      kind: scores
      activation: softmax
    labels: [idle, walking, running]
    thresholds: {min_confidence: 0.6}

Every key is checked against what the agent reads (the ``KEYS`` of each step): an unknown one, at the top level
or inside ``input``/``output``, is refused with one line naming it, so that a typo never ships silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgefleet.errors import ConfigError
from edgefleet.runtime.inputs import INPUT_STEPS
from edgefleet.runtime.outputs import OUTPUT_STEPS

TOP_KEYS = ("input", "output", "labels", "thresholds")


@dataclass(frozen=True)
class PipelineFile:
    """A parsed pipeline file; empty parts were not given."""

    input: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] | None = None
    labels: tuple[str, ...] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    where: str = "pipeline file"


def load_pipeline_file(path: Path) -> PipelineFile:
    """Read and check a pipeline file; ConfigError with one line naming the file and what is wrong."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return parse_pipeline(text, where=str(path))


def parse_pipeline(text: str, *, where: str = "pipeline file") -> PipelineFile:
    """Parse pipeline YAML (see the module docstring)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "syntax error"
        raise ConfigError(f"{where} is not valid YAML: {first}") from exc
    if data is None:
        return PipelineFile(where=where)
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping with keys {', '.join(TOP_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in TOP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(TOP_KEYS)})")
    inputs = _mapping(data.get("input"), f"{where}: input")
    if inputs:
        check_step_keys(inputs, "input", where, kind_required=False)
    output = _mapping(data.get("output"), f"{where}: output") or None
    if output is not None:
        check_step_keys(output, "output", where, kind_required=True)
    labels = parse_labels(data["labels"], f"{where}: labels") if data.get("labels") is not None else None
    thresholds = _mapping(data.get("thresholds"), f"{where}: thresholds")
    return PipelineFile(input=inputs, output=output, labels=labels,
                        thresholds={str(k): threshold_value(v, f"{where}: thresholds.{k}")
                                    for k, v in thresholds.items()}, where=where)


def check_step_keys(spec: dict[str, Any], part: str, where: str, *, kind: str | None = None,
                    kind_required: bool = True) -> None:
    """Refuse a key that the step of ``spec``'s kind (or ``kind``) does not read; an unknown kind too."""
    steps: dict[str, Any] = INPUT_STEPS if part == "input" else OUTPUT_STEPS
    name = spec.get("kind", kind)
    if name is None:
        if kind_required:
            raise ConfigError(f"{where}: {part} needs a kind ({', '.join(sorted(steps))})")
        known = frozenset().union(*(step.KEYS for step in steps.values()))
    else:
        step = steps.get(str(name))
        if step is None:
            raise ConfigError(f"{where}: unknown {part} kind {name!r} (known: {', '.join(sorted(steps))})")
        known = step.KEYS
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:
        what = f"{part} ({name})" if name is not None else part
        raise ConfigError(f"{where}: unknown key {part}.{unknown[0]} for {what} (known: {', '.join(sorted(known))})")


def parse_labels(value: Any, where: str) -> tuple[str, ...]:
    """Class names from a list (YAML) or a comma-separated string (a flag); blank names are refused."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{where} must be a list of class names")
    labels = tuple(str(v).strip() for v in items)
    if not labels or any(not label for label in labels):
        raise ConfigError(f"{where} holds an empty class name")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{where} names a class twice")
    return labels


def threshold_value(value: Any, where: str) -> float:
    """A finite number, or ConfigError."""
    try:
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where} must be a number, got {value!r}") from exc
    if not math.isfinite(number):
        raise ConfigError(f"{where} must be finite")
    return number


def parse_thresholds(pairs: list[str]) -> dict[str, float]:
    """``--threshold KEY=VALUE`` flags as a mapping; ConfigError naming a malformed one."""
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--threshold {pair!r} is not KEY=VALUE")
        out[key.strip()] = threshold_value(value, f"--threshold {key.strip()}")
    return out


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping")
    return {str(k): v for k, v in value.items()}

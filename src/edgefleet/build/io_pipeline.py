"""The input pipeline, output interpretation, labels and thresholds that ``edgefleet build`` and ``edgefleet bundle
pack`` write into a bundle, and the data they turn into model input.

Each source is laid over the previous one: the pipeline inferred from the model's signature (bundle.describe) or
given by a dataset or a torch factory; what the data file carries (``sample_rate_hz``, ``labels``); the pipeline
file (build.pipeline_file); the flags (``--sample-rate``, ``--window``, ``--hop``, ``--labels``, ``--threshold``).
The result is checked as the agent will run it (bundle.pack.model_pipeline) before any work is done.

The data file's x arrays hold what the sensor gives, in the model's layout, BEFORE the pipeline's scaling:
``model_input`` applies the input step to them, so with the default (identity) pipeline the data is the model
input, and a device replaying ``test_x`` through the same pipeline feeds the model what the build measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.build.pipeline_file import PipelineFile, check_step_keys
from edgefleet.errors import BundleError, ConfigError, DataError
from edgefleet.runtime.inputs import ImageInput, InputStep, SeriesInput, TensorInput, VectorInput, input_step

SERIES = "sliding_window"
GOLDEN_ROWS = 4
"""Golden samples a build attaches by default: the first calibration rows, after the input step."""


@dataclass(frozen=True)
class PipelineOptions:
    """What the user said about the pipeline: a pipeline file and flags (None: not said)."""

    file: PipelineFile | None = None
    sample_rate_hz: float | None = None
    window: int | None = None
    hop: int | None = None
    labels: tuple[str, ...] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ResolvedPipeline:
    """What the bundle will say; ``output_given``: the output spec came from the user, not from inference."""

    preprocess: dict[str, Any]
    postprocess: dict[str, Any] | None
    labels: list[str]
    thresholds: dict[str, float]
    output_given: bool = False

    @property
    def step(self) -> InputStep:
        return input_step(self.preprocess)


def resolve_pipeline(model: bytes, options: PipelineOptions, *, base: dict[str, Any] | None = None,
                     base_labels: list[str] | tuple[str, ...] = (), data_sample_rate: float | None = None,
                     data_labels: list[str] | None = None) -> ResolvedPipeline:
    """Lay the sources over each other (see the module docstring) and check the result against the model;
    ConfigError with one line for anything the agent could not run."""
    from edgefleet.bundle.describe import default_preprocess
    from edgefleet.bundle.pack import BundleSpec, model_pipeline, model_schema

    inputs, outputs = model_schema(model)
    pipe = options.file or PipelineFile()
    try:
        pre = dict(base) if base else default_preprocess(inputs)
    except BundleError as exc:
        if not pipe.input.get("kind"):
            raise ConfigError(f"the agent could not run this bundle: {exc}") from exc
        pre = {}
    pre = _normalized(pre)
    if data_sample_rate is not None and pre.get("kind") == SERIES:
        pre["sample_rate_hz"] = float(data_sample_rate)
    if pipe.input:
        given = _normalized(pipe.input)
        if given.get("kind", pre.get("kind")) != pre.get("kind"):
            pre = given  # another kind of input: the inferred spec's keys mean nothing to it
        else:
            pre = {**pre, **given}
            check_step_keys(given, "input", pipe.where, kind=str(pre.get("kind")))
    pre = _flags(pre, options)
    labels = list(options.labels or pipe.labels or data_labels or base_labels)
    thresholds = {**pipe.thresholds, **options.thresholds}
    spec = BundleSpec(name="check", version="0.0.0", labels=labels, preprocess=pre, postprocess=pipe.output)
    pre, post = model_pipeline(model, inputs, outputs, spec)
    if not labels and post and post.get("kind") == "label_probabilities" and post.get("classes"):
        labels = [str(c) for c in post["classes"]]  # an ONNX-ML classifier names its classes
    return ResolvedPipeline(preprocess=pre, postprocess=post, labels=labels, thresholds=thresholds,
                            output_given=pipe.output is not None)


def _normalized(spec: dict[str, Any]) -> dict[str, Any]:
    out = dict(spec)
    if out.get("kind") == "series":
        out["kind"] = SERIES
    return out


def _flags(pre: dict[str, Any], options: PipelineOptions) -> dict[str, Any]:
    said = {flag: value for flag, value in (("--sample-rate", options.sample_rate_hz), ("--window", options.window),
                                            ("--hop", options.hop)) if value is not None}
    if not said:
        return pre
    if pre.get("kind") != SERIES:
        raise ConfigError(f"{', '.join(said)} apply to a time series ({SERIES}) input; this model's input "
                          f"pipeline is {pre.get('kind')!r}")
    out = dict(pre)
    if options.sample_rate_hz is not None:
        out["sample_rate_hz"] = float(options.sample_rate_hz)
    if options.window is not None:
        out["window"] = int(options.window)
        if options.hop is None and int(pre.get("hop", 0)) == int(pre.get("window", 0)):
            out["hop"] = int(options.window)  # hop followed window: keep it so
    if options.hop is not None:
        out["hop"] = int(options.hop)
    return out


def with_activation(pipeline: ResolvedPipeline, scores: np.ndarray) -> ResolvedPipeline:
    """For class scores whose activation the user did not say: ``softmax`` unless the float model's outputs
    ``scores`` (on calibration data) are already rows of non-negative values summing to 1."""
    if not needs_activation(pipeline):
        return pipeline
    post = pipeline.postprocess
    activation = "none" if is_probability(scores) else "softmax"
    return replace(pipeline, postprocess={**(post or {"kind": "scores"}), "activation": activation})


def needs_activation(pipeline: ResolvedPipeline) -> bool:
    """Whether the output spec reads class scores without saying their activation."""
    post = pipeline.postprocess
    return post is None or (post.get("kind") == "scores" and "activation" not in post)


def is_probability(scores: np.ndarray, atol: float = 1e-3) -> bool:
    """Whether every row holds non-negative values that sum to 1 (within ``atol``)."""
    rows = np.asarray(scores, dtype=np.float64)
    return bool(rows.ndim == 2 and np.all(rows >= -atol) and np.allclose(rows.sum(axis=1), 1.0, atol=atol))


def row_shape(step: InputStep) -> tuple[int, ...]:
    """One data row, in the model's layout, before the pipeline: what the data file's x arrays hold per sample."""
    if isinstance(step, SeriesInput):
        return (step.window.channels, step.window.window)
    if isinstance(step, ImageInput | VectorInput | TensorInput):
        return tuple(step.model_shape[1:])
    raise ConfigError(f"the build cannot feed data to a {step.kind} input")


def check_rows(x: Any, step: InputStep, model_shape: list[int | None], what: str) -> np.ndarray:
    """Data rows as float32, checked against the pipeline's row shape: numeric, rank, sizes and finite values;
    DataError naming the data's shape and the model's input."""
    try:
        raw = np.asarray(x)
        if raw.dtype.kind not in "fiu":
            raise DataError(f"{what} must hold real numbers (float or integer), got dtype {raw.dtype}")
        rows = np.ascontiguousarray(raw, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} is not numeric: {exc}") from exc
    want = row_shape(step)
    shown = ", ".join("?" if d is None or d <= 0 else str(d) for d in model_shape)
    if rows.ndim != len(want) + 1 or len(rows) == 0:
        raise DataError(f"{what} must be a non-empty rank-{len(want) + 1} array, got shape {rows.shape}; the "
                        f"model's input is [{shown}]")
    if tuple(rows.shape[1:]) != want:
        made = tuple(step.model_shape[1:])
        via = "" if made == want else f" (its {step.kind} pipeline reads rows of {list(want)})"
        raise DataError(f"{what} has shape {rows.shape}; the model's input is [{shown}]{via}")
    if not np.isfinite(rows).all():
        raise DataError(f"{what} contains NaN or infinite values")
    return rows


def model_input(step: InputStep, rows: np.ndarray) -> np.ndarray:
    """Data rows in the model's layout (see ``row_shape``) -> the model input, through the input step as the
    agent runs it (an image's rows become frames first)."""
    if isinstance(step, ImageInput):
        return step.apply(step.to_frames(rows))
    return step.apply(rows)


GOLDEN_TOLERANCE = {"none": 1e-3, "fp16": 1e-2}
"""Golden tolerance (atol = rtol) by the pass that made the shipped model; int8 models get ``INT8_TOLERANCE``:
their integer kernels differ between CPUs (x86 u8s8 saturation, ARM dot products) by a quantization step."""
INT8_TOLERANCE = 5e-2


def golden_tolerance(pass_name: str) -> float:
    """The golden samples' tolerance for a model made by ``pass_name`` ("none": the float model)."""
    return GOLDEN_TOLERANCE.get(pass_name, INT8_TOLERANCE)


def options_from_flags(pipeline: Path | None = None, labels: str | None = None, thresholds: list[str] | None = None,
                       sample_rate_hz: float | None = None, window: int | None = None,
                       hop: int | None = None) -> PipelineOptions:
    """The pipeline options of ``build`` and ``bundle pack``: ``--pipeline``, ``--labels a,b,c``,
    ``--threshold KEY=VALUE`` (repeatable), ``--sample-rate``, ``--window``, ``--hop``."""
    from edgefleet.build.pipeline_file import load_pipeline_file, parse_labels, parse_thresholds

    if sample_rate_hz is not None and not (np.isfinite(sample_rate_hz) and sample_rate_hz > 0):
        raise ConfigError(f"--sample-rate must be a positive number of Hz, got {sample_rate_hz}")
    for flag, value in (("--window", window), ("--hop", hop)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1 sample, got {value}")
    return PipelineOptions(file=None if pipeline is None else load_pipeline_file(pipeline),
                           sample_rate_hz=sample_rate_hz, window=window, hop=hop,
                           labels=None if labels is None else parse_labels(labels, "--labels"),
                           thresholds=parse_thresholds(thresholds or []))

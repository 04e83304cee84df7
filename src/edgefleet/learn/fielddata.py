"""Field data: the hard examples devices send, the labels posted for them, and datasets made of them.

Hard examples arrive inside telemetry batches (``TelemetryBatch.hard_examples``: the model input, encoded);
:func:`example_rows` turns a batch into store rows. Labelled examples count as labelled windows of the model
that predicted them (:func:`label_stats`: delayed labels for accuracy gates and monitors), and
:func:`export_dataset` writes them in the format ``edgefleet build --data`` reads.

Labels have a source and a trust: an operator's label (one example, ``operator``, or a device's time range,
``range``) is ground truth; the upstream model's answer to an escalated window (``upstream``: what
``edgefleet serve-model --report-to`` posts, answers to queued escalations included) is a label of lower trust.
Upstream labels never feed accuracy gates or monitors, and datasets carry them only when asked
(``include_upstream``), marked in ``test_source``.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from edgefleet.core.cohorts import CohortStats
from edgefleet.errors import DataError
from edgefleet.transport.messages import TelemetryBatch

OPERATOR, RANGE, UPSTREAM = "operator", "range", "upstream"
GROUND_TRUTH_SOURCES = (OPERATOR, RANGE)
"""Label sources that are ground truth; anything else (``upstream``) is of lower trust."""
UPSTREAM_ENCODING = "f16"
MAX_UPSTREAM_VALUES = 1 << 20


def label_trust(source: str | None) -> str | None:
    """``ground_truth`` for an operator's label, ``low`` for the upstream model's, None without a label."""
    if source is None:
        return None
    return "ground_truth" if source in GROUND_TRUTH_SOURCES else "low"


def upstream_row(answer: Mapping[str, Any]) -> dict[str, Any]:
    """A store row (labelled ``upstream``) from one upstream answer: model ref, device, ts, shape, float32 data in
    base64 (the window as escalated), the local label and confidence, the upstream label. DataError when the
    window cannot be read; it is kept as float16 (the hard examples' ``f16`` encoding)."""
    shape = [int(d) for d in answer["shape"]]
    if not shape or any(d < 1 for d in shape) or math.prod(shape) > MAX_UPSTREAM_VALUES:
        raise DataError(f"an upstream answer's shape {shape} is empty or too large")
    try:
        raw = base64.b64decode(str(answer["data"]), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DataError("an upstream answer's data is not base64") from exc
    if len(raw) != 4 * math.prod(shape):
        raise DataError(f"an upstream answer holds {len(raw)} bytes; shape {shape} needs {4 * math.prod(shape)}")
    x = np.frombuffer(raw, dtype="<f4")
    if not np.all(np.isfinite(x)):
        raise DataError("an upstream answer's window holds NaN or infinity")
    model = str(answer["model"])
    return {"name": model.partition("@")[0], "model": model, "device": str(answer["device"]),
            "ts": float(answer["ts"]), "predicted": str(answer["local_label"])[:128],
            "confidence": float(answer["local_confidence"]), "shape": shape, "encoding": UPSTREAM_ENCODING,
            "data": base64.b64encode(x.astype("<f2").tobytes()).decode("ascii"), "scale": None,
            "label": str(answer["label"])[:128]}


def example_rows(batch: TelemetryBatch) -> list[dict[str, Any]]:
    """The hard examples of one batch as store rows (model name and ref, device, time, prediction, data)."""
    if not batch.hard_examples or not batch.model:
        return []
    name = batch.model.partition("@")[0]
    return [{"name": name, "model": batch.model, "device": batch.device, "ts": e.ts or batch.ts,
             "predicted": e.predicted[:128], "confidence": float(e.confidence), "shape": list(e.shape),
             "encoding": e.encoding, "data": e.data, "scale": e.scale} for e in batch.hard_examples]


def label_stats(labels: Iterable[tuple[str, str, str]]) -> dict[str, CohortStats]:
    """Per model ref, labelled and correct counts from (model ref, predicted, label) triples."""
    out: dict[str, CohortStats] = {}
    for model, predicted, label in labels:
        stats = out.setdefault(model, CohortStats())
        stats.labelled += 1
        stats.correct += int(predicted == label)
    return out


def add_field_labels(primary: dict[str, dict[str, CohortStats]],
                     labels: Iterable[tuple[str, str, str, str]]) -> None:
    """Count (device, model ref, predicted, label) field labels as labelled windows in per-device, per-model stats
    (as the store's ``device_model_stats`` gives them): delayed labels for the accuracy gates of rollouts."""
    for device, model, predicted, label in labels:
        stats = primary.setdefault(device, {}).setdefault(model, CohortStats(devices=1))
        stats.labelled += 1
        stats.correct += int(predicted == label)


class _Stored:
    """A stored hard example read as the agent's encoding (for :func:`decode_example`)."""

    def __init__(self, row: Any) -> None:
        self.shape: list[int] = list(row.shape)
        self.encoding: str = row.encoding
        self.data: str = row.data
        self.scale: float | None = row.scale


def decode(row: Any) -> np.ndarray:
    """The float32 model input a stored hard example holds; DataError when it cannot be read."""
    from edgefleet.agent.stats import decode_example

    try:
        return decode_example(_Stored(row))
    except (ValueError, TypeError) as exc:
        raise DataError(f"hard example {getattr(row, 'id', '?')} cannot be decoded: {exc}") from exc


def export_dataset(rows: Sequence[Any], labels: Sequence[str], preprocess: Mapping[str, Any] | None = None, *,
                   include_upstream: bool = False, input_rank: int | None = None) -> tuple[bytes, dict[str, int]]:
    """An ``.npz`` (calib_x: every example; test_x, test_y: the labelled ones; test_source: each one's label
    source; labels: class names) of hard examples of one shape (the most common one), and counts; DataError when
    none is labelled. Examples labelled only by the upstream model count as labelled with ``include_upstream``,
    else they are left out of test_x (and counted as ``upstream_left_out``). Examples are model inputs: with the
    model's ``input_rank`` (its first input's dimensions, batch included) their batch axis of 1 is dropped, so that
    a row is one window, as in ``build --data``.

    A hard example is the model's input: with a sliding-window ``preprocess`` (the model's manifest) it is scaled
    by the training statistics, so it is scaled back into raw readings (one row per window, ``sample_rate_hz``
    kept), the layout ``build --data`` reads."""
    if not rows:
        raise DataError("no hard examples stored for this model")
    shape = Counter(tuple(r.shape) for r in rows).most_common(1)[0][0]
    kept = [r for r in rows if tuple(r.shape) == shape]
    names = list(labels) or sorted({str(r.label) for r in kept if r.label is not None})
    index = {name: i for i, name in enumerate(names)}
    named = [r for r in kept if r.label is not None and r.label in index]
    labelled = [r for r in named if include_upstream or r.label_source in GROUND_TRUTH_SOURCES]
    upstream = sum(1 for r in labelled if r.label_source not in GROUND_TRUTH_SOURCES)
    if not labelled:
        hint = " (some have upstream labels: include them to use those)" if named else ""
        raise DataError(f"no labelled hard examples for this model: post labels first (edgefleet data label){hint}")
    batched = input_rank is not None and len(shape) == input_rank and len(shape) > 1 and shape[0] == 1
    row_shape = shape[1:] if batched else shape
    unscale = _unscaler(row_shape, preprocess or {})

    def row(r: Any) -> np.ndarray:
        return unscale(decode(r).reshape(row_shape))

    calib = np.stack([row(r) for r in kept]).astype(np.float32)
    test_x = np.stack([row(r) for r in labelled]).astype(np.float32)
    test_y = np.array([index[str(r.label)] for r in labelled], dtype=np.int64)
    arrays: dict[str, Any] = {"calib_x": calib, "test_x": test_x, "test_y": test_y,
                              "test_source": np.array([str(r.label_source or OPERATOR) for r in labelled],
                                                      dtype=np.str_),
                              "labels": np.array(names, dtype=np.str_)}
    rate = (preprocess or {}).get("sample_rate_hz")
    if isinstance(rate, int | float) and rate > 0:
        arrays["sample_rate_hz"] = np.float64(rate)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue(), {"examples": len(kept), "labelled": len(labelled), "upstream_labelled": upstream,
                               "upstream_left_out": len(named) - len(labelled), "left_out": len(rows) - len(kept)}


def _unscaler(shape: tuple[int, ...], preprocess: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """Undo a sliding window's scaling (x * std + mean per channel) for windows of ``shape`` [channels, window]."""
    mean, std = preprocess.get("mean"), preprocess.get("std")
    if (preprocess.get("kind") != "sliding_window" or len(shape) != 2 or not isinstance(mean, list)
            or not isinstance(std, list) or len(mean) != shape[0] or len(std) != shape[0]):
        return lambda x: x
    m = np.asarray(mean, dtype=np.float32).reshape(-1, 1)
    s = np.asarray(std, dtype=np.float32).reshape(-1, 1)
    return lambda x: x * s + m

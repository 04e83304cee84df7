"""REST endpoints for field data: the hard examples devices sent (list), ground-truth labels for one example or
a device's time range (post), the upstream model's answers to escalated windows (labels of lower trust, posted by
``edgefleet serve-model --report-to``), and a dataset of them in the ``edgefleet build --data`` format (export)."""

import base64
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field, model_validator

from edgefleet.learn.fielddata import MAX_UPSTREAM_VALUES, export_dataset, label_trust, upstream_row
from edgefleet.server.store import Store
from edgefleet.server.store.learn_tables import HardExampleRow


class LabelIn(BaseModel):
    """A label for one hard example (``example``), or for every hard example a device sent in a time range."""

    label: str = Field(min_length=1, max_length=128)
    example: int | None = Field(default=None, ge=1, le=2**62)
    device: str | None = Field(default=None, max_length=64)
    start: float | None = Field(default=None, allow_inf_nan=False, ge=-1e12, le=1e12, description="unix seconds")
    end: float | None = Field(default=None, allow_inf_nan=False, ge=-1e12, le=1e12, description="unix seconds")
    model: str | None = Field(default=None, max_length=64, description="with a range: only this model NAME's")

    @model_validator(mode="after")
    def _one_target(self) -> "LabelIn":
        if (self.example is None) == (self.device is None):
            raise ValueError("give either example or device (with start and end)")
        if self.device is not None and (self.start is None or self.end is None or self.end < self.start):
            raise ValueError("a device's range needs start <= end (unix seconds)")
        return self


class UpstreamAnswerIn(BaseModel):
    """One escalated window and the upstream model's answer (``edgefleet.upstream.report``)."""

    model: str = Field(min_length=3, max_length=140, pattern=r"^[^@]+@[^@]+$", description="NAME@VERSION")
    device: str = Field(min_length=1, max_length=64)
    ts: float = Field(allow_inf_nan=False, ge=0, le=1e12)
    shape: list[int] = Field(min_length=1, max_length=8)
    data: str = Field(max_length=MAX_UPSTREAM_VALUES * 4 * 4 // 3 + 4, description="float32, base64")
    local_label: str = Field(max_length=128)
    local_confidence: float = Field(allow_inf_nan=False, ge=0, le=1)
    label: str = Field(min_length=1, max_length=128, description="the upstream model's answer")
    confidence: float = Field(allow_inf_nan=False, ge=0, le=1)
    upstream_model: str = Field(default="", max_length=140)


class UpstreamAnswersIn(BaseModel):
    answers: list[UpstreamAnswerIn] = Field(max_length=500)


class HardExampleOut(BaseModel):
    """A hard example as the API lists it (its input stays on the server; ``data export`` writes inputs)."""

    id: int
    model: str
    device: str
    ts: float
    predicted: str
    confidence: float
    shape: list[int]
    label: str | None
    label_source: str | None
    label_trust: str | None
    labelled_at: float | None


class LabelledOut(BaseModel):
    """What a label request labelled: the count, and the example when one was named."""

    labelled: int
    example: HardExampleOut | None = None


class UpstreamStoredOut(BaseModel):
    """Upstream answers kept: new examples, existing ones labelled, operator labels kept, answers left out."""

    stored: int
    labelled: int
    kept: int
    unknown: int


class FieldExportOut(BaseModel):
    """A model's field data as an ``.npz`` (base64) with its counts."""

    model: str
    examples: int
    labelled: int
    upstream_labelled: int
    upstream_left_out: int
    left_out: int
    npz: str


def example_out(row: HardExampleRow) -> HardExampleOut:
    return HardExampleOut(id=row.id, model=row.model, device=row.device, ts=row.ts, predicted=row.predicted,
                          confidence=row.confidence, shape=row.shape, label=row.label, label_source=row.label_source,
                          label_trust=label_trust(row.label_source if row.label is not None else None),
                          labelled_at=row.labelled_at)


def input_rank(manifest: dict[str, Any]) -> int | None:
    """The dimensions (batch included) of the model's first input, as its manifest lists them."""
    inputs = manifest.get("inputs") or []
    shape = inputs[0].get("shape") if inputs and isinstance(inputs[0], dict) else None
    return len(shape) if isinstance(shape, list) else None


def fielddata_router(store: Store) -> APIRouter:
    router = APIRouter(prefix="/api/v1/fielddata")

    def latest_manifest(name: str) -> dict[str, Any]:
        versions = [m for m in store.list_models() if m.name == name]
        if not versions:
            raise HTTPException(404, f"unknown model {name!r}")
        return dict(max(versions, key=lambda m: m.release).manifest)

    def known_labels(name: str) -> list[str]:
        return list(latest_manifest(name).get("labels") or [])

    @router.get("/{name}/examples")
    def examples(name: str, version: str | None = None, device: str | None = None, labelled: bool | None = None,
                 limit: int = Query(1000, ge=1, le=100_000)) -> list[HardExampleOut]:
        known_labels(name)
        rows = store.hard_examples(name, version=version, device=device, labelled=labelled,
                                   limit=max(1, min(limit, 100_000)))
        return [example_out(r) for r in rows]

    @router.post("/labels")
    def label(body: LabelIn) -> LabelledOut:
        if body.example is not None:
            row = store.hard_example(body.example)
            if row is None:
                raise HTTPException(404, f"unknown hard example {body.example}")
            check_label(row.name, body.label)
            return LabelledOut(labelled=1, example=example_out(store.label_example(body.example, body.label)))
        assert body.device is not None and body.start is not None and body.end is not None
        if store.get_device(body.device) is None:
            raise HTTPException(404, f"unknown device {body.device!r}")
        if body.model is not None:
            check_label(body.model, body.label)
        n = store.label_range(body.device, body.start, body.end, body.label, name=body.model)
        return LabelledOut(labelled=n)

    def check_label(name: str, label: str) -> None:
        labels = known_labels(name)
        if labels and label not in labels:
            raise HTTPException(422, f"label {label!r} is not a class of {name} ({', '.join(labels)})")

    @router.post("/upstream")
    def upstream(body: UpstreamAnswersIn) -> UpstreamStoredOut:
        """Keep the upstream model's answers as labels of lower trust (``label_source`` upstream); answers for a
        model or device the server does not know are left out and counted."""
        known = {f"{m.name}@{m.version}" for m in store.list_models()}
        rows, unknown = [], 0
        for answer in body.answers:
            if answer.model not in known or store.get_device(answer.device) is None:
                unknown += 1
                continue
            rows.append(upstream_row(answer.model_dump()))  # DataError: 422 with one line
        return UpstreamStoredOut(**store.add_upstream_answers(rows), unknown=unknown)

    @router.get("/{name}/export")
    def export(name: str, include_upstream: bool = False) -> FieldExportOut:
        """The model's field data as an ``.npz`` (base64): calib_x, test_x, test_y, test_source, labels; labels of
        the upstream model only with ``include_upstream``."""
        manifest = latest_manifest(name)
        data, counts = export_dataset(store.hard_examples(name), list(manifest.get("labels") or []),
                                      manifest.get("preprocess"), include_upstream=include_upstream,
                                      input_rank=input_rank(manifest))
        return FieldExportOut(model=name, **counts, npz=base64.b64encode(data).decode("ascii"))

    return router

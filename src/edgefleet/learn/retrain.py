"""One-command retraining: fine-tune a factory's torch model on the base data plus labelled field data, build it
through the accuracy-gated pipeline (build.product.build_bundle) and sign it as the next version.

* The factory (``module:function``) returns the architecture: a ``torch.nn.Module`` (or ``(module, data)`` as
  ``edgefleet build`` factories do). When the function takes a ``deployed`` argument it is called with the
  deployed version (:class:`Deployed`: name, version, release, the bundle's manifest and ONNX bytes, fetched
  from the server) so that it can load that version's weights; otherwise its own initialization is the starting
  point. The new version keeps the deployed version's input pipeline (window, hop, scaling) and class names.
* Base data: an ``.npz`` with calib_x, test_x, test_y and optionally train_x/train_y (without them, half of the
  test rows train and the other half stay held out). Field data: what ``edgefleet data export`` writes (the
  labelled field examples in test_x/test_y); a seeded 70/30 split trains and scores. Rows its ``test_source``
  marks as labelled by the upstream model (lower trust) are used only when asked (``include_upstream``), and then
  only for training: the field score stays on ground-truth labels.
* Accuracy before (the starting model) and after, on the held-out base rows and the held-out field examples.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from edgefleet.build.product import BuiltBundle

FIELD_TRAIN_FRACTION = 0.7


@dataclass(frozen=True)
class Deployed:
    """The version being replaced, as the server's registry lists it."""

    name: str
    version: str
    release: int
    model: bytes | None = None
    sha256: str = ""
    manifest: dict[str, Any] | None = None
    """The deployed bundle's manifest (preprocess, postprocess, labels...), when it was fetched."""


def with_bundle(deployed: Deployed, bundle: bytes) -> Deployed:
    """``deployed`` with its bundle's manifest and ONNX model (no model when the bundle is encrypted)."""
    from dataclasses import replace

    from edgefleet.bundle.container import MODEL, read_container
    from edgefleet.bundle.pack import peek_manifest
    from edgefleet.errors import BundleError

    try:
        manifest = peek_manifest(bundle)
        model = None if manifest.encryption is not None else read_container(bundle).get(MODEL)
    except (BundleError, ValueError) as exc:
        raise DataError(f"the deployed bundle of {deployed.name}@{deployed.version} cannot be read: {exc}") from exc
    return replace(deployed, model=model, manifest=manifest.model_dump(mode="json"))


@dataclass(frozen=True)
class RetrainData:
    """Training rows, held-out base rows, held-out field rows and calibration rows (raw, in the model's layout)."""

    train_x: np.ndarray
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    field_x: np.ndarray
    field_y: np.ndarray
    calib_x: np.ndarray
    labels: list[str]
    field_train: int
    field_upstream: int = 0
    """Of the field training rows, how many carry the upstream model's label (lower trust)."""
    upstream_left_out: int = 0
    """Field rows with only an upstream label that were not used (not asked for)."""


@dataclass(frozen=True)
class RetrainResult:
    built: BuiltBundle
    before: dict[str, float]
    after: dict[str, float]
    previous: Deployed | None


def next_version(models: list[dict[str, Any]], name: str) -> tuple[Deployed | None, str, int]:
    """The registry's newest release of ``name``, the next version (patch bump) and release (+1)."""
    mine = [m for m in models if m.get("name") == name]
    if not mine:
        return None, "1.0.0", 1
    latest = max(mine, key=lambda m: int(m["release"]))
    major, minor, patch = (int(p) for p in str(latest["version"]).split("+")[0].split("-")[0].split("."))
    current = Deployed(name=name, version=str(latest["version"]), release=int(latest["release"]),
                       sha256=str(latest.get("sha256", "")))
    return current, f"{major}.{minor}.{patch + 1}", current.release + 1


def load_model(spec: str, deployed: Deployed | None) -> torch.nn.Module:
    """Call the factory; ConfigError with one line when it cannot be imported or returns no torch model."""
    import torch

    from edgefleet.build.training.data import import_factory

    factory = import_factory(spec)
    takes_deployed = "deployed" in inspect.signature(factory).parameters
    result = factory(deployed=deployed) if takes_deployed else factory()
    if isinstance(result, tuple) and result:
        result = result[0]
    if not isinstance(result, torch.nn.Module):
        raise ConfigError(f"--factory {spec} must return a torch.nn.Module, got {type(result).__name__}")
    return result


def _read(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    from edgefleet.build.inputs import read_npz

    out = read_npz(path, required)
    with np.load(path, allow_pickle=False) as npz:
        for extra in ("train_x", "train_y", "test_source"):
            if extra in npz.files:
                out[extra] = npz[extra]
    return out


def load_data(base: Path, field: Path | None, seed: int = 0, *, include_upstream: bool = False) -> RetrainData:
    """Base and field rows, split and checked: one DataError line when shapes or labels disagree. Field rows
    labelled by the upstream model train only with ``include_upstream`` and are never scored."""
    arrays = _read(base, ("calib_x", "test_x", "test_y"))
    rng = np.random.default_rng(seed)
    test_x, test_y = np.asarray(arrays["test_x"], np.float32), np.asarray(arrays["test_y"]).astype(np.int64)
    if "train_x" in arrays and "train_y" in arrays:
        train_x, train_y = np.asarray(arrays["train_x"], np.float32), np.asarray(arrays["train_y"]).astype(np.int64)
        hold_x, hold_y = test_x, test_y
    else:
        order = rng.permutation(len(test_x))
        half = len(order) // 2
        train_x, train_y, hold_x, hold_y = test_x[order[:half]], test_y[order[:half]], test_x[order[half:]], \
            test_y[order[half:]]
    row = tuple(train_x.shape[1:])
    for what, x in (("test_x", hold_x), ("calib_x", np.asarray(arrays["calib_x"]))):
        if tuple(x.shape[1:]) != row:
            raise DataError(f"{base}: {what} rows are {list(x.shape[1:])}, train rows {list(row)}")
    field_x = np.zeros((0, *row), np.float32)
    field_y = np.zeros(0, np.int64)
    field_train = upstream_used = upstream_left = 0
    if field is not None:
        fa = _read(field, ("test_x", "test_y"))
        fx, fy = np.asarray(fa["test_x"], np.float32), np.asarray(fa["test_y"]).astype(np.int64)
        if tuple(fx.shape[1:]) != row:
            raise DataError(f"{field}: field rows are {list(fx.shape[1:])}; the base data's are {list(row)}")
        if fy.shape != (len(fx),):
            raise DataError(f"{field}: test_y has shape {fy.shape}; expected ({len(fx)},)")
        upstream = _upstream_rows(fa.get("test_source"), len(fx), field)
        ux, uy = fx[upstream], fy[upstream]
        fx, fy = fx[~upstream], fy[~upstream]
        if include_upstream:
            upstream_used = len(uy)
        else:
            upstream_left = len(uy)
        order = rng.permutation(len(fx))
        field_train = round(len(fx) * FIELD_TRAIN_FRACTION) if len(fx) > 1 else len(fx)
        train_x = np.concatenate([train_x, fx[order[:field_train]], ux[:upstream_used]])
        train_y = np.concatenate([train_y, fy[order[:field_train]], uy[:upstream_used]])
        field_x, field_y = fx[order[field_train:]], fy[order[field_train:]]
        field_train += upstream_used
    return RetrainData(train_x=train_x, train_y=train_y, holdout_x=hold_x, holdout_y=hold_y, field_x=field_x,
                       field_y=field_y, calib_x=np.asarray(arrays["calib_x"], np.float32),
                       labels=list(arrays.get("labels", [])), field_train=field_train, field_upstream=upstream_used,
                       upstream_left_out=upstream_left)


def _upstream_rows(source: Any, rows: int, path: Path) -> np.ndarray:
    """A mask of the rows a dataset's ``test_source`` marks as labelled by the upstream model (none without one)."""
    from edgefleet.learn.fielddata import GROUND_TRUTH_SOURCES

    if source is None:
        return np.zeros(rows, dtype=bool)
    names = np.asarray(source)
    if names.dtype.kind not in "US" or names.shape != (rows,):
        raise DataError(f"{path}: test_source must hold one label source per test row, got {names.dtype} "
                        f"{names.shape}")
    return ~np.isin(names.astype(str), list(GROUND_TRUTH_SOURCES))


def fine_tune(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, *, epochs: int, lr: float = 1e-3,
              batch: int = 32, seed: int = 0, show: bool = True) -> torch.nn.Module:
    """Adam on cross-entropy over seeded shuffles; rich progress bars for epochs and steps."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = max((len(x) + batch - 1) // batch, 1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TimeElapsedColumn())
    with Progress(*columns, disable=not show, transient=False) as bars:
        epoch_bar = bars.add_task("epochs", total=epochs, loss="")
        step_bar = bars.add_task("steps", total=steps, loss="")
        for _ in range(epochs):
            bars.reset(step_bar, total=steps)
            order = torch.randperm(len(xt), generator=generator)
            for start in range(0, len(xt), batch):
                idx = order[start:start + batch]
                if len(idx) < 2:
                    bars.advance(step_bar)
                    continue
                optimizer.zero_grad()
                loss = loss_fn(model(xt[idx]), yt[idx])
                loss.backward()
                optimizer.step()
                bars.update(step_bar, advance=1, loss=f"loss {loss.item():.3f}")
            bars.advance(epoch_bar)
    return model.eval()


def scores(model: bytes, data: RetrainData, postprocess: dict[str, Any] | None) -> dict[str, float]:
    """Accuracy on the held-out base rows and (when there are any) the held-out field examples."""
    from edgefleet.build.evaluate import accuracy

    out = {"holdout": accuracy(model, data.holdout_x, data.holdout_y, postprocess)}
    if len(data.field_x):
        out["field"] = accuracy(model, data.field_x, data.field_y, postprocess)
    return out


def as_model_input(data: RetrainData, step: Any) -> RetrainData:
    """``data`` with its training and scored rows (raw, as ``build --data`` holds them) turned into model inputs by
    the pipeline's input ``step`` (a sliding window's scaling by the training statistics, for one)."""
    from dataclasses import replace

    from edgefleet.build.io_pipeline import model_input

    def fed(x: np.ndarray) -> np.ndarray:
        return np.asarray(model_input(step, x), np.float32) if len(x) else x

    return replace(data, train_x=fed(data.train_x), holdout_x=fed(data.holdout_x), field_x=fed(data.field_x))


def retrain(factory: str, data: RetrainData, *, name: str, previous: Deployed | None, version: str, release: int,
            key: Any, epochs: int = 20, lr: float = 1e-3, max_accuracy_drop: float | None = None, show: bool = True,
            progress: Callable[[str], None] | None = None) -> RetrainResult:
    """Fine-tune, then build and sign through build_bundle (the accuracy gate compares the compressed candidates
    with the fine-tuned float model on the held-out base rows plus field examples)."""
    from edgefleet.build.inputs import prepare
    from edgefleet.build.io_pipeline import PipelineOptions, resolve_pipeline
    from edgefleet.build.product import build_bundle
    from edgefleet.build.recipe import load_recipe
    from edgefleet.build.train import export_classifier
    from edgefleet.core.profiles import BUILTIN_PROFILES, resolve

    net = load_model(factory, previous)
    sample = tuple(int(d) for d in data.train_x.shape[1:])
    before_model = export_classifier(net, sample)
    deployed = (previous.manifest if previous is not None else None) or {}
    base = dict(deployed["preprocess"]) if deployed.get("preprocess") else None
    labels = data.labels or list(deployed.get("labels") or [])
    first = resolve_pipeline(before_model, PipelineOptions(), base=base, base_labels=labels)
    fed = as_model_input(data, first.step)  # the rows through the input step (scaling) as the agent feeds them
    before = scores(before_model, fed, first.postprocess)
    tuned = fine_tune(net, fed.train_x, fed.train_y, epochs=epochs, lr=lr, show=show)
    after_model = export_classifier(tuned, sample)
    test_x = np.concatenate([data.holdout_x, data.field_x])
    test_y = np.concatenate([data.holdout_y, data.field_y])
    arrays: Mapping[str, Any] = {"calib_x": data.calib_x, "test_x": test_x, "test_y": test_y}
    pipeline = resolve_pipeline(after_model, PipelineOptions(), base=base, base_labels=labels)
    inputs = prepare(after_model, arrays, pipeline, source=factory, name=name)
    recipe = load_recipe(None)
    if max_accuracy_drop is not None:
        recipe = recipe.model_copy(update={"max_accuracy_drop": max_accuracy_drop})
    built = build_bundle(inputs, recipe, resolve(list(BUILTIN_PROFILES), {}), key, name=name, version=version,
                         release=release, progress=progress)
    after = scores(built.chosen.model or after_model, fed, inputs.postprocess)
    return RetrainResult(built=built, before=before, after=after, previous=previous)

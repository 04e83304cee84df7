"""Training-time candidates for the build search: structured pruning with distillation (then int8 by post-training
quantization and by quantization-aware training), QAT alone, and unstructured pruning where its zeros buy
compressed size. Each comes back as an unmeasured :class:`~edgefleet.build.pipeline.Candidate` with its
training time; a model the converter cannot handle gives one error candidate and the search goes on."""

from __future__ import annotations

import copy
import time
import zlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet.build.compact import compact
from edgefleet.build.pipeline import Candidate
from edgefleet.build.training.config import TrainingSpec
from edgefleet.build.training.data import TrainingSet
from edgefleet.errors import EdgefleetError

if TYPE_CHECKING:
    import torch

    from edgefleet.build.training.export import Signature
    from edgefleet.build.training.teacher import Teacher

Progress = Callable[[str], None]
PASS_NAME = "train"
SPARSE_GAIN = 0.9
"""Unstructured pruning is a candidate only when its compressed model is at most this fraction of the dense one's."""


def compressed_size(model: bytes) -> int:
    """zlib (level 9) size: what the model costs on the wire when a bundle travels compressed."""
    return len(zlib.compress(model, 9))


class TrainingRun:
    """One build's training-time candidates, sharing the teacher's scores and the pruned students."""

    def __init__(self, float_model: bytes, train: TrainingSet, calib: np.ndarray, spec: TrainingSpec, *,
                 seed: int = 0, progress: Progress | None = None) -> None:
        self.float_model, self.train, self.calib, self.spec, self.seed = float_model, train, calib, spec, seed
        self.progress = progress or (lambda _msg: None)
        rows = len(train.x)
        keep = np.sort(np.random.default_rng(seed).choice(rows, size=min(rows, spec.max_rows), replace=False))
        self.x, self.y = train.x[keep], train.y[keep]

    def candidates(self) -> list[Candidate]:
        """Every training-time candidate (errors included), in the order they were trained."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(self.spec.threads)
        try:
            return list(self._candidates())
        finally:
            torch.set_num_threads(threads)

    def _candidates(self) -> Iterator[Candidate]:
        import torch

        from edgefleet.build.training.distill import teacher_logits
        from edgefleet.build.training.export import Signature
        from edgefleet.build.training.teacher import from_model

        try:
            teacher = from_model(self.float_model, self.train.torch_model)
        except EdgefleetError as exc:
            self.progress(f"training-time compression skipped: {exc}")
            yield Candidate(label="training-time compression", pass_name=PASS_NAME, config={}, error=str(exc))
            return
        torch.manual_seed(self.seed)
        soft = teacher_logits(teacher.module, self.x)
        sig = Signature.of(self.float_model, teacher.sample_shape, teacher.softmax_axis)
        for ratio in self.spec.prune_ratios:
            yield from self._pruned(teacher, soft, sig, ratio)
        if self.spec.qat and self.spec.qat_unpruned:
            yield self._guard(f"QAT int8 ({self.spec.qat_epochs} ep)", {"qat_epochs": self.spec.qat_epochs},
                              lambda: self._qat(copy.deepcopy(teacher.module), soft, sig))
        if self.spec.unstructured_sparsity > 0:
            yield self._sparse(teacher, soft, sig)

    def _guard(self, label: str, config: dict[str, Any], make: Callable[[], tuple[bytes, list[str], float]],
               inherited_s: float = 0.0) -> Candidate:
        """Run ``make`` (model, notes, training seconds) into a candidate; an EdgefleetError becomes its error.
        ``inherited_s``: time spent on the model this one starts from (counted in its build time)."""
        cand = Candidate(label=label, pass_name=PASS_NAME, config=dict(config))
        self.progress(f"training {label}")
        start = time.perf_counter()
        try:
            model, notes, train_s = make()
        except EdgefleetError as exc:
            cand.error = str(exc)
            return cand
        cand.raw, cand.model, cand.notes = model, compact(model), notes
        cand.build_s, cand.config["train_s"] = inherited_s + time.perf_counter() - start, round(train_s, 3)
        cand.train_s = train_s
        return cand

    def _distill(self, student: torch.nn.Module, soft: torch.Tensor, epochs: int, lr: float, **kw: Any) -> float:
        from edgefleet.build.training.distill import distill

        start = time.perf_counter()
        spec = self.spec
        distill(student, self.x, self.y, soft, epochs=epochs, batch=spec.batch, lr=lr, temperature=spec.temperature,
                alpha=spec.alpha, seed=self.seed, **kw)
        return time.perf_counter() - start

    def _ptq(self, model: bytes) -> bytes:
        from edgefleet.build.passes import get_pass

        step = get_pass("static_int8")
        return step.run(model, self.calib, step.config_type.model_validate({"per_channel": True})).model

    def _qat(self, student: torch.nn.Module, soft: torch.Tensor, sig: Signature) -> tuple[bytes, list[str], float]:
        from edgefleet.build.training.export import export_quantized
        from edgefleet.build.training.qat import quantization_aware

        spent: list[float] = []
        quantized = quantization_aware(student, sig.sample_shape, self.calib, lambda m: spent.append(
            self._distill(m, soft, self.spec.qat_epochs, self.spec.qat_lr, switch_mode=False)))
        return export_quantized(quantized, sig), [
            f"quantization-aware training: {self.spec.qat_epochs} epoch(s) with distillation from the original "
            "model, uint8 activations and per-channel int8 weights (torchao PT2E), exported as int8 ONNX"], sum(spent)

    def _pruned(self, teacher: Teacher, soft: torch.Tensor, sig: Signature, ratio: float) -> Iterator[Candidate]:
        from edgefleet.build.training.export import export_float
        from edgefleet.build.training.prune import count, prune_channels

        spec = self.spec
        student = copy.deepcopy(teacher.module)
        base = f"pruned {100 * ratio:g}% + KD"
        state: dict[str, Any] = {}

        def prune_and_distill() -> tuple[bytes, list[str], float]:
            start = time.perf_counter()
            before = count(student, sig.sample_shape)
            prune_channels(student, sig.sample_shape, ratio, spec.round_to)
            after = count(student, sig.sample_shape)
            self._distill(student, soft, spec.epochs, spec.lr)
            state.update(train_s=time.perf_counter() - start, macs_before=before.macs, macs_after=after.macs,
                         params_before=before.params, params_after=after.params)
            state["note"] = (f"structured pruning ({teacher.source}): {100 * ratio:g}% of channels removed per layer "
                             f"group (multiples of {spec.round_to}), MACs {before.macs:,} -> {after.macs:,} "
                             f"({after.macs / max(before.macs, 1):.2f}x), parameters {before.params:,} -> "
                             f"{after.params:,} ({after.params / max(before.params, 1):.2f}x); {spec.epochs} epoch(s) "
                             f"of distillation (T={spec.temperature:g}, label weight {spec.alpha:g})")
            return export_float(student, sig), [state["note"]], state["train_s"]

        def config() -> dict[str, Any]:
            return {"prune_ratio": ratio, "epochs": spec.epochs, "round_to": spec.round_to,
                    **{k: v for k, v in state.items() if k.endswith(("_before", "_after"))}}

        pruned = self._guard(f"{base} float32", {}, prune_and_distill)
        pruned.config.update(config())
        if pruned.error is not None or pruned.raw is None:
            yield pruned
            return
        yield pruned
        float_onnx = pruned.raw
        ptq = self._guard(f"{base}, int8 PTQ", config(),
                          lambda: (self._ptq(float_onnx), [state["note"], "then static int8 per-channel "
                                                           "(post-training, uint8 activations)"], state["train_s"]),
                          inherited_s=pruned.build_s)
        yield ptq
        if spec.qat:
            def qat() -> tuple[bytes, list[str], float]:
                model, notes, seconds = self._qat(copy.deepcopy(student), soft, sig)
                return model, [state["note"], *notes], state["train_s"] + seconds

            yield self._guard(f"{base} + QAT int8", {**config(), "qat_epochs": spec.qat_epochs}, qat,
                              inherited_s=pruned.build_s)

    def _sparse(self, teacher: Teacher, soft: torch.Tensor, sig: Signature) -> Candidate:
        from edgefleet.build.training.export import export_float
        from edgefleet.build.training.prune import magnitude_masks

        sparsity = self.spec.unstructured_sparsity

        def make() -> tuple[bytes, list[str], float]:
            student = copy.deepcopy(teacher.module)
            seconds = self._distill(student, soft, self.spec.epochs, self.spec.lr,
                                    after_step=magnitude_masks(student, sparsity))
            sparse = self._ptq(export_float(student, sig))
            dense = self._ptq(self.float_model)
            small, full = compressed_size(compact(sparse)), compressed_size(compact(dense))
            state.update(compressed_bytes=small, dense_compressed_bytes=full)
            note = (f"unstructured pruning: {100 * sparsity:g}% of conv/linear weights zeroed by magnitude, "
                    f"{self.spec.epochs} epoch(s) of distillation, static int8; compressed (zlib) {small:,} bytes "
                    f"against {full:,} for the dense int8 model ({small / max(full, 1):.2f}x); ONNX Runtime runs the "
                    "zeros at dense speed")
            if small > SPARSE_GAIN * full:
                raise _NoGain(f"unstructured pruning buys no size here: compressed {small:,} bytes against {full:,} "
                              f"dense (needs <= {SPARSE_GAIN:g}x); ONNX Runtime turns no sparsity into speed")
            return sparse, [note], seconds

        state: dict[str, Any] = {}
        cand = self._guard(f"sparse {100 * sparsity:g}% + KD, int8 PTQ", {"sparsity": sparsity,
                                                                          "epochs": self.spec.epochs}, make)
        cand.config.update(state)
        return cand


class _NoGain(EdgefleetError):
    """Unstructured pruning whose zeros buy neither speed nor compressed size: reported, not a candidate."""


def training_candidates(float_model: bytes, train: TrainingSet | None, calib: np.ndarray, spec: TrainingSpec, *,
                        seed: int = 0, progress: Progress | None = None) -> list[Candidate]:
    """The training-time candidates (none without training rows or with the recipe's training disabled)."""
    if train is None or not spec.enabled:
        return []
    return TrainingRun(float_model, train, calib, spec, seed=seed, progress=progress).candidates()

"""The manifest's output interpretation: how a model's outputs become class scores, a value or an anomaly score.

    {"kind": "scores", "output": NAME, "activation": "none" | "softmax"}     class scores [n, K]
    {"kind": "label_probabilities", "label": NAME, "probabilities": NAME,
     "zipmap": true | false, "classes": [class ids or names]}               ONNX-ML classifiers (scikit-learn)
    {"kind": "regression", "output": NAME}                                   values [n, k]
    {"kind": "anomaly_score", "output": NAME}                                one score per input, higher = odder

A bundle without an output spec is read as ``scores`` of its first output without activation (the format before
this spec existed). ``scores`` with ``softmax`` turns logits into probabilities, so confidence is a probability.
``label_probabilities`` reads the probabilities output, a tensor [n, K] or, with ``zipmap``, ONNX-ML's list of
{class: probability} maps, ordered by ``classes`` (which must match the manifest's labels in number).

Each step returns a function from model input to a float array [n, K] (class scores, values, or [n, 1] scores)
built once per model, so the inference loop pays one call and no branching per window.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from edgefleet.errors import BundleError, ModelError
from edgefleet.runtime.inputs import check_version

Scorer = Callable[[np.ndarray], np.ndarray]


class RawRunner(Protocol):
    """What an output step needs of a runner: the named outputs for a batch, as the runtime returns them."""

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]: ...


def _invalid(kind: str, why: str) -> BundleError:
    return BundleError(f"output spec ({kind}) is invalid: {why}", reason="malformed")


class OutputStep(ABC):
    """One way of reading a model's outputs."""

    kind: ClassVar[str]
    classifies: ClassVar[bool] = True
    """Whether the result is class scores (argmax is the prediction, the maximum the confidence)."""
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "output"})
    """The spec keys this step reads (a pipeline file with any other key is refused)."""

    @classmethod
    @abstractmethod
    def from_manifest(cls, spec: dict[str, Any]) -> OutputStep: ...

    @property
    @abstractmethod
    def output_names(self) -> tuple[str, ...]:
        """The model outputs this step reads ('' for the model's first output)."""

    @abstractmethod
    def interpret(self, outputs: list[Any]) -> np.ndarray:
        """Raw outputs (in ``output_names`` order) -> float32 [n, K]."""

    def scorer(self, runner: RawRunner) -> Scorer:
        """Model input -> float32 [n, K], for the inference loop."""
        names, interpret = self.output_names, self.interpret

        def score(batch: np.ndarray) -> np.ndarray:
            return interpret(runner.run_outputs(batch, names))

        return score


def _name(kind: str, spec: dict[str, Any], key: str = "output") -> str:
    value = spec.get(key, "")
    if not isinstance(value, str):
        raise _invalid(kind, f"{key} must be an output name")
    return value


def _as_matrix(value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 1:
        return array[:, np.newaxis]
    if array.ndim != 2:
        return array.reshape(len(array), -1)
    return array


@dataclass(frozen=True)
class ClassScores(OutputStep):
    """One output of class scores [n, K]: probabilities as they are, or logits through a softmax."""

    kind: ClassVar[str] = "scores"
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "output", "activation"})
    output: str = ""
    activation: str = "none"

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> ClassScores:
        activation = str(spec.get("activation", "none")).lower()
        if activation not in ("none", "softmax"):
            raise _invalid(cls.kind, f"activation {activation!r} is not none or softmax")
        return cls(_name(cls.kind, spec), activation)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.output,)

    def interpret(self, outputs: list[Any]) -> np.ndarray:
        scores = _as_matrix(outputs[0])
        return softmax(scores) if self.activation == "softmax" else scores

    def scorer(self, runner: RawRunner) -> Scorer:
        run = getattr(runner, "run", None)
        if self.activation == "none" and not self.output and run is not None:
            return run  # type: ignore[no-any-return]  # the hot path: the runner's first output as it is
        return super().scorer(runner)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, stable for large logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs: np.ndarray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)
    return probs


@dataclass(frozen=True)
class LabelProbabilities(OutputStep):
    """An ONNX-ML classifier's probabilities output: a tensor [n, K] or a ZipMap (a list of {class: p})."""

    kind: ClassVar[str] = "label_probabilities"
    KEYS: ClassVar[frozenset[str]] = frozenset({"kind", "version", "label", "probabilities", "zipmap", "classes"})
    probabilities: str
    label: str = ""
    zipmap: bool = False
    classes: tuple[int | str, ...] = ()

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> LabelProbabilities:
        probabilities = _name(cls.kind, spec, "probabilities")
        if not probabilities:
            raise _invalid(cls.kind, "needs the probabilities output's name")
        raw = spec.get("classes", [])
        if not isinstance(raw, list) or not all(isinstance(c, int | str) for c in raw):
            raise _invalid(cls.kind, "classes must be a list of class ids or names")
        zipmap = bool(spec.get("zipmap", False))
        if zipmap and not raw:
            raise _invalid(cls.kind, "a ZipMap output needs its classes in order")
        return cls(probabilities, _name(cls.kind, spec, "label"), zipmap, tuple(raw))

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.probabilities,)

    def interpret(self, outputs: list[Any]) -> np.ndarray:
        value = outputs[0]
        if not self.zipmap:
            return _as_matrix(value)
        try:
            return np.asarray([[row[c] for c in self.classes] for row in value], dtype=np.float32)
        except (KeyError, TypeError) as exc:
            raise ModelError(f"the ZipMap output lacks class {exc}") from exc


@dataclass(frozen=True)
class Regression(OutputStep):
    """One output of values per input [n, k]; no classes, no confidence."""

    kind: ClassVar[str] = "regression"
    classifies: ClassVar[bool] = False
    output: str = ""

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> Regression:
        return cls(_name(cls.kind, spec))

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.output,)

    def interpret(self, outputs: list[Any]) -> np.ndarray:
        return _as_matrix(outputs[0])


@dataclass(frozen=True)
class AnomalyScore(Regression):
    """One score per input [n, 1]: the manifest's ``anomaly_score`` threshold turns it into an alert."""

    kind: ClassVar[str] = "anomaly_score"

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> AnomalyScore:
        return cls(_name(cls.kind, spec))

    def interpret(self, outputs: list[Any]) -> np.ndarray:
        scores = _as_matrix(outputs[0])
        return scores[:, :1]


OUTPUT_STEPS: dict[str, type[OutputStep]] = {
    "scores": ClassScores, "label_probabilities": LabelProbabilities, "regression": Regression,
    "anomaly_score": AnomalyScore,
}


def output_step(spec: dict[str, Any] | None) -> OutputStep:
    """The output step a manifest's ``postprocess`` describes (first output's scores when there is none)."""
    if not spec:
        return ClassScores()
    if not isinstance(spec, dict):
        raise BundleError("output spec must be an object", reason="malformed")
    check_version(spec, "output spec")
    kind = spec.get("kind")
    step = OUTPUT_STEPS.get(str(kind))
    if step is None:
        raise BundleError(f"unknown output kind {kind!r} (known: {', '.join(sorted(OUTPUT_STEPS))})",
                          reason="malformed")
    return step.from_manifest(spec)

"""The inference runner port: one protocol, one base class, a backend per runtime.

A :class:`BaseRunner` has one hook, ``_run`` (the named outputs for a batch, as the runtime returns them); its
public :meth:`~BaseRunner.run` and :meth:`~BaseRunner.run_outputs` check output names and turn every runtime
failure into one-line :class:`~edgefleet.errors.ModelError`. Backends:

    onnxruntime   ONNX Runtime (an ONNX model; execution providers picked by :func:`onnxruntime_providers`)
    openvino      OpenVINO on CPU (the same ONNX model, read directly): ``runtime.openvino_runner``
    litert        LiteRT, the TFLite interpreter (a ``.tflite`` model, float or int8): ``runtime.litert_runner``

:func:`installed_runtimes` says which of them this Python can load (without importing them), less those the
caller hides; :func:`make_runner` builds the runner a bundle's manifest names.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from edgefleet.bundle.runtimes import DEFAULT_RUNTIME, RUNTIMES
from edgefleet.errors import ConfigError, ModelError

_MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "litert": "ai_edge_litert"}
"""The import each runtime needs."""

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class Runner(Protocol):
    """Runs a model on a batch: its first output (``run``), or the named ones as the runtime returns them."""

    input_name: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]: ...


class BaseRunner(ABC):
    """A loaded model: subclasses set ``input_name`` and ``output_names`` and implement :meth:`_run`."""

    runtime: str = ""
    input_name: str
    output_names: tuple[str, ...]

    @abstractmethod
    def _run(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]:
        """The outputs ``names`` (all known) for ``batch``; may raise anything the runtime raises."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The first output for ``batch``."""
        return np.asarray(self.run_outputs(batch, [""])[0])

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]:
        """The named outputs ('' = the first) as the runtime returns them (arrays, or lists of maps)."""
        wanted = [name or self.output_names[0] for name in names]
        unknown = [name for name in wanted if name not in self.output_names]
        if unknown:
            raise ModelError(f"the model has no output {unknown[0]!r} (it has {', '.join(self.output_names)})")
        try:
            return self._run(batch, wanted)
        except ModelError:
            raise
        except Exception as exc:  # each runtime raises its own types: all mean this inference failed
            raise ModelError(f"inference failed ({self.runtime}): {_first_line(exc)}") from exc


class OnnxRuntimeRunner(BaseRunner):
    """An ONNX Runtime session over model bytes already verified by the caller (CPU unless ``providers``)."""

    runtime = "onnxruntime"

    def __init__(self, model: bytes, *, threads: int = 1, providers: Sequence[str] | None = None,
                 provider_options: Sequence[dict[str, Any]] | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        chosen = list(providers or ["CPUExecutionProvider"])
        try:
            self._session = ort.InferenceSession(model, options, providers=chosen,
                                                 provider_options=list(provider_options) if provider_options else None)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/...: all mean the model is unusable
            raise ModelError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from exc
        self.providers = tuple(self._session.get_providers())
        self.input_name = self._session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in self._session.get_outputs())

    def _run(self, batch: np.ndarray, names: Sequence[str]) -> list[Any]:
        return list(self._session.run(list(names), {self.input_name: batch}))


def installed_runtimes(hidden: Iterable[str] = ()) -> tuple[str, ...]:
    """The runtimes whose package this Python can import (found, not imported), less ``hidden``."""
    hide = set(hidden)
    return tuple(name for name in RUNTIMES if name not in hide and importlib.util.find_spec(_MODULES[name]))


def parse_runtimes(text: str) -> tuple[str, ...]:
    """A comma-separated runtime list (settings, CLI flags); ConfigError naming an unknown one."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown:
        raise ConfigError(f"unknown runtime {unknown[0]!r} (known: {', '.join(RUNTIMES)})")
    return names


def onnxruntime_providers(preferred: Sequence[str] = ()) -> list[str]:
    """The execution providers to ask ONNX Runtime for: those of ``preferred`` (a device profile's order) that
    this ONNX Runtime build offers, then the CPU provider as the fallback."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    chosen = [p for p in preferred if p in available and p != "CPUExecutionProvider"]
    return [*chosen, "CPUExecutionProvider"]


def gpu_unavailable() -> str | None:
    """Why ONNX Runtime cannot use an NVIDIA GPU here (None: it can): no CUDA provider in this build, or no GPU."""
    import shutil
    import subprocess

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return (f"this ONNX Runtime ({ort.__version__}) has no CUDA provider (providers: "
                f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu")
    smi = shutil.which("nvidia-smi")
    try:
        found = smi is not None and subprocess.run([smi, "-L"], capture_output=True, timeout=20,
                                                   check=False).stdout.strip() != b""
    except (OSError, subprocess.SubprocessError):
        found = False
    return None if found else "no NVIDIA GPU here (nvidia-smi finds none)"


def make_runner(model: bytes, runtime: str | None = None, *, threads: int = 1,
                providers: Sequence[str] = ()) -> BaseRunner:
    """The runner for ``model`` on ``runtime`` (None: ONNX Runtime); ModelError when the runtime is not
    installed here or cannot load the model. ``providers`` is ONNX Runtime's preference order."""
    name = runtime or DEFAULT_RUNTIME
    if name not in RUNTIMES:
        raise ModelError(f"unknown runtime {name!r} (known: {', '.join(RUNTIMES)})")
    if name not in installed_runtimes():
        raise ModelError(f"runtime {name} is not installed here")
    if name == "openvino":
        from edgefleet.runtime.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(model, threads=threads)
    if name == "litert":
        from edgefleet.runtime.litert_runner import LiteRtRunner

        return LiteRtRunner(model, threads=threads)
    return OnnxRuntimeRunner(model, threads=threads,
                             providers=onnxruntime_providers(providers) if providers else None)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]

"""The TFLite export path: a torch model -> ``.tflite`` for LiteRT, float32 or int8 (static, calibrated).

Conversion is litert-torch's (torch -> float ``.tflite``) and int8 is ai-edge-quantizer's static recipe (int8
weights per channel, int8 activations from calibration rows). Both pull ~680 MB (jax, jaxlib, the MLIR
converter) and pin pydantic and typing-extensions below the project's, so they live in a venv of their own
(``make litert-venv``: ``.venv-litert``, which sees this venv's torch and numpy) and run as a child process
(:mod:`edgefleet.build.tflite_child`). The model travels as a ``torch.export`` program, so the child needs
none of the caller's classes. ``$EDGEFLEET_LITERT_PYTHON`` names another interpreter that has them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import edgefleet
from edgefleet.errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch

LITERT_PYTHON_ENV = "EDGEFLEET_LITERT_PYTHON"
LITERT_VENV = ".venv-litert"
TIMEOUT_S = 600.0


@dataclass(frozen=True)
class TfliteModels:
    """One export's models: float32, and int8 where calibration rows were given."""

    float32: bytes
    int8: bytes | None = None


def litert_python() -> str:
    """The interpreter that has the converter: ``$EDGEFLEET_LITERT_PYTHON``, else ``.venv-litert`` beside the
    project's venv; ConfigError with the command that makes it when there is none."""
    chosen = os.environ.get(LITERT_PYTHON_ENV)
    if chosen:
        if not Path(chosen).exists():
            raise ConfigError(f"${LITERT_PYTHON_ENV} names {chosen}, which does not exist")
        return chosen
    beside = Path(sys.prefix).parent / LITERT_VENV / "bin" / "python"
    if beside.exists():
        return str(beside)
    raise ConfigError(f"the TFLite export needs the LiteRT converter: run `make litert-venv` (or set "
                      f"${LITERT_PYTHON_ENV} to a Python with litert-torch and ai-edge-quantizer)")


def export_tflite(module: torch.nn.Module, sample: np.ndarray, calibration: np.ndarray | None = None, *,
                  timeout_s: float = TIMEOUT_S) -> TfliteModels:
    """``module`` (in eval mode) as ``.tflite`` models for inputs shaped like ``sample``: float32, and int8 too
    when ``calibration`` rows are given (their first axis lists rows shaped like one ``sample`` row)."""
    import torch

    python = litert_python()
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="edgefleet-tflite-") as tmp:
        work = Path(tmp)
        try:
            program = torch.export.export(module.eval(), (torch.from_numpy(sample),))
        except Exception as exc:  # torch.export raises many types for graphs it cannot capture
            raise ModelError(f"torch.export cannot capture the model: {str(exc).splitlines()[0][:200]}") from exc
        torch.export.save(program, str(work / "program.pt2"))
        np.save(work / "sample.npy", sample)
        if calibration is not None:
            rows = np.asarray(calibration, dtype=np.float32)
            if rows.shape[1:] != sample.shape[1:] or len(rows) < len(sample):
                raise ConfigError(f"calibration rows of shape {rows.shape[1:]} do not fit the input {sample.shape}")
            np.save(work / "calibration.npy", rows)
        report = _run_child(python, work, timeout_s)
        if not report.get("ok"):
            raise ModelError(f"TFLite export failed: {report.get('error', 'no reason given')}")
        int8 = work / "int8.tflite"
        return TfliteModels((work / "float.tflite").read_bytes(), int8.read_bytes() if int8.exists() else None)


def export_onnx_tflite(model: bytes, sample: np.ndarray, calibration: np.ndarray | None = None, *,
                       timeout_s: float = TIMEOUT_S) -> TfliteModels:
    """A float ONNX model as ``.tflite``: converted to PyTorch (:mod:`edgefleet.build.torch_bridge`; one-line
    ConversionError for an operator it lacks), then :func:`export_tflite`."""
    from edgefleet.build.torch_bridge import to_torch

    return export_tflite(to_torch(model).module, sample, calibration, timeout_s=timeout_s)


def litert_accuracy(model: bytes, x: np.ndarray, y: np.ndarray, postprocess: dict[str, Any] | None = None,
                    batch: int = 64) -> float:
    """Top-1 accuracy of a ``.tflite`` model on rows ``x`` run by LiteRT, its scores read through the output spec."""
    from edgefleet.runtime.litert_runner import LiteRtRunner
    from edgefleet.runtime.outputs import output_step

    score = output_step(postprocess).scorer(LiteRtRunner(model))
    scores = np.concatenate([score(np.ascontiguousarray(x[i : i + batch], dtype=np.float32))
                             for i in range(0, len(x), batch)])
    return float(np.mean(scores.argmax(axis=1) == np.asarray(y)))


def _run_child(python: str, work: Path, timeout_s: float) -> dict[str, object]:
    root = str(Path(edgefleet.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        done = subprocess.run([python, "-m", "edgefleet.build.tflite_child", str(work)], env=env,
                              capture_output=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelError(f"TFLite export gave no answer within {timeout_s:.0f} s") from exc
    except OSError as exc:
        raise ConfigError(f"cannot start the LiteRT converter {python}: {exc.strerror}") from exc
    lines = done.stdout.decode(errors="replace").strip().splitlines()
    try:
        report = json.loads(lines[-1]) if lines else None
    except ValueError:
        report = None
    if not isinstance(report, dict):
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ModelError(f"the LiteRT converter exited {done.returncode}: {tail[0][:200]}")
    return report

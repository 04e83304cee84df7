"""Child process of :mod:`edgefleet.build.tflite`: a torch program -> ``.tflite`` (float, or int8 calibrated).

Runs in the LiteRT converter's Python (``make litert-venv``: litert-torch and ai-edge-quantizer, kept out of the
project's venv because they pin pydantic and typing-extensions lower). It imports nothing else of edgefleet.

    python -m edgefleet.build.tflite_child DIR

DIR holds ``program.pt2`` (``torch.export.save``), ``sample.npy`` (one input batch) and, for int8,
``calibration.npy`` (rows); the child writes ``float.tflite`` (and ``int8.tflite``) there and prints one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def convert(work: Path) -> dict[str, object]:
    """Convert DIR's program; int8 when DIR has calibration rows."""
    import litert_torch
    import numpy as np
    import torch

    program = torch.export.load(str(work / "program.pt2"))
    sample = torch.from_numpy(np.load(work / "sample.npy"))
    edge = litert_torch.convert(program.module(), (sample,))
    float_path = work / "float.tflite"
    edge.export(str(float_path))
    calibration_file = work / "calibration.npy"
    if calibration_file.exists():
        from ai_edge_quantizer import quantizer, recipe

        rows = np.load(calibration_file).astype(np.float32)
        batch = sample.shape[0]
        feeds = [{"args_0": rows[i : i + batch]} for i in range(0, len(rows) - batch + 1, batch)]
        quant = quantizer.Quantizer(bytearray(float_path.read_bytes()), recipe.static_wi8_ai8())
        result = quant.quantize(quant.calibrate({"serving_default": feeds}))
        (work / "int8.tflite").write_bytes(bytes(result.quantized_model))
    return {"ok": True, "int8": calibration_file.exists()}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(json.dumps({"ok": False, "error": "usage: tflite_child DIR"}))
        return 2
    try:
        report = convert(Path(argv[0]))
    except Exception as exc:  # any converter failure is this model's: report it as one line to the parent
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        report = {"ok": False, "error": f"{type(exc).__name__}: {lines[0][:300]}"}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

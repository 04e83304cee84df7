"""The device's check of a ``.tflite`` model member, by its bytes alone (no LiteRT import).

A TFLite model is a flatbuffer: a little-endian root table offset, then the file identifier ``TFL3``. The check
refuses anything else (including what :func:`~edgefleet.bundle.safe_onnx.sniff_model` refuses) and a root offset
outside the file; LiteRT's own verifier runs when the agent loads the model.
"""

from __future__ import annotations

import struct

from edgefleet.bundle.safe_onnx import MAX_MODEL_BYTES, sniff_model
from edgefleet.errors import BundleError

TFLITE_IDENTIFIER = b"TFL3"


def check_tflite(data: bytes, max_bytes: int = MAX_MODEL_BYTES) -> None:
    """Sniff ``data``, then require the TFLite identifier and a root table inside the file."""
    sniff_model(data, max_bytes)
    if len(data) < 16 or data[4:8] != TFLITE_IDENTIFIER:
        raise BundleError("model member is not a TFLite flatbuffer (no TFL3 identifier)", reason="invalid_model")
    (root,) = struct.unpack_from("<I", data, 0)
    if not 8 <= root < len(data):
        raise BundleError(f"TFLite model's root table offset {root} lies outside the file", reason="invalid_model")

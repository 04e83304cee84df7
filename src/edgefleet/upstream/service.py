"""``POST /v1/infer``: one model input window in, the upstream model's answer out. ``GET /v1/health``.

Request (what ``agent.escalation.encode_request`` sends)::

    {"model": "name@version", "shape": [1, C, W], "dtype": "float32", "data": BASE64 little-endian float32,
     "local": {"label": "...", "confidence": 0.41}, "ts": 1700000000.0, "device": "dev-1"}

Response: ``{"label": str, "index": int, "confidence": float, "probs": [...], "model": "name@version"}``.
The bundle is verified with ``core.update.decide`` against the given public key before the model is parsed.
Who may ask (mutual TLS with the fleet CA, device tokens) is :mod:`edgefleet.upstream.auth`. With a reporter
(:mod:`edgefleet.upstream.report`) every answer goes to the control plane as a label of lower trust.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field

from edgefleet.bundle.manifest import Manifest
from edgefleet.bundle.signing import load_public_key
from edgefleet.core.update import TrustState, decide
from edgefleet.errors import ConfigError, ModelError, TransportError
from edgefleet.runtime.outputs import Scorer, output_step
from edgefleet.runtime.runner import OnnxRuntimeRunner, Runner
from edgefleet.storage import atomic_write
from edgefleet.transport.ports import free_port
from edgefleet.upstream.auth import DeviceTokens, UpstreamTls
from edgefleet.upstream.report import AnswerReporter

log = logging.getLogger(__name__)

MAX_VALUES = 4 * 1024 * 1024


class InferRequest(BaseModel):
    """One window, as the agent's escalator sends it."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    shape: list[int] = Field(min_length=1, max_length=8)
    dtype: Literal["float32"] = "float32"
    data: str = Field(max_length=MAX_VALUES * 4 * 4 // 3 + 4)
    local: dict[str, Any] | None = None
    ts: float | None = Field(default=None, allow_inf_nan=False, ge=0, le=1e12)
    device: str | None = Field(default=None, max_length=64)


@dataclass(frozen=True)
class UpstreamModel:
    """A verified bundle ready to answer: its manifest, runner, and the scores its output spec reads."""

    manifest: Manifest
    runner: Runner
    score: Scorer

    @property
    def ref(self) -> str:
        return self.manifest.ref

    def expected_shape(self) -> list[int | None]:
        return list(self.manifest.inputs[0].shape) if self.manifest.inputs else []


def load_upstream(bundle: Path, public_key: Path) -> UpstreamModel:
    """Read, verify (signature, hashes, safe ONNX) and load ``bundle``; ConfigError/BundleError on refusal."""
    try:
        data = bundle.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read bundle {bundle}: {exc.strerror}") from exc
    key = load_public_key(public_key)
    accepted = decide(data, TrustState(keys={key.key_id: key}, hardware=None))  # the upstream serves any hardware
    runner = OnnxRuntimeRunner(accepted.model)
    return UpstreamModel(accepted.manifest, runner, output_step(accepted.manifest.postprocess).scorer(runner))


def decode_window(request: InferRequest, expected: list[int | None]) -> np.ndarray:
    """The request's float32 array; ValueError when it is malformed or does not fit the model's input."""
    if any(d < 1 for d in request.shape) or math.prod(request.shape) > MAX_VALUES:
        raise ValueError(f"shape {request.shape} is empty or too large")
    try:
        raw = base64.b64decode(request.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("data is not base64") from exc
    if len(raw) != 4 * math.prod(request.shape):
        raise ValueError(f"data holds {len(raw)} bytes, shape {request.shape} needs {4 * math.prod(request.shape)}")
    if expected and (len(expected) != len(request.shape) or any(
            e is not None and e != d for e, d in zip(expected, request.shape, strict=True))):
        raise ValueError(f"shape {request.shape} does not fit the model's input {expected}")
    x = np.frombuffer(raw, dtype="<f4").reshape(request.shape).astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError("data holds NaN or infinity")
    return x


def create_app(model: UpstreamModel, tokens: DeviceTokens | None = None,
               reporter: AnswerReporter | None = None) -> FastAPI:
    """The service's FastAPI app around one loaded model; with ``tokens``, ``/v1/infer`` wants a listed device
    token (401 without one, 403 with another); with ``reporter``, each answer is reported with its window."""
    app = FastAPI(title="edgefleet upstream model", version="1")
    labels = model.manifest.labels
    expected = model.expected_shape()

    def device(request: Request) -> None:
        if tokens is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "a device token is required")
        if not tokens.allows(token):
            raise HTTPException(403, "unknown device token")

    @app.get("/v1/health")
    def health() -> dict[str, str]:
        return {"status": "ok", "model": model.ref}

    @app.post("/v1/infer", dependencies=[Depends(device)])
    def infer(request: InferRequest) -> dict[str, Any]:
        try:
            x = decode_window(request, expected)
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=str(exc)) from exc
        try:
            output = model.score(x)
        except ModelError as exc:
            raise HTTPException(status_code=500, detail=str(exc)) from exc
        probs = np.asarray(output[0], dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(probs)):
            raise HTTPException(status_code=500, detail="the model returned NaN or infinity")
        if probs.size == 1:
            return {"label": "score", "index": 0, "confidence": float(probs[0]), "probs": [float(probs[0])],
                    "model": model.ref}
        best = int(probs.argmax())
        answer = {"label": labels[best] if best < len(labels) else str(best), "index": best,
                  "confidence": float(probs[best]), "probs": [round(float(p), 6) for p in probs], "model": model.ref}
        if reporter is not None:
            reporter.add(request, answer)
        return answer

    return app


class _Server(uvicorn.Server):
    """uvicorn, announcing itself only once its socket accepts connections."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()


def uvicorn_config(model: UpstreamModel, host: str, port: int, tls: UpstreamTls | None,
                   tokens: DeviceTokens | None, reporter: AnswerReporter | None = None) -> uvicorn.Config:
    """The app on ``host:port``; with ``tls``, HTTPS that requires a client certificate of ``tls.client_ca``."""
    extra: dict[str, Any] = {}
    if tls is not None:
        import ssl

        extra = {"ssl_certfile": str(tls.cert_file), "ssl_keyfile": str(tls.key_file),
                 "ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return uvicorn.Config(create_app(model, tokens, reporter), host=host, port=port, log_level="warning",
                          access_log=False, **extra)


def service_url(host: str, port: int, tls: UpstreamTls | None) -> str:
    return f"{'https' if tls is not None else 'http'}://{host}:{port}"


def serve(model: UpstreamModel, host: str = "127.0.0.1", port: int = 8090, info_file: Path | None = None, *,
          tls: UpstreamTls | None = None, tokens: DeviceTokens | None = None,
          reporter: AnswerReporter | None = None) -> None:
    """Serve ``model`` until interrupted; ``port`` 0 picks a free one; ``info_file`` gets ``{"url": ...}``;
    ``reporter`` is flushed and closed on the way out."""
    port = port or free_port(host)
    url = service_url(host, port, tls)

    def started() -> None:
        log.info("serving %s at %s", model.ref, url)
        if info_file is not None:
            atomic_write(info_file, json.dumps({"url": url, "model": model.ref}).encode())

    try:
        _Server(uvicorn_config(model, host, port, tls, tokens, reporter), started).run()
    finally:
        if reporter is not None:
            reporter.close()


class BackgroundService:
    """The service on a thread of this process (tests, benchmarks): ``start`` returns its URL, ``stop`` ends it."""

    def __init__(self, model: UpstreamModel, host: str = "127.0.0.1", port: int = 0, *,
                 tls: UpstreamTls | None = None, tokens: DeviceTokens | None = None,
                 reporter: AnswerReporter | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.url = service_url(host, self.port, tls)
        self._ready = threading.Event()
        self._server = _Server(uvicorn_config(model, host, self.port, tls, tokens, reporter), self._ready.set)
        self._reporter = reporter
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 10.0) -> str:
        self._thread = threading.Thread(target=self._server.run, name="upstream-service", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TransportError(f"upstream service did not start on {self.url} within {timeout_s:g} s")
        return self.url

    def stop(self, timeout_s: float = 5.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._reporter is not None:
            self._reporter.close()

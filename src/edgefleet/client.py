"""A small client for the control plane's operator API.

Over ``https://`` it verifies the server against the fleet CA (``ca``, else the ``EDGEFLEET_CA`` file, else the
system's CAs): a ``--tls`` server's certificate is signed by its own CA (``DATA_DIR/pki/ca.pem``).
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import httpx

from edgefleet.errors import ConfigError, TransportError

CA_ENV = "EDGEFLEET_CA"


def verify_context(ca: Path | str | None = None) -> ssl.SSLContext:
    """The TLS context for the API: trust ``ca`` (or ``$EDGEFLEET_CA``), else the system's CAs."""
    path = ca or os.environ.get(CA_ENV) or None
    try:
        return ssl.create_default_context(cafile=str(path) if path else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA file {path}: {exc}") from exc


class ControlPlane:
    """Operator calls over HTTP; every failure is a TransportError with the server's reason."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 30.0, ca: Path | str | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout_s, verify=verify_context(ca),
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def health(self) -> Any:
        return self._call("GET", "/api/v1/health")

    def push_model(self, bundle: bytes, model_key: str | None = None) -> Any:
        """Upload a bundle; an encrypted one with its model key (base64 text), which the server stores sealed."""
        headers = {"Content-Type": "application/octet-stream"}
        if model_key is not None:
            headers["X-Edgefleet-Model-Key"] = model_key  # server.app.MODEL_KEY_HEADER
        return self._call("POST", "/api/v1/models", content=bundle, headers=headers)

    def models(self) -> Any:
        return self._call("GET", "/api/v1/models")

    def add_device(self, device_id: str, tags: dict[str, str] | None = None,
                   profile: str | None = None, hardware: str | None = None) -> Any:
        body: dict[str, Any] = {"id": device_id, "tags": tags or {}, "profile": profile}
        if hardware is not None:
            body["hardware"] = hardware
        return self._call("POST", "/api/v1/devices", json=body)

    def device(self, device_id: str) -> Any:
        return self._call("GET", f"/api/v1/devices/{device_id}")

    def devices(self) -> Any:
        return self._call("GET", "/api/v1/devices")

    def deploy(self, model: str, devices: list[str]) -> Any:
        return self._call("POST", "/api/v1/deployments", json={"model": model, "devices": devices})

    def renew_certificate(self, device_id: str, *, revoke_previous: bool = False) -> Any:
        """A new certificate for the device (``--tls`` servers); the previous one stays valid unless revoked."""
        return self._call("POST", f"/api/v1/devices/{device_id}/certificate",
                          json={"revoke_previous": revoke_previous})

    def revoke_device(self, device_id: str) -> Any:
        return self._call("POST", f"/api/v1/devices/{device_id}/revoke")

    def publish_statement(self, statement: bytes) -> Any:
        """Register a signed key rotation or revocation; the server sends it to every device."""
        return self._call("POST", "/api/v1/keys/statements", content=statement,
                          headers={"Content-Type": "application/json"})

    def keyring(self) -> Any:
        """The server's trusted, retired and revoked keys and its trust log."""
        return self._call("GET", "/api/v1/keys")

    def model_telemetry(self, model: str, since: float = 0.0) -> Any:
        name, _, version = model.partition("@")
        return self._call("GET", f"/api/v1/models/{name}/{version}/telemetry", params={"since": since})

    def create_rollout(self, model: str, *, waves: list[str] | None = None, gates: list[Any] | None = None,
                       select: dict[str, str] | None = None, **options: Any) -> Any:
        """Start a rollout of ``model`` (name@version); ``options``: mode, profile, window_s, install_timeout_s..."""
        body = {"model": model, "waves": waves or ["100%"], "gates": gates or [], "select": select or {},
                **{k: v for k, v in options.items() if v is not None}}
        return self._call("POST", "/api/v1/rollouts", json=body)

    def rollouts(self) -> Any:
        return self._call("GET", "/api/v1/rollouts")

    def rollout(self, rollout_id: str) -> Any:
        return self._call("GET", f"/api/v1/rollouts/{rollout_id}")

    def promote_rollout(self, rollout_id: str, **options: Any) -> Any:
        """Start a canary rollout of a shadow-passed rollout's candidate; ``options``: waves, gates, window_s..."""
        return self._call("POST", f"/api/v1/rollouts/{rollout_id}/promote",
                          json={k: v for k, v in options.items() if v is not None})

    def rehearsal_profiles(self, select: dict[str, str] | None = None, profile: str | None = None, *,
                           limit: int = 100, since_s: float = 3600.0) -> Any:
        """The devices a rehearsal copies, with their recent inputs (``POST /api/v1/rollouts/rehearsal-profiles``)."""
        return self._call("POST", "/api/v1/rollouts/rehearsal-profiles",
                          json={"select": select or {}, "profile": profile, "limit": limit, "since_s": since_s})

    def rollout_command(self, rollout_id: str, action: str, note: str = "") -> Any:
        """``action``: pause, resume or abort."""
        return self._call("POST", f"/api/v1/rollouts/{rollout_id}/{action}", json={"note": note})

    def metrics(self) -> str:
        try:
            response = self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise TransportError(f"GET /metrics failed: {exc}") from exc
        return response.text

    def telemetry(self, device_id: str) -> Any:
        return self._call("GET", f"/api/v1/devices/{device_id}/telemetry")

    def events(self, device_id: str) -> Any:
        return self._call("GET", f"/api/v1/devices/{device_id}/events")

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request; the decoded JSON body, or TransportError with the server's reason."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise TransportError(f"{method} {path} failed: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise TransportError(f"{method} {path} refused: HTTP {response.status_code}: {detail}")
        return response.json()

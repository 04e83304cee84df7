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

    def put_report(self, model: str, report: Any) -> Any:
        """Attach a build report (REPORT.json's content) to model version NAME@VERSION."""
        name, _, version = model.partition("@")
        return self._call("PUT", f"/api/v1/models/{name}/{version}/report", json=report)

    def bundle(self, sha256: str) -> bytes:
        """A stored bundle's bytes, by its sha256 (as ``models()`` lists it)."""
        try:
            response = self._http.get(f"/api/v1/artifacts/{sha256}")
        except httpx.HTTPError as exc:
            raise TransportError(f"GET bundle {sha256[:12]} failed: {exc}") from exc
        if response.status_code != 200:
            raise TransportError(f"GET bundle {sha256[:12]} refused: HTTP {response.status_code}: "
                                 f"{response.text[:200]}")
        return response.content

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

    # the learning loop: monitors, alerts, field data ------------------------------------------------------
    def create_monitor(self, expr: str, model: str, *, select: dict[str, str] | None = None,
                       webhook: str | None = None, pause_rollouts: bool = False, window_s: float = 300.0) -> Any:
        """Watch model NAME's fleet with a gate expression (drift_psi, accuracy, silent_for, ...)."""
        return self._call("POST", "/api/v1/monitors", json={
            "expr": expr, "model": model, "select": select or {}, "webhook": webhook,
            "pause_rollouts": pause_rollouts, "window_s": window_s})

    def monitors(self) -> Any:
        return self._call("GET", "/api/v1/monitors")

    def monitor(self, monitor_id: str) -> Any:
        return self._call("GET", f"/api/v1/monitors/{monitor_id}")

    def delete_monitor(self, monitor_id: str) -> Any:
        return self._call("DELETE", f"/api/v1/monitors/{monitor_id}")

    def alerts(self, *, active: bool = False) -> Any:
        """Fleet alerts, newest first; with ``active`` only those not cleared."""
        return self._call("GET", "/api/v1/alerts", params={"active": active})

    def hard_examples(self, model: str, *, version: str | None = None, device: str | None = None,
                      labelled: bool | None = None, limit: int | None = None) -> Any:
        """Model NAME's stored hard examples (without their data), oldest first."""
        params = {"version": version, "device": device, "labelled": labelled, "limit": limit}
        return self._call("GET", f"/api/v1/fielddata/{model}/examples",
                          params={k: v for k, v in params.items() if v is not None})

    def label_examples(self, label: str, *, example: int | None = None, device: str | None = None,
                       start: float | None = None, end: float | None = None, model: str | None = None) -> Any:
        """A ground-truth label for one hard example, or for every one ``device`` sent from ``start`` to ``end``."""
        return self._call("POST", "/api/v1/fielddata/labels", json={
            "label": label, "example": example, "device": device, "start": start, "end": end, "model": model})

    def export_field_data(self, model: str, *, include_upstream: bool = False) -> tuple[bytes, dict[str, Any]]:
        """Model NAME's field data as ``.npz`` bytes (the ``build --data`` format) and its counts; labels of the
        upstream model (lower trust) only with ``include_upstream``."""
        import base64

        answer = dict(self._call("GET", f"/api/v1/fielddata/{model}/export",
                                 params={"include_upstream": include_upstream}))
        return base64.b64decode(answer.pop("npz")), answer

    def report_upstream_answers(self, answers: list[dict[str, Any]]) -> Any:
        """Post the upstream model's answers to escalated windows (kept as labels of lower trust)."""
        return self._call("POST", "/api/v1/fielddata/upstream", json={"answers": answers})

    def metrics(self) -> str:
        try:
            response = self._http.get("/metrics")
        except httpx.HTTPError as exc:
            raise TransportError(f"GET /metrics failed: {exc}") from exc
        return response.text

    def telemetry(self, device_id: str) -> Any:
        return self._call("GET", f"/api/v1/devices/{device_id}/telemetry")

    def measured_profiles(self, profile: str | None = None) -> Any:
        """Measured device profiles (all, or one): facts, latency per model, scaling against the build host."""
        return self._call("GET", f"/api/v1/profiles/{profile}/measured" if profile else "/api/v1/profiles/measured")

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

"""The device's credentials file (written by ``edgefleet device add``) and agent settings.

The broker address the server last told the device to dial (its desired state's ``mqtt_url``) is kept in the
data directory (:data:`BROKER_URL_FILE`) and wins over the credentials' ``mqtt_url``: a moved broker needs no
file edited on the device. The credentials' user name and password are used whatever the address.

With TLS (a server started with ``--tls``) the credentials also carry the fleet CA (``ca_cert``) and the
device's certificate and key (``client_cert``, ``client_key``), as PEM text or as paths (``*_file``, relative to
the credentials file). :func:`load_config` keeps them as files in ``DATA_DIR/tls`` (key 0600): the device
trusts only the fleet CA for the broker (``mqtts://``), the control plane and the upstream (``https://``),
and presents its certificate to each.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgefleet.agent.fetch import DownloadLimits
from edgefleet.agent.local_action import LocalActionConfig
from edgefleet.bundle.signing import PublicKey
from edgefleet.errors import ConfigError
from edgefleet.storage import atomic_write
from edgefleet.transport.mqtt_url import MqttEndpoint, MqttTls, parse_mqtt_url

BROKER_URL_FILE = "broker.url"
TLS_DIR = "tls"
TLS_FIELDS = (("ca_cert", "ca.pem"), ("client_cert", "client.pem"), ("client_key", "client.key"))
"""Credentials fields (PEM text, or ``FIELD_file``: a path) and the files they are kept in under DATA_DIR/tls."""
DEFAULT_TELEMETRY_INTERVAL_S = 300.0
"""Seconds between telemetry batches: a device's uplink is metered; every 5 minutes keeps the demo stream's
uplink under 1% of its raw sensor bytes (see BENCHMARKS.md). Demos and tests pass a short one explicitly."""
DEFAULT_HARD_EXAMPLES_PER_HOUR = 2
"""Hard examples a device uplinks per hour unless told otherwise (``--hard-examples-per-hour``)."""

DOWNLOAD_ENV: dict[str, tuple[str, type[int] | type[float]]] = {
    "EDGEFLEET_DOWNLOAD_MAX_BYTES": ("max_bytes", int),
    "EDGEFLEET_DOWNLOAD_RESERVE_BYTES": ("reserve_bytes", int),
    "EDGEFLEET_DOWNLOAD_DEADLINE_S": ("deadline_s", float),
    "EDGEFLEET_DOWNLOAD_MIN_RATE": ("min_rate_bps", float),
    "EDGEFLEET_DOWNLOAD_GRACE_S": ("grace_s", float),
    "EDGEFLEET_DOWNLOAD_READ_TIMEOUT_S": ("read_timeout_s", float),
}
"""The environment variables that set the agent's :class:`DownloadLimits` (each field's default otherwise)."""
RUNTIMES_ENV = "EDGEFLEET_AGENT_RUNTIMES"
"""Comma-separated runtimes the agent may run models on (default: every one installed); others are refused."""
PROVIDERS_ENV = "EDGEFLEET_AGENT_PROVIDERS"
"""Comma-separated ONNX Runtime execution providers to prefer (e.g. TensorrtExecutionProvider,
CUDAExecutionProvider: a device profile's ``providers``), used where this ONNX Runtime has them; CPU otherwise."""


@dataclass(frozen=True)
class AgentConfig:
    """Who the device is, where its control plane is, and what it trusts."""

    device_id: str
    server_url: str
    mqtt: MqttEndpoint
    token: str
    trusted_keys: dict[str, PublicKey]
    data_dir: Path
    hardware: str = "generic"
    """The hardware id given at provisioning (credentials' ``hardware``): bundles for other hardware are refused."""
    profile: str | None = None
    """The device profile given at provisioning (credentials' ``profile``), reported to the server."""
    telemetry_interval_s: float = DEFAULT_TELEMETRY_INTERVAL_S
    failures_before_rollback: int = 5
    health_timeout_s: float = 30.0
    latency_budget_ms: float | None = None
    outbox_max_bytes: int = 64 * 1024 * 1024
    upstream_url: str | None = None
    """``edgefleet serve-model`` base URL for tiered inference; None: every window is answered locally."""
    escalate_below: float | None = None
    """Escalate windows whose confidence is under this (overrides the manifest's ``escalate_below``)."""
    escalation_deadline_s: float = 0.25
    escalation_rate_per_s: float = 1.0
    escalation_burst: float = 5.0
    escalation_queue_max: int = 1000
    hard_examples_per_hour: int = DEFAULT_HARD_EXAMPLES_PER_HOUR
    """Hard (low-confidence) inputs uplinked per hour at most: the field data retraining learns from."""
    downloads: DownloadLimits = field(default_factory=DownloadLimits)
    """Bundle size cap, free-space reserve, deadline and minimum rate of update downloads."""
    local_action: LocalActionConfig = field(default_factory=LocalActionConfig)
    """Where outcomes and alerts go on the device itself (a Unix socket, a local broker, a hook): none by default."""
    tls: MqttTls | None = None
    """The fleet CA to trust and the device's certificate to present (credentials of a TLS server), else None."""
    runtimes: tuple[str, ...] = ("onnxruntime",)
    """The runtimes this agent runs models on (:func:`agent_runtimes`); a bundle for another one is refused."""
    providers: tuple[str, ...] = ()
    """ONNX Runtime execution providers to prefer (:data:`PROVIDERS_ENV`); none: the CPU provider."""


def agent_runtimes(environ: Mapping[str, str]) -> tuple[str, ...]:
    """The runtimes installed here, limited to those :data:`RUNTIMES_ENV` names when it is set."""
    from edgefleet.runtime.runner import installed_runtimes, parse_runtimes

    text = environ.get(RUNTIMES_ENV, "").strip()
    installed = installed_runtimes()
    if not text:
        return installed
    allowed = parse_runtimes(text)
    return tuple(name for name in installed if name in allowed)


def download_limits(environ: Mapping[str, str]) -> DownloadLimits:
    """:class:`DownloadLimits` from the ``EDGEFLEET_DOWNLOAD_*`` variables (:data:`DOWNLOAD_ENV`) that are set."""
    values: dict[str, int | float] = {}
    for name, (field_name, kind) in DOWNLOAD_ENV.items():
        text = environ.get(name)
        if text is None or not text.strip():
            continue
        try:
            value = kind(text)
        except ValueError as exc:
            raise ConfigError(f"{name} must be a {kind.__name__}, got {text!r}") from exc
        if value < 0 or (field_name in ("max_bytes", "deadline_s", "read_timeout_s") and value == 0):
            raise ConfigError(f"{name} must be positive, got {text!r}")
        values[field_name] = value
    return DownloadLimits(**values)  # type: ignore[arg-type]


def load_config(credentials: Path, data_dir: Path, *, device_id: str | None = None, server_url: str | None = None,
                telemetry_interval_s: float = DEFAULT_TELEMETRY_INTERVAL_S,
                environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read the credentials JSON; flags given on the command line override what it says. The download limits
    and the local action come from ``environ`` (the process environment by default), see :func:`download_limits`
    and :meth:`LocalActionConfig.from_environ`."""
    try:
        raw = json.loads(credentials.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read credentials {credentials}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"credentials {credentials} are not JSON: {exc}") from exc
    try:
        file_device = str(raw["device_id"])
        if device_id is not None and device_id != file_device:
            raise ConfigError(f"--device-id {device_id} does not match the credentials' {file_device}")
        tls = tls_files(raw, credentials.parent, data_dir)
        endpoint = stored_broker(data_dir) or parse_mqtt_url(str(raw["mqtt_url"]))
        mqtt = MqttEndpoint(endpoint.host, endpoint.port, raw.get("mqtt_username"), raw.get("mqtt_password"))
        if endpoint.tls is not None:
            mqtt = replace(mqtt, tls=tls or endpoint.tls)
        keys = [PublicKey.from_text(str(text)) for text in dict(raw["trusted_keys"]).values()]
        token = str(raw["token"])
        hardware = str(raw.get("hardware") or "generic")
        profile = str(raw["profile"]) if raw.get("profile") else None
        url = server_url or str(raw["server_url"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"credentials {credentials} lack a valid {exc}") from exc
    if not keys:
        raise ConfigError(f"credentials {credentials} name no trusted signing key")
    if telemetry_interval_s <= 0:
        raise ConfigError("telemetry interval must be positive")
    return AgentConfig(device_id=file_device, server_url=url, mqtt=mqtt, token=token,
                       trusted_keys={k.key_id: k for k in keys}, data_dir=data_dir, hardware=hardware, profile=profile,
                       telemetry_interval_s=telemetry_interval_s, tls=tls,
                       downloads=download_limits(os.environ if environ is None else environ),
                       local_action=LocalActionConfig.from_environ(os.environ if environ is None else environ),
                       runtimes=agent_runtimes(os.environ if environ is None else environ),
                       providers=tuple(p.strip() for p in (os.environ if environ is None else environ)
                                       .get(PROVIDERS_ENV, "").split(",") if p.strip()))


def tls_files(raw: dict[str, Any], base: Path, data_dir: Path) -> MqttTls | None:
    """The credentials' CA and client certificate as files in DATA_DIR/tls (rewritten when they changed); None
    when the credentials carry no CA. ConfigError for a path that cannot be read."""
    paths: dict[str, Path] = {}
    for name, filename in TLS_FIELDS:
        text = raw.get(name)
        if text is None and raw.get(f"{name}_file"):
            path = base / str(raw[f"{name}_file"])
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"cannot read {name}_file {path}: {exc.strerror}") from exc
        if text is None:
            continue
        target = data_dir / TLS_DIR / filename
        try:
            current = target.read_text(encoding="utf-8")
        except OSError:
            current = None
        if current != str(text):
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, str(text).encode(), mode=0o600)
        paths[name] = target
    if "ca_cert" not in paths:
        return None
    return MqttTls(paths["ca_cert"], paths.get("client_cert"), paths.get("client_key") if "client_cert" in paths
                   else None)


def stored_broker(data_dir: Path) -> MqttEndpoint | None:
    """The broker address the server last gave this device, if any (a damaged file is ignored)."""
    try:
        return parse_mqtt_url((data_dir / BROKER_URL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ConfigError):
        return None


def remember_broker(data_dir: Path, url: str, current: MqttEndpoint) -> str | None:
    """Keep ``url`` (a desired state's broker address) for the next start; the address kept, or None when it is
    the one in use or already kept. ConfigError for a malformed address."""
    address = parse_mqtt_url(url).address.url
    kept = stored_broker(data_dir)
    if address == (kept.url if kept else current.address.url):
        return None
    atomic_write(data_dir / BROKER_URL_FILE, (address + "\n").encode())
    return address

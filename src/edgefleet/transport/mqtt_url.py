"""MQTT broker addresses: ``mqtt[s]://[user:pass@]host[:port]`` parsed into an :class:`MqttEndpoint`.

``mqtts://`` is MQTT over TLS (port 8883 by default). The certificate files a connection presents and trusts
are not part of a URL: they are attached to the endpoint as :class:`MqttTls`. :func:`tls_context` builds the
``ssl.SSLContext`` for it; ``ssl`` is imported there only, so that a plain ``mqtt://`` process never loads
OpenSSL (:mod:`edgefleet.agent.lean`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from edgefleet.errors import ConfigError

if TYPE_CHECKING:
    import ssl

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883


@dataclass(frozen=True)
class MqttTls:
    """TLS for one MQTT connection: the CA to trust (None: the system's) and the client certificate to present."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None


def tls_context(tls: MqttTls) -> ssl.SSLContext:
    """A client ``SSLContext`` that verifies the broker against ``tls.ca_file`` and presents the client
    certificate, if any; ConfigError (one line) when a file cannot be read."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the MQTT TLS files ({tls.ca_file}, {tls.cert_file}): {exc}") from exc
    return context


@dataclass(frozen=True)
class MqttEndpoint:
    """Where a broker listens, and the credentials to present to it (if any)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    tls: MqttTls | None = None
    """None: plain TCP (``mqtt://``); else TLS with these files (``mqtts://``)."""

    @property
    def url(self) -> str:
        """The broker's URL without credentials, e.g. ``mqtt://127.0.0.1:1883`` or ``mqtts://host:8883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls is not None else 'mqtt'}://{host}:{self.port}"

    @property
    def address(self) -> MqttEndpoint:
        """Where it is and whether it is TLS, without credentials or files: what a device is told to dial."""
        return MqttEndpoint(self.host, self.port, tls=MqttTls() if self.tls is not None else None)

    def __repr__(self) -> str:
        secret = "***" if self.password is not None else None
        fields = f"host={self.host!r}, port={self.port}, username={self.username!r}, password={secret}"
        return f"MqttEndpoint({fields}, tls={self.tls is not None})"


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse ``mqtt[s]://[user:pass@]host[:port]``; raise :class:`ConfigError` for anything else.

    ``mqtts://`` gives an endpoint with ``tls=MqttTls()`` (the system's CAs, no client certificate): callers
    that hold certificate files attach them (``dataclasses.replace``)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: scheme must be mqtt:// or mqtts://, not "
                          f"{parts.scheme!r}")
    tls = MqttTls() if parts.scheme == "mqtts" else None
    if not parts.hostname:
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: unexpected path, query or fragment")
    if port == 0:
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: port must be 1-65535")
    username = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and not username:
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: password given without a user name")
    return MqttEndpoint(
        host=parts.hostname,
        port=(DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT) if port is None else port,
        username=username or None,
        password=password,
        tls=tls,
    )


def _redact(url: str) -> str:
    """Hide the password of a URL so it never reaches an error message."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"

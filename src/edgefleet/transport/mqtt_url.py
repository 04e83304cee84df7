"""MQTT broker addresses: ``mqtt://[user:pass@]host[:port]`` parsed into an :class:`MqttEndpoint`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from edgefleet.errors import ConfigError

DEFAULT_MQTT_PORT = 1883


@dataclass(frozen=True)
class MqttEndpoint:
    """Where a broker listens, and the credentials to present to it (if any)."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        """The broker's URL without credentials, e.g. ``mqtt://127.0.0.1:1883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"mqtt://{host}:{self.port}"

    def __repr__(self) -> str:
        secret = "***" if self.password is not None else None
        fields = f"host={self.host!r}, port={self.port}, username={self.username!r}, password={secret}"
        return f"MqttEndpoint({fields})"


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse ``mqtt://[user:pass@]host[:port]``; raise :class:`ConfigError` for anything else."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: {exc}") from exc
    if parts.scheme != "mqtt":
        raise ConfigError(f"invalid MQTT URL {_redact(url)!r}: scheme must be mqtt://, not {parts.scheme!r}")
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
        port=DEFAULT_MQTT_PORT if port is None else port,
        username=username or None,
        password=password,
    )


def _redact(url: str) -> str:
    """Hide the password of a URL so it never reaches an error message."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hostpart = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{hostpart}"

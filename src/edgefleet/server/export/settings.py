"""How to reach a Kafka cluster: bootstrap servers, TLS and SASL, topic names; the kwargs aiokafka takes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.errors import ConfigError

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SERVER = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]{0,200}$")


@dataclass(frozen=True)
class KafkaSettings:
    """A cluster and how to talk to it; validated on construction (ConfigError, one line, names the option)."""

    bootstrap: str
    """Comma-separated HOST:PORT list."""
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    topic_prefix: str = "edgefleet."
    idempotent: bool = True
    """Ask for an idempotent producer; a broker that refuses one gets a plain producer (said once in the log)."""
    batch: int = 2000
    """Rows read from the outbox and sent per round."""
    lease_s: float = 10.0
    """How long the export lease lasts unless renewed: a dead replica's export resumes elsewhere after this."""
    timeout_s: float = 15.0
    """A round not acknowledged within this is abandoned and sent again after a backoff."""

    def __post_init__(self) -> None:
        servers = [s.strip() for s in self.bootstrap.split(",") if s.strip()]
        if not servers:
            raise ConfigError("--kafka needs HOST:PORT (comma-separated for several)")
        for server in servers:
            found = _SERVER.match(server)
            if found is None or not 0 < int(found.group(2)) <= 65535:
                raise ConfigError(f"--kafka {server!r} is not HOST:PORT")
        protocol = self.security_protocol.upper()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--kafka-security must be one of {', '.join(PROTOCOLS)}, not {self.security_protocol!r}")
        if protocol.startswith("SASL"):
            if (self.sasl_mechanism or "PLAIN").upper() not in SASL_MECHANISMS:
                raise ConfigError(f"--kafka-sasl-mechanism must be one of {', '.join(SASL_MECHANISMS)}")
            if not self.username or not self.password:
                raise ConfigError(f"--kafka-security {protocol} needs --kafka-user and --kafka-password")
        elif self.sasl_mechanism or self.username:
            raise ConfigError("--kafka-user and --kafka-sasl-mechanism need --kafka-security SASL_SSL or "
                              "SASL_PLAINTEXT")
        tls_files = (("--kafka-ca", self.ca_file), ("--kafka-cert", self.cert_file), ("--kafka-key", self.key_file))
        for flag, path in tls_files:
            if path is not None:
                if not protocol.endswith("SSL"):
                    raise ConfigError(f"{flag} needs --kafka-security SSL or SASL_SSL")
                if not path.is_file():
                    raise ConfigError(f"{flag} {path}: no such file")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("--kafka-cert and --kafka-key go together")
        if not _PREFIX.match(self.topic_prefix):
            raise ConfigError(f"--kafka-topic-prefix {self.topic_prefix!r}: letters, digits, '.', '_' or '-' only")
        if not 1 <= self.batch <= 100_000:
            raise ConfigError(f"export batch must be 1-100000, not {self.batch}")
        for name, value in (("lease", self.lease_s), ("timeout", self.timeout_s)):
            if not (math.isfinite(value) and 0 < value <= 3600):
                raise ConfigError(f"export {name} must be more than 0 and at most 3600 s, not {value:g}")

    @property
    def servers(self) -> list[str]:
        return [s.strip() for s in self.bootstrap.split(",") if s.strip()]

    def topic(self, name: str) -> str:
        """The Kafka topic of an export stream (``telemetry`` -> ``edgefleet.telemetry``)."""
        return self.topic_prefix + name

    def client_kwargs(self) -> dict[str, Any]:
        """Connection options for an aiokafka producer, consumer or admin client."""
        kwargs: dict[str, Any] = {"bootstrap_servers": self.servers,
                                  "security_protocol": self.security_protocol.upper()}
        if kwargs["security_protocol"].endswith("SSL"):
            from aiokafka.helpers import create_ssl_context

            kwargs["ssl_context"] = create_ssl_context(cafile=self.ca_file, certfile=self.cert_file,
                                                       keyfile=self.key_file)
        if kwargs["security_protocol"].startswith("SASL"):
            kwargs.update(sasl_mechanism=(self.sasl_mechanism or "PLAIN").upper(),
                          sasl_plain_username=self.username, sasl_plain_password=self.password)
        return kwargs

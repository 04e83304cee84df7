"""Who may ask the upstream tier: devices of the fleet, by their certificate or their token; nobody else.

Two checks, each on when configured, both when both are:

- **mutual TLS** (:class:`UpstreamTls`): the service speaks HTTPS with a certificate of the fleet CA (issued
  from the server's CA directory by ``serve-model --pki DATA_DIR/pki``, or given as ``--cert``/``--key``/
  ``--client-ca``) and requires every client to present a certificate that the fleet CA signed
  (``ssl.CERT_REQUIRED``): a connection without one, or with another CA's, fails in the TLS handshake, before
  any request is read;
- **device tokens** (:class:`DeviceTokens`): ``Authorization: Bearer TOKEN`` must be one of the tokens listed
  in a file (one a line, the token ``device add`` gave the device, or ``sha256:HEX`` of it; re-read when it
  changes, so devices are added and removed without a restart): 401 without a token, 403 with another.

:func:`check_exposure` refuses a non-loopback address without TLS unless told ``--insecure``, as ``edgefleet
server`` does. Revocation: a revoked device's token is removed from the tokens file; certificates are not checked
against the fleet's CRL here (a device revoked on the server keeps its TLS access to the upstream until its
certificate expires, unless the token check is on too).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import threading
from dataclasses import dataclass
from pathlib import Path

from edgefleet.errors import ConfigError


@dataclass(frozen=True)
class UpstreamTls:
    """The service's certificate and key, and the CA whose certificates clients must present."""

    cert_file: Path
    key_file: Path
    client_ca: Path


def tls_from_files(cert: Path | None, key: Path | None, client_ca: Path | None) -> UpstreamTls | None:
    """``--cert``/``--key``/``--client-ca`` given together (or none of them); ConfigError otherwise."""
    given = [p for p in (cert, key, client_ca) if p is not None]
    if not given:
        return None
    if cert is None or key is None or client_ca is None:
        raise ConfigError("--cert, --key and --client-ca go together (the service's certificate and key, and the "
                          "fleet CA that signs the devices' certificates)")
    for path in (cert, key, client_ca):
        if not path.is_file():
            raise ConfigError(f"cannot read {path}")
    return UpstreamTls(cert, key, client_ca)


class DeviceTokens:
    """The allowed device tokens, from a file re-read whenever it changes (mtime, size or inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._digests: frozenset[bytes] = frozenset()
        self.digests()  # a missing or unreadable file is an error at start, not a silent "nobody"

    def digests(self) -> frozenset[bytes]:
        """SHA-256 of every allowed token, as the file says now."""
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise ConfigError(f"cannot read the device tokens file {self.path}: {exc.strerror}") from exc
        stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        with self._lock:
            if stamp != self._stamp:
                try:
                    text = self.path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    raise ConfigError(f"cannot read the device tokens file {self.path}: {exc}") from exc
                self._digests, self._stamp = frozenset(_digest(line) for line in text.splitlines()
                                                       if line.strip() and not line.lstrip().startswith("#")), stamp
            return self._digests

    def allows(self, token: str) -> bool:
        """Whether ``token`` is listed (compared by digest, in constant time per entry)."""
        want = hashlib.sha256(token.encode()).digest()
        try:
            listed = self.digests()
        except ConfigError:
            return False  # the file went away: nobody until it is back
        return any(hmac.compare_digest(want, d) for d in listed)


def _digest(line: str) -> bytes:
    text = line.strip()
    if text.startswith("sha256:"):
        try:
            value = bytes.fromhex(text[len("sha256:"):])
        except ValueError:
            value = b""
        if len(value) == 32:
            return value
    return hashlib.sha256(text.encode()).digest()


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address or ``localhost``."""
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, tls: UpstreamTls | None, insecure: bool) -> None:
    """Refuse to serve a non-loopback address in clear text (so to anyone), unless ``insecure``."""
    if insecure or is_loopback(host):
        return
    if tls is None:
        raise ConfigError(f"--host {host} is not a loopback address: serve it over TLS (--pki DIR, or --cert/--key/"
                          "--client-ca), or pass --insecure to send windows and tokens in clear text")

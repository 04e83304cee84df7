"""The fleet's certificate authority: one CA per server data directory, device and server certificates, the CRL.

Created on the server's first start with TLS (``DATA_DIR/pki``): ``ca.key`` (mode 0600) and ``ca.pem``. Every
certificate it issues names one identity as its Common Name: a device's id (the MQTT user name the brokers
take from it), ``edgefleet-server`` for the server's own MQTT connections, or a host for a TLS listener (with
that host in its subjectAltName). Keys are ECDSA P-256: issuing one takes well under a millisecond, so
provisioning is bounded by the API, not by key generation.

What was issued and what was revoked are two append-only logs (``issued.jsonl``, ``revoked.jsonl``, one JSON
object a line, flushed and fsynced): issuing 10,000 certificates rewrites nothing. :meth:`FleetCA.crl_pem`
signs the revocation list that brokers check (Mosquitto's ``crlfile``, the embedded broker's plugin).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.errors import ConfigError
from edgefleet.storage import atomic_write

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
ISSUED_LOG = "issued.jsonl"
REVOKED_LOG = "revoked.jsonl"
CA_DAYS = 3650
DEVICE_DAYS = 365
SERVER_DAYS = 825
CRL_DAYS = 30
_SKEW = dt.timedelta(minutes=5)
"""Certificates are valid from a little before now: a device whose clock is slightly behind still accepts one."""


@dataclass(frozen=True)
class Issued:
    """One issued certificate and its private key (PEM), as handed to whoever it names."""

    identity: str
    serial: int
    not_after: float
    cert_pem: str
    key_pem: str


class FleetCA:
    """The CA in ``directory``: loaded, or created (key 0600) on first use. Safe to use from several threads."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)
        key_path, cert_path = self.directory / CA_KEY, self.directory / CA_CERT
        try:
            if not key_path.exists():
                self._create(key_path, cert_path)
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the fleet CA in {self.directory}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"the fleet CA key {key_path} is not an EC key")
        self._key = key
        self._issued: dict[int, tuple[str, float]] = {}
        self._revoked: dict[int, float] = {}
        for record in _read_log(self.directory / ISSUED_LOG):
            self._issued[int(record["serial"], 16)] = (str(record["identity"]), float(record["not_after"]))
        for record in _read_log(self.directory / REVOKED_LOG):
            self._revoked[int(record["serial"], 16)] = float(record["at"])

    @property
    def ca_path(self) -> Path:
        return self.directory / CA_CERT

    @property
    def ca_pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    def _create(self, key_path: Path, cert_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefleet"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"edgefleet fleet CA {os.urandom(4).hex()}")])
        now = dt.datetime.now(dt.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - _SKEW)
                .not_valid_after(now + dt.timedelta(days=CA_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                               critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        atomic_write(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()), mode=0o600)

    def issue(self, identity: str, *, days: float = DEVICE_DAYS, hosts: Iterable[str] = (),
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
        """A new key and certificate whose Common Name is ``identity``; with ``hosts``, a TLS server certificate
        for those names and addresses, else a client certificate. ``not_before``/``not_after`` override the
        validity (tests issue expired certificates this way)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start = not_before or now - _SKEW
        end = not_after or now + dt.timedelta(days=days)
        names = list(hosts)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if names else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                                            critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(identity=identity, serial=cert.serial_number, not_after=end.timestamp(),
                        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                        key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode())
        with self._lock:
            _append(self.directory / ISSUED_LOG,
                    {"serial": f"{issued.serial:x}", "identity": identity, "not_after": issued.not_after})
            self._issued[issued.serial] = (identity, issued.not_after)
        return issued

    def write_identity(self, identity: str, cert_path: Path, key_path: Path, *, hosts: Iterable[str] = (),
                       renew_within_days: float = 30) -> None:
        """Keep a certificate for ``identity`` (and ``hosts``) at these paths: issued when missing, expiring
        within ``renew_within_days``, for other hosts, or not signed by this CA."""
        names = sorted(set(hosts))
        try:
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
            valid = (current.issuer == self.cert.subject and key_path.exists()
                     and current.not_valid_after_utc - dt.timedelta(days=renew_within_days)
                     > dt.datetime.now(dt.UTC)
                     and _hosts(current) == names and current.serial_number not in self._revoked)
        except (OSError, ValueError):
            valid = False
        if valid:
            return
        issued = self.issue(identity, days=SERVER_DAYS if names else DEVICE_DAYS, hosts=names)
        atomic_write(key_path, issued.key_pem.encode(), mode=0o600)
        atomic_write(cert_path, issued.cert_pem.encode())

    def serials(self, identity: str) -> list[int]:
        """Serial numbers of every certificate issued to ``identity``."""
        with self._lock:
            return [serial for serial, (who, _) in self._issued.items() if who == identity]

    def revoke(self, identity: str, *, keep: int | None = None) -> list[int]:
        """Revoke every certificate of ``identity`` (but ``keep``); the serials newly revoked."""
        now = dt.datetime.now(dt.UTC).timestamp()
        with self._lock:
            serials = [s for s, (who, _) in self._issued.items()
                       if who == identity and s != keep and s not in self._revoked]
            for serial in serials:
                _append(self.directory / REVOKED_LOG, {"serial": f"{serial:x}", "at": now})
                self._revoked[serial] = now
        return serials

    def is_revoked(self, serial: int) -> bool:
        with self._lock:
            return serial in self._revoked

    def crl_pem(self) -> bytes:
        """The signed certificate revocation list (every revoked serial, expired ones too), valid CRL_DAYS."""
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(now - _SKEW).next_update(now + dt.timedelta(days=CRL_DAYS)))
        with self._lock:
            revoked = sorted(self._revoked.items())
        for serial, at in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial)
                .revocation_date(dt.datetime.fromtimestamp(at, dt.UTC)).build())
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    def write_crl(self, path: Path) -> None:
        atomic_write(path, self.crl_pem())


def certificate_identity(cert_pem: bytes | str) -> tuple[str, int]:
    """(Common Name, serial number) of a PEM certificate."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    cert = x509.load_pem_x509_certificate(data)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return (str(names[0].value) if names else "", cert.serial_number)


def revoked_serials(crl_path: Path) -> frozenset[int]:
    """The serials a PEM CRL file lists (empty if the file is missing). The signature is not checked here:
    the file is written by the server next to the broker, in a directory only they can write."""
    try:
        crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    except (OSError, ValueError):
        return frozenset()
    return frozenset(r.serial_number for r in crl)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _hosts(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return sorted([str(ip) for ip in san.get_values_for_type(x509.IPAddress)] + san.get_values_for_type(x509.DNSName))


def _append(path: Path, record: dict[str, object]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_log(path: Path) -> list[dict[str, str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a crash: the certificate it named was never handed out
    return records

"""Per-device MQTT credentials and topic rules, for Mosquitto and for the embedded amqtt broker alike.

One password file in Mosquitto's ``$7$`` format (PBKDF2-SHA512, as ``mosquitto_passwd`` writes it) and one
rule: a device may subscribe to (and receive) only ``ef/v1/<its id>/desired`` and publish only to its own
``reported``, ``telemetry`` and ``events``; the server's own user may do anything. The server writes the
files from the store (:class:`BrokerAccess`); Mosquitto re-reads them on SIGHUP (its ``pid_file``), the
embedded broker's plugins whenever the file changes (:class:`PasswordFile`).

Revocation also takes effect on a connection opened before it: on reload Mosquitto 2 re-checks every connected
client against the new password file and disconnects the ones no longer in it; in the embedded broker
:class:`DeviceTopicAcl` refuses such a user every publish and delivery, and the broker process closes its
connection (:mod:`edgefleet.server.broker_process`). Either way the client's reconnect is refused.

With TLS and device certificates (mutual TLS, :mod:`edgefleet.server.pki`) the certificate's Common Name is the
user name: Mosquitto's ``use_identity_as_username``, the embedded broker's :class:`CertificateAuth`. Mosquitto
then reads no password file, so revocation there is the CRL (``crl.pem``, written here, re-read on SIGHUP) for
new connections and, for an open one, a ``topic deny #`` block for the revoked user in the ACL file (ACLs are
checked on every publish and delivery, and re-read on SIGHUP).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from edgefleet.storage import atomic_write

log = logging.getLogger(__name__)

SERVER_USER = "edgefleet-server"
PASSWD_FILE = "passwd"
ACL_FILE = "acl"
PID_FILE = "mosquitto.pid"
CRL_FILE = "crl.pem"
_ITERATIONS = 101
DEVICE_PUBLISH = ("reported", "telemetry", "events")
DEVICE_SUBSCRIBE = ("desired",)


def hash_password(password: str, *, iterations: int = _ITERATIONS, salt: bytes | None = None) -> str:
    """``$7$ITER$SALT$HASH``: Mosquitto's PBKDF2-SHA512 password format."""
    salt = salt or secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Check a password against a ``$7$`` (PBKDF2-SHA512) or ``$6$`` (salted SHA-512) Mosquitto hash."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
            return hmac.compare_digest(got, want)
        if len(parts) == 4 and parts[1] == "6":
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            return hmac.compare_digest(hashlib.sha512(password.encode() + salt).digest(), want)
    except (ValueError, TypeError):
        return False
    return False


def allowed(username: str | None, topic: str, action: str, server_user: str = SERVER_USER) -> bool:
    """May ``username`` do ``action`` (publish, subscribe, receive) on ``topic`` (a name or a filter)?"""
    if username is None or not username:
        return False
    if username == server_user:
        return True
    prefix = f"ef/v1/{username}/"
    if not topic.startswith(prefix):
        return False
    channel = topic[len(prefix):]
    if action == "publish":
        return channel in DEVICE_PUBLISH
    return channel in DEVICE_SUBSCRIBE


def acl_text(server_user: str = SERVER_USER, revoked: Iterable[str] = ()) -> str:
    """Mosquitto's ACL file for the same rules as :func:`allowed`; each ``revoked`` user may do nothing."""
    lines = [f"user {server_user}", "topic readwrite #", ""]
    for user in sorted(set(revoked) - {server_user}):
        lines += [f"user {user}", "topic deny #", ""]
    lines += [f"pattern read ef/v1/%u/{c}" for c in DEVICE_SUBSCRIBE]
    lines += [f"pattern write ef/v1/%u/{c}" for c in DEVICE_PUBLISH]
    return "\n".join(lines) + "\n"


def passwd_text(entries: Iterable[tuple[str, str]]) -> str:
    return "".join(f"{user}:{encoded}\n" for user, encoded in sorted(entries))


@dataclass
class BrokerAccess:
    """Writes the password and ACL files from the store and tells the broker to reload them."""

    directory: Path
    server_password: str
    server_user: str = SERVER_USER
    pid_file: Path | None = None
    crl: Callable[[], bytes] | None = None
    """With device certificates: the fleet CA's signed revocation list, written to :data:`CRL_FILE`."""
    _last: str = field(default="", repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _server_hash: str = field(default="", repr=False)

    @property
    def passwd_path(self) -> Path:
        return self.directory / PASSWD_FILE

    @property
    def acl_path(self) -> Path:
        return self.directory / ACL_FILE

    @property
    def crl_path(self) -> Path:
        return self.directory / CRL_FILE

    def sync(self, devices: Iterable[tuple[str, str | None, bool]]) -> bool:
        """``devices``: (id, password hash, revoked). Rewrite the files if they changed; True if they did."""
        with self._lock:
            if not self._server_hash or not verify_password(self.server_password, self._server_hash):
                self._server_hash = hash_password(self.server_password)
            entries = [(self.server_user, self._server_hash)]
            rows = list(devices)
            entries += [(d, h) for d, h, revoked in rows if h and not revoked and d != self.server_user]
            text = passwd_text(entries)
            acl = acl_text(self.server_user, (d for d, _h, revoked in rows if revoked))
            if text + acl == self._last and self.passwd_path.exists():
                return False
            self.directory.mkdir(parents=True, exist_ok=True)
            if self.crl is not None:
                atomic_write(self.crl_path, self.crl())
            atomic_write(self.acl_path, acl.encode(), mode=0o600)
            atomic_write(self.passwd_path, text.encode(), mode=0o600)
            self._last = text + acl
            self._reload()
            return True

    def _reload(self) -> None:
        pid_file = self.pid_file or self.directory / PID_FILE
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGHUP)
        except OSError as exc:
            log.warning("cannot signal the broker (pid %d) to reload credentials: %s", pid, exc)


# -- amqtt plugins (loaded by the embedded broker's child process) -------------------------------------------
class PasswordFile:
    """The users of a Mosquitto password file, re-read whenever the file changes (mtime, size or inode)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.generation = 0
        """Bumped on every reload, so that watchers can tell that the users changed."""
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}

    def users(self) -> dict[str, str]:
        """user -> encoded password, as the file says now (no users if it is missing)."""
        try:
            stat = self.path.stat()
            stamp: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = None
        if stamp == self._stamp and self.generation:
            return self._users
        users = {}
        if stamp is not None:
            try:
                text = self.path.read_text(encoding="utf-8")
            except OSError:
                text = ""
            for line in text.splitlines():
                user, sep, encoded = line.strip().partition(":")
                if sep and user and not user.startswith("#"):
                    users[user] = encoded
        self._users, self._stamp = users, stamp
        self.generation += 1
        return users


_PASSWORD_FILES: dict[Path, PasswordFile] = {}


def password_file(path: str | Path) -> PasswordFile:
    """One :class:`PasswordFile` per path in this process, shared by the plugins and the revocation watcher."""
    key = Path(path)
    if key not in _PASSWORD_FILES:
        _PASSWORD_FILES[key] = PasswordFile(key)
    return _PASSWORD_FILES[key]


class PasswordFileAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Authenticate against the shared password file, re-read whenever it changes."""

    @dataclass
    class Config:
        password_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._file = password_file(self._get_config_option("password_file", ""))

    async def authenticate(self, *, session: Session) -> bool | None:
        user, password = session.username, session.password
        encoded = self._file.users().get(user or "")
        ok = encoded is not None and password is not None and verify_password(str(password), encoded)
        if not ok:
            log.info("MQTT login refused for %r", user)
        return ok


class DeviceTopicAcl(BaseTopicPlugin):  # type: ignore[misc]
    """Each device only on its own topics; the server's user everywhere (see :func:`allowed`).

    With ``password_file``, a user no longer in the file (a revoked device) may do nothing, on a connection
    opened before the revocation too: its publishes are dropped and nothing is delivered to it.
    """

    @dataclass
    class Config:
        server_user: str = SERVER_USER
        password_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        path = self._get_config_option("password_file", "")
        self._file = password_file(path) if path else None

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool | None:
        if session is None or topic is None or action is None:
            return False
        if self._file is not None and (session.username or "") not in self._file.users():
            return False
        server_user = self._get_config_option("server_user", SERVER_USER)
        return allowed(session.username, topic, str(action.value), server_user)



class CertificateAuth(BaseAuthPlugin):  # type: ignore[misc]
    """Mutual TLS for the embedded broker: a client must present a certificate of the fleet CA (the TLS listener
    verified it: signature, validity dates), not listed in ``crl_file``, whose Common Name is a user of the
    password file (a device not revoked, or the server). That name becomes the session's user name, as
    Mosquitto's ``use_identity_as_username`` does; a password, if sent, is ignored."""

    @dataclass
    class Config:
        password_file: str = ""
        crl_file: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self._file = password_file(self._get_config_option("password_file", ""))
        self._crl = Path(self._get_config_option("crl_file", ""))
        self._crl_stamp: tuple[int, int, int] | None = None
        self._revoked: frozenset[int] = frozenset()

    async def authenticate(self, *, session: Session) -> bool | None:
        from edgefleet.server.pki import certificate_identity

        ssl_object = session.ssl_object
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            log.info("MQTT login refused for %r: no client certificate", session.username)
            return False
        import ssl

        name, serial = certificate_identity(ssl.DER_cert_to_PEM_cert(der))
        if serial in self._revoked_serials() or name not in self._file.users():
            log.info("MQTT login refused for certificate %r (serial %x): revoked or unknown", name, serial)
            return False
        session.username = name
        return True

    def _revoked_serials(self) -> frozenset[int]:
        from edgefleet.server.pki import revoked_serials

        try:
            stat = self._crl.stat()
            stamp: tuple[int, int, int] | None = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except OSError:
            stamp = None
        if stamp != self._crl_stamp:
            self._revoked, self._crl_stamp = revoked_serials(self._crl), stamp
        return self._revoked

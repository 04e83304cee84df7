"""The machine's PostgreSQL cluster for tests and benchmarks: start it if down, make throwaway databases.

Debian's ``postgresql-common`` layout (``pg_lsclusters``, ``pg_ctlcluster``); the tests run as root (CI) or as
a user who may ``su postgres``. A role ``edgefleet`` with a password connects over TCP on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass

from edgefleet.errors import ConfigError, StoreError

INSTALL_HINT = "apt-get install -y postgresql-15"
ROLE = "edgefleet"
PASSWORD = "edgefleet-test"
_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Cluster:
    version: str
    name: str
    port: int


def find_cluster(version: str = "15", name: str = "main") -> Cluster:
    """The installed cluster (creating it if the package is there but the cluster is not); ConfigError if absent."""
    if shutil.which("pg_lsclusters") is None or not os.path.isdir(f"/usr/lib/postgresql/{version}"):
        raise ConfigError(f"PostgreSQL {version} is not installed; install it with: {INSTALL_HINT}")
    for line in _run(["pg_lsclusters", "--no-header"]).splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == version and parts[1] == name:
            return Cluster(version, name, int(parts[2]))
    _run(["pg_createcluster", version, name])
    return find_cluster(version, name)


def ensure_running(cluster: Cluster, timeout_s: float = 60.0) -> None:
    """Start the cluster if it is down and wait until it accepts connections."""
    status = _run(["pg_lsclusters", "--no-header", cluster.version, cluster.name])
    if "online" not in status:
        with contextlib.suppress(StoreError):  # another test process may have just started it: the wait decides
            _run(["pg_ctlcluster", cluster.version, cluster.name, "start"])
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", str(cluster.port)],
                          check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise StoreError(f"PostgreSQL {cluster.version}/{cluster.name} did not accept connections in {timeout_s:g} s")


def psql(sql: str) -> str:
    """Run SQL as the ``postgres`` superuser (peer authentication over the local socket)."""
    command = ["psql", "-v", "ON_ERROR_STOP=1", "-qAtX", "-c", sql]
    if os.geteuid() == 0:
        command = ["su", "postgres", "-c", " ".join(_quote(a) for a in command)]
    elif _user() != "postgres":
        command = ["sudo", "-n", "-u", "postgres", *command]
    return _run(command)


def create_database(cluster: Cluster, name: str | None = None) -> str:
    """Create a fresh database owned by the test role; return its SQLAlchemy URL."""
    name = name or f"ef_{uuid.uuid4().hex[:12]}"
    if not _NAME.match(name):
        raise ConfigError(f"bad database name {name!r}")
    # several test processes may get here at once: creating the role must not fail when another one just did
    psql(f"DO $$ BEGIN CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; "
         "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$")
    psql(f"CREATE DATABASE {name} OWNER {ROLE}")
    return f"postgresql+psycopg://{ROLE}:{PASSWORD}@127.0.0.1:{cluster.port}/{name}"


def drop_database(name: str) -> None:
    if _NAME.match(name):
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def start_postgres(version: str = "15") -> Cluster:
    """Find (or create) and start the cluster; the usual entry point."""
    cluster = find_cluster(version)
    ensure_running(cluster)
    return cluster


def _run(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StoreError(f"{command[0]} failed: {exc}") from exc
    if done.returncode != 0:
        raise StoreError(f"{' '.join(command[:3])} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def _user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name

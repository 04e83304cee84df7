"""Keeping OpenSSL out of the agent process until something in it needs TLS.

The agent runs for a device's whole uptime, and its resident memory is a budget (E4: at most 1.25x a bare
process that only runs the same model in ONNX Runtime). Nothing the running agent does with a plain
``mqtt://`` broker and an ``http://`` control plane needs OpenSSL, yet importing paho-mqtt loads it: paho
imports ``ssl`` (``_ssl``, linked with libssl and libcrypto) and ``hashlib`` (``_hashlib``, libcrypto),
both at module top. Measured on the demo model (fresh processes, VmRSS): numpy + ONNX Runtime 44.9 MiB;
+ paho-mqtt, sqlite3, zipfile 55.7 MiB, or 51.1 MiB with OpenSSL kept out; + the agent's own modules
58.1 MiB, or 53.5 MiB. Those 4.6 MiB are the difference between 1.30x and about 1.21x.

Both imports are optional where they happen: paho imports ``ssl`` in ``try/except ImportError`` (and then
refuses ``tls_set``), http.client and urllib.request likewise, and ``hashlib`` falls back to CPython's own
sha256, sha1, md5, blake2 and sha3 when ``_hashlib`` cannot be imported. So the process entry
(``python -m edgefleet.agent``) calls :func:`keep_openssl_out` before it imports anything else: a ``None`` in
``sys.modules`` makes ``import ssl`` raise ImportError. Then:

* a configuration that speaks TLS (:func:`needs_openssl`: an ``https://`` server or upstream, a TLS MQTT
  scheme) calls :func:`allow_openssl` at once, before paho-mqtt or httpx are imported, and so loads OpenSSL
  as any process would (hashlib, imported while reading the credentials, keeps its builtin hashes);
* otherwise OpenSSL stays out until the agent opens an HTTP client: httpx makes an SSL context for every
  client, ``http://`` or not, so :func:`allow_openssl` runs where the agent imports httpx, for an update's
  download (:class:`edgefleet.agent.fetch.ArtifactFetcher`) and for tiered inference
  (:class:`edgefleet.agent.escalation.HttpUpstream`). Verifying an update (``cryptography``, pydantic, onnx)
  needs no ``ssl``.

What an update loads (httpx and OpenSSL for its download, ``cryptography``, pydantic and ``onnx`` for its
verification) is given back by executing the agent again once the update is done (:mod:`edgefleet.agent.main`).

What was imported while OpenSSL was out keeps that state for the process's life: hashlib its builtin hashes,
http.client no ``HTTPSConnection``, paho-mqtt no TLS (its MQTT connections are plain by then, see
:mod:`edgefleet.transport.link` for the stand-in it gets). None of these ever carries TLS in the agent.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable

OPENSSL_MODULES = ("ssl", "_ssl", "_hashlib")
"""The extension modules that load OpenSSL's libssl and libcrypto (and ``ssl``, the only importer of ``_ssl``)."""
TLS_SCHEMES = frozenset({"https", "mqtts", "ssl", "tls", "wss"})

_lock = threading.Lock()


def needs_openssl(urls: Iterable[str | None]) -> bool:
    """Whether any of these URLs (None: not configured) speaks TLS, so the process needs OpenSSL from the start."""
    for url in urls:
        scheme, sep, _ = (url or "").partition("://")
        if sep and scheme.strip().lower() in TLS_SCHEMES:
            return True
    return False


def keep_openssl_out() -> bool:
    """Make ``import ssl`` / ``import _hashlib`` fail until :func:`allow_openssl`; True if OpenSSL is now out.

    False (and nothing changed) when one of them is imported already: memory is not given back by forgetting
    a module, and blocking the rest would only take functions away.
    """
    with _lock:
        if any(sys.modules.get(name) is not None for name in OPENSSL_MODULES):
            return False
        for name in OPENSSL_MODULES:
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "cannot be imported"
        return True


def allow_openssl() -> None:
    """Let ``ssl`` and ``_hashlib`` be imported again (they load when something imports them next); idempotent,
    safe from any thread, and a no-op where :func:`keep_openssl_out` never ran."""
    with _lock:
        for name in OPENSSL_MODULES:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def openssl_kept_out() -> bool:
    """Whether :func:`keep_openssl_out` is in force."""
    return any(name in sys.modules and sys.modules[name] is None for name in OPENSSL_MODULES)

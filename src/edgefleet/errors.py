"""One exception tree for edgefleet.

    EdgefleetError                 exit 1   anything the user can act on
    ├── ConfigError                exit 2   bad arguments, settings or files given by the user
    ├── DataError                  exit 3   datasets, sensor input, calibration arrays
    ├── ModelError                 exit 4   a model that cannot be read, built, quantized or run
    ├── BundleError                exit 5   a bundle that is malformed, unsigned, tampered or refused
    │   └── SignatureError                  the signature does not verify against a trusted key
    ├── TransportError             exit 6   broker or HTTP peer unreachable, refused, or misbehaving
    └── StoreError                 exit 7   the server's database refused an operation

Third-party exceptions are translated at the boundary with ``raise ... from exc``; programming
errors (TypeError, AssertionError, ...) are left alone so that they surface as bugs.
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Root of every error edgefleet raises on purpose."""

    exit_code = 1


class ConfigError(EdgefleetError):
    """Bad arguments, settings or input files."""

    exit_code = 2


class DataError(EdgefleetError):
    """A dataset, calibration array or sensor reading that cannot be used."""

    exit_code = 3


class ModelError(EdgefleetError):
    """A model that cannot be read, built, quantized or run."""

    exit_code = 4


class BundleError(EdgefleetError):
    """A bundle that is malformed, tampered with, or refused by the device's trust policy."""

    exit_code = 5

    def __init__(self, message: str, *, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


class SignatureError(BundleError):
    """The bundle's signature does not verify against any trusted key."""

    def __init__(self, message: str, *, reason: str = "bad_signature") -> None:
        super().__init__(message, reason=reason)


class TransportError(EdgefleetError):
    """The broker or an HTTP peer was unreachable, refused us, or answered nonsense."""

    exit_code = 6


class StoreError(EdgefleetError):
    """The server's database refused an operation."""

    exit_code = 7

"""REST endpoints for the server's keyring: show it, and publish key rotations and revocations to the fleet.

``POST /api/v1/keys/statements`` takes a statement file's bytes (``edgefleet keys rotate`` / ``keys revoke``
write them), verifies it against the server's keyring and adds it to the trust log: from then on the server
trusts what it says and every device is sent it in its desired state (see :mod:`edgefleet.server.trust`).
"""

from collections.abc import Mapping

from fastapi import APIRouter, HTTPException, Request, Response
from pydantic import BaseModel, Field

from edgefleet.bundle.signing import PublicKey
from edgefleet.errors import BundleError
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store
from edgefleet.server.trust import keyring_json, pin_keys, publish_statement, server_keyring


class TrustLogEntry(BaseModel):
    kind: str = Field(description="rotate, revoke or rollback")
    subject: str = Field(description="the key id, or the model name of a rollback order")
    release: int | None
    signer: str | None
    created: float


class KeyringOut(BaseModel):
    trusted: dict[str, str] = Field(description="key id: public key")
    retired: dict[str, str] = Field(description="key id: the key that replaced it")
    revoked: list[str]


class KeyringWithLog(KeyringOut):
    log: list[TrustLogEntry]


class StatementOut(KeyringOut):
    type: str
    key_id: str
    stored: bool = Field(description="false: it was already in effect")


def keys_router(store: Store, orchestrator: Orchestrator, pinned: Mapping[str, PublicKey]) -> APIRouter:
    """The router; the keys the server was started with (``pinned``) are recorded in the trust log first."""
    pin_keys(store, pinned)
    router = APIRouter(prefix="/api/v1/keys")

    @router.get("")
    def keyring() -> KeyringWithLog:
        """Trusted, retired and revoked keys, and the statements every device is sent."""
        log = [{"kind": r.kind, "subject": r.subject, "release": r.release, "signer": r.signer, "created": r.created}
               for r in store.trust_log() if r.kind != "pin"]
        return KeyringWithLog.model_validate({**keyring_json(server_keyring(store)), "log": log})

    @router.post("/statements", status_code=201)
    async def publish(request: Request, response: Response) -> StatementOut:
        """Register a signed rotation or revocation; 200 (nothing stored) when it is already in effect."""
        try:
            published = publish_statement(store, await request.body())
        except BundleError as exc:
            raise HTTPException(422, f"statement refused ({exc.reason}): {exc}") from exc
        if published.stored:
            orchestrator.publish_pending()
        else:
            response.status_code = 200
        return StatementOut.model_validate({"type": published.type, "key_id": published.subject,
                                            "stored": published.stored, **keyring_json(published.keyring)})

    return router

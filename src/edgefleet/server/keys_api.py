"""REST endpoints for the server's keyring: show it, and publish key rotations and revocations to the fleet.

``POST /api/v1/keys/statements`` takes a statement file's bytes (``edgefleet keys rotate`` / ``keys revoke``
write them), verifies it against the server's keyring and adds it to the trust log: from then on the server
trusts what it says and every device is sent it in its desired state (see :mod:`edgefleet.server.trust`).
"""

from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response

from edgefleet.bundle.signing import PublicKey
from edgefleet.errors import BundleError
from edgefleet.server.orchestrator import Orchestrator
from edgefleet.server.store import Store
from edgefleet.server.trust import keyring_json, pin_keys, publish_statement, server_keyring


def keys_router(store: Store, orchestrator: Orchestrator, pinned: Mapping[str, PublicKey]) -> APIRouter:
    """The router; the keys the server was started with (``pinned``) are recorded in the trust log first."""
    pin_keys(store, pinned)
    router = APIRouter(prefix="/api/v1/keys")

    @router.get("")
    def keyring() -> dict[str, Any]:
        """Trusted, retired and revoked keys, and the statements every device is sent."""
        log = [{"kind": r.kind, "subject": r.subject, "release": r.release, "signer": r.signer, "created": r.created}
               for r in store.trust_log() if r.kind != "pin"]
        return {**keyring_json(server_keyring(store)), "log": log}

    @router.post("/statements", status_code=201)
    async def publish(request: Request, response: Response) -> dict[str, Any]:
        """Register a signed rotation or revocation; 200 (nothing stored) when it is already in effect."""
        try:
            published = publish_statement(store, await request.body())
        except BundleError as exc:
            raise HTTPException(422, f"statement refused ({exc.reason}): {exc}") from exc
        if published.stored:
            orchestrator.publish_pending()
        else:
            response.status_code = 200
        return {"type": published.type, "key_id": published.subject, "stored": published.stored,
                **keyring_json(published.keyring)}

    return router

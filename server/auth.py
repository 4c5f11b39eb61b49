"""Who an HTTP request is: Lodestore agent tokens through the MCP SDK's bearer machinery.

Lodestore tokens are opaque (``lds_…``), minted by this store's CLI, and only their hash is
stored. ``StoreTokenVerifier`` is the SDK ``TokenVerifier``: a token is accepted when its
hash is an active agent of this store, and the ``AccessToken`` it yields is bound to this
server's resource URL (RFC 8707 ``resource``; the bearer backend is configured to refuse
any other) and carries the ``Principal`` the tool calls run as. The token itself is never
forwarded anywhere, logged, or put in a reply.

HTTP status rules (see ``server/http_app.py`` for the wiring):

- 401 + ``WWW-Authenticate: Bearer error="invalid_token" … resource_metadata="…"`` when the
  ``Authorization: Bearer`` header is missing, malformed, unknown to this store, or revoked
  (revocation is seen within 2 seconds). The resource metadata document (RFC 9728) is
  served at ``/.well-known/oauth-protected-resource``.
- 403 ``insufficient_scope`` when the token is valid but the agent's role has no access at
  all under its tenant's policy: no path rule grants the role read or write anywhere. Such
  an agent could only ever get refusals, so it is refused at the door. An agent with some
  access that asks for a path outside it gets a tool result with ``isError`` (``forbidden``)
  instead: one HTTP request can carry many calls, and the answer belongs to the call.
- 403 for a request whose ``Origin`` is neither absent, a loopback origin, nor one the
  operator allowed (``--allow-origin``) — browsers on other sites cannot drive the server.
"""

from __future__ import annotations

import logging
from typing import Any

from mcp.server.auth.provider import AccessToken

from governance.errors import Unauthorized
from governance.principals import Principal

from .wiring import App

log = logging.getLogger("lodestore.auth")

SCOPE = "lodestore"  # held by every valid token whose role has some access


def role_has_access(app: App, p: Principal) -> bool:
    """Whether any path rule of the tenant's policy grants the role read or write."""
    pol = app.gateway.policy(p)
    role = p.role
    return any("*" in r or role in r or "*" in w or role in w for _prefix, r, w in pol.rules)


class StoreTokenVerifier:
    """``mcp.server.auth.provider.TokenVerifier`` over this store's agent tokens."""

    def __init__(self, app: App, resource_url: str) -> None:
        self.app = app
        self.resource_url = resource_url

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            # cached in memory for 2 s per token: a dictionary lookup on almost every request
            p = self.app.gateway.authenticate(token)
        except Unauthorized:
            return None
        except Exception as exc:  # noqa: BLE001 - a broken control database refuses, loudly
            log.error("token verification failed: %s", type(exc).__name__)
            return None
        try:
            scopes = [SCOPE] if role_has_access(self.app, p) else []
        except Exception as exc:  # noqa: BLE001
            log.error("policy lookup failed: %s", type(exc).__name__)
            scopes = []
        who = f"{p.tenant}/{p.agent}"
        claims: dict[str, Any] = {"principal": p, "iss": self.resource_url}
        return AccessToken(token=token, client_id=who, subject=who, scopes=scopes,
                           resource=self.resource_url, claims=claims)


__all__ = ["StoreTokenVerifier", "role_has_access", "SCOPE"]

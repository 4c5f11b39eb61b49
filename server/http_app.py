"""The HTTP face of the MCP server: one Starlette app, served by uvicorn.

Routes:

- ``/mcp`` — MCP streamable HTTP (the SDK's session manager).
- ``/sse`` (GET) and ``/messages/`` (POST) — the legacy HTTP+SSE transport.
- ``/healthz`` — store health as JSON (200 while every fragment can be read, 503 when
  fewer than k targets are healthy); no tenant data.
- ``/metrics`` — Prometheus text (see ``server/metrics.py``); no tenant data.
- ``/.well-known/oauth-protected-resource`` — RFC 9728 metadata naming this resource.

The MCP routes require ``Authorization: Bearer <agent token>`` (``server/auth.py`` has the
401/403 rules) and check ``Origin`` first: absent, loopback, or explicitly allowed.
When bound to a loopback address the ``Host`` header must name a loopback host too, which
stops DNS-rebinding pages from reaching the server through a name they control.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import urlsplit

import anyio
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.routes import build_resource_metadata_url, create_protected_resource_routes
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import SCOPE, StoreTokenVerifier
from .kv_http import kv_app
from .mcp_app import LodestoreMCP
from .transports import freeze_heap

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
DEFAULT_MAX_BODY = 16 << 20


@functools.lru_cache(maxsize=256)
def is_loopback(host: str) -> bool:
    h = host.strip("[]").lower()
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _hostname(hostport: str) -> str:
    if hostport.startswith("["):
        return hostport[1:].split("]", 1)[0]
    return hostport.rsplit(":", 1)[0] if hostport.count(":") == 1 else hostport


class OriginGuard:
    """Refuse foreign ``Origin`` headers (403) and, on loopback, foreign ``Host`` (421)."""

    def __init__(self, app: ASGIApp, allowed_origins: Iterable[str], check_host: bool,
                 on_refuse: Any = None) -> None:
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed_origins}
        self.check_host = check_host
        self.on_refuse = on_refuse

    def origin_ok(self, origin: str) -> bool:
        o = origin.rstrip("/").lower()
        if o in self.allowed or "*" in self.allowed:
            return True
        try:
            parts = urlsplit(o)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and bool(parts.hostname) and is_loopback(
            parts.hostname or "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            origin = headers.get("origin")
            if origin is not None and not self.origin_ok(origin):
                if self.on_refuse:
                    self.on_refuse(403, "origin")
                await JSONResponse({"error": "forbidden_origin", "error_description": (
                    "this Origin may not use the server; start it with --allow-origin "
                    "ORIGIN to allow a web client")}, status_code=403)(scope, receive, send)
                return
            if self.check_host:
                host = headers.get("host") or ""
                if not is_loopback(_hostname(host)):
                    if self.on_refuse:
                        self.on_refuse(421, "host")
                    await PlainTextResponse("Invalid Host header", status_code=421)(
                        scope, receive, send)
                    return
        await self.app(scope, receive, send)


class _CountRefusals:
    """Count the 401/403 answers of the auth layer, by reason, for /metrics."""

    def __init__(self, app: ASGIApp, metrics: Any) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                if message["status"] == 401:
                    has = any(k.lower() == b"authorization" for k, _v in scope.get("headers", ()))
                    self.metrics.refused(401, "invalid_token" if has else "missing_token")
                else:
                    self.metrics.refused(403, "no_access")
            await send(message)
        await self.app(scope, receive, counting_send)


class Health:
    """Store health, cached for a second (it touches every target)."""

    def __init__(self, mcp: LodestoreMCP) -> None:
        self.vol = mcp.app.vol
        self.cached: tuple[float, int, dict[str, Any]] | None = None

    def _probe(self) -> tuple[int, dict[str, Any]]:
        vol = self.vol
        healthy = 0
        targets = []
        for t in vol.targets:
            try:
                ok = bool(t.health().healthy)
            except Exception:  # noqa: BLE001 - a target that cannot answer is down
                ok = False
            healthy += ok
            targets.append({"id": t.id, "healthy": ok})
        k, m = vol.cfg.k, vol.cfg.m
        n = len(targets)
        if healthy >= n:
            status, code = "ok", 200
        elif healthy >= k:
            status, code = "degraded", 200
        else:
            status, code = "down", 503
        return code, {"status": status, "targets": targets, "healthy_targets": healthy,
                      "k": k, "m": m}

    async def endpoint(self, request: Request) -> Response:
        now = time.monotonic()
        if self.cached is None or self.cached[0] < now:
            code, body = await anyio.to_thread.run_sync(self._probe)
            self.cached = (now + 1.0, code, body)
        _, code, body = self.cached
        return JSONResponse(body, status_code=code)


def build_http_app(mcp: LodestoreMCP, *, public_url: str, bind_host: str = "127.0.0.1",
                   transports: Iterable[str] = ("mcp", "sse"), allowed_origins: Iterable[str] = (),
                   json_response: bool = False, max_body: int = DEFAULT_MAX_BODY,
                   stateless: bool = False) -> Starlette:
    """The whole HTTP app; ``public_url`` is the base URL clients use (the resource id)."""
    transports = set(transports)
    low = mcp.lowlevel
    metrics = mcp.metrics
    resource = public_url.rstrip("/")
    resource_url = AnyHttpUrl(resource)
    prm_url = build_resource_metadata_url(resource_url)
    verifier = StoreTokenVerifier(mcp.app, resource)
    # Host/Origin are checked by OriginGuard; the SDK's own check stays for Content-Type
    sdk_security = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    check_host = is_loopback(bind_host)

    def guarded(inner: ASGIApp) -> ASGIApp:
        return OriginGuard(_CountRefusals(RequireAuthMiddleware(inner, [SCOPE], prm_url), metrics),
                           allowed_origins, check_host, metrics.refused)

    routes: list[Route | Mount] = []
    manager: StreamableHTTPSessionManager | None = None
    if "mcp" in transports:
        manager = StreamableHTTPSessionManager(
            app=low, json_response=json_response, stateless=stateless,
            security_settings=sdk_security, max_request_body_size=max_body)
        routes.append(Route("/mcp", endpoint=guarded(StreamableHTTPASGIApp(manager))))
    if "sse" in transports:
        sse = SseServerTransport("/messages/", security_settings=sdk_security,
                                 max_request_body_size=max_body)

        async def handle_sse(scope: Scope, receive: Receive, send: Send) -> None:
            with contextlib.suppress(ValueError):  # refused by the transport: answered
                async with sse.connect_sse(scope, receive, send) as (read, write):
                    await low.run(read, write, low.create_initialization_options())

        routes.append(Route("/sse", endpoint=guarded(handle_sse), methods=["GET"]))
        routes.append(Mount("/messages/", app=guarded(sse.handle_post_message)))
    health = Health(mcp)

    async def metrics_endpoint(request: Request) -> Response:
        return PlainTextResponse(metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    # the token warehouse (KV-cache blocks): its own bearer auth and JSON errors
    routes.append(Mount("/v1/kv", app=OriginGuard(
        kv_app(mcp.app.gateway, resource_metadata_url=str(prm_url)), allowed_origins,
        check_host, metrics.refused)))
    routes.append(Route("/healthz", endpoint=health.endpoint, methods=["GET"]))
    routes.append(Route("/metrics", endpoint=metrics_endpoint, methods=["GET"]))
    routes.extend(create_protected_resource_routes(
        resource_url=resource_url, authorization_servers=[resource_url],
        scopes_supported=[SCOPE], resource_name="Lodestore"))

    async def index(request: Request) -> Response:
        return JSONResponse({"service": "lodestore", "mcp": f"{resource}/mcp",
                             "sse": f"{resource}/sse", "auth": "Authorization: Bearer <token>",
                             "health": f"{resource}/healthz"})
    routes.append(Route("/", endpoint=index, methods=["GET"]))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        freeze_heap()
        if manager is None:
            yield
            return
        async with manager.run():
            yield

    middleware = [
        Middleware(AuthenticationMiddleware,
                   backend=BearerAuthBackend(verifier, resource_server_url=resource_url),
                   on_error=_auth_error),
        Middleware(AuthContextMiddleware),
    ]
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


def _auth_error(conn: Any, exc: Exception) -> Response:
    return JSONResponse({"error": "invalid_request", "error_description": str(exc)},
                        status_code=400)


def connection_help(public_url: str, transports: Iterable[str]) -> str:
    base = public_url.rstrip("/")
    lines = []
    t = set(transports)
    if "mcp" in t:
        lines.append(f"  streamable HTTP  {base}/mcp")
    if "sse" in t:
        lines.append(f"  legacy SSE       {base}/sse")
    lines.append(f"  token warehouse  {base}/v1/kv   (KV-cache blocks; server/kv_client.py)")
    lines.append(f"  health           {base}/healthz   metrics {base}/metrics")
    return "\n".join(lines)


__all__ = ["build_http_app", "OriginGuard", "is_loopback", "connection_help"]

"""The token warehouse over HTTP: ``/v1/kv/...``, bearer auth, tenant-scoped.

Every request carries ``Authorization: Bearer <agent token>``; the tenant is the token's,
never a parameter, so one tenant's blocks are invisible to every other. Missing or invalid
tokens get 401 with ``WWW-Authenticate``; errors are JSON ``{"error": code,
"error_description": what was wrong and what to do}``. Model ids contain '/', so they go in
a query parameter (``?model=``), in the JSON body, or at the end of ``/models/{model}``.

Routes (all under ``/v1/kv``):

==========  ========================  =====================================================
GET         /models                   the tenant's models
PUT         /models/{model}           register: JSON ``{block_size, block_bytes?, dtype?,
                                      hash_seed?, root?}`` (idempotent)
GET/DELETE  /models/{model}           manifest / remove the model and all its blocks
POST        /blocks                   put: a KV frame (``server/kv_client.py``) whose header
                                      has ``model, token_ids, block_size?, start_block?,
                                      hashes?, ttl?, extra_keys?``
POST        /blocks/get               JSON ``{model, hashes}`` → KV frame (-1: absent)
POST        /blocks/delete            JSON ``{model, hashes}`` → ``{deleted}``
GET         /blocks?model=            list: ``{blocks, next_cursor}`` (``cursor``, ``limit``)
GET/HEAD    /blocks/{hash}?model=     one block's bytes / 200 or 404 (exists)
DELETE      /blocks/{hash}?model=     remove one block
POST        /lookup                   JSON ``{model, token_ids, block_size?, extra_keys?}``
                                      → ``{tokens, blocks, block_size, hashes}``
POST        /hashes                   JSON ``{model, token_ids, extra_keys?}`` → ``{hashes}``
PUT/GET/    /objects?model=&key=      keyed objects (engines that name their own chunks,
HEAD/DELETE                           e.g. LMCache); GET without ``key`` lists the keys
POST        /evict                    drop the tenant's expired and over-capacity blocks
==========  ========================  =====================================================

A 404 for an absent block or object carries ``X-KV-Absent: 1`` (a 404 without it means
the model itself is unknown). Request bodies are bounded (``max_body``, 413 past it).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from governance.errors import Forbidden, Unauthorized
from governance.gateway import Gateway
from governance.principals import Principal
from governance.warehouse import WarehouseDoor
from storage.errors import (
    InvalidArgument,
    InvalidPath,
    NotFound,
    StorageError,
    UnknownTenant,
)
from storage.warehouse import ModelMismatch

from .kv_client import FRAME_TYPE, FrameError, pack_frame, unpack_frame

log = logging.getLogger("lodestore.kv")

DEFAULT_MAX_KV_BODY = 512 << 20
MAX_JSON_BODY = 64 << 20

Handler = Callable[[Request, Principal], Awaitable[Response]]


class HTTPError(Exception):
    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}
        super().__init__(message)


def _error_response(status: int, code: str, message: str,
                    headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "error_description": message}, status_code=status,
                        headers=headers)


def _map_error(exc: BaseException) -> tuple[int, dict[str, str]]:
    from governance.audit import AuditWriteError
    from governance.qos import QuotaExceeded, RateLimited

    if isinstance(exc, RateLimited):
        return 429, {"Retry-After": str(max(1, math.ceil(exc.retry_after_ms / 1000)))}
    if isinstance(exc, Unauthorized):
        return 401, {}
    if isinstance(exc, Forbidden | PermissionError):
        return 403, {}
    if isinstance(exc, QuotaExceeded):
        return 507, {}
    if isinstance(exc, ModelMismatch):
        return 409, {}
    if isinstance(exc, InvalidArgument | InvalidPath):
        return 400, {}
    if isinstance(exc, NotFound | UnknownTenant):
        return 404, {}
    if isinstance(exc, AuditWriteError):
        return 503, {}
    return 500, {}


class _PartsResponse(Response):
    """A response sent as several body pieces (no join of large blocks)."""

    def __init__(self, parts: list[bytes | memoryview], media_type: str) -> None:
        super().__init__(content=b"", media_type=media_type)
        self.parts = parts
        self.headers["content-length"] = str(sum(len(p) for p in parts))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        for i, p in enumerate(self.parts):
            await send({"type": "http.response.body", "body": bytes(p),
                        "more_body": i < len(self.parts) - 1})
        if not self.parts:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def _absent() -> Response:
    return JSONResponse({"error": "not_found", "error_description": "no such block or object "
                         "(never stored, deleted, evicted or expired)"}, status_code=404,
                        headers={"X-KV-Absent": "1"})


class KVApi:
    """The ``/v1/kv`` routes over one ``WarehouseDoor``."""

    def __init__(self, gateway: Gateway, door: WarehouseDoor | None = None, *,
                 max_body: int = DEFAULT_MAX_KV_BODY, resource_metadata_url: str | None = None
                 ) -> None:
        self.gateway = gateway
        self.door = door or WarehouseDoor.for_gateway(gateway)
        self.max_body = max_body
        self.prm = resource_metadata_url

    # -- plumbing ----------------------------------------------------------------------

    def _www(self, error: str, description: str) -> dict[str, str]:
        v = f'Bearer realm="lodestore", error="{error}", error_description="{description}"'
        if self.prm:
            v += f', resource_metadata="{self.prm}"'
        return {"WWW-Authenticate": v}

    async def _principal(self, request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        # the app-wide bearer middleware may have verified this token already
        at = getattr(request.scope.get("user"), "access_token", None)
        claims = getattr(at, "claims", None)
        if (isinstance(claims, dict) and isinstance(claims.get("principal"), Principal)
                and getattr(at, "token", None) == token and token):
            return claims["principal"]
        if scheme.lower() != "bearer" or not token:
            raise HTTPError(401, "invalid_token",
                            "send 'Authorization: Bearer <agent token>' (mint one with "
                            "`lodestore agent add TENANT NAME`)",
                            self._www("invalid_token", "Authentication required"))
        try:
            return await anyio.to_thread.run_sync(self.gateway.authenticate, token)
        except Unauthorized as exc:
            raise HTTPError(401, "invalid_token", str(exc),
                            self._www("invalid_token", "Invalid or revoked token")) from None

    def route(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                p = await self._principal(request)
                return await handler(request, p)
            except HTTPError as exc:
                return _error_response(exc.status, exc.code, exc.message, exc.headers)
            except FrameError as exc:
                return _error_response(400, "bad_frame", str(exc))
            except StorageError as exc:
                status, headers = _map_error(exc)
                if status == 500:
                    log.error("kv request failed: %s", exc)
                return _error_response(status, getattr(exc, "code", "error"), str(exc), headers)
            except Exception:  # noqa: BLE001 - never a stack trace to a client
                log.exception("kv request failed")
                return _error_response(500, "internal_error",
                                       "the server failed on this request; see its log")
        return endpoint

    async def _body(self, request: Request, limit: int) -> bytearray:
        n = request.headers.get("content-length")
        if n is not None and n.isdigit() and int(n) > limit:
            raise HTTPError(413, "body_too_large",
                            f"the body is {int(n):,} bytes, over this server's {limit:,}-byte "
                            "limit; send fewer blocks per request")
        buf = bytearray()
        async for piece in request.stream():
            buf += piece
            if len(buf) > limit:
                raise HTTPError(413, "body_too_large",
                                f"the body is over this server's {limit:,}-byte limit; send "
                                "fewer blocks per request")
        return buf

    async def _json(self, request: Request) -> dict[str, Any]:
        raw = await self._body(request, min(self.max_body, MAX_JSON_BODY))
        try:
            doc = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            raise HTTPError(400, "bad_json", "the body must be a JSON object") from None
        if not isinstance(doc, dict):
            raise HTTPError(400, "bad_json", "the body must be a JSON object")
        return doc

    @staticmethod
    def _model(value: Any) -> str:
        if not isinstance(value, str) or not value:
            raise HTTPError(400, "invalid_argument",
                            "name the model: ?model=<id> or \"model\" in the body")
        return value

    @staticmethod
    def _float(request: Request, name: str) -> float | None:
        v = request.query_params.get(name)
        if v is None:
            return None
        try:
            return float(v)
        except ValueError:
            raise HTTPError(400, "invalid_argument", f"{name} must be a number") from None

    # -- models ------------------------------------------------------------------------

    async def list_models(self, request: Request, p: Principal) -> Response:
        models = await self.door.alist_models(p)
        return JSONResponse({"models": [m.as_dict() for m in models]})

    async def model(self, request: Request, p: Principal) -> Response:
        model = self._model(request.path_params.get("model"))
        if request.method == "GET":
            return JSONResponse((await self.door.amodel_info(p, model)).as_dict())
        if request.method == "DELETE":
            return JSONResponse({"deleted": await self.door.adelete_model(p, model)})
        doc = await self._json(request)
        root = doc.get("root")
        try:
            root_b = bytes.fromhex(root) if isinstance(root, str) else None
        except ValueError:
            raise HTTPError(400, "invalid_argument", "root must be 64 hex digits") from None
        allowed = {"block_size", "block_bytes", "dtype", "hash_seed", "root"}
        extra = set(doc) - allowed
        if extra:
            raise HTTPError(400, "invalid_argument",
                            f"unknown fields {sorted(extra)}; allowed: {sorted(allowed)}")
        info = await self.door.aregister_model(
            p, model, doc.get("block_size"), block_bytes=doc.get("block_bytes"),
            dtype=doc.get("dtype"), hash_seed=doc.get("hash_seed"), root_hash=root_b)
        return JSONResponse(info.as_dict())

    # -- blocks ------------------------------------------------------------------------

    async def put_blocks(self, request: Request, p: Principal) -> Response:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        if ctype not in (FRAME_TYPE, "application/octet-stream"):
            raise HTTPError(415, "unsupported_media_type",
                            f"send blocks as a KV frame (Content-Type: {FRAME_TYPE}); see "
                            "server/kv_client.py")
        body = await self._body(request, self.max_body)
        header, parts = unpack_frame(body)
        if any(x is None for x in parts) or not parts:
            raise HTTPError(400, "kv_bad_block", "every block of a put needs bytes (no -1 sizes)")
        res = await self.door.aput_blocks(
            p, self._model(header.get("model")), header.get("token_ids"),
            parts,  # type: ignore[arg-type]
            header.get("block_size"), start_block=header.get("start_block", 0),
            hashes=header.get("hashes"), ttl=header.get("ttl"),
            extra_keys=header.get("extra_keys"))
        return JSONResponse({"hashes": [h.hex() for h in res.hashes], "written": res.written,
                             "bytes_written": res.bytes_written})

    async def get_blocks(self, request: Request, p: Principal) -> Response:
        doc = await self._json(request)
        blocks = await self.door.aget_blocks(p, self._model(doc.get("model")),
                                             doc.get("hashes"))  # type: ignore[arg-type]
        return _PartsResponse(pack_frame({"count": len(blocks)}, blocks), FRAME_TYPE)

    async def delete_blocks(self, request: Request, p: Principal) -> Response:
        doc = await self._json(request)
        hashes = doc.get("hashes")
        if not isinstance(hashes, list):
            raise HTTPError(400, "invalid_argument", "hashes must be a list of hex hashes")
        n = await self.door.adelete_blocks(p, self._model(doc.get("model")), hashes)
        return JSONResponse({"deleted": n})

    async def list_blocks(self, request: Request, p: Principal) -> Response:
        q = request.query_params
        try:
            limit = int(q.get("limit", "1000"))
        except ValueError:
            raise HTTPError(400, "invalid_argument", "limit must be an integer") from None
        items, nxt = await self.door.alist_blocks(p, self._model(q.get("model")),
                                                  q.get("cursor"), limit)
        return JSONResponse({"blocks": [b.as_dict() for b in items], "next_cursor": nxt})

    async def block(self, request: Request, p: Principal) -> Response:
        model = self._model(request.query_params.get("model"))
        h = request.path_params["hash"]
        if request.method == "HEAD":
            ok = await self.door.aexists(p, model, h)
            return Response(status_code=200) if ok else Response(
                status_code=404, headers={"X-KV-Absent": "1"})
        if request.method == "DELETE":
            return JSONResponse({"deleted": await self.door.adelete_blocks(p, model, [h])})
        data = (await self.door.aget_blocks(p, model, [h]))[0]
        if data is None:
            return _absent()
        return Response(data, media_type="application/octet-stream")

    async def lookup(self, request: Request, p: Principal) -> Response:
        doc = await self._json(request)
        model = self._model(doc.get("model"))
        tokens, hashes = await self.door.alookup(p, model, doc.get("token_ids"),
                                                 doc.get("block_size"), doc.get("extra_keys"))
        bs = tokens // len(hashes) if hashes else doc.get("block_size")
        return JSONResponse({"tokens": tokens, "blocks": len(hashes), "block_size": bs,
                             "hashes": [h.hex() for h in hashes]})

    async def hashes(self, request: Request, p: Principal) -> Response:
        doc = await self._json(request)
        hs = await self.door.ablock_hashes(p, self._model(doc.get("model")),
                                           doc.get("token_ids"), doc.get("extra_keys"))
        return JSONResponse({"hashes": [h.hex() for h in hs]})

    # -- keyed objects -----------------------------------------------------------------

    async def objects(self, request: Request, p: Principal) -> Response:
        q = request.query_params
        key = q.get("key")
        if request.method == "GET" and key is None:
            model = q.get("model")
            return JSONResponse({"keys": await self.door.alist_objects(p, model)})
        model = self._model(q.get("model"))
        if key is None:
            raise HTTPError(400, "invalid_argument", "name the object: ?key=<key>")
        if request.method == "PUT":
            data = await self._body(request, self.max_body)
            n = await self.door.aput_object(p, model, key, bytes(data), ttl=self._float(request,
                                                                                        "ttl"))
            return JSONResponse({"size": n})
        if request.method == "HEAD":
            ok = await self.door.ahas_object(p, model, key)
            return Response(status_code=200 if ok else 404,
                            headers={} if ok else {"X-KV-Absent": "1"})
        if request.method == "DELETE":
            return JSONResponse({"deleted": await self.door.adelete_object(p, model, key)})
        data = await self.door.aget_object(p, model, key)
        if data is None:
            return _absent()
        return Response(data, media_type="application/octet-stream")

    async def evict(self, request: Request, p: Principal) -> Response:
        return JSONResponse(await self.door.aevict(p))

    # -- the app -----------------------------------------------------------------------

    def routes(self) -> list[Route]:
        r = self.route
        return [
            Route("/models", r(self.list_models), methods=["GET"]),
            Route("/models/{model:path}", r(self.model), methods=["GET", "PUT", "DELETE"]),
            Route("/blocks/get", r(self.get_blocks), methods=["POST"]),
            Route("/blocks/delete", r(self.delete_blocks), methods=["POST"]),
            Route("/blocks", r(self.put_blocks), methods=["POST"]),
            Route("/blocks", r(self.list_blocks), methods=["GET"]),
            Route("/blocks/{hash}", r(self.block), methods=["GET", "HEAD", "DELETE"]),
            Route("/lookup", r(self.lookup), methods=["POST"]),
            Route("/hashes", r(self.hashes), methods=["POST"]),
            Route("/objects", r(self.objects), methods=["GET", "HEAD", "PUT", "DELETE"]),
            Route("/evict", r(self.evict), methods=["POST"]),
        ]

    def app(self) -> Starlette:
        """An ASGI app to mount at ``/v1/kv``."""
        return Starlette(routes=self.routes())


def kv_app(gateway: Gateway, **settings: Any) -> Starlette:
    """The ``/v1/kv`` app for ``gateway`` (mount it at ``/v1/kv``)."""
    return KVApi(gateway, **settings).app()


__all__ = ["DEFAULT_MAX_KV_BODY", "KVApi", "kv_app"]

"""Python client of the token warehouse over HTTP (``/v1/kv/...``), and the wire frame.

Blocks travel as raw bytes, not base64 JSON: several blocks and their JSON header go in one
*KV frame* (``application/vnd.lodestore.kv-frame``)::

    b"LKV1" | header length (u32, big-endian) | header (UTF-8 JSON) | block bytes ...

The header's ``sizes`` lists each part's byte length in order (-1: absent, no bytes), so a
reader slices the payload without copying it.

    from server.kv_client import KVClient
    kv = KVClient("http://127.0.0.1:8765", token)
    kv.register_model("HuggingFaceTB/SmolLM2-135M", block_size=16)
    kv.put_blocks(model, token_ids, [block0, block1])
    cached_tokens = kv.lookup(model, token_ids)
    blocks = kv.get_blocks(model, kv.block_hashes(model, token_ids)[:cached_tokens // 16])
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import httpx

FRAME_TYPE = "application/vnd.lodestore.kv-frame"
FRAME_MAGIC = b"LKV1"
MAX_FRAME_HEADER = 16 << 20
_LEN = struct.Struct(">I")


class FrameError(ValueError):
    """A malformed or truncated KV frame."""


def pack_frame(header: dict[str, Any], parts: Sequence[bytes | bytearray | memoryview | None]
               ) -> list[bytes | memoryview]:
    """The pieces of a frame (join them, or send them one after another)."""
    head = dict(header)
    head["sizes"] = [-1 if p is None else len(p) for p in parts]
    h = json.dumps(head, separators=(",", ":")).encode()
    out: list[bytes | memoryview] = [FRAME_MAGIC + _LEN.pack(len(h)) + h]
    out.extend(memoryview(p) for p in parts if p is not None)
    return out


def unpack_frame(body: bytes | bytearray | memoryview
                 ) -> tuple[dict[str, Any], list[memoryview | None]]:
    """Header and parts (views into ``body``) of a frame, or ``FrameError``."""
    mv = memoryview(body)
    if len(mv) < 8 or bytes(mv[:4]) != FRAME_MAGIC:
        raise FrameError("not a KV frame: the body must start with b'LKV1' and a header length")
    (n,) = _LEN.unpack(mv[4:8])
    if n > MAX_FRAME_HEADER or 8 + n > len(mv):
        raise FrameError(f"truncated KV frame: the header says {n} header bytes but the body "
                         f"has {len(mv) - 8}")
    try:
        header = json.loads(bytes(mv[8:8 + n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"the KV frame header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise FrameError("the KV frame header must be a JSON object")
    sizes = header.get("sizes", [])
    if not isinstance(sizes, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= -1 for s in sizes):
        raise FrameError("the KV frame header's 'sizes' must be a list of byte counts (-1: none)")
    total = sum(s for s in sizes if s > 0)
    have = len(mv) - 8 - n
    if total != have:
        raise FrameError(f"{'truncated' if have < total else 'oversized'} KV frame: the header "
                         f"lists {total} bytes of blocks but the body carries {have}")
    parts: list[memoryview | None] = []
    pos = 8 + n
    for s in sizes:
        if s < 0:
            parts.append(None)
        else:
            parts.append(mv[pos:pos + s])
            pos += s
    return header, parts


class KVError(Exception):
    """An error answer of the warehouse: ``status``, ``code`` and the server's message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(f"{status} {code}: {message}")


def _hex(h: bytes | str) -> str:
    return h.hex() if isinstance(h, bytes | bytearray) else str(h)


class KVClient:
    """Blocking client; one ``httpx.Client`` (connection pool) per instance."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 120.0,
                 client: httpx.Client | None = None) -> None:
        self.base = base_url.rstrip("/") + "/v1/kv"
        self.http = client or httpx.Client(timeout=timeout)
        self.http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> KVClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    def _check(self, r: httpx.Response, ok: tuple[int, ...] = (200,)) -> httpx.Response:
        if r.status_code in ok:
            return r
        try:
            doc = r.json()
            code, msg = doc.get("error", "error"), doc.get("error_description", r.text)
        except ValueError:
            code, msg = "error", r.text
        raise KVError(r.status_code, code, msg)

    def _json(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        r = self.http.request(method, self.base + path, json=body,
                              params={k: v for k, v in params.items() if v is not None})
        return self._check(r).json()

    # -- models ------------------------------------------------------------------------

    def register_model(self, model: str, block_size: int | None = None, *,
                       block_bytes: int | None = None, dtype: str | None = None,
                       hash_seed: str | None = None, root: bytes | None = None
                       ) -> dict[str, Any]:
        body = {"block_size": block_size, "block_bytes": block_bytes, "dtype": dtype,
                "hash_seed": hash_seed, "root": root.hex() if root else None}
        return self._json("PUT", "/models/" + quote(model, safe="/"),
                          {k: v for k, v in body.items() if v is not None})

    def model_info(self, model: str) -> dict[str, Any]:
        return self._json("GET", "/models/" + quote(model, safe="/"))

    def list_models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/models")["models"]

    def delete_model(self, model: str) -> int:
        return self._json("DELETE", "/models/" + quote(model, safe="/"))["deleted"]

    # -- blocks ------------------------------------------------------------------------

    def put_blocks(self, model: str, token_ids: Sequence[int], blocks: Sequence[bytes],
                   block_size: int | None = None, *, start_block: int = 0,
                   hashes: Sequence[bytes | str] | None = None, ttl: float | None = None,
                   extra_keys: Any = None) -> list[bytes]:
        """Store blocks ``start_block ...`` of the prefix ``token_ids``; returns their hashes."""
        header: dict[str, Any] = {"model": model, "token_ids": list(token_ids),
                                  "start_block": start_block}
        if block_size is not None:
            header["block_size"] = block_size
        if hashes is not None:
            header["hashes"] = [_hex(h) for h in hashes]
        if ttl is not None:
            header["ttl"] = ttl
        if extra_keys is not None:
            header["extra_keys"] = extra_keys
        body = b"".join(pack_frame(header, blocks))
        r = self.http.post(self.base + "/blocks", content=body,
                           headers={"Content-Type": FRAME_TYPE})
        return [bytes.fromhex(h) for h in self._check(r).json()["hashes"]]

    def get_blocks(self, model: str, hashes: Sequence[bytes | str]) -> list[bytes | None]:
        """The blocks with these hashes; None where absent or expired."""
        r = self.http.post(self.base + "/blocks/get",
                           json={"model": model, "hashes": [_hex(h) for h in hashes]})
        _h, parts = unpack_frame(self._check(r).content)
        return [None if p is None else bytes(p) for p in parts]

    def get_block(self, model: str, h: bytes | str) -> bytes | None:
        r = self.http.get(f"{self.base}/blocks/{_hex(h)}", params={"model": model})
        if r.status_code == 404 and r.headers.get("x-kv-absent") == "1":
            return None
        return self._check(r).content

    def lookup(self, model: str, token_ids: Sequence[int], *, block_size: int | None = None,
               extra_keys: Any = None) -> int:
        """Tokens covered by the longest cached prefix of ``token_ids``."""
        return self.lookup_ex(model, token_ids, block_size=block_size,
                              extra_keys=extra_keys)["tokens"]

    def lookup_ex(self, model: str, token_ids: Sequence[int], *, block_size: int | None = None,
                  extra_keys: Any = None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "token_ids": list(token_ids)}
        if block_size is not None:
            body["block_size"] = block_size
        if extra_keys is not None:
            body["extra_keys"] = extra_keys
        return self._json("POST", "/lookup", body)

    def block_hashes(self, model: str, token_ids: Sequence[int], *,
                     extra_keys: Any = None) -> list[bytes]:
        body: dict[str, Any] = {"model": model, "token_ids": list(token_ids)}
        if extra_keys is not None:
            body["extra_keys"] = extra_keys
        return [bytes.fromhex(h) for h in self._json("POST", "/hashes", body)["hashes"]]

    def exists(self, model: str, h: bytes | str) -> bool:
        r = self.http.head(f"{self.base}/blocks/{_hex(h)}", params={"model": model})
        if r.status_code == 404 and r.headers.get("x-kv-absent") == "1":
            return False
        self._check(r)
        return True

    def delete(self, model: str, hashes: Sequence[bytes | str]) -> int:
        return self._json("POST", "/blocks/delete",
                          {"model": model, "hashes": [_hex(h) for h in hashes]})["deleted"]

    def list(self, model: str, *, cursor: str | None = None, limit: int = 1000
             ) -> tuple[list[dict[str, Any]], str | None]:
        doc = self._json("GET", "/blocks", model=model, cursor=cursor, limit=limit)
        return doc["blocks"], doc.get("next_cursor")

    # -- keyed objects -----------------------------------------------------------------

    def put_object(self, model: str, key: str, data: bytes, *, ttl: float | None = None) -> int:
        params: dict[str, Any] = {"model": model, "key": key}
        if ttl is not None:
            params["ttl"] = ttl
        r = self.http.put(self.base + "/objects", params=params, content=data,
                          headers={"Content-Type": "application/octet-stream"})
        return self._check(r).json()["size"]

    def get_object(self, model: str, key: str) -> bytes | None:
        r = self.http.get(self.base + "/objects", params={"model": model, "key": key})
        if r.status_code == 404 and r.headers.get("x-kv-absent") == "1":
            return None
        return self._check(r).content

    def has_object(self, model: str, key: str) -> bool:
        r = self.http.head(self.base + "/objects", params={"model": model, "key": key})
        if r.status_code == 404:
            return False
        self._check(r)
        return True

    def delete_object(self, model: str, key: str) -> bool:
        return self._json("DELETE", "/objects", model=model, key=key)["deleted"]

    def list_objects(self, model: str | None = None) -> list[str]:
        return self._json("GET", "/objects", model=model)["keys"]

    def evict(self) -> dict[str, int]:
        return self._json("POST", "/evict")


class AsyncKVClient:
    """The async form of the calls an inference connector needs on its event loop."""

    def __init__(self, base_url: str, token: str, *, timeout: float = 120.0,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base = base_url.rstrip("/") + "/v1/kv"
        self.http = client or httpx.AsyncClient(timeout=timeout)
        self.http.headers["Authorization"] = f"Bearer {token}"

    async def aclose(self) -> None:
        await self.http.aclose()

    @staticmethod
    def _raise(r: httpx.Response) -> None:
        try:
            doc = r.json()
            code, msg = doc.get("error", "error"), doc.get("error_description", r.text)
        except ValueError:
            code, msg = "error", r.text
        raise KVError(r.status_code, code, msg)

    async def put_object(self, model: str, key: str, data: bytes | memoryview, *,
                         ttl: float | None = None) -> int:
        params: dict[str, Any] = {"model": model, "key": key}
        if ttl is not None:
            params["ttl"] = ttl
        r = await self.http.put(self.base + "/objects", params=params, content=bytes(data),
                                headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 200:
            self._raise(r)
        return r.json()["size"]

    async def get_object(self, model: str, key: str) -> bytes | None:
        r = await self.http.get(self.base + "/objects", params={"model": model, "key": key})
        if r.status_code == 404 and r.headers.get("x-kv-absent") == "1":
            return None
        if r.status_code != 200:
            self._raise(r)
        return r.content

    async def has_object(self, model: str, key: str) -> bool:
        r = await self.http.head(self.base + "/objects", params={"model": model, "key": key})
        if r.status_code == 404:
            return False
        if r.status_code != 200:
            self._raise(r)
        return True

    async def delete_object(self, model: str, key: str) -> bool:
        r = await self.http.delete(self.base + "/objects", params={"model": model, "key": key})
        if r.status_code != 200:
            self._raise(r)
        return bool(r.json()["deleted"])

    async def list_objects(self, model: str | None = None) -> list[str]:
        params = {"model": model} if model is not None else {}
        r = await self.http.get(self.base + "/objects", params=params)
        if r.status_code != 200:
            self._raise(r)
        return r.json()["keys"]


__all__ = ["FRAME_TYPE", "AsyncKVClient", "FrameError", "KVClient", "KVError", "pack_frame",
           "unpack_frame"]

"""Lodestore as an LMCache remote backend: a connector with the shape of LMCache's
``RemoteConnector`` (``lmcache/v1/storage_backend/connector/base_connector.py``).

LMCache names its own KV chunks (``CacheEngineKey``: model, world size, worker, chunk
hash, dtype); each one is stored as a keyed object of the token warehouse, under the
key's model and ``key.to_string()``, over ``/v1/kv/objects`` with the agent's bearer
token, so it is tenant-scoped, audited, rate limited, erasure-coded and deduplicated like
any other KV block. The stored bytes are a KV frame (``server/kv_client.py``): a JSON header
with the memory object's shapes, dtypes and format, then its raw bytes.

With LMCache installed, ``LodestoreConnector`` subclasses its ``RemoteConnector`` and plugs
in as an external connector::

    remote_url: "external://lodestore:0/server.lmcache_connector/?connector_name=LodestoreConnector"
    extra_config: {lodestore_url: "http://127.0.0.1:8765", lodestore_token: "lds_..."}

(or ``LODESTORE_URL`` / ``LODESTORE_TOKEN`` in the environment). Without LMCache the same
class works on any memory object with ``byte_array`` and ``get_shapes/get_dtypes/
get_memory_format`` (or ``metadata``), returning ``BytesMemoryObj`` from ``get``.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any

from .kv_client import AsyncKVClient, KVClient, pack_frame, unpack_frame

try:  # LMCache is optional: the connector keeps its shape without it
    from lmcache.v1.storage_backend.connector.base_connector import (
        RemoteConnector as _RemoteConnector,
    )

    HAVE_LMCACHE = True
except Exception:  # noqa: BLE001 - not installed, or its native parts do not load here
    _RemoteConnector = object  # type: ignore[assignment,misc]
    HAVE_LMCACHE = False

FRAME_KIND = "lmcache.memory_obj.v1"


def _dtype_name(dt: Any) -> str | None:
    if dt is None:
        return None
    return str(dt).removeprefix("torch.")


def _dtype_of(name: str | None) -> Any:
    if name is None:
        return None
    try:
        import torch

        return getattr(torch, name)
    except (ImportError, AttributeError):
        return name


def _shape_of(dims: list[int]) -> Any:
    try:
        import torch

        return torch.Size(dims)
    except ImportError:
        return tuple(dims)


def _fmt_of(value: Any) -> Any:
    if value is None:
        return None
    try:
        from lmcache.v1.memory_management import MemoryFormat

        return MemoryFormat(value)
    except Exception:  # noqa: BLE001 - without LMCache the plain value is the format
        return value


@dataclass
class BytesMemoryObj:
    """What ``get`` returns when there is no LMCache CPU backend to allocate from."""

    data: bytes
    shapes: list[Any] = field(default_factory=list)
    dtypes: list[Any] = field(default_factory=list)
    fmt: Any = None

    @property
    def byte_array(self) -> memoryview:
        return memoryview(self.data)

    def get_shapes(self) -> list[Any]:
        return self.shapes

    def get_dtypes(self) -> list[Any]:
        return self.dtypes

    def get_memory_format(self) -> Any:
        return self.fmt

    def get_size(self) -> int:
        return len(self.data)


def _describe(memory_obj: Any) -> dict[str, Any]:
    """Shapes, dtypes and format of an LMCache memory object (any version's accessors)."""
    if hasattr(memory_obj, "get_shapes"):
        shapes, dtypes = memory_obj.get_shapes(), memory_obj.get_dtypes()
    elif hasattr(memory_obj, "get_shape"):
        shapes, dtypes = [memory_obj.get_shape()], [memory_obj.get_dtype()]
    else:
        meta = getattr(memory_obj, "metadata", None) or getattr(memory_obj, "meta", None)
        shapes = [getattr(meta, "shape", None)] if meta is not None else []
        dtypes = [getattr(meta, "dtype", None)] if meta is not None else []
    fmt = (memory_obj.get_memory_format() if hasattr(memory_obj, "get_memory_format")
           else getattr(getattr(memory_obj, "metadata", None), "fmt", None))
    return {"kind": FRAME_KIND,
            "shapes": [[int(d) for d in s] for s in shapes if s is not None],
            "dtypes": [_dtype_name(d) for d in dtypes],
            "fmt": int(getattr(fmt, "value", fmt)) if fmt is not None else None}


def _bytes_view(buf: Any) -> memoryview:
    """A plain unsigned-byte view: LMCache's ``byte_array`` is a ctypes view of format
    '<B', which slice assignment from bytes refuses."""
    mv = memoryview(buf)
    return mv if mv.format == "B" else mv.cast("B")


def _key_parts(key: Any) -> tuple[str, str]:
    """(model id, key string) of a ``CacheEngineKey`` (or any key with ``to_string``)."""
    s = key.to_string() if hasattr(key, "to_string") else str(key)
    model = getattr(key, "model_name", None) or s.split("@", 1)[0] or "lmcache"
    return str(model), s


class LodestoreConnector(_RemoteConnector):  # type: ignore[misc,valid-type]
    """LMCache ``RemoteConnector`` over Lodestore's ``/v1/kv`` HTTP API."""

    def __init__(self, url: str | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 local_cpu_backend: Any = None, config: Any = None, *,
                 token: str | None = None, ttl: float | None = None) -> None:
        extra = (getattr(config, "extra_config", None) or {}) if config is not None else {}
        self.url = (url if url and url.startswith("http") else None) or extra.get(
            "lodestore_url") or os.environ.get("LODESTORE_URL", "http://127.0.0.1:8765")
        token = token or extra.get("lodestore_token") or os.environ.get("LODESTORE_TOKEN")
        if not token:
            raise ValueError("LodestoreConnector needs an agent token: pass token=, set "
                             "extra_config.lodestore_token, or LODESTORE_TOKEN")
        if HAVE_LMCACHE and local_cpu_backend is not None:
            try:  # LMCache >= 0.3: shapes and metadata sizes from the engine metadata
                super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
            except TypeError:
                super().__init__()
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self.ttl = ttl if ttl is not None else extra.get("lodestore_ttl")
        self._token = token
        self._aclient: AsyncKVClient | None = None
        self._client: KVClient | None = None

    def __repr__(self) -> str:
        return f"<LodestoreConnector {self.url}>"

    # -- clients -----------------------------------------------------------------------

    @property
    def aclient(self) -> AsyncKVClient:
        if self._aclient is None:
            self._aclient = AsyncKVClient(self.url, self._token)
        return self._aclient

    @property
    def client(self) -> KVClient:
        if self._client is None:
            self._client = KVClient(self.url, self._token)
        return self._client

    # -- the RemoteConnector contract --------------------------------------------------

    async def exists(self, key: Any) -> bool:
        model, k = _key_parts(key)
        return await self.aclient.has_object(model, k)

    def exists_sync(self, key: Any) -> bool:
        model, k = _key_parts(key)
        return self.client.has_object(model, k)

    async def get(self, key: Any) -> Any:
        """The memory object stored under ``key``, or None if absent (or unallocatable)."""
        model, k = _key_parts(key)
        data = await self.aclient.get_object(model, k)
        if data is None:
            return None
        return self._to_memory_obj(data)

    async def put(self, key: Any, memory_obj: Any) -> None:
        model, k = _key_parts(key)
        await self.aclient.put_object(model, k, self._to_bytes(memory_obj), ttl=self.ttl)

    async def list(self) -> list[str]:
        return await self.aclient.list_objects()

    async def close(self) -> None:
        if self._aclient is not None:
            await self._aclient.aclose()
            self._aclient = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def remove_sync(self, key: Any) -> bool:
        model, k = _key_parts(key)
        return self.client.delete_object(model, k)

    # -- memory objects <-> stored bytes ------------------------------------------------

    @staticmethod
    def _to_bytes(memory_obj: Any) -> bytes:
        return b"".join(pack_frame(_describe(memory_obj), [_bytes_view(memory_obj.byte_array)]))

    def _to_memory_obj(self, data: bytes) -> Any:
        header, parts = unpack_frame(data)
        if header.get("kind") != FRAME_KIND or len(parts) != 1 or parts[0] is None:
            raise ValueError("the stored object is not an LMCache memory object")
        payload = parts[0]
        shapes = [_shape_of(s) for s in header.get("shapes", [])]
        dtypes = [_dtype_of(d) for d in header.get("dtypes", [])]
        fmt = _fmt_of(header.get("fmt"))
        if self.local_cpu_backend is None:
            return BytesMemoryObj(bytes(payload), shapes, dtypes, fmt)
        one = len(shapes) == 1
        obj = self.local_cpu_backend.allocate(shapes[0] if one else shapes,
                                              dtypes[0] if one else dtypes, fmt)
        if obj is None:
            return None  # LMCache's contract: no memory now means a miss
        buf = _bytes_view(obj.byte_array)
        if len(buf) < len(payload):
            obj.ref_count_down()
            raise ValueError(f"stored object is {len(payload)} bytes but its shapes allocate "
                             f"{len(buf)}")
        buf[:len(payload)] = payload
        return obj


__all__ = ["HAVE_LMCACHE", "BytesMemoryObj", "LodestoreConnector"]

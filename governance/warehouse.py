"""The governed door to the token warehouse (KV-cache blocks).

Every call goes principal → authorize → QoS admit → warehouse → audit, through the
gateway's own pipeline (``Gateway._run`` / ``_arun``), so KV traffic is rate limited and
audited like file traffic. Authorization is by the tenant's path rules on the reserved
path ``/.lodestore/kv``: reads (get, lookup, exists, list) need the role to read it, puts
and deletes need it to write it. Puts count against the tenant's byte and file quotas.

KV blocks are opaque tensors: they are not PII-classified (there is no text to scan), and
the token ids that name them are hashed, never stored.

Like the gateway, the door keeps the warehouse (and so the volume) in a module-private
slot, not on an attribute: what the HTTP layer holds leads to no volume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from storage.errors import StorageError
from storage.warehouse import KV_ROOT, TokenWarehouse, model_dir
from storage.warehouse.records import BlockInfo, ModelInfo, PutResult

from .gateway import _DOORS, Gateway, _Call
from .principals import Principal

T = TypeVar("T")

KV_PATH = "/.lodestore/kv"  # the path the tenant's policy rules are checked against
_WAREHOUSES: dict[int, TokenWarehouse] = {}
_SHARED: dict[int, WarehouseDoor] = {}


def _audit_path(model: Any) -> str:
    try:
        return f"{KV_ROOT}/{model_dir(model)}"
    except StorageError:
        return KV_ROOT


class WarehouseDoor:
    """Governed token-warehouse calls for one gateway. Thread-safe; share one per gateway
    (``WarehouseDoor.for_gateway``). Each method has an ``a``-prefixed async twin that keeps
    the event loop free (the work runs in a worker thread)."""

    __slots__ = ("_g", "_w", "__weakref__")

    def __init__(self, gateway: Gateway, *, hot_bytes: int = 512 << 20,
                 capacity_bytes: int | None = None, default_ttl: float | None = None,
                 hash_seed: str | None = None, root_hash: bytes | None = None) -> None:
        vol = _DOORS[id(gateway)]
        self._g = gateway
        _WAREHOUSES[id(self)] = TokenWarehouse(
            vol, hot_bytes=hot_bytes, capacity_bytes=capacity_bytes, default_ttl=default_ttl,
            hash_seed=hash_seed, root_hash=root_hash)
        self._w: Callable[[], TokenWarehouse] = lambda: _WAREHOUSES[id(self)]

    @classmethod
    def for_gateway(cls, gateway: Gateway, **settings: Any) -> WarehouseDoor:
        """The door shared by everything served from ``gateway`` (one hot tier)."""
        door = _SHARED.get(id(gateway))
        if door is None or door._g is not gateway or id(gateway) not in _DOORS:
            door = _SHARED[id(gateway)] = cls(gateway, **settings)
        return door

    def close(self) -> None:
        wh = _WAREHOUSES.pop(id(self), None)
        if wh is not None:
            wh.close()
        for k, v in list(_SHARED.items()):
            if v is self:
                _SHARED.pop(k, None)

    # -- plumbing ----------------------------------------------------------------------

    def _allow(self, p: Principal, write: bool) -> None:
        self._g._can(p, KV_PATH, write=write)  # raises Forbidden with the rule to ask for
        if write:
            self._g._audit_ready()

    def _run(self, p: Principal, op: str, model: Any, write: bool,
             body: Callable[[_Call, TokenWarehouse], T], cost: int = 0) -> T:
        def run(call: _Call) -> T:
            self._allow(p, write)
            return body(call, self._w())
        return self._g._run(p, op, _audit_path(model), run, cost_bytes=cost)

    async def _arun(self, p: Principal, op: str, model: Any, write: bool,
                    body: Callable[[_Call, TokenWarehouse], T], cost: int = 0) -> T:
        def run(call: _Call) -> T:
            self._allow(p, write)
            return body(call, self._w())
        return await self._g._arun(p, op, _audit_path(model), run, cost_bytes=cost)

    def _quota(self, p: Principal, add_bytes: int, add_files: int) -> None:
        self._g._check_quota(p, self._g.policy(p), add_bytes, add_files)

    @staticmethod
    def _charge(call: _Call, n: int) -> None:
        call.event.bytes = n
        if call.ticket is not None:
            call.ticket.charge(n)

    # -- bodies (shared by the sync and async forms) -----------------------------------

    def _put(self, p: Principal, model: str, token_ids: Sequence[int], blocks: Sequence[bytes],
             block_size: int | None, start_block: int, hashes: Sequence[Any] | None,
             ttl: float | None, extra_keys: Any) -> Callable[[_Call, TokenWarehouse], PutResult]:
        def body(call: _Call, wh: TokenWarehouse) -> PutResult:
            size = sum(len(b) for b in blocks if isinstance(b, bytes | bytearray | memoryview))
            self._quota(p, size, len(blocks) if isinstance(blocks, Sequence) else 0)
            res = wh.put_blocks_ex(p.tenant, model, token_ids, blocks, block_size,
                                   start_block=start_block, hashes=hashes, ttl=ttl,
                                   extra_keys=extra_keys)
            self._g._adjust_usage(p.tenant, res.bytes_written, res.written)
            call.event.bytes = res.bytes_written
            return res
        return body

    def _get(self, p: Principal, model: str, hashes: Sequence[Any]
             ) -> Callable[[_Call, TokenWarehouse], list[bytes | None]]:
        def body(call: _Call, wh: TokenWarehouse) -> list[bytes | None]:
            out = wh.get_blocks(p.tenant, model, hashes)
            self._charge(call, sum(len(b) for b in out if b is not None))
            return out
        return body

    @staticmethod
    def _cost(blocks: Any) -> int:
        if isinstance(blocks, Sequence) and not isinstance(blocks, bytes | str):
            return sum(len(b) for b in blocks if isinstance(b, bytes | bytearray | memoryview))
        return 0

    # -- models ------------------------------------------------------------------------

    def register_model(self, p: Principal, model: str, block_size: int | None = None,
                       **manifest: Any) -> ModelInfo:
        return self._run(p, "kv_register", model, True,
                         lambda c, wh: wh.register_model(p.tenant, model, block_size, **manifest))

    async def aregister_model(self, p: Principal, model: str, block_size: int | None = None,
                              **manifest: Any) -> ModelInfo:
        return await self._arun(
            p, "kv_register", model, True,
            lambda c, wh: wh.register_model(p.tenant, model, block_size, **manifest))

    def model_info(self, p: Principal, model: str) -> ModelInfo:
        return self._run(p, "kv_model", model, False,
                         lambda c, wh: wh.model_info(p.tenant, model, fresh=True))

    async def amodel_info(self, p: Principal, model: str) -> ModelInfo:
        return await self._arun(p, "kv_model", model, False,
                                lambda c, wh: wh.model_info(p.tenant, model, fresh=True))

    def list_models(self, p: Principal) -> list[ModelInfo]:
        return self._run(p, "kv_models", None, False, lambda c, wh: wh.list_models(p.tenant))

    async def alist_models(self, p: Principal) -> list[ModelInfo]:
        return await self._arun(p, "kv_models", None, False,
                                lambda c, wh: wh.list_models(p.tenant))

    def delete_model(self, p: Principal, model: str) -> int:
        return self._run(p, "kv_delete_model", model, True, self._delete_model(p, model))

    async def adelete_model(self, p: Principal, model: str) -> int:
        return await self._arun(p, "kv_delete_model", model, True, self._delete_model(p, model))

    def _delete_model(self, p: Principal, model: str) -> Callable[[_Call, TokenWarehouse], int]:
        def body(call: _Call, wh: TokenWarehouse) -> int:
            n = wh.delete_model(p.tenant, model)
            self._g._usage.pop(p.tenant, None)
            return n
        return body

    # -- blocks ------------------------------------------------------------------------

    def put_blocks(self, p: Principal, model: str, token_ids: Sequence[int],
                   blocks: Sequence[bytes], block_size: int | None = None, *,
                   start_block: int = 0, hashes: Sequence[Any] | None = None,
                   ttl: float | None = None, extra_keys: Any = None) -> PutResult:
        return self._run(p, "kv_put", model, True,
                         self._put(p, model, token_ids, blocks, block_size, start_block, hashes,
                                   ttl, extra_keys), cost=self._cost(blocks))

    async def aput_blocks(self, p: Principal, model: str, token_ids: Sequence[int],
                          blocks: Sequence[bytes], block_size: int | None = None, *,
                          start_block: int = 0, hashes: Sequence[Any] | None = None,
                          ttl: float | None = None, extra_keys: Any = None) -> PutResult:
        return await self._arun(p, "kv_put", model, True,
                                self._put(p, model, token_ids, blocks, block_size, start_block,
                                          hashes, ttl, extra_keys), cost=self._cost(blocks))

    def get_blocks(self, p: Principal, model: str, hashes: Sequence[Any]) -> list[bytes | None]:
        return self._run(p, "kv_get", model, False, self._get(p, model, hashes))

    async def aget_blocks(self, p: Principal, model: str, hashes: Sequence[Any]
                          ) -> list[bytes | None]:
        return await self._arun(p, "kv_get", model, False, self._get(p, model, hashes))

    def lookup(self, p: Principal, model: str, token_ids: Sequence[int],
               block_size: int | None = None, extra_keys: Any = None) -> tuple[int, list[bytes]]:
        """(tokens covered by the longest cached prefix, hashes of those blocks)."""
        return self._run(p, "kv_lookup", model, False,
                         lambda c, wh: wh.lookup_ex(p.tenant, model, token_ids, block_size,
                                                    extra_keys))

    async def alookup(self, p: Principal, model: str, token_ids: Sequence[int],
                      block_size: int | None = None, extra_keys: Any = None
                      ) -> tuple[int, list[bytes]]:
        return await self._arun(p, "kv_lookup", model, False,
                                lambda c, wh: wh.lookup_ex(p.tenant, model, token_ids,
                                                           block_size, extra_keys))

    def block_hashes(self, p: Principal, model: str, token_ids: Sequence[int],
                     extra_keys: Any = None) -> list[bytes]:
        """The model's chained hashes of the full blocks of ``token_ids`` (stores nothing)."""
        return self._run(p, "kv_hashes", model, False, self._hashes(p, model, token_ids,
                                                                    extra_keys))

    async def ablock_hashes(self, p: Principal, model: str, token_ids: Sequence[int],
                            extra_keys: Any = None) -> list[bytes]:
        return await self._arun(p, "kv_hashes", model, False,
                                self._hashes(p, model, token_ids, extra_keys))

    def _hashes(self, p: Principal, model: str, token_ids: Sequence[int], extra_keys: Any
                ) -> Callable[[_Call, TokenWarehouse], list[bytes]]:
        def body(call: _Call, wh: TokenWarehouse) -> list[bytes]:
            info = wh.model_info(p.tenant, model)
            if info.block_size is None:
                return []
            return wh.block_hashes(token_ids, info.block_size, extra_keys, root=info.root)
        return body

    def exists(self, p: Principal, model: str, h: Any) -> bool:
        return self._run(p, "kv_exists", model, False,
                         lambda c, wh: wh.exists(p.tenant, model, h))

    async def aexists(self, p: Principal, model: str, h: Any) -> bool:
        return await self._arun(p, "kv_exists", model, False,
                                lambda c, wh: wh.exists(p.tenant, model, h))

    def delete_blocks(self, p: Principal, model: str, hashes: Sequence[Any]) -> int:
        return self._run(p, "kv_delete", model, True, self._delete(p, model, hashes))

    async def adelete_blocks(self, p: Principal, model: str, hashes: Sequence[Any]) -> int:
        return await self._arun(p, "kv_delete", model, True, self._delete(p, model, hashes))

    def _delete(self, p: Principal, model: str, hashes: Sequence[Any]
                ) -> Callable[[_Call, TokenWarehouse], int]:
        def body(call: _Call, wh: TokenWarehouse) -> int:
            n = wh.delete_blocks(p.tenant, model, hashes)
            self._g._usage.pop(p.tenant, None)
            return n
        return body

    def list_blocks(self, p: Principal, model: str, cursor: str | None = None,
                    limit: int = 1000) -> tuple[list[BlockInfo], str | None]:
        return self._run(p, "kv_list", model, False,
                         lambda c, wh: wh.list_blocks(p.tenant, model, cursor, limit))

    async def alist_blocks(self, p: Principal, model: str, cursor: str | None = None,
                           limit: int = 1000) -> tuple[list[BlockInfo], str | None]:
        return await self._arun(p, "kv_list", model, False,
                                lambda c, wh: wh.list_blocks(p.tenant, model, cursor, limit))

    # -- keyed objects (LMCache-style remote backends) ---------------------------------

    def _put_obj(self, p: Principal, model: str, key: str, data: bytes, ttl: float | None
                 ) -> Callable[[_Call, TokenWarehouse], int]:
        def body(call: _Call, wh: TokenWarehouse) -> int:
            self._quota(p, len(data) if isinstance(data, bytes | bytearray) else 0, 1)
            n = wh.put_object(p.tenant, model, key, data, ttl=ttl)
            self._g._usage.pop(p.tenant, None)
            call.event.bytes = n
            return n
        return body

    def put_object(self, p: Principal, model: str, key: str, data: bytes, *,
                   ttl: float | None = None) -> int:
        return self._run(p, "kv_put_object", model, True, self._put_obj(p, model, key, data, ttl),
                         cost=len(data) if isinstance(data, bytes | bytearray) else 0)

    async def aput_object(self, p: Principal, model: str, key: str, data: bytes, *,
                          ttl: float | None = None) -> int:
        return await self._arun(p, "kv_put_object", model, True,
                                self._put_obj(p, model, key, data, ttl),
                                cost=len(data) if isinstance(data, bytes | bytearray) else 0)

    def _get_obj(self, p: Principal, model: str, key: str
                 ) -> Callable[[_Call, TokenWarehouse], bytes | None]:
        def body(call: _Call, wh: TokenWarehouse) -> bytes | None:
            data = wh.get_object(p.tenant, model, key)
            self._charge(call, len(data) if data is not None else 0)
            return data
        return body

    def get_object(self, p: Principal, model: str, key: str) -> bytes | None:
        return self._run(p, "kv_get_object", model, False, self._get_obj(p, model, key))

    async def aget_object(self, p: Principal, model: str, key: str) -> bytes | None:
        return await self._arun(p, "kv_get_object", model, False, self._get_obj(p, model, key))

    def has_object(self, p: Principal, model: str, key: str) -> bool:
        return self._run(p, "kv_exists_object", model, False,
                         lambda c, wh: wh.has_object(p.tenant, model, key))

    async def ahas_object(self, p: Principal, model: str, key: str) -> bool:
        return await self._arun(p, "kv_exists_object", model, False,
                                lambda c, wh: wh.has_object(p.tenant, model, key))

    def delete_object(self, p: Principal, model: str, key: str) -> bool:
        return self._run(p, "kv_delete_object", model, True,
                         lambda c, wh: wh.delete_object(p.tenant, model, key))

    async def adelete_object(self, p: Principal, model: str, key: str) -> bool:
        return await self._arun(p, "kv_delete_object", model, True,
                                lambda c, wh: wh.delete_object(p.tenant, model, key))

    def list_objects(self, p: Principal, model: str | None = None) -> list[str]:
        return self._run(p, "kv_list_objects", model, False,
                         lambda c, wh: wh.list_objects(p.tenant, model))

    async def alist_objects(self, p: Principal, model: str | None = None) -> list[str]:
        return await self._arun(p, "kv_list_objects", model, False,
                                lambda c, wh: wh.list_objects(p.tenant, model))

    # -- maintenance -------------------------------------------------------------------

    def evict(self, p: Principal) -> dict[str, int]:
        """Remove the tenant's expired blocks and those past capacity, now."""
        return self._run(p, "kv_evict", None, True, lambda c, wh: wh.evict(p.tenant))

    async def aevict(self, p: Principal) -> dict[str, int]:
        return await self._arun(p, "kv_evict", None, True, lambda c, wh: wh.evict(p.tenant))


__all__ = ["KV_PATH", "WarehouseDoor"]

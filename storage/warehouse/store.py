"""The token warehouse: LLM KV-cache blocks in the chunk store, behind a hot tier.

Layout, in each tenant's own namespace (so blocks are erasure-coded, checksummed,
deduplicated within the tenant and never across tenants, and kept alive by GC because
their entries reference their chunks)::

    /.lodestore/kv/<model-dir>/model.json        the model's manifest
    /.lodestore/kv/<model-dir>/p/<hh>/<pack-id>   one pack: the new blocks of one put,
                                                   concatenated (at most PACK_MAX_BYTES;
                                                   larger puts write several, in parallel),
                                                   stored as a single chunk
    /.lodestore/kv/<model-dir>/o/<hh>/<key-hex>   one keyed object (engines that name their
                                                   own chunks, e.g. LMCache; key-hex is
                                                   sha256 of the key, the key is in attrs)
    /.lodestore/kv/<model-dir>/b/<hh>/<hash-hex>  one token block per file: the layout of
                                                   older versions, still read, listed and
                                                   deleted (never written any more)

Block index, in the KV tier (namespace: the tenant, like the volume)::

    kvw/<model-dir>/b/<hash-hex>          JSON {p: pack id, o: offset, n: length, pos,
                                          exp: expiry, par: parent hash, t: write time}
    kvw/<model-dir>/k/<pack-id>/<hash-hex>  empty: the pack still holds this live block

A put writes its packs first, then all their index entries and references in ONE atomic
``put_many``: a crash in between leaves an unindexed pack, invisible, which
``sweep_packs`` deletes. Removing a block deletes its entry and its reference; when a
pack has no reference left (one ``scan`` with limit 1) the pack file is deleted. Packs are
ordinary volume files, so GC keeps their chunks alive. Reads look up all entries in one
``get_many``, read contiguous blocks of a pack in one streamed range read, packs in
parallel. Chunk-level dedup now works on packs (identical puts share chunks; the same
block at another offset does not); whole-block dedup within a tenant is by hash, as
before. Internally a block is still named by its logical path ``.../b/<hh>/<hash-hex>``
(hot-tier and recency keys).

``<model-dir>`` is a readable slug of the model id plus 16 hex digits of its SHA-256, so any
model id maps to a safe, unique folder. Blocks are fanned out over 256 folders so the
metadata of one model's blocks spreads over many virtual shards (and SQL engines).

Token blocks are named by vLLM's chained block hash (see ``hashing.py``): a put recomputes
the hashes from the token ids and refuses blocks whose given hashes differ, so a block can
only be found under the prefix that produced it. The manifest pins the model's
``block_size`` and the byte size of a full block (given at registration, else taken from
the first put), so truncated or malformed blocks are refused before anything is stored.

Hot tier: an in-memory, size-bounded LRU of recently put or read blocks (write-through,
read-through), per process. Eviction:

- TTL: a block's expiry (wall clock) is in its index entry (the blocks of one put share
  it). Expired blocks read as absent
  at once; ``evict()`` deletes them, and a put sweeps the tenant's expired blocks at most
  every ``sweep_seconds`` once the tenant has stored blocks with a TTL.
- Capacity: ``capacity_bytes`` bounds each tenant's KV bytes. Recency of use is tracked in
  memory (puts, gets, lookups); after a restart it is seeded from write times, so the first
  evictions then follow write order. Over capacity, least recently used blocks go first.

Thread-safe; one instance per process and store.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..config import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from ..errors import (
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    StorageError,
    VersionMismatch,
)
from ..volume import FileInfo, Volume, decode_cursor, encode_cursor
from . import hashing
from .hashing import HASH_ALGORITHM, HASH_BYTES
from .memory_tiers import ChainCache, HotTier, _Usage
from .records import (
    MAX_BLOCK_BYTES,
    BadBlock,
    BlockInfo,
    HashMismatch,
    ModelInfo,
    ModelMismatch,
    PutResult,
    UnknownModel,
    _as_block,
    _check_key,
    check_model_id,
    model_dir,
    parse_hash,
)

KV_ROOT = "/.lodestore/kv"
MANIFEST = "model.json"
MAX_BLOCKS_PER_CALL = 4096
# A put's new blocks go into packs of at most this many bytes (one block may exceed it
# alone), and a pack is stored as one chunk: m fragment files per pack instead of m per
# 4 MiB, so far fewer file creates, fsyncs and renames per byte. In-process A/B of
# 256-token (5.6 MiB) block puts on one disk, medians: 8 MiB packs in 4 MiB chunks 193,
# 16 MiB packs as one chunk 371-430, 32 MiB packs as one chunk 531 MiB/s.
PACK_MAX_BYTES = 32 << 20
INDEX = "kvw"  # KV-tier key prefix of the block index (the namespace is the tenant)
_SCAN_PAGE = 1000


def _index_key(mdir: str, hx: str) -> str:
    """The index entry of one block: where its bytes are and what it is."""
    return f"{INDEX}/{mdir}/b/{hx}"


def _ref_key(mdir: str, pack: str, hx: str = "") -> str:
    """A pack's reference to one of its blocks (empty value); the pack lives while any does."""
    return f"{INDEX}/{mdir}/k/{pack}/{hx}"


def _pack_path(mdir: str, pack: str) -> str:
    return f"{KV_ROOT}/{mdir}/p/{pack[:2]}/{pack}"


def _split_block_path(path: str) -> tuple[str, str] | None:
    """(model dir, hash hex) of a logical block path ``KV_ROOT/<dir>/b/<hh>/<hex>``."""
    parts = path.split("/")
    if len(parts) == 7 and parts[4] == "b" and path.startswith(KV_ROOT + "/"):
        return parts[3], parts[6]
    return None


@dataclass(frozen=True)
class _Entry:
    """A block's index entry: bytes ``off .. off + n`` of pack ``pack``."""

    pack: str
    off: int
    n: int
    pos: int | None
    exp: float | None
    parent: str | None
    t: float  # wall-clock write time

    def live(self, now: float) -> bool:
        return self.exp is None or self.exp > now

    def dumps(self) -> bytes:
        return json.dumps({"p": self.pack, "o": self.off, "n": self.n, "pos": self.pos,
                           "exp": self.exp, "par": self.parent, "t": self.t}).encode()

    @staticmethod
    def loads(raw: bytes | None) -> _Entry | None:
        if raw is None:
            return None
        try:
            d = json.loads(raw)
            return _Entry(d["p"], int(d["o"]), int(d["n"]), d.get("pos"), d.get("exp"),
                          d.get("par"), float(d.get("t", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry reads as a miss (the warehouse is a cache)


class TokenWarehouse:
    """KV-cache blocks keyed by (tenant, model, chained token-prefix hash).

    ``hot_bytes``: size of the in-memory hot tier. ``capacity_bytes``: per-tenant bound on
    KV bytes (LRU eviction past it; None: unbounded). ``default_ttl``: seconds a block
    lives when a put gives no TTL (None: no expiry). ``hash_seed``/``root_hash``: the chain
    root new models get (default: vLLM's root with PYTHONHASHSEED=0); a model keeps the root
    it was registered with. ``clock``: wall-clock time source (tests pass a fake one).
    """

    def __init__(self, vol: Volume, *, hot_bytes: int = 512 << 20,
                 capacity_bytes: int | None = None, default_ttl: float | None = None,
                 hash_seed: str | None = None, root_hash: bytes | None = None,
                 io_threads: int = 8, sweep_seconds: float = 60.0,
                 clock: Callable[[], float] = time.time) -> None:
        if capacity_bytes is not None and capacity_bytes <= 0:
            raise InvalidArgument("capacity_bytes must be positive (or None: unbounded)")
        if default_ttl is not None and default_ttl <= 0:
            raise InvalidArgument("default_ttl must be positive seconds (or None: no expiry)")
        self.vol = vol
        self.hot = HotTier(hot_bytes)
        self._chain = ChainCache()
        self.capacity_bytes = capacity_bytes
        self.default_ttl = default_ttl
        self.root = hashing.root_hash(hash_seed, root_hash)
        self.clock = clock
        self.sweep_seconds = sweep_seconds
        self.pool = ThreadPoolExecutor(max(1, io_threads), thread_name_prefix="lodestore-kv")
        self._models: dict[tuple[str, str], ModelInfo] = {}
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.RLock()
        self._last_sweep: dict[str, float] = {}
        self._expiring: set[str] = set()  # tenants that stored blocks with a TTL
        self._legacy: dict[tuple[str, str], bool] = {}  # (tenant, dir): per-block files?

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        self.hot.clear()

    # -- hashing -----------------------------------------------------------------------

    def block_hashes(self, token_ids: Sequence[int], block_size: int,
                     extra_keys: Sequence[tuple[Any, ...] | None] | None = None, *,
                     root: bytes | None = None) -> list[bytes]:
        """vLLM-compatible chained hashes of the full blocks of ``token_ids``."""
        return hashing.block_hashes(hashing.check_token_ids(token_ids), block_size, extra_keys,
                                    none_hash=root or self.root)

    # -- models ------------------------------------------------------------------------

    def _model_root(self, model: str) -> str:
        return f"{KV_ROOT}/{model_dir(model)}"

    def _read_manifest(self, tenant: str, model: str) -> ModelInfo | None:
        path = f"{self._model_root(model)}/{MANIFEST}"
        try:
            reader = self.vol.open_file(tenant, path)
        except (NotFound, NotADirectory):
            return None
        try:
            doc = json.loads(reader.read())
            info = ModelInfo(model=doc["model"], dir=model_dir(model),
                             block_size=doc.get("block_size"), block_bytes=doc.get("block_bytes"),
                             dtype=doc.get("dtype"), root=bytes.fromhex(doc["root"]),
                             hash_algorithm=doc.get("hash_algorithm", HASH_ALGORITHM),
                             created=float(doc.get("created", 0.0)), version=reader.info.version)
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"the manifest of model {model!r} at {path} is damaged ({exc}); "
                               "delete the model and put its blocks again") from None
        if info.model != model:
            raise StorageError(f"model folder collision at {path}: it holds {info.model!r}")
        with self._lock:
            self._models[(tenant, model)] = info
        return info

    def model_info(self, tenant: str, model: str, *, fresh: bool = False) -> ModelInfo:
        """The model's manifest, or ``UnknownModel``."""
        check_model_id(model)
        info = None if fresh else self._models.get((tenant, model))
        if info is None:
            info = self._read_manifest(tenant, model)
        if info is None:
            self.vol.stat(tenant, "/")  # an unknown tenant says so
            raise UnknownModel(model)
        return info

    def _write_manifest(self, tenant: str, info: ModelInfo, expected_version: int) -> ModelInfo:
        doc = info.as_dict()
        doc.pop("dir")
        data = json.dumps(doc, sort_keys=True).encode()
        fi = self.vol.write(tenant, f"{KV_ROOT}/{info.dir}/{MANIFEST}", data,
                            expected_version=expected_version, attrs={"kind": "kv_model"})
        new = ModelInfo(**{**info.__dict__, "version": fi.version})
        with self._lock:
            self._models[(tenant, info.model)] = new
        return new

    def register_model(self, tenant: str, model: str, block_size: int | None = None, *,
                       block_bytes: int | None = None, dtype: str | None = None,
                       hash_seed: str | None = None, root_hash: bytes | None = None
                       ) -> ModelInfo:
        """Create or complete a model's manifest (idempotent; conflicts are errors)."""
        check_model_id(model)
        if block_size is not None:
            hashing.check_block_size(block_size)
        if block_bytes is not None and (isinstance(block_bytes, bool) or not isinstance(
                block_bytes, int) or not 1 <= block_bytes <= MAX_BLOCK_BYTES):
            raise InvalidArgument(f"block_bytes must be an integer from 1 to {MAX_BLOCK_BYTES}")
        if dtype is not None and (not isinstance(dtype, str) or not 1 <= len(dtype) <= 32):
            raise InvalidArgument("dtype must be a short name such as 'bfloat16'")
        root = (hashing.root_hash(hash_seed, root_hash)
                if hash_seed is not None or root_hash is not None else None)
        for _attempt in range(20):
            cur = self._read_manifest(tenant, model)
            if cur is None:
                self.vol.stat(tenant, "/")
                info = ModelInfo(model, model_dir(model), block_size, block_bytes, dtype,
                                 root or self.root, HASH_ALGORITHM, self.clock())
                try:
                    return self._write_manifest(tenant, info, 0)
                except VersionMismatch:
                    continue
            new = self._merge(cur, block_size, block_bytes, dtype, root)
            if new == cur:
                return cur
            try:
                return self._write_manifest(tenant, new, cur.version)
            except VersionMismatch:
                continue
        raise StorageError(f"the manifest of model {model!r} keeps changing; retry")

    @staticmethod
    def _merge(cur: ModelInfo, block_size: int | None, block_bytes: int | None,
               dtype: str | None, root: bytes | None) -> ModelInfo:
        m = cur.model
        if block_size is not None and cur.block_size not in (None, block_size):
            raise ModelMismatch(
                f"model {m!r} stores blocks of {cur.block_size} tokens, not {block_size}; use "
                f"block_size {cur.block_size} (or delete the model's blocks to change it)")
        if block_bytes is not None and cur.block_bytes not in (None, block_bytes):
            raise ModelMismatch(
                f"model {m!r} stores blocks of {cur.block_bytes:,} bytes, not {block_bytes:,}; "
                "check the KV layout (layers, heads, dtype) of the engine")
        if dtype is not None and cur.dtype not in (None, dtype):
            raise ModelMismatch(f"model {m!r} stores {cur.dtype} blocks, not {dtype}")
        if root is not None and root != cur.root:
            raise ModelMismatch(
                f"model {m!r} was registered with another hash root (seed); its block hashes "
                "would never match: use the same PYTHONHASHSEED as the engine that stored them")
        return ModelInfo(**{**cur.__dict__,
                            "block_size": cur.block_size or block_size,
                            "block_bytes": cur.block_bytes or block_bytes,
                            "dtype": cur.dtype or dtype})

    def list_models(self, tenant: str) -> list[ModelInfo]:
        out = []
        for d in self._iter_dir(tenant, KV_ROOT):
            if not d.is_dir:
                continue
            try:
                reader = self.vol.open_file(tenant, f"{d.path}/{MANIFEST}")
                model = json.loads(reader.read())["model"]
                out.append(self.model_info(tenant, model, fresh=True))
            except (StorageError, ValueError, KeyError):
                continue
        return out

    def delete_model(self, tenant: str, model: str) -> int:
        """Remove a model and all its blocks and objects; returns the files removed."""
        info = self.model_info(tenant, model, fresh=True)
        root = f"{KV_ROOT}/{info.dir}"
        n = 0
        usage = self._usage.get(tenant)
        # the index first (blocks vanish at once), then the files (packs, objects, old blocks)
        keys = [key for key, _raw in self._scan(tenant, f"{INDEX}/{info.dir}/")]
        for key in keys:
            if key.startswith(f"{INDEX}/{info.dir}/b/"):
                n += 1
                if usage is not None:
                    with self._lock:
                        usage.remove(f"{root}/b/{key[-2 * HASH_BYTES:][:2]}/"
                                     f"{key[-2 * HASH_BYTES:]}")
        for i in range(0, len(keys), 1000):  # one transaction per thousand keys
            self.vol.kv.delete_many(tenant, keys[i:i + 1000])
        for fi in self._walk_files(tenant, root):
            if fi.path == f"{root}/{MANIFEST}" or fi.path.startswith(f"{root}/p/"):
                continue
            n += 1
            if usage is not None:
                with self._lock:
                    usage.remove(fi.path)
        with contextlib.suppress(NotFound):
            self.vol.delete(tenant, root, recursive=True)
        self.hot.pop_under(tenant, root + "/")
        with self._lock:
            self._models.pop((tenant, model), None)
            self._legacy.pop((tenant, info.dir), None)
        return n

    # -- paths -------------------------------------------------------------------------

    @staticmethod
    def _block_path(info: ModelInfo, h: bytes) -> str:
        x = h.hex()
        return f"{KV_ROOT}/{info.dir}/b/{x[:2]}/{x}"

    @staticmethod
    def _object_path(info: ModelInfo, key: str) -> str:
        x = hashlib.sha256(key.encode()).hexdigest()
        return f"{KV_ROOT}/{info.dir}/o/{x[:2]}/{x}"

    # -- put ---------------------------------------------------------------------------

    def put_blocks(self, tenant: str, model: str, token_ids: Sequence[int],
                   blocks: Sequence[bytes], block_size: int | None = None, *,
                   start_block: int = 0, hashes: Sequence[bytes | str] | None = None,
                   ttl: float | None = None,
                   extra_keys: Sequence[tuple[Any, ...] | None] | None = None) -> list[bytes]:
        """Store ``blocks`` as blocks ``start_block ...`` of the prefix ``token_ids``.

        ``token_ids`` must cover every block given (the prefix before ``start_block`` is
        needed for the chained hash). ``hashes``, if given, must equal the recomputed ones.
        Everything is checked before anything is stored. Returns the blocks' hashes.
        """
        return self.put_blocks_ex(tenant, model, token_ids, blocks, block_size,
                                  start_block=start_block, hashes=hashes, ttl=ttl,
                                  extra_keys=extra_keys).hashes

    def put_blocks_ex(self, tenant: str, model: str, token_ids: Sequence[int],
                      blocks: Sequence[bytes], block_size: int | None = None, *,
                      start_block: int = 0, hashes: Sequence[bytes | str] | None = None,
                      ttl: float | None = None,
                      extra_keys: Sequence[tuple[Any, ...] | None] | None = None) -> PutResult:
        """``put_blocks`` that also says how many blocks and bytes were written."""
        check_model_id(model)
        if isinstance(blocks, bytes | bytearray | memoryview | str) or not isinstance(
                blocks, Sequence):
            raise BadBlock("blocks must be a list of bytes objects, one per block")
        if not 1 <= len(blocks) <= MAX_BLOCKS_PER_CALL:
            raise BadBlock(f"give 1 to {MAX_BLOCKS_PER_CALL} blocks per call, got {len(blocks)}")
        datas = [_as_block(b, i) for i, b in enumerate(blocks)]
        tokens = hashing.check_token_ids(token_ids)
        if isinstance(start_block, bool) or not isinstance(start_block, int) or start_block < 0:
            raise InvalidArgument("start_block must be an integer >= 0")
        exp = self._expiry(ttl)
        try:
            info: ModelInfo | None = self.model_info(tenant, model)
        except UnknownModel:
            info = None
        if info is not None and info.block_size is None:
            info = self.model_info(tenant, model, fresh=True)
        bs = block_size if block_size is not None else (info.block_size if info else None)
        if bs is None:
            raise UnknownModel(model) if info is None else ModelMismatch(
                f"model {model!r} has no block_size yet; pass block_size with the first put")
        hashing.check_block_size(bs)
        if info is not None:
            self._merge(info, bs, None, None, None)  # raises on a block_size conflict
        want = start_block + len(datas)
        full = len(tokens) // bs
        if full < want:
            raise BadBlock(
                f"token_ids hold {len(tokens)} tokens = {full} full blocks of {bs}, but blocks "
                f"{start_block}..{want - 1} were given; send the token ids of the whole prefix "
                "up to the end of the last block")
        root = info.root if info is not None else self.root
        # the chain up to start_block from an earlier put of this prefix: hash only the new
        parent = (self._chain.get(tenant, tokens, bs, root, start_block)
                  if start_block > 0 and extra_keys is None else None)
        if start_block == 0 or parent is not None:
            mine = hashing.block_hashes(tokens[start_block * bs:want * bs], bs, extra_keys,
                                        none_hash=root, parent=parent)
            first_parent = parent
        else:
            chain = hashing.block_hashes(tokens, bs, extra_keys, none_hash=root, limit=want)
            mine, first_parent = chain[start_block:want], chain[start_block - 1]
        prev: list[bytes | None] = [first_parent, *mine[:-1]]
        if extra_keys is None:
            self._chain.put(tenant, tokens, bs, root, want, mine[-1])
        if hashes is not None:
            if isinstance(hashes, str | bytes) or len(hashes) != len(datas):
                raise HashMismatch(f"give one hash per block ({len(datas)}), or none")
            for i, (given, real) in enumerate(zip(hashes, mine, strict=True)):
                g = parse_hash(given, f"hashes[{i}]")
                if g != real:
                    raise HashMismatch(
                        f"block {start_block + i}: the given hash {g.hex()[:16]}… is not the "
                        f"hash of its token ids ({real.hex()[:16]}…) under model {model!r}'s "
                        "root and block size; nothing was stored. Check block_size, the hash "
                        "seed (PYTHONHASHSEED) and extra keys")
        expect = info.block_bytes if info is not None else None
        if expect is None:
            expect = len(datas[0])
        for i, d in enumerate(datas):
            if len(d) != expect:
                raise BadBlock(
                    f"block {start_block + i} is {len(d):,} bytes but blocks of model {model!r} "
                    f"are {expect:,} bytes (truncated or malformed?); nothing was stored")
        if self.capacity_bytes is not None and expect * len(datas) > self.capacity_bytes:
            raise InvalidArgument(
                f"this put holds {expect * len(datas):,} bytes, more than the warehouse "
                f"capacity of {self.capacity_bytes:,} bytes per tenant; put fewer blocks")
        # all checks passed: from here on, store
        if info is None or info.block_size is None or info.block_bytes is None:
            info = self.register_model(tenant, model, bs, block_bytes=expect)
        written, nbytes = self._store_blocks(tenant, info, mine, datas, start_block,
                                             prev, exp)
        self._after_put(tenant, exp)
        return PutResult(mine, written, nbytes)

    def _expiry(self, ttl: float | None) -> float | None:
        if ttl is None:
            ttl = self.default_ttl
        if ttl is None:
            return None
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 10 * 365 * 86400:
            raise InvalidArgument("ttl must be a positive number of seconds (at most 10 years)")
        return self.clock() + float(ttl)

    def _live(self, fi: FileInfo, now: float) -> bool:
        exp = (fi.attrs or {}).get("exp")
        return exp is None or exp > now

    def _store_blocks(self, tenant: str, info: ModelInfo, hashes: list[bytes],
                      datas: list[bytes | memoryview], start: int,
                      prev: list[bytes | None],
                      exp: float | None) -> tuple[int, int]:
        """Write the new blocks into pack files, then index them in one KV transaction.

        Crash order: the packs are written (and durable) first, the index entries last, in
        one atomic ``put_many``; a pack without index entries is invisible garbage
        (``sweep_packs`` deletes it). Live blocks already stored are skipped (dedup within
        the tenant); a later expiry given for them is written to their index entry.
        """
        d = info.dir
        hexes = [h.hex() for h in hashes]
        now = self.clock()
        cur = self._index_get(tenant, d, hexes)
        legacy = self._has_legacy(tenant, d)
        todo: list[int] = []
        refresh: list[tuple[str, bytes]] = []
        seen: set[str] = set()
        for i, e in enumerate(cur):
            hx = hexes[i]
            if hx in seen:
                continue
            seen.add(hx)
            path = self._block_path(info, hashes[i])
            if e is not None and e.live(now):
                if e.exp is not None and (exp is None or exp > e.exp + 1.0):
                    refresh.append((_index_key(d, hx),
                                    _Entry(**{**e.__dict__, "exp": exp}).dumps()))
                    self.hot.pop((tenant, path))
                self._note(tenant, path, e.n)
                continue
            if e is not None:  # expired: drop it (and maybe its pack), then store anew
                self._remove(tenant, path)
            elif legacy and self._keep_legacy(tenant, path, exp, now):
                continue
            todo.append(i)
        if refresh:
            self.vol.kv.put_many(tenant, refresh)
        if not todo:
            return 0, 0
        groups: list[list[int]] = [[]]
        size = 0
        for i in todo:
            if groups[-1] and size + len(datas[i]) > PACK_MAX_BYTES:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += len(datas[i])

        def write_pack(group: list[int]) -> str:
            pack = os.urandom(16).hex()
            data = datas[group[0]] if len(group) == 1 else b"".join(datas[i] for i in group)
            self.vol.write(tenant, _pack_path(d, pack), data, mode="create",
                           attrs={"kind": "kv_pack", "blocks": len(group)},
                           chunk_size=min(MAX_CHUNK_SIZE, max(MIN_CHUNK_SIZE, len(data))))
            return pack

        packs: list[str] = []
        try:
            if len(groups) == 1:
                packs.append(write_pack(groups[0]))
            else:
                futs = [self.pool.submit(write_pack, g) for g in groups]
                err: BaseException | None = None
                for f in futs:
                    try:
                        packs.append(f.result())
                    except BaseException as exc:  # let the others finish, then clean up
                        err = err or exc
                if err is not None:
                    raise err
            items: list[tuple[str, bytes]] = []
            t = time.time()
            for pack, group in zip(packs, groups, strict=True):
                off = 0
                for i in group:
                    pos = start + i
                    n = len(datas[i])
                    parent = prev[pos - start]
                    e = _Entry(pack, off, n, pos, exp, parent.hex() if parent else None, t)
                    items.append((_index_key(d, hexes[i]), e.dumps()))
                    items.append((_ref_key(d, pack, hexes[i]), b""))
                    off += n
            self.vol.kv.put_many(tenant, items)
        except BaseException:
            for pack in packs:  # never a silent partial put; an unindexed pack is garbage
                with contextlib.suppress(StorageError, OSError):
                    self.vol.delete(tenant, _pack_path(d, pack))
            raise
        nbytes = 0
        for i in todo:
            n = len(datas[i])
            nbytes += n
            path = self._block_path(info, hashes[i])
            if n <= self.hot.max_bytes:
                self.hot.put((tenant, path), bytes(datas[i]), exp)
            self._note(tenant, path, n)
        return len(todo), nbytes

    def _keep_legacy(self, tenant: str, path: str, exp: float | None, now: float) -> bool:
        """A block of the old layout (one file per block): True if it is live and kept."""
        try:
            fi = self.vol.stat(tenant, path)
        except (NotFound, NotADirectory):
            return False
        if not self._live(fi, now):
            self._remove(tenant, path)
            return False
        old = (fi.attrs or {}).get("exp")
        if old is not None and (exp is None or exp > old + 1.0):
            self._set_expiry(tenant, path, exp)
        self._note(tenant, path, fi.size)
        return True

    def _set_expiry(self, tenant: str, path: str, exp: float | None) -> None:
        """Change an old-layout block's expiry without rewriting its data (an empty append)."""
        def merge(old: dict[str, Any] | None, _size: int) -> dict[str, Any]:
            return {**(old or {}), "exp": exp}
        with contextlib.suppress(StorageError):
            self.vol.write(tenant, path, b"", mode="append", merge_attrs=merge)
            self.hot.pop((tenant, path))

    # -- the block index ---------------------------------------------------------------

    def _index_get(self, tenant: str, mdir: str, hexes: Sequence[str]) -> list[_Entry | None]:
        if not hexes:
            return []
        raws = self.vol.kv.get_many(tenant, [_index_key(mdir, hx) for hx in hexes])
        return [_Entry.loads(r) for r in raws]

    def _scan(self, tenant: str, prefix: str, after: str | None = None
              ) -> Iterator[tuple[str, bytes]]:
        """Every live KV pair under ``prefix`` after key ``after``, page by page."""
        while True:
            rows = self.vol.kv.scan(tenant, prefix, start_after=after, limit=_SCAN_PAGE)
            yield from rows
            if len(rows) < _SCAN_PAGE:
                return
            after = rows[-1][0]

    def _has_legacy(self, tenant: str, mdir: str) -> bool:
        """Whether the model has a folder of per-block files (written by older versions)."""
        key = (tenant, mdir)
        hit = self._legacy.get(key)
        if hit is None:
            try:
                hit = self.vol.stat(tenant, f"{KV_ROOT}/{mdir}/b").is_dir
            except (NotFound, NotADirectory):
                hit = False
            self._legacy[key] = hit
        return hit

    def _drop_pack_if_empty(self, tenant: str, mdir: str, pack: str) -> bool:
        if self.vol.kv.scan(tenant, _ref_key(mdir, pack), limit=1):
            return False
        try:
            self.vol.delete(tenant, _pack_path(mdir, pack))
            return True
        except (NotFound, NotADirectory):
            return False

    def sweep_packs(self, tenant: str, grace: float = 3600.0) -> int:
        """Delete pack files no index entry points to (left by a crash between a pack's
        write and its index, or by racing puts of one block) once older than ``grace``
        seconds (wall clock: a put in flight has written its pack but not yet its index).
        Returns the packs deleted."""
        n = 0
        cutoff = time.time() - grace
        for m in self._iter_dir(tenant, KV_ROOT):
            if not m.is_dir:
                continue
            for fi in self._walk_files(tenant, f"{m.path}/p"):
                if fi.mtime > cutoff:
                    continue
                pack = fi.name
                for key, _v in list(self._scan(tenant, _ref_key(m.name, pack))):
                    hx = key.rsplit("/", 1)[1]
                    e = self._index_get(tenant, m.name, [hx])[0]
                    if e is None or e.pack != pack:  # a stale reference
                        self.vol.kv.delete(tenant, key)
                n += self._drop_pack_if_empty(tenant, m.name, pack)
        return n

    # -- get ---------------------------------------------------------------------------

    def get_blocks(self, tenant: str, model: str, hashes: Sequence[bytes | str]
                   ) -> list[bytes | None]:
        """The blocks with these hashes (None where absent or expired), read in parallel."""
        info = self.model_info(tenant, model)
        if isinstance(hashes, str | bytes) or not isinstance(hashes, Sequence):
            raise InvalidArgument("hashes must be a list of block hashes")
        if len(hashes) > MAX_BLOCKS_PER_CALL:
            raise InvalidArgument(f"ask for at most {MAX_BLOCKS_PER_CALL} blocks per call")
        paths = [self._block_path(info, parse_hash(h, f"hashes[{i}]"))
                 for i, h in enumerate(hashes)]
        return self._read_many(tenant, paths)

    def get_block(self, tenant: str, model: str, h: bytes | str) -> bytes | None:
        return self.get_blocks(tenant, model, [h])[0]

    def _read_many(self, tenant: str, paths: list[str]) -> list[bytes | None]:
        """Blocks (logical paths) and objects: hot tier first, then one index lookup, then
        the pack ranges (contiguous blocks of one pack in one read, packs in parallel)."""
        now = self.clock()
        out: list[bytes | None] = [None] * len(paths)
        files: list[int] = []  # objects and old-layout blocks: one file each
        blocks: dict[str, list[tuple[int, str]]] = {}  # model dir -> [(index, hex)]
        for i, p in enumerate(paths):
            hit = self.hot.get((tenant, p), now)
            if hit is not None:
                out[i] = hit
                self._touch(tenant, p)
                continue
            sp = _split_block_path(p)
            if sp is None:
                files.append(i)
            else:
                blocks.setdefault(sp[0], []).append((i, sp[1]))
        packs: dict[tuple[str, str], list[tuple[_Entry, int]]] = {}
        for mdir, wanted in blocks.items():
            entries = self._index_get(tenant, mdir, [hx for _i, hx in wanted])
            legacy = self._has_legacy(tenant, mdir)
            for (i, _hx), e in zip(wanted, entries, strict=True):
                if e is None:
                    if legacy:
                        files.append(i)
                elif e.live(now):
                    packs.setdefault((mdir, e.pack), []).append((e, i))
        jobs: list[Callable[[], list[tuple[int, bytes, float | None]]]] = []
        for i in files:
            jobs.append(lambda i=i: self._read_file(tenant, i, paths[i], now))
        for (mdir, pack), items in packs.items():
            jobs.append(lambda mdir=mdir, pack=pack, items=items:
                        self._read_pack(tenant, mdir, pack, items))
        results = ([jobs[0]()] if len(jobs) == 1
                   else list(self.pool.map(lambda job: job(), jobs)))
        for res in results:
            for i, data, exp in res:
                out[i] = data
                if len(data) <= self.hot.max_bytes:
                    self.hot.put((tenant, paths[i]), data, exp)
                self._note(tenant, paths[i], len(data))
        return out

    def _read_file(self, tenant: str, i: int, path: str, now: float
                   ) -> list[tuple[int, bytes, float | None]]:
        try:
            reader = self.vol.open_file(tenant, path)
        except (NotFound, NotADirectory, IsADirectory):
            return []
        if not self._live(reader.info, now):
            return []
        return [(i, reader.read(), (reader.info.attrs or {}).get("exp"))]

    def _read_pack(self, tenant: str, mdir: str, pack: str, items: list[tuple[_Entry, int]]
                   ) -> list[tuple[int, bytes, float | None]]:
        try:
            reader = self.vol.open_file(tenant, _pack_path(mdir, pack))
        except (NotFound, NotADirectory, IsADirectory):
            return []  # deleted since the index was read: misses
        items = sorted(items, key=lambda it: it[0].off)
        # every block read in place, straight into the bytes returned (a few chunks read
        # ahead): no copy after the kernel's, where cutting a streamed run made one
        datas = reader.read_ranges([(e.off, e.n) for e, _i in items])
        return [(i, data, e.exp) for (e, i), data in zip(items, datas, strict=True)
                if len(data) == e.n]  # a short one: a damaged pack, a miss

    def _present(self, tenant: str, path: str, now: float) -> bool:
        return self._present_prefix(tenant, [path], now) == 1

    def _present_prefix(self, tenant: str, paths: list[str], now: float) -> int:
        """How many leading ``paths`` are present and live (touching them)."""
        n = 0
        step = 64
        while n < len(paths):
            part = paths[n:n + step]
            step = min(step * 4, 1024)
            miss: dict[int, str] = {}
            byd: dict[str, list[tuple[int, str]]] = {}
            for j, p in enumerate(part):
                if self.hot.get((tenant, p), now) is not None:
                    continue
                sp = _split_block_path(p)
                if sp is None:
                    miss[j] = p
                else:
                    byd.setdefault(sp[0], []).append((j, sp[1]))
            for mdir, wanted in byd.items():
                entries = self._index_get(tenant, mdir, [hx for _j, hx in wanted])
                legacy = self._has_legacy(tenant, mdir)
                for (j, _hx), e in zip(wanted, entries, strict=True):
                    if e is None and legacy:
                        miss[j] = part[j]
                    elif e is None or not e.live(now):
                        miss[j] = ""  # absent
            for j, p in enumerate(part):
                if j in miss and not (miss[j] and self._file_live(tenant, p, now)):
                    return n
                self._touch(tenant, p)
                n += 1
        return n

    def _file_live(self, tenant: str, path: str, now: float) -> bool:
        try:
            fi = self.vol.stat(tenant, path)
        except (NotFound, NotADirectory):
            return False
        return self._live(fi, now)

    def exists(self, tenant: str, model: str, h: bytes | str) -> bool:
        info = self.model_info(tenant, model)
        return self._present(tenant, self._block_path(info, parse_hash(h)), self.clock())

    def lookup(self, tenant: str, model: str, token_ids: Sequence[int],
               block_size: int | None = None,
               extra_keys: Sequence[tuple[Any, ...] | None] | None = None) -> int:
        """How many leading tokens of ``token_ids`` the longest cached prefix covers."""
        return self.lookup_ex(tenant, model, token_ids, block_size, extra_keys)[0]

    def lookup_ex(self, tenant: str, model: str, token_ids: Sequence[int],
                  block_size: int | None = None,
                  extra_keys: Sequence[tuple[Any, ...] | None] | None = None
                  ) -> tuple[int, list[bytes]]:
        """``lookup`` plus the hashes of the cached blocks, in order."""
        info = self.model_info(tenant, model)
        tokens = hashing.check_token_ids(token_ids)
        if info.block_size is None:
            if block_size is not None:
                hashing.check_block_size(block_size)
            return 0, []
        if block_size is not None and block_size != info.block_size:
            self._merge(info, block_size, None, None, None)
        bs = info.block_size
        n = len(tokens) // bs
        if extra_keys is not None and len(extra_keys) < n:
            raise InvalidArgument(f"extra_keys has {len(extra_keys)} entries but there are "
                                  f"{n} full blocks; give one entry (null or a list) per block")
        now = self.clock()
        chain: list[bytes] = []
        parent: bytes | None = None
        for i in range(n):
            ek = extra_keys[i] if extra_keys is not None else None
            if isinstance(ek, list):
                ek = tuple(ek)
            parent = hashing.hash_block_tokens(parent, tokens[i * bs:(i + 1) * bs], ek,
                                               none_hash=info.root)
            chain.append(parent)
        found = self._present_prefix(tenant, [self._block_path(info, h) for h in chain], now)
        return found * bs, chain[:found]

    # -- delete, list ------------------------------------------------------------------

    def delete_blocks(self, tenant: str, model: str, hashes: Sequence[bytes | str]) -> int:
        info = self.model_info(tenant, model)
        n = 0
        for i, h in enumerate(hashes):
            n += self._remove(tenant, self._block_path(info, parse_hash(h, f"hashes[{i}]")))
        return n

    def _remove(self, tenant: str, path: str) -> bool:
        """Remove one block (its index entry, its pack once no block of it is left, an
        old-layout file) or one object file."""
        self.hot.pop((tenant, path))
        usage = self._usage.get(tenant)
        if usage is not None:
            with self._lock:
                usage.remove(path)
        sp = _split_block_path(path)
        removed = False
        if sp is not None:
            mdir, hx = sp
            e = self._index_get(tenant, mdir, [hx])[0]
            keys = [_index_key(mdir, hx)] + ([_ref_key(mdir, e.pack, hx)] if e else [])
            self.vol.kv.delete_many(tenant, keys)  # the entry and its pack marker at once
            removed = e is not None  # a live entry was there (expired ones read as absent)
            if e is not None:
                self._drop_pack_if_empty(tenant, mdir, e.pack)
            if not self._has_legacy(tenant, mdir):
                return removed
        try:
            self.vol.delete(tenant, path)
            return True
        except (NotFound, NotADirectory):
            return removed

    def _iter_dir(self, tenant: str, path: str, after: str | None = None) -> Iterator[FileInfo]:
        cursor = encode_cursor(after) if after else None
        while True:
            try:
                items, cursor = self.vol.list_dir(tenant, path, cursor)
            except (NotFound, NotADirectory):
                return
            yield from items
            if cursor is None:
                return

    def _walk_files(self, tenant: str, root: str) -> Iterator[FileInfo]:
        for fi in self._iter_dir(tenant, root):
            if fi.is_dir:
                yield from self._walk_files(tenant, fi.path)
            else:
                yield fi

    def list_blocks(self, tenant: str, model: str, cursor: str | None = None,
                    limit: int = 1000) -> tuple[list[BlockInfo], str | None]:
        """One page of the model's live blocks in hash order, and the next page's cursor."""
        info = self.model_info(tenant, model)
        if not 1 <= limit <= 10_000:
            raise InvalidArgument("limit must be between 1 and 10000")
        after = decode_cursor(cursor) if cursor else ""
        if after and len(after) != 2 * HASH_BYTES:
            raise InvalidArgument("invalid cursor: pass back next_cursor unchanged")
        now = self.clock()
        prefix = f"{INDEX}/{info.dir}/b/"

        def indexed() -> Iterator[tuple[str, BlockInfo | None]]:
            for key, raw in self._scan(tenant, prefix, prefix + after if after else None):
                hx = key[len(prefix):]
                e = _Entry.loads(raw)
                yield hx, (BlockInfo(bytes.fromhex(hx), e.n, e.pos, e.exp, e.t)
                           if e is not None and e.live(now) else None)

        sources = [indexed()]
        if self._has_legacy(tenant, info.dir):
            sources.append(self._legacy_blocks(tenant, info, after, now))
        out: list[BlockInfo] = []
        last = ""
        for hx, bi in heapq.merge(*sources, key=lambda x: x[0]):
            if hx == last:
                continue  # in the index and an old file: the index wins (it came first)
            last = hx
            if bi is None:
                continue
            if len(out) >= limit:
                return out, encode_cursor(out[-1].hash.hex())
            out.append(bi)
        return out, None

    def _legacy_blocks(self, tenant: str, info: ModelInfo, after: str, now: float
                       ) -> Iterator[tuple[str, BlockInfo | None]]:
        base = f"{KV_ROOT}/{info.dir}/b"
        fan = [d.name for d in self._iter_dir(tenant, base) if d.is_dir and d.name >= after[:2]]
        for sub in fan:
            # the cursor's own fan-out folder resumes after the cursor's name
            start = after if after and after[:2] == sub else None
            for fi in self._iter_dir(tenant, f"{base}/{sub}", start):
                if fi.is_dir:
                    continue
                if not self._live(fi, now):
                    yield fi.name, None
                    continue
                a = fi.attrs or {}
                yield fi.name, BlockInfo(bytes.fromhex(fi.name), fi.size, a.get("pos"),
                                         a.get("exp"), fi.mtime)

    # -- keyed objects (engines that name their own chunks) ----------------------------

    def _object_model(self, tenant: str, model: str) -> ModelInfo:
        try:
            return self.model_info(tenant, model)
        except UnknownModel:
            return self.register_model(tenant, model)

    def put_object(self, tenant: str, model: str, key: str, data: bytes, *,
                   ttl: float | None = None) -> int:
        """Store ``data`` under an engine-chosen ``key`` (e.g. an LMCache key string)."""
        _check_key(key)
        data = _as_block(data, 0)
        exp = self._expiry(ttl)
        info = self._object_model(tenant, model)
        path = self._object_path(info, key)
        fi = self.vol.write(tenant, path, data, attrs={"kind": "kv_object", "key": key,
                                                       "exp": exp})
        self.hot.put((tenant, path), bytes(data), exp)
        self._note(tenant, path, fi.size)
        self._after_put(tenant, exp)
        return fi.size

    def get_object(self, tenant: str, model: str, key: str) -> bytes | None:
        """The object's bytes; None if absent or expired (or its model has none yet)."""
        try:
            info = self.model_info(tenant, model)
        except UnknownModel:
            return None
        return self._read_many(tenant, [self._object_path(info, _check_key(key))])[0]

    def has_object(self, tenant: str, model: str, key: str) -> bool:
        try:
            info = self.model_info(tenant, model)
        except UnknownModel:
            return False
        return self._present(tenant, self._object_path(info, _check_key(key)), self.clock())

    def delete_object(self, tenant: str, model: str, key: str) -> bool:
        try:
            info = self.model_info(tenant, model)
        except UnknownModel:
            return False
        return self._remove(tenant, self._object_path(info, _check_key(key)))

    def list_objects(self, tenant: str, model: str | None = None) -> list[str]:
        """Keys of the live objects of one model, or of every model."""
        try:
            infos = ([self.model_info(tenant, model)] if model is not None
                     else self.list_models(tenant))
        except UnknownModel:
            return []
        now = self.clock()
        keys = []
        for info in infos:
            for fi in self._walk_files(tenant, f"{KV_ROOT}/{info.dir}/o"):
                if self._live(fi, now) and (fi.attrs or {}).get("key"):
                    keys.append(fi.attrs["key"])  # type: ignore[index]
        return keys

    # -- hot tier, eviction ------------------------------------------------------------

    def drop_hot(self) -> None:
        """Empty the hot tier: the next reads come from the chunk store."""
        self.hot.clear()

    def _note(self, tenant: str, path: str, size: int) -> None:
        usage = self._usage.get(tenant)
        if usage is not None:
            with self._lock:
                usage.add(path, size)

    def _touch(self, tenant: str, path: str) -> None:
        usage = self._usage.get(tenant)
        if usage is not None:
            with self._lock:
                usage.touch(path)

    def _kv_files(self, tenant: str) -> Iterator[FileInfo]:
        """Objects and old-layout block files (not manifests, not packs)."""
        for m in self._iter_dir(tenant, KV_ROOT):
            if m.is_dir:
                for sub in ("o", "b"):
                    yield from self._walk_files(tenant, f"{m.path}/{sub}")

    def _indexed(self, tenant: str) -> Iterator[tuple[str, _Entry | None]]:
        """(logical block path, index entry) of every indexed block of the tenant."""
        for key, raw in self._scan(tenant, f"{INDEX}/"):
            parts = key.split("/")
            if len(parts) == 4 and parts[2] == "b":
                hx = parts[3]
                yield f"{KV_ROOT}/{parts[1]}/b/{hx[:2]}/{hx}", _Entry.loads(raw)

    def _usage_of(self, tenant: str) -> _Usage:
        """The tenant's recency index, seeded from the store (write order) on first use."""
        usage = self._usage.get(tenant)
        if usage is not None:
            return usage
        items = [(fi.mtime, fi.path, fi.size) for fi in self._kv_files(tenant)]
        items += [(e.t, path, e.n) for path, e in self._indexed(tenant) if e is not None]
        items.sort(key=lambda x: x[0])
        with self._lock:
            usage = self._usage.get(tenant)
            if usage is None:
                usage = _Usage()
                for _t, path, size in items:
                    usage.add(path, size)
                self._usage[tenant] = usage
        return usage

    def usage(self, tenant: str) -> int:
        """Bytes of KV blocks and objects the tenant holds (expired ones until evicted)."""
        return self._usage_of(tenant).total

    def _after_put(self, tenant: str, exp: float | None = None) -> None:
        if exp is not None:
            self._expiring.add(tenant)
        now = self.clock()
        if (tenant in self._expiring
                and now - self._last_sweep.get(tenant, 0.0) >= self.sweep_seconds):
            self._last_sweep[tenant] = now
            self._sweep_expired(tenant, now)
        if self.capacity_bytes is not None:
            self._enforce_capacity(tenant)

    def _sweep_expired(self, tenant: str, now: float) -> int:
        n = 0
        for path, e in list(self._indexed(tenant)):
            if e is None or not e.live(now):
                n += self._remove(tenant, path)
        for fi in list(self._kv_files(tenant)):
            if not self._live(fi, now):
                n += self._remove(tenant, fi.path)
        return n

    def _enforce_capacity(self, tenant: str) -> int:
        if self.capacity_bytes is None:
            return 0
        usage = self._usage_of(tenant)
        n = 0
        while True:
            with self._lock:
                if usage.total <= self.capacity_bytes or not usage.order:
                    return n
                path = next(iter(usage.order))
            n += self._remove(tenant, path)
            with self._lock:
                usage.remove(path)

    def evict(self, tenant: str | None = None) -> dict[str, int]:
        """Delete expired blocks, then least recently used ones past capacity."""
        tenants = [tenant] if tenant is not None else self.vol.list_tenants()
        now = self.clock()
        expired = capacity = 0
        for t in tenants:
            expired += self._sweep_expired(t, now)
            self._last_sweep[t] = now
            capacity += self._enforce_capacity(t)
        return {"expired": expired, "capacity": capacity}

    # the short names of the API sketch in issue 5
    delete = delete_blocks
    list = list_blocks


__all__ = ["KV_ROOT", "BadBlock", "BlockInfo", "HashMismatch", "HotTier", "ModelInfo",
           "ModelMismatch", "PutResult", "TokenWarehouse", "UnknownModel", "check_model_id",
           "model_dir", "parse_hash"]

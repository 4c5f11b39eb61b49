"""The volume: a POSIX-like namespace per tenant over the chunk store.

Writes store chunks first (fragments, then chunk records) and commit the entry last, in
one metadata transaction: a crash leaves the old version or the new, never a torn file.
Small files live inline in their entry row. Reads of large files stream chunk by chunk
with read-ahead; a small read touches one data share.
"""

from __future__ import annotations

import base64
import bisect
import json
import random
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

from . import paths
from .buffers import Fresh
from .chunks import ChunkStore, WriteBatch
from .config import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, StoreConfig, default_home
from .errors import (
    AlreadyExists,
    ConcurrentChange,
    DirectoryNotEmpty,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotFound,
    VersionMismatch,
)
from .kv import KVStore, open_kv
from .meta import ROOT_INO, Entry, MetaStore, new_ino
from .targets import open_target

_REF = struct.Struct("<32sQ")  # chunk id, chunk length
MAX_RETRIES = 60


def _backoff(attempt: int) -> None:
    """Jittered exponential backoff between optimistic retries (max ~20 ms)."""
    time.sleep(random.random() * min(0.02, 0.0005 * (2 ** min(attempt, 6))))

DataSource = bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]


@dataclass(frozen=True)
class FileInfo:
    path: str
    name: str
    kind: str  # 'file' | 'directory'
    size: int
    version: int
    ctime: float
    mtime: float
    inline: bool
    chunks: int
    attrs: dict[str, Any] | None

    @property
    def is_dir(self) -> bool:
        return self.kind == "directory"


@dataclass(frozen=True)
class TenantDirectory:
    """What the control plane needs of the store: create and list tenants, and where the
    control database is. It carries no way to read or write files."""

    create: Callable[[str], bool]
    names: Callable[[], list[str]]
    control_url: str
    durability: str


def pack_refs(refs: list[tuple[bytes, int]]) -> bytes:
    return b"".join(_REF.pack(c, n) for c, n in refs)


def unpack_refs(blob: bytes | None) -> list[tuple[bytes, int]]:
    if not blob:
        return []
    return [_REF.unpack_from(blob, o) for o in range(0, len(blob), _REF.size)]


def _info(path: str, e: Entry) -> FileInfo:
    return FileInfo(
        path=path, name=e.name, kind="directory" if e.is_dir else "file", size=e.size,
        version=e.version, ctime=e.ctime, mtime=e.mtime, inline=e.chunks is None,
        chunks=len(e.chunks) // _REF.size if e.chunks else 0,
        attrs=json.loads(e.attrs) if e.attrs else None,
    )


def encode_cursor(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def decode_cursor(cursor: str) -> str:
    try:
        name = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        name = ""
    if not name:
        raise InvalidArgument(
            "invalid cursor: pass back the next_cursor of the previous page unchanged")
    return name


class _Chunker:
    """Cuts any data source into pieces of exactly ``size`` bytes (the last one shorter),
    copying as little as it can: file reads of a whole chunk are passed through as is."""

    def __init__(self, data: DataSource, size: int) -> None:
        self.data, self.size = data, size

    def __iter__(self) -> Iterator[bytes | memoryview]:
        data, size = self.data, self.size
        if isinstance(data, bytes | bytearray | memoryview):
            mv = memoryview(data)
            for i in range(0, len(mv), size):
                yield mv[i : i + size]
            return
        if hasattr(data, "read"):
            while True:
                piece = data.read(size)  # type: ignore[union-attr]
                if not piece:
                    return
                if len(piece) < size:  # a pipe or socket: top up to a whole chunk
                    buf = bytearray(piece)
                    while len(buf) < size:
                        more = data.read(size - len(buf))  # type: ignore[union-attr]
                        if not more:
                            break
                        buf += more
                    piece = bytes(buf)
                    if len(piece) < size:
                        yield piece
                        return
                yield piece
        buf = bytearray()
        for piece in data:  # type: ignore[union-attr]
            if not isinstance(piece, bytes | bytearray | memoryview):
                raise InvalidArgument(f"data must be bytes, got {type(piece).__name__}")
            if not buf and len(piece) == size:
                yield piece
                continue
            buf += piece
            if len(buf) >= size:
                view = memoryview(buf)
                cut = len(buf) - len(buf) % size
                for i in range(0, cut, size):
                    yield bytes(view[i : i + size])
                del view
                del buf[:cut]
        if buf:
            yield bytes(buf)


class Volume:
    """Thread-safe. One per process; cheap calls, no hidden global state."""

    def __init__(self, cfg: StoreConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.home = Path(cfg.home)
        self.meta = MetaStore(cfg.engines, cfg.shard_map, cfg.control, cfg.durability)
        self.targets = [open_target(t.id, t.url, cfg.durability, cfg.direct_writes)
                        for t in cfg.targets]
        self.chunks = ChunkStore(self.meta, self.targets, cfg.k, cfg.m, cfg.checksum_block,
                                 cfg.io_threads)
        self.pool = ThreadPoolExecutor(max(cfg.write_concurrency, cfg.readahead) * 2,
                                       thread_name_prefix="lodestore-chunk")
        self._dirs: dict[tuple[str, int, str], tuple[int, float]] = {}
        self._dirs_lock = threading.Lock()
        self._kv: KVStore | None = None

    # -- lifecycle ---------------------------------------------------------------------

    @classmethod
    def init(cls, home: str | Path | None = None, cfg: StoreConfig | None = None) -> Volume:
        """Create a store (idempotent: an existing store is opened, not replaced)."""
        home = Path(home) if home is not None else default_home()
        home.mkdir(parents=True, exist_ok=True)
        if (home / "lodestore.yaml").exists():
            return cls.open(home)
        cfg = cfg or StoreConfig.embedded(home)
        cfg.validate()
        for t in cfg.targets:
            open_target(t.id, t.url, cfg.durability).ensure()
        vol = cls(cfg)  # opens every engine first: a bad URL leaves no config behind
        try:
            cfg.save()
        except BaseException:
            vol.close()
            raise
        return vol

    @classmethod
    def open(cls, home: str | Path | None = None, *, create: bool = False) -> Volume:
        home = Path(home) if home is not None else default_home()
        if create and not (home / "lodestore.yaml").exists():
            return cls.init(home)
        return cls(StoreConfig.load(home))

    @property
    def kv(self) -> KVStore:
        """The KV tier (opened on first use: most CLI commands never need it)."""
        if self._kv is None:
            with self._dirs_lock:
                if self._kv is None:
                    self._kv = open_kv(self.cfg.kv_url(), self.cfg.durability)
        return self._kv

    def close(self) -> None:
        if self._kv is not None:
            self._kv.close()
        self.pool.shutdown(wait=True)
        self.chunks.close()
        self.meta.close()

    def __enter__(self) -> Volume:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tenants -----------------------------------------------------------------------

    def create_tenant(self, tenant: str) -> bool:
        return self.meta.create_tenant(paths.check_tenant_id(tenant))

    def list_tenants(self) -> list[str]:
        return [t for t, _ in self.meta.list_tenants()]

    def tenant_directory(self) -> TenantDirectory:
        """Tenant registration without data access, for the control plane."""
        meta = self.meta
        return TenantDirectory(
            create=lambda t: meta.create_tenant(paths.check_tenant_id(t)),
            names=lambda: [t for t, _ in meta.list_tenants()],
            control_url=self.cfg.control,
            durability=self.cfg.durability,
        )

    def _tenant(self, tenant: str) -> str:
        paths.check_tenant_id(tenant)
        self.meta.tenant_key(tenant)  # raises UnknownTenant
        return tenant

    # -- path resolution ---------------------------------------------------------------

    def _lookup_dir(self, tenant: str, parent: int, name: str, path: str) -> int:
        key = (tenant, parent, name)
        hit = self._dirs.get(key)
        now = time.monotonic()
        if hit is not None and hit[1] > now:
            return hit[0]
        e = self.meta.get(tenant, parent, name)
        if e is None:
            raise NotFound(f"directory {path} does not exist")
        if not e.is_dir:
            raise NotADirectory(f"{path} is a file, not a directory")
        with self._dirs_lock:
            self._dirs[key] = (e.ino, now + self.cfg.dir_cache_ttl)
        return e.ino

    def _forget_dir(self, tenant: str, parent: int, name: str) -> None:
        with self._dirs_lock:
            self._dirs.pop((tenant, parent, name), None)
            if len(self._dirs) > 100_000:
                self._dirs.clear()

    def _resolve_dir(self, tenant: str, parts: tuple[str, ...], create: bool = False) -> list[int]:
        """Inodes of root and each directory in ``parts`` (mkdir -p when ``create``)."""
        chain = [ROOT_INO]
        for i, comp in enumerate(parts):
            path = paths.join(parts[: i + 1])
            try:
                chain.append(self._lookup_dir(tenant, chain[-1], comp, path))
            except NotFound:
                if not create:
                    raise
                chain.append(self._mkdir_one(tenant, chain[-1], comp, path, exist_ok=True).ino)
        return chain

    def _live_parent(self, tenant: str, parts: tuple[str, ...], parent: int, create: bool) -> int:
        """Re-check, bypassing the directory cache, that ``parent`` is still the directory
        at ``parts[:-1]`` before a new entry goes in it (another process may have removed
        or moved it within the cache TTL). Returns the directory's current inode."""
        if len(parts) < 2:
            return parent
        d = self.meta.get(tenant, self._grandparent(tenant, parts), parts[-2])
        if d is not None and d.is_dir and d.ino == parent:
            return parent
        with self._dirs_lock:
            self._dirs.clear()
        return self._resolve_dir(tenant, parts[:-1], create=create)[-1]

    def _grandparent(self, tenant: str, parts: tuple[str, ...]) -> int:
        return self._resolve_dir(tenant, parts[:-2])[-1] if len(parts) > 2 else ROOT_INO

    def _entry(self, tenant: str, parts: tuple[str, ...]) -> tuple[int, Entry]:
        if not parts:
            raise IsADirectory("/ is the root directory")
        parent = self._resolve_dir(tenant, parts[:-1])[-1]
        e = self.meta.get(tenant, parent, parts[-1])
        if e is None:
            raise NotFound(f"{paths.join(parts)} does not exist")
        return parent, e

    # -- namespace ---------------------------------------------------------------------

    def stat(self, tenant: str, path: str) -> FileInfo:
        self._tenant(tenant)
        parts = paths.split_path(path)
        if not parts:
            return FileInfo("/", "", "directory", 0, 0, 0.0, 0.0, True, 0, None)
        _, e = self._entry(tenant, parts)
        return _info(paths.join(parts), e)

    def exists(self, tenant: str, path: str) -> bool:
        try:
            self.stat(tenant, path)
            return True
        except (NotFound, NotADirectory):
            return False

    def list_dir(
        self, tenant: str, path: str, cursor: str | None = None, limit: int = 1000
    ) -> tuple[list[FileInfo], str | None]:
        """One page of a directory in byte order of names, and the cursor of the next."""
        self._tenant(tenant)
        if not 1 <= limit <= 10_000:
            raise InvalidArgument("limit must be between 1 and 10000")
        parts = paths.split_path(path)
        ino = self._resolve_dir(tenant, parts)[-1]
        after = decode_cursor(cursor) if cursor else None
        kids = self.meta.children(tenant, ino, after, limit + 1)
        more = len(kids) > limit
        kids = kids[:limit]
        base = paths.join(parts).rstrip("/")
        items = [_info(f"{base}/{e.name}", e) for e in kids]
        return items, (encode_cursor(kids[-1].name) if more and kids else None)

    def iter_dir(self, tenant: str, path: str) -> Iterator[FileInfo]:
        cursor = None
        while True:
            items, cursor = self.list_dir(tenant, path, cursor)
            yield from items
            if cursor is None:
                return

    def walk(self, tenant: str, path: str = "/") -> Iterator[FileInfo]:
        """Every entry below ``path``, depth first."""
        for info in self.iter_dir(tenant, path):
            yield info
            if info.is_dir:
                yield from self.walk(tenant, info.path)

    def _mkdir_one(self, tenant: str, parent: int, name: str, path: str, exist_ok: bool) -> Entry:
        now = time.time()
        e = Entry(tenant, parent, name, new_ino(), "d", 1, 0, now, now)
        try:
            return self.meta.create(e)
        except AlreadyExists:
            cur = self.meta.get(tenant, parent, name)
            if cur is not None and cur.is_dir and exist_ok:
                return cur
            if cur is not None and not cur.is_dir:
                raise NotADirectory(f"{path} exists and is a file") from None
            raise AlreadyExists(f"{path} already exists") from None

    def mkdir(self, tenant: str, path: str, parents: bool = False, exist_ok: bool = False) -> FileInfo:
        self._tenant(tenant)
        parts = paths.split_path(path)
        if not parts:
            if exist_ok:
                return self.stat(tenant, "/")
            raise AlreadyExists("/ already exists")
        parent = self._resolve_dir(tenant, parts[:-1], create=parents)[-1]
        e = self._mkdir_one(tenant, parent, parts[-1], paths.join(parts), exist_ok)
        return _info(paths.join(parts), e)

    # -- writes ------------------------------------------------------------------------

    def _store_stream(self, tenant: str, data: DataSource, chunk_size: int | None = None
                      ) -> tuple[list[tuple[bytes, int]], int]:
        """Store all chunks of ``data`` with bounded parallelism; nothing is committed."""
        refs: list[tuple[bytes, int]] = []
        inflight: list[Future] = []
        batch = WriteBatch()  # registry updates and folder fsyncs, finished together below
        size = 0
        limit = self.cfg.write_concurrency
        try:
            for piece in _Chunker(data, chunk_size or self.cfg.chunk_size):
                size += len(piece)
                inflight.append(self.pool.submit(self.chunks.store, tenant, piece, batch))
                if len(inflight) >= limit:
                    refs.append(inflight.pop(0).result())
            for fut in inflight:
                refs.append(fut.result())
        finally:
            for fut in inflight:  # a failure mid-stream: cancel what has not started,
                fut.cancel()
            wait(inflight)  # and let started chunks finish before the caller's data goes
        self.chunks.finish(batch)
        return refs, size

    def _head(self, data: DataSource) -> tuple[bytes | None, DataSource]:
        """If ``data`` fits inline, return it whole; else a source that replays it."""
        limit = self.cfg.inline_threshold
        if isinstance(data, bytes | bytearray | memoryview):
            return (bytes(data) if len(data) <= limit else None), data
        if isinstance(data, str):
            raise InvalidArgument("data must be bytes; encode text first (e.g. UTF-8)")
        if not (hasattr(data, "read") or isinstance(data, Iterable)):
            raise InvalidArgument(
                f"data must be bytes, a binary file object or an iterable of bytes, "
                f"not {type(data).__name__}")
        if hasattr(data, "read"):
            first = data.read(limit + 1)  # type: ignore[union-attr]
            if len(first) <= limit:
                return first, first
            return None, _Chained([first], data)  # type: ignore[arg-type]
        it = iter(data)  # type: ignore[arg-type]
        buf = bytearray()
        for piece in it:
            if not isinstance(piece, bytes | bytearray | memoryview):
                raise InvalidArgument(f"data must be bytes, got {type(piece).__name__}")
            buf += piece
            if len(buf) > limit:
                return None, _Chained([bytes(buf)], it)  # type: ignore[arg-type]
        return bytes(buf), bytes(buf)

    def write(
        self,
        tenant: str,
        path: str,
        data: DataSource,
        *,
        mode: str = "overwrite",
        expected_version: int | None = None,
        parents: bool = True,
        attrs: dict[str, Any] | Callable[[], dict[str, Any] | None] | None = None,
        merge_attrs: Callable[[dict[str, Any] | None, int], dict[str, Any] | None] | None = None,
        chunk_size: int | None = None,
    ) -> FileInfo:
        """Create, overwrite or append ``path``.

        ``expected_version``: the write happens only if the file is at that version
        (0: only if it does not exist yet). ``mode='create'`` refuses an existing file.
        ``attrs`` is stored with the new version (labels, spans: owned by upper layers);
        a callable is evaluated after all data is consumed and before the commit, so
        attributes derived from streamed content land atomically with it.
        For appends, ``merge_attrs(old_attrs, old_size)`` computes them from the version
        being appended to, inside the compare-and-swap loop, so concurrent appends
        cannot lose each other's attributes.
        ``chunk_size`` overrides the store's for this (non-append) write: a caller that
        writes whole objects read back by range (the token warehouse's packs) stores one
        object as one chunk, with m fragment files instead of m per 4 MiB.
        """
        self._tenant(tenant)
        if mode not in ("overwrite", "create", "append"):
            raise InvalidArgument("mode must be 'overwrite', 'create' or 'append'")
        if chunk_size is not None and not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidArgument(f"chunk_size must be between 4 KiB and 256 MiB, not {chunk_size}")
        if chunk_size is not None and mode == "append":
            raise InvalidArgument("chunk_size cannot be set for appends (they follow the file's)")
        if expected_version is not None and expected_version < 0:
            raise InvalidArgument("expected_version must be >= 0")
        parts = paths.split_path(path)
        if not parts:
            raise IsADirectory("cannot write to / (the root directory)")
        norm = paths.join(parts)
        parent = self._resolve_dir(tenant, parts[:-1], create=parents)[-1]
        name = parts[-1]
        attrs_json = (json.dumps(attrs, sort_keys=True)
                      if attrs is not None and not callable(attrs) else None)
        if mode == "append":
            return self._append(tenant, parent, parts, norm, data, expected_version, attrs_json,
                                merge_attrs, parents)
        # Check preconditions before spending work on chunks.
        cur = self.meta.get(tenant, parent, name)
        self._check(norm, cur, mode, expected_version)
        inline, source = self._head(data)
        if inline is not None:
            blob: bytes | None = inline
            refs_blob = None
            size = len(inline)
        else:
            refs, size = self._store_stream(tenant, source, chunk_size)
            blob, refs_blob = None, pack_refs(refs)
        if callable(attrs):
            late = attrs()
            attrs_json = json.dumps(late, sort_keys=True) if late is not None else None
        for attempt in range(MAX_RETRIES):
            now = time.time()
            if cur is None:
                fresh = self._live_parent(tenant, parts, parent, parents)
                if fresh != parent:
                    parent = fresh
                    cur = self.meta.get(tenant, parent, name)
                    self._check(norm, cur, mode, expected_version)
                    continue
                e = Entry(tenant, parent, name, new_ino(), "f", 1, size, now, now,
                          blob, refs_blob, attrs_json)
                try:
                    return _info(norm, self.meta.create(e))
                except AlreadyExists:
                    _backoff(attempt)
                    cur = self.meta.get(tenant, parent, name)
                    self._check(norm, cur, mode, expected_version)
                    continue
            new = replace(cur, version=cur.version + 1, size=size, mtime=now, data=blob,
                          chunks=refs_blob, attrs=attrs_json)
            try:
                return _info(norm, self.meta.update(cur, new))
            except ConcurrentChange:
                _backoff(attempt)
                cur = self.meta.get(tenant, parent, name)
                self._check(norm, cur, mode, expected_version)
        raise ConcurrentChange(f"{norm} is being changed by others; retry")

    @staticmethod
    def _check(path: str, cur: Entry | None, mode: str, expected: int | None) -> None:
        if cur is not None and cur.is_dir:
            raise IsADirectory(f"{path} is a directory")
        if expected is not None:
            actual = cur.version if cur is not None else None
            if (expected == 0 and cur is not None) or (expected > 0 and actual != expected):
                raise VersionMismatch(path, expected, actual)
        if mode == "create" and cur is not None:
            raise AlreadyExists(f"{path} already exists; use overwrite or append")

    def _append(
        self, tenant: str, parent: int, parts: tuple[str, ...], path: str, data: DataSource,
        expected: int | None, attrs_json: str | None,
        merge_attrs: Callable[[dict[str, Any] | None, int], dict[str, Any] | None] | None,
        parents: bool,
    ) -> FileInfo:
        name = parts[-1]
        cur = self.meta.get(tenant, parent, name)
        self._check(path, cur, "append", expected)
        inline, source = self._head(data)
        new_refs: list[tuple[bytes, int]] | None = None
        for attempt in range(MAX_RETRIES):
            now = time.time()
            old_size = cur.size if cur is not None else 0
            old_inline = cur.data if cur is not None and cur.chunks is None else b""
            if inline is not None and len(old_inline or b"") + len(inline) <= self.cfg.inline_threshold and (
                cur is None or cur.chunks is None
            ):
                blob, refs_blob, size = (old_inline or b"") + inline, None, old_size + len(inline)
            else:
                if new_refs is None:
                    new_refs, _ = self._store_stream(tenant, inline if inline is not None else source)
                refs = unpack_refs(cur.chunks) if cur is not None and cur.chunks else []
                if old_inline:
                    refs = [self.chunks.store(tenant, old_inline)]
                refs = self._merge_tail(tenant, refs, new_refs)
                blob, refs_blob = None, pack_refs(refs)
                size = sum(n for _, n in refs)
            if merge_attrs is not None:
                old_attrs = json.loads(cur.attrs) if cur is not None and cur.attrs else None
                merged = merge_attrs(old_attrs, old_size)
                attrs_json = json.dumps(merged, sort_keys=True) if merged is not None else None
            try:
                if cur is None:
                    fresh = self._live_parent(tenant, parts, parent, parents)
                    if fresh != parent:
                        parent = fresh
                        raise ConcurrentChange("parent directory moved")
                    e = Entry(tenant, parent, name, new_ino(), "f", 1, size, now, now,
                              blob, refs_blob, attrs_json)
                    return _info(path, self.meta.create(e))
                new = replace(cur, version=cur.version + 1, size=size, mtime=now, data=blob,
                              chunks=refs_blob, attrs=attrs_json if attrs_json is not None else cur.attrs)
                return _info(path, self.meta.update(cur, new))
            except (ConcurrentChange, AlreadyExists):
                _backoff(attempt)
                cur = self.meta.get(tenant, parent, name)
                self._check(path, cur, "append", expected)
        raise ConcurrentChange(f"{path} is being changed by others; retry")

    def _merge_tail(self, tenant: str, old: list[tuple[bytes, int]],
                    new: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        """Join a short last chunk with the first new one, so appends don't fragment."""
        if not old or not new or old[-1][1] + new[0][1] > self.cfg.chunk_size:
            return old + new
        a = self.chunks.read_all(tenant, old[-1][0].hex())
        b = self.chunks.read_all(tenant, new[0][0].hex())
        return old[:-1] + [self.chunks.store(tenant, a + b)] + new[1:]

    # -- reads -------------------------------------------------------------------------

    def open_file(self, tenant: str, path: str) -> FileReader:
        self._tenant(tenant)
        parts = paths.split_path(path)
        _, e = self._entry(tenant, parts)
        if e.is_dir:
            raise IsADirectory(f"{paths.join(parts)} is a directory")
        return FileReader(self, tenant, paths.join(parts), e)

    def read(self, tenant: str, path: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.open_file(tenant, path).read(offset, length)

    # -- move and delete ---------------------------------------------------------------

    def move(self, tenant: str, src: str, dst: str, overwrite: bool = False) -> FileInfo:
        self._tenant(tenant)
        sp, dp = paths.split_path(src), paths.split_path(dst)
        if not sp or not dp:
            raise InvalidPath("cannot move the root directory or onto it")
        if sp == dp:
            return self.stat(tenant, src)
        for attempt in range(MAX_RETRIES):
            if attempt:
                _backoff(attempt)
            s_parent, s = self._entry(tenant, sp)
            chain = self._resolve_dir(tenant, dp[:-1])
            if s.is_dir and s.ino in chain:
                raise InvalidArgument(f"cannot move {paths.join(sp)} into itself ({paths.join(dp)})")
            d_parent = chain[-1]
            existing = self.meta.get(tenant, d_parent, dp[-1])
            if existing is not None:
                if not overwrite:
                    raise AlreadyExists(f"{paths.join(dp)} already exists; pass overwrite to replace it")
                if existing.is_dir and not s.is_dir:
                    raise IsADirectory(f"{paths.join(dp)} is a directory; cannot replace it with a file")
                if s.is_dir and not existing.is_dir:
                    raise NotADirectory(f"{paths.join(dp)} is a file; cannot replace it with a directory")
                if existing.is_dir and self.meta.has_children(tenant, existing.ino):
                    raise DirectoryNotEmpty(f"{paths.join(dp)} is a non-empty directory")
            moved = replace(s, parent=d_parent, name=dp[-1], ctime=time.time())
            try:
                self.meta.move(s, moved, existing)
            except ConcurrentChange:
                continue
            if s.is_dir:
                self._forget_dir(tenant, s_parent, sp[-1])
            if existing is not None and existing.is_dir:
                self._forget_dir(tenant, d_parent, dp[-1])
            return _info(paths.join(dp), moved)
        raise ConcurrentChange(f"{paths.join(sp)} keeps changing; retry the move")

    def delete(
        self, tenant: str, path: str, recursive: bool = False, expected_version: int | None = None
    ) -> None:
        self._tenant(tenant)
        parts = paths.split_path(path)
        if not parts:
            raise InvalidPath("cannot delete the root directory")
        for attempt in range(MAX_RETRIES):
            if attempt:
                _backoff(attempt)
            parent, e = self._entry(tenant, parts)
            if expected_version is not None and e.version != expected_version:
                raise VersionMismatch(paths.join(parts), expected_version, e.version)
            nonempty = e.is_dir and self.meta.has_children(tenant, e.ino)
            if nonempty and not recursive:
                raise DirectoryNotEmpty(
                    f"{paths.join(parts)} is not empty; delete recursively to remove it all")
            try:
                self.meta.remove(e, to_trash=nonempty)
            except ConcurrentChange:
                continue
            if e.is_dir:
                self._forget_dir(tenant, parent, parts[-1])
            if nonempty:
                self.empty_trash()
            return
        raise ConcurrentChange(f"{paths.join(parts)} keeps changing; retry the delete")

    def empty_trash(self) -> int:
        """Remove the subtrees of recursively deleted directories."""
        removed = 0
        while True:
            items = self.meta.trash_items()
            if not items:
                return removed
            for tenant, ino in items:
                removed += self.meta.empty_trash_dir(tenant, ino)

    def usage(self, tenant: str) -> tuple[int, int]:
        """(bytes, files) the tenant stores: logical sizes, before erasure coding."""
        self._tenant(tenant)
        return self.meta.usage(tenant)

    # -- maintenance (see maintenance.py) ----------------------------------------------

    def target_health(self) -> dict[str, Any]:
        return {t.id: t.health() for t in self.targets}


class _Chained:
    """A file-like object: already-read head bytes, then the rest of a stream or iterator."""

    def __init__(self, head: list[bytes], rest: IO[bytes] | Iterator[bytes]) -> None:
        self.buf = bytearray(b"".join(head))
        self.rest = rest

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.buf) < n:
            more = (self.rest.read(n - len(self.buf) if n > 0 else 1 << 20)  # type: ignore[union-attr]
                    if hasattr(self.rest, "read") else next(self.rest, b""))  # type: ignore[call-overload]
            if not more:
                break
            if not isinstance(more, bytes | bytearray | memoryview):
                raise InvalidArgument(f"data must be bytes, got {type(more).__name__}")
            self.buf += more
        if n < 0 or n >= len(self.buf):
            out, self.buf = bytes(self.buf), bytearray()
            return out
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out


# Reads at least this long are made in place (``FileReader.read_ranges``); shorter ones
# (4 KiB random reads) keep the plain path, whose one small copy is cheaper than the setup.
IN_PLACE_MIN = 64 * 1024


class FileReader:
    """A snapshot of one file version: reads see that version even if it is replaced."""

    def __init__(self, vol: Volume, tenant: str, path: str, e: Entry) -> None:
        self.vol, self.tenant, self.path, self.entry = vol, tenant, path, e
        self.size = e.size
        self.info = _info(path, e)
        self.refs = unpack_refs(e.chunks)
        self.hexes = [cid.hex() for cid, _n in self.refs]
        self.starts: list[int] = []
        pos = 0
        for _, n in self.refs:
            self.starts.append(pos)
            pos += n

    @property
    def inline(self) -> bool:
        """Is the content in the metadata row (reads need no fragment I/O)?"""
        return self.entry.chunks is None

    def _pieces(self, offset: int, end: int) -> list[tuple[str, int, int]]:
        out = []
        i = max(0, bisect.bisect_right(self.starts, offset) - 1)
        while i < len(self.refs) and self.starts[i] < end:
            cid, n = self.refs[i]
            s = self.starts[i]
            out.append((cid.hex(), max(offset, s) - s, min(end, s + n) - s))
            i += 1
        return out

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length must be >= 0")
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return b""
        if self.entry.chunks is None:
            return (self.entry.data or b"")[offset:end]
        if end - offset < IN_PLACE_MIN:
            i = bisect.bisect_right(self.starts, offset) - 1
            s0 = self.starts[i]
            if end <= s0 + self.refs[i][1]:  # within one chunk: try the cached fast path
                data = self.vol.chunks.read_small(self.tenant, self.hexes[i], offset - s0,
                                                  end - s0)
                if data is not None:
                    return data
            pieces = self._pieces(offset, end)
            if len(pieces) == 1:
                cid, a, b = pieces[0]
                return self.vol.chunks.read(self.tenant, cid, a, b)
            return b"".join(self._parallel(pieces))
        return self.read_ranges([(offset, end - offset)])[0]

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several (offset, length) ranges at once, each read in place: the shares are
        read by the kernel straight into the bytes returned (no copy after the kernel's),
        up to ``readahead`` chunks at a time."""
        outs: list[Fresh] = []
        jobs: list[tuple[str, int, int, memoryview]] = []
        for offset, length in ranges:
            if offset < 0 or length < 0:
                raise InvalidArgument("offset and length must be >= 0")
            end = min(self.size, offset + length)
            fresh = Fresh(max(0, end - offset))
            outs.append(fresh)
            if offset >= end:
                continue
            if self.entry.chunks is None:
                fresh.view[:] = (self.entry.data or b"")[offset:end]
                continue
            pos = 0
            for cid, a, b in self._pieces(offset, end):
                jobs.append((cid, a, b, fresh.view[pos:pos + b - a]))
                pos += b - a
        chunks, tenant = self.vol.chunks, self.tenant
        if len(jobs) == 1:
            cid, a, b, view = jobs[0]
            chunks.read_into(tenant, cid, a, b, view)
        elif jobs:
            depth = max(1, self.vol.cfg.readahead)
            futs: list[Future] = []
            try:
                for cid, a, b, view in jobs:
                    if len(futs) >= depth:
                        futs.pop(0).result()
                    futs.append(self.vol.pool.submit(chunks.read_into, tenant, cid, a, b,
                                                     view))
                for fut in futs:
                    fut.result()
            finally:
                for fut in futs:  # a failure: let the reads in flight end before we leave
                    fut.cancel()
                wait(futs)
        return [f.finish() for f in outs]

    def _parallel(self, pieces: list[tuple[str, int, int]], in_place: bool = False
                  ) -> Iterator[bytes]:
        """The pieces' bytes in order, ``readahead`` chunks read ahead. ``in_place``:
        each piece is read straight into the bytes yielded (see ``read_ranges``)."""
        depth = max(1, self.vol.cfg.readahead)
        chunks, pool, tenant = self.vol.chunks, self.vol.pool, self.tenant

        def one(cid: str, a: int, b: int) -> bytes:
            if not in_place or b - a < IN_PLACE_MIN:
                return chunks.read(tenant, cid, a, b)
            fresh = Fresh(b - a)
            chunks.read_into(tenant, cid, a, b, fresh.view)
            return fresh.finish()

        futs: list[Future] = []
        it = iter(pieces)
        try:
            for cid, a, b in it:
                futs.append(pool.submit(one, cid, a, b))
                if len(futs) >= depth:
                    break
            while futs:
                data = futs.pop(0).result()
                nxt = next(it, None)
                if nxt is not None:
                    futs.append(pool.submit(one, *nxt))
                yield data
        finally:
            for fut in futs:  # abandoned early: drop what has not started
                fut.cancel()

    def iter(self, offset: int = 0, length: int | None = None) -> Iterator[bytes]:
        """Stream the file chunk by chunk with read-ahead; memory stays bounded."""
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length must be >= 0")
        end = self.size if length is None else min(self.size, offset + length)
        if offset >= end:
            return
        if self.entry.chunks is None:
            yield (self.entry.data or b"")[offset:end]
            return
        yield from self._parallel(self._pieces(offset, end), in_place=True)

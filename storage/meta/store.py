"""The metadata store: directory entries and the chunk registry over virtual shards.

An entry lives in the virtual shard ``hash(tenant, parent inode) mod N``; a chunk record
in ``hash(tenant, chunk id) mod N``. The shard map (part of the store config) places each
virtual shard on one physical engine. Every operation is one transaction on one engine,
except a move between engines, which runs a small commit protocol (see ``move``).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import xxhash
from sqlalchemy import Connection, and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError, OperationalError

from ..errors import AlreadyExists, StorageError, UnknownTenant, VersionMismatch
from .engines import make_engine
from .schema import chunks, control, entries, intents, meta, tenants, trash

ROOT_INO = 1
PENDING_TIMEOUT = 30.0  # seconds an unfinished cross-engine move may stay undecided


class ConcurrentChange(StorageError):
    """The entry changed between read and write; the caller re-reads and retries."""

    code = "concurrent_change"


@dataclass(frozen=True)
class Entry:
    tenant: str
    parent: int
    name: str
    ino: int
    kind: str  # 'f' or 'd'
    version: int
    size: int
    ctime: float
    mtime: float
    data: bytes | None = None
    chunks: bytes | None = None
    attrs: str | None = None

    @property
    def is_dir(self) -> bool:
        return self.kind == "d"


@dataclass(frozen=True)
class ChunkRecord:
    tenant: str
    cid: str
    length: int
    k: int
    m: int
    share_len: int
    block_size: int
    placement: tuple[str, ...]  # target id per share index ('' = no copy)
    created: float
    touched: float


_ENTRY_COLS = (
    "tenant", "parent", "name", "ino", "kind", "version", "size", "ctime", "mtime",
    "data", "chunks", "attrs",
)
_SEL_ENTRY = [entries.c[n] for n in _ENTRY_COLS] + [entries.c.state, entries.c.intent, entries.c.pending]


def new_ino() -> int:
    return secrets.randbits(62) + 2


def _entry_from(row) -> Entry:  # type: ignore[no-untyped-def]
    data = row.data
    ch = row.chunks
    return Entry(
        row.tenant, row.parent, row.name, row.ino, row.kind, row.version, row.size,
        row.ctime, row.mtime,
        bytes(data) if data is not None else None,
        bytes(ch) if ch is not None else None,
        row.attrs,
    )


def _entry_values(e: Entry, vshard: int) -> dict:
    return {n: getattr(e, n) for n in _ENTRY_COLS} | {"vshard": vshard, "state": 0}


def _pack_pending(e: Entry) -> bytes:
    d = {n: getattr(e, n) for n in _ENTRY_COLS}
    for n in ("data", "chunks"):
        if d[n] is not None:
            d[n] = d[n].hex()
    return json.dumps(d).encode()


def _unpack_pending(raw: bytes) -> Entry:
    d = json.loads(bytes(raw))
    for n in ("data", "chunks"):
        if d[n] is not None:
            d[n] = bytes.fromhex(d[n])
    return Entry(**d)


class MetaStore:
    def __init__(
        self, engine_urls: list[str], shard_map: list[int], control_url: str,
        durability: str = "fsync",
    ) -> None:
        self.urls = list(engine_urls)
        self.engines = [make_engine(u, durability) for u in engine_urls]
        self.shard_map = list(shard_map)
        self.vshards = len(shard_map)
        self.control = make_engine(control_url, durability)
        self._keys: dict[str, bytes] = {}
        self._keys_lock = threading.Lock()
        for eng in self.engines:
            self._retry_locked(lambda eng=eng: meta.create_all(eng))
        self._retry_locked(lambda: control.create_all(self.control))

    @staticmethod
    def _retry_locked(fn):  # type: ignore[no-untyped-def]
        for attempt in range(50):
            try:
                return fn()
            except OperationalError as exc:  # concurrent first-time schema creation
                if "locked" not in str(exc) or attempt == 49:
                    raise
                time.sleep(0.05)
        return None

    def close(self) -> None:
        for eng in self.engines:
            eng.dispose()
        self.control.dispose()

    # -- placement ---------------------------------------------------------------------

    def vshard_of(self, tenant: str, key: int | str) -> int:
        return xxhash.xxh64_intdigest(f"{tenant}\x00{key}".encode()) % self.vshards

    def _engine(self, vshard: int):  # type: ignore[no-untyped-def]
        return self.engines[self.shard_map[vshard]]

    @contextmanager
    def _read(self, vshard: int) -> Iterator[Connection]:
        with self._engine(vshard).connect() as conn:
            yield conn

    @contextmanager
    def _write(self, vshard: int) -> Iterator[Connection]:
        with self._engine(vshard).connect().execution_options(write=True) as conn, conn.begin():
            yield conn

    # -- tenants -----------------------------------------------------------------------

    def create_tenant(self, tenant: str) -> bool:
        """Register ``tenant``; returns False if it already existed."""
        try:
            with self.control.connect().execution_options(write=True) as c, c.begin():
                c.execute(insert(tenants).values(
                    id=tenant, chunk_key=secrets.token_bytes(32), created=time.time()))
            return True
        except IntegrityError:
            return False

    def tenant_key(self, tenant: str) -> bytes:
        key = self._keys.get(tenant)
        if key is not None:
            return key
        with self.control.connect() as c:
            row = c.execute(select(tenants.c.chunk_key).where(tenants.c.id == tenant)).first()
        if row is None:
            raise UnknownTenant(tenant)
        with self._keys_lock:
            self._keys[tenant] = bytes(row[0])
        return self._keys[tenant]

    def list_tenants(self) -> list[tuple[str, float]]:
        with self.control.connect() as c:
            return [(r.id, r.created) for r in c.execute(
                select(tenants.c.id, tenants.c.created).order_by(tenants.c.id))]

    # -- entries: reads ----------------------------------------------------------------

    def get(self, tenant: str, parent: int, name: str) -> Entry | None:
        vs = self.vshard_of(tenant, parent)
        with self._read(vs) as c:
            row = c.execute(select(*_SEL_ENTRY).where(
                entries.c.tenant == tenant, entries.c.parent == parent, entries.c.name == name
            )).first()
        if row is None:
            return None
        if row.state:
            return self._settle(vs, row)
        return _entry_from(row)

    def children(
        self, tenant: str, ino: int, after: str | None = None, limit: int = 1000
    ) -> list[Entry]:
        vs = self.vshard_of(tenant, ino)
        q = select(*_SEL_ENTRY).where(entries.c.tenant == tenant, entries.c.parent == ino)
        if after is not None:
            q = q.where(entries.c.name > after)
        q = q.order_by(entries.c.name).limit(limit)
        with self._read(vs) as c:
            rows = c.execute(q).all()
        out: list[Entry] = []
        for row in rows:
            e = self._settle(vs, row) if row.state else _entry_from(row)
            if e is not None:
                out.append(e)
        return out

    def has_children(self, tenant: str, ino: int) -> bool:
        return bool(self.children(tenant, ino, limit=1))

    def count_children(self, tenant: str, ino: int) -> int:
        vs = self.vshard_of(tenant, ino)
        with self._read(vs) as c:
            return c.execute(select(func.count()).select_from(entries).where(
                entries.c.tenant == tenant, entries.c.parent == ino)).scalar_one()

    # -- entries: writes ---------------------------------------------------------------

    def create(self, e: Entry) -> Entry:
        vs = self.vshard_of(e.tenant, e.parent)
        for _ in range(3):
            try:
                with self._write(vs) as c:
                    c.execute(insert(entries).values(**_entry_values(e, vs)))
                return e
            except IntegrityError:
                if self.get(e.tenant, e.parent, e.name) is not None:
                    raise AlreadyExists(f"{e.name!r} already exists") from None
                # the key was held by an aborted pending move that settling just cleared
        raise ConcurrentChange(f"could not create {e.name!r}; retry")

    def update(self, old: Entry, new: Entry) -> Entry:
        """Replace ``old`` (same key) with ``new`` iff ``old`` is still current."""
        vs = self.vshard_of(old.tenant, old.parent)
        vals = {n: getattr(new, n) for n in _ENTRY_COLS[3:]}
        with self._write(vs) as c:
            res = c.execute(update(entries).where(
                entries.c.tenant == old.tenant, entries.c.parent == old.parent,
                entries.c.name == old.name, entries.c.version == old.version,
                entries.c.ino == old.ino, entries.c.state == 0,
            ).values(**vals))
        if res.rowcount != 1:
            raise ConcurrentChange(f"{old.name!r} changed concurrently")
        return new

    def remove(self, e: Entry, *, to_trash: bool = False) -> None:
        """Delete ``e`` iff still current; directories with children go to the trash so
        their subtree disappears atomically and is reclaimed in the background."""
        vs = self.vshard_of(e.tenant, e.parent)
        with self._write(vs) as c:
            res = c.execute(delete(entries).where(
                entries.c.tenant == e.tenant, entries.c.parent == e.parent,
                entries.c.name == e.name, entries.c.version == e.version,
                entries.c.ino == e.ino, entries.c.state == 0,
            ))
            if res.rowcount != 1:
                raise ConcurrentChange(f"{e.name!r} changed concurrently")
            if to_trash:
                c.execute(insert(trash).values(
                    tenant=e.tenant, ino=e.ino, vshard=vs, created=time.time()))

    # -- moves -------------------------------------------------------------------------

    def move(self, src: Entry, dst: Entry, replaced: Entry | None) -> Entry:
        """Atomically make ``dst`` (src's content under a new key) replace ``src``.

        Same engine: one transaction. Across engines, the source engine's transaction is
        the commit point: (1) write ``dst`` as pending in the destination engine, (2) in
        the source engine delete ``src`` and record the intent as committed, (3) make
        ``dst`` visible, (4) drop the intent. A reader meeting a pending row asks the
        source engine whether its intent committed, so readers see the move all at once;
        after a crash the next reader (or the collector) rolls it forward or back.
        """
        vs_s = self.vshard_of(src.tenant, src.parent)
        vs_d = self.vshard_of(dst.tenant, dst.parent)
        if self.shard_map[vs_s] == self.shard_map[vs_d]:
            with self._write(vs_s) as c:
                self._delete_exact(c, src)
                if replaced is not None:
                    self._delete_exact(c, replaced)
                try:
                    c.execute(insert(entries).values(**_entry_values(dst, vs_d)))
                except IntegrityError:
                    raise AlreadyExists(f"{dst.name!r} already exists") from None
            return dst
        intent = f"{vs_s}:{time.time():.3f}:{uuid.uuid4().hex}"
        key = and_(entries.c.tenant == dst.tenant, entries.c.parent == dst.parent,
                   entries.c.name == dst.name)
        # (1) pending destination
        with self._write(vs_d) as c:
            if replaced is not None:
                res = c.execute(update(entries).where(
                    key, entries.c.version == replaced.version, entries.c.ino == replaced.ino,
                    entries.c.state == 0,
                ).values(state=2, intent=intent, pending=_pack_pending(dst)))
                if res.rowcount != 1:
                    raise ConcurrentChange(f"{dst.name!r} changed concurrently")
            else:
                try:
                    c.execute(insert(entries).values(
                        **_entry_values(dst, vs_d) | {"state": 1, "intent": intent}))
                except IntegrityError:
                    raise AlreadyExists(f"{dst.name!r} already exists") from None
        # (2) commit point
        try:
            with self._write(vs_s) as c:
                self._delete_exact(c, src)
                c.execute(insert(intents).values(
                    id=intent, tenant=src.tenant, state="committed", created=time.time()))
        except (ConcurrentChange, IntegrityError) as exc:
            self._abort(vs_s, vs_d, intent, dst.tenant, dst.parent, dst.name)
            raise ConcurrentChange(f"{src.name!r} changed during the move; retry") from exc
        # (3) visible, (4) forget the intent
        self._finish(vs_d, intent, dst.tenant, dst.parent, dst.name)
        with self._write(vs_s) as c:
            c.execute(delete(intents).where(intents.c.id == intent))
        return dst

    def _delete_exact(self, c: Connection, e: Entry) -> None:
        res = c.execute(delete(entries).where(
            entries.c.tenant == e.tenant, entries.c.parent == e.parent,
            entries.c.name == e.name, entries.c.version == e.version,
            entries.c.ino == e.ino, entries.c.state == 0,
        ))
        if res.rowcount != 1:
            raise ConcurrentChange(f"{e.name!r} changed concurrently")

    def _finish(self, vs_d: int, intent: str, tenant: str, parent: int, name: str) -> Entry | None:
        key = and_(entries.c.tenant == tenant, entries.c.parent == parent,
                   entries.c.name == name, entries.c.intent == intent)
        with self._write(vs_d) as c:
            row = c.execute(select(*_SEL_ENTRY).where(key)).first()
            if row is None:
                return None
            if row.state == 2:
                new = _unpack_pending(row.pending)
                vals = {n: getattr(new, n) for n in _ENTRY_COLS[3:]}
                c.execute(update(entries).where(key).values(
                    **vals, state=0, intent=None, pending=None))
                return new
            c.execute(update(entries).where(key).values(state=0, intent=None, pending=None))
            return _entry_from(row)

    def _rollback_pending(self, vs_d: int, intent: str, tenant: str, parent: int, name: str) -> Entry | None:
        key = and_(entries.c.tenant == tenant, entries.c.parent == parent,
                   entries.c.name == name, entries.c.intent == intent)
        with self._write(vs_d) as c:
            row = c.execute(select(*_SEL_ENTRY).where(key)).first()
            if row is None:
                return None
            if row.state == 2:
                c.execute(update(entries).where(key).values(state=0, intent=None, pending=None))
                return _entry_from(row)
            c.execute(delete(entries).where(key))
            return None

    def _abort(self, vs_s: int, vs_d: int, intent: str, tenant: str, parent: int, name: str) -> str:
        """Decide an undecided intent as aborted, unless it committed first."""
        try:
            with self._write(vs_s) as c:
                c.execute(insert(intents).values(
                    id=intent, tenant=tenant, state="aborted", created=time.time()))
        except IntegrityError:
            pass
        with self._read(vs_s) as c:
            state = c.execute(select(intents.c.state).where(intents.c.id == intent)).scalar()
        if state == "committed":
            self._finish(vs_d, intent, tenant, parent, name)
        else:
            self._rollback_pending(vs_d, intent, tenant, parent, name)
        with self._write(vs_s) as c:
            c.execute(delete(intents).where(intents.c.id == intent))
        return state or "aborted"

    def _settle(self, vs_d: int, row) -> Entry | None:  # type: ignore[no-untyped-def]
        """What a reader sees of a row in the middle of a cross-engine move."""
        intent: str = row.intent
        vs_s = int(intent.split(":", 1)[0])
        started = float(intent.split(":")[1])
        with self._read(vs_s) as c:
            state = c.execute(select(intents.c.state).where(intents.c.id == intent)).scalar()
        if state == "committed":
            return self._finish(vs_d, intent, row.tenant, row.parent, row.name)
        if state is None and time.time() - started < PENDING_TIMEOUT:
            # undecided and young: the mover is still running; show the pre-move state
            return _entry_from(row) if row.state == 2 else None
        self._abort(vs_s, vs_d, intent, row.tenant, row.parent, row.name)
        return self.get(row.tenant, row.parent, row.name)

    # -- chunk registry ----------------------------------------------------------------

    def chunk_get(self, tenant: str, cid: str) -> ChunkRecord | None:
        vs = self.vshard_of(tenant, cid)
        with self._read(vs) as c:
            row = c.execute(select(chunks).where(
                chunks.c.tenant == tenant, chunks.c.cid == cid)).first()
        return _chunk_from(row) if row is not None else None

    def chunk_put(self, rec: ChunkRecord) -> None:
        """Register a chunk, or refresh its placement and touch time if known."""
        vs = self.vshard_of(rec.tenant, rec.cid)
        vals = dict(
            tenant=rec.tenant, cid=rec.cid, vshard=vs, length=rec.length, k=rec.k, m=rec.m,
            share_len=rec.share_len, block_size=rec.block_size,
            placement=",".join(rec.placement), created=rec.created, touched=rec.touched,
        )
        try:
            with self._write(vs) as c:
                c.execute(insert(chunks).values(**vals))
        except IntegrityError:
            with self._write(vs) as c:
                c.execute(update(chunks).where(
                    chunks.c.tenant == rec.tenant, chunks.c.cid == rec.cid,
                ).values(placement=vals["placement"], touched=rec.touched))

    def chunk_touch(self, tenant: str, cid: str) -> bool:
        vs = self.vshard_of(tenant, cid)
        with self._write(vs) as c:
            res = c.execute(update(chunks).where(
                chunks.c.tenant == tenant, chunks.c.cid == cid).values(touched=time.time()))
        return res.rowcount == 1

    def chunk_set_placement(self, tenant: str, cid: str, placement: tuple[str, ...]) -> None:
        vs = self.vshard_of(tenant, cid)
        with self._write(vs) as c:
            c.execute(update(chunks).where(
                chunks.c.tenant == tenant, chunks.c.cid == cid,
            ).values(placement=",".join(placement)))

    def chunk_delete_if_idle(self, tenant: str, cid: str, touched_before: float) -> bool:
        vs = self.vshard_of(tenant, cid)
        with self._write(vs) as c:
            res = c.execute(delete(chunks).where(
                chunks.c.tenant == tenant, chunks.c.cid == cid,
                chunks.c.touched < touched_before))
        return res.rowcount == 1

    def iter_chunks(self, batch: int = 1000) -> Iterator[ChunkRecord]:
        for eng in self.engines:
            last: tuple[str, str] = ("", "")
            while True:
                q = select(chunks).where(
                    (chunks.c.tenant > last[0])
                    | and_(chunks.c.tenant == last[0], chunks.c.cid > last[1])
                ).order_by(chunks.c.tenant, chunks.c.cid).limit(batch)
                with eng.connect() as c:
                    rows = c.execute(q).all()
                if not rows:
                    break
                for r in rows:
                    yield _chunk_from(r)
                last = (rows[-1].tenant, rows[-1].cid)

    def iter_entries(self, batch: int = 2000) -> Iterator[tuple[Entry, int, bytes | None]]:
        """Every row on every engine as (entry, state, pending replacement)."""
        for eng in self.engines:
            last: tuple[str, int, str] = ("", -1, "")
            while True:
                t, p, n = last
                q = select(*_SEL_ENTRY).where(
                    (entries.c.tenant > t)
                    | and_(entries.c.tenant == t, entries.c.parent > p)
                    | and_(entries.c.tenant == t, entries.c.parent == p, entries.c.name > n)
                ).order_by(entries.c.tenant, entries.c.parent, entries.c.name).limit(batch)
                with eng.connect() as c:
                    rows = c.execute(q).all()
                if not rows:
                    break
                for r in rows:
                    yield _entry_from(r), r.state, (bytes(r.pending) if r.pending else None)
                last = (rows[-1].tenant, rows[-1].parent, rows[-1].name)

    def settle_all(self) -> int:
        """Resolve every undecided or unfinished move; returns how many were settled."""
        n = 0
        for eng_idx, eng in enumerate(self.engines):
            with eng.connect() as c:
                rows = c.execute(select(*_SEL_ENTRY).where(entries.c.state != 0)).all()
            for row in rows:
                vs = self.vshard_of(row.tenant, row.parent)
                if self.shard_map[vs] != eng_idx:
                    continue
                self._settle(vs, row)
                n += 1
            # intents whose rows were already finished (crash between steps 3 and 4)
            with eng.connect() as c:
                stale = c.execute(select(intents.c.id).where(
                    intents.c.created < time.time() - PENDING_TIMEOUT)).all()
            for (iid,) in stale:
                with eng.connect().execution_options(write=True) as c, c.begin():
                    still = c.execute(select(func.count()).select_from(entries).where(
                        entries.c.intent == iid)).scalar_one()
                if still:
                    continue  # its row lives on another engine; settled via that row
                self._drop_intent_everywhere(iid)
                n += 1
        return n

    def _drop_intent_everywhere(self, iid: str) -> None:
        for eng in self.engines:
            with eng.connect().execution_options(write=True) as c, c.begin():
                pending = c.execute(select(func.count()).select_from(entries).where(
                    entries.c.intent == iid)).scalar_one()
            if pending:
                return
        vs_s = int(iid.split(":", 1)[0])
        with self._write(vs_s) as c:
            c.execute(delete(intents).where(intents.c.id == iid))

    # -- trash -------------------------------------------------------------------------

    def trash_items(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for eng in self.engines:
            with eng.connect() as c:
                out += [(r.tenant, r.ino) for r in c.execute(select(trash.c.tenant, trash.c.ino))]
        return out

    def empty_trash_dir(self, tenant: str, ino: int, batch: int = 500) -> int:
        """Remove the children of a trashed directory (sub-directories go to the trash
        themselves), then the trash record. Returns entries removed."""
        removed = 0
        while True:
            kids = self.children(tenant, ino, limit=batch)
            if not kids:
                break
            for kid in kids:
                try:
                    self.remove(kid, to_trash=kid.is_dir)
                    removed += 1
                except ConcurrentChange:
                    continue
        # the trash row lives with the directory's old entry, which may be another shard
        for eng in self.engines:
            with eng.connect().execution_options(write=True) as c, c.begin():
                c.execute(delete(trash).where(trash.c.tenant == tenant, trash.c.ino == ino))
        return removed

    def in_trash(self, tenant: str, ino: int) -> bool:
        for eng in self.engines:
            with eng.connect() as c:
                if c.execute(select(trash.c.ino).where(
                        trash.c.tenant == tenant, trash.c.ino == ino)).first():
                    return True
        return False


def _chunk_from(row) -> ChunkRecord:  # type: ignore[no-untyped-def]
    return ChunkRecord(
        row.tenant, row.cid, row.length, row.k, row.m, row.share_len, row.block_size,
        tuple(row.placement.split(",")), row.created, row.touched,
    )


__all__ = ["Entry", "ChunkRecord", "MetaStore", "ConcurrentChange", "ROOT_INO", "new_ino",
           "VersionMismatch"]

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
from dataclasses import dataclass
from typing import Any

import xxhash
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import OperationalError as SAOperationalError

from ..errors import AlreadyExists, ConcurrentChange, ConfigError, UnknownTenant
from .engines import SqlEngine
from .schema import control, meta

ROOT_INO = 1
PENDING_TIMEOUT = 30.0  # seconds an unfinished cross-engine move may stay undecided


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
    layout: int = 2  # fragment layout of its shares (storage/fragment.py)


_FIELDS = ("tenant", "parent", "name", "ino", "kind", "version", "size", "ctime", "mtime",
           "data", "chunks", "attrs")
_ECOLS = ", ".join(_FIELDS) + ", state, intent, pending"
_LCOLS = _ECOLS.replace("data,", "NULL,", 1)  # listings: no inline content
_KEY = "tenant = ? AND parent = ? AND name = ?"
_EXACT = _KEY + " AND version = ? AND ino = ? AND state = 0"
_INSERT = (f"INSERT INTO entries ({', '.join(_FIELDS)}, vshard, state, intent, pending) "
           f"VALUES ({', '.join('?' * len(_FIELDS))}, ?, ?, ?, NULL)")
_SET_CONTENT = ", ".join(f"{f} = ?" for f in _FIELDS[3:])
_CCOLS = "tenant, cid, length, k, m, share_len, block_size, placement, created, touched, layout"
S_PENDING_NEW, S_PENDING_REPLACE = 1, 2
_GET = f"SELECT {_ECOLS} FROM entries WHERE {_KEY}"
_CHUNK_GET = f"SELECT {_CCOLS} FROM chunks WHERE tenant = ? AND cid = ?"


def new_ino() -> int:
    return secrets.randbits(62) + 2


def _b(v: Any) -> bytes | None:
    return bytes(v) if v is not None else None


def _entry(row: tuple) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8],
                 _b(row[9]), _b(row[10]), row[11])


def _values(e: Entry) -> tuple:
    return (e.tenant, e.parent, e.name, e.ino, e.kind, e.version, e.size, e.ctime, e.mtime,
            e.data, e.chunks, e.attrs)


def _pack_pending(e: Entry) -> bytes:
    d = {n: getattr(e, n) for n in _FIELDS}
    for n in ("data", "chunks"):
        if d[n] is not None:
            d[n] = d[n].hex()
    return json.dumps(d).encode()


def unpack_pending(raw: bytes) -> Entry:
    d = json.loads(bytes(raw))
    for n in ("data", "chunks"):
        if d[n] is not None:
            d[n] = bytes.fromhex(d[n])
    return Entry(**d)


def _chunk(row: tuple) -> ChunkRecord:
    return ChunkRecord(row[0], row[1], row[2], row[3], row[4], row[5], row[6],
                       tuple(row[7].split(",")), row[8], row[9], row[10])


def _add_layout_column(eng: SqlEngine) -> None:
    """Stores made before fragment layout 3 lack ``chunks.layout``: add it (their rows
    are layout 2). Idempotent, and safe when two processes open the store at once."""
    if "layout" in {c["name"] for c in sa_inspect(eng.sa).get_columns("chunks")}:
        return
    try:
        with eng.sa.begin() as conn:
            conn.exec_driver_sql(
                "ALTER TABLE chunks ADD COLUMN layout SMALLINT NOT NULL DEFAULT 2")
    except SAOperationalError as exc:
        if "duplicate column" not in str(exc).lower():
            raise
    except Exception as exc:  # PostgreSQL: another process added it first
        if "already exists" not in str(exc):
            raise


class MetaStore:
    def __init__(
        self, engine_urls: list[str], shard_map: list[int], control_url: str,
        durability: str = "fsync",
    ) -> None:
        self.urls = list(engine_urls)
        self.engines = [SqlEngine(u, durability) for u in engine_urls]
        self.shard_map = list(shard_map)
        self.vshards = len(shard_map)
        self.control = SqlEngine(control_url, durability)
        self._keys: dict[str, bytes] = {}
        self._keys_lock = threading.Lock()
        for eng in self.engines:
            self._create_schema(eng, meta)
            _add_layout_column(eng)
        self._create_schema(self.control, control)

    @staticmethod
    def _create_schema(eng: SqlEngine, md) -> None:  # type: ignore[no-untyped-def]
        for attempt in range(100):
            try:
                md.create_all(eng.sa)
                return
            except SAOperationalError as exc:  # concurrent first-time schema creation
                if "locked" in str(exc) and attempt < 99:
                    time.sleep(0.05)
                    continue
                safe = eng.url.split("@")[-1]
                reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
                raise ConfigError(
                    f"cannot open metadata engine {safe}: {reason}; check that the server "
                    "is running and the URL, user and database are right"
                ) from None

    def close(self) -> None:
        for eng in self.engines:
            eng.dispose()
        self.control.dispose()

    # -- placement ---------------------------------------------------------------------

    def vshard_of(self, tenant: str, key: int | str) -> int:
        return xxhash.xxh64_intdigest(f"{tenant}\x00{key}".encode()) % self.vshards

    def engine(self, vshard: int) -> SqlEngine:
        return self.engines[self.shard_map[vshard]]

    # -- tenants -----------------------------------------------------------------------

    def create_tenant(self, tenant: str) -> bool:
        """Register ``tenant``; returns False if it already existed."""
        c = self.control
        try:
            with c.write() as cur:
                cur.execute(c.sql("INSERT INTO tenants (id, chunk_key, created) VALUES (?, ?, ?)"),
                            (tenant, secrets.token_bytes(32), time.time()))
            return True
        except c.IntegrityError:
            return False

    def tenant_key(self, tenant: str) -> bytes:
        key = self._keys.get(tenant)
        if key is not None:
            return key
        c = self.control
        with c.read() as cur:
            cur.execute(c.sql("SELECT chunk_key FROM tenants WHERE id = ?"), (tenant,))
            row = cur.fetchone()
        if row is None:
            raise UnknownTenant(tenant)
        with self._keys_lock:
            self._keys[tenant] = bytes(row[0])
        return self._keys[tenant]

    def list_tenants(self) -> list[tuple[str, float]]:
        c = self.control
        with c.read() as cur:
            cur.execute("SELECT id, created FROM tenants ORDER BY id")
            return [(r[0], r[1]) for r in cur.fetchall()]

    # -- entries: reads ----------------------------------------------------------------

    def get(self, tenant: str, parent: int, name: str) -> Entry | None:
        vs = self.vshard_of(tenant, parent)
        eng = self.engine(vs)
        row = eng.query_one(eng.sql(_GET), (tenant, parent, name))
        if row is None:
            return None
        if row[12]:
            return self._settle(vs, row)
        return _entry(row)

    def children(
        self, tenant: str, ino: int, after: str | None = None, limit: int = 1000
    ) -> list[Entry]:
        """Up to ``limit`` visible entries after ``after``, in byte order of names.

        Rows hidden by an undecided move are skipped without counting towards the
        limit, so a short page always means the end of the directory. Inline file content
        is left out (``data`` None): a listing of small files would otherwise read them all.
        """
        vs = self.vshard_of(tenant, ino)
        eng = self.engine(vs)
        out: list[Entry] = []
        while len(out) < limit:
            want = limit - len(out)
            with eng.read() as cur:
                if after is None:
                    cur.execute(eng.sql(
                        f"SELECT {_LCOLS} FROM entries WHERE tenant = ? AND parent = ? "
                        "ORDER BY name LIMIT ?"), (tenant, ino, want))
                else:
                    cur.execute(eng.sql(
                        f"SELECT {_LCOLS} FROM entries WHERE tenant = ? AND parent = ? "
                        "AND name > ? ORDER BY name LIMIT ?"), (tenant, ino, after, want))
                rows = cur.fetchall()
            for row in rows:
                e = self._settle(vs, row) if row[12] else _entry(row)
                if e is not None:
                    out.append(e)
            if len(rows) < want:
                break
            after = rows[-1][2]
        return out

    def has_children(self, tenant: str, ino: int) -> bool:
        return bool(self.children(tenant, ino, limit=1))

    # -- entries: writes ---------------------------------------------------------------

    def create(self, e: Entry) -> Entry:
        vs = self.vshard_of(e.tenant, e.parent)
        eng = self.engine(vs)
        for _ in range(3):
            try:
                with eng.write() as cur:
                    cur.execute(eng.sql(_INSERT), (*_values(e), vs, 0, None))
                return e
            except eng.IntegrityError:
                if self.get(e.tenant, e.parent, e.name) is not None:
                    raise AlreadyExists(f"{e.name!r} already exists") from None
                # the key was held by an aborted pending move that settling just cleared
        raise ConcurrentChange(f"could not create {e.name!r}; retry")

    def update(self, old: Entry, new: Entry) -> Entry:
        """Replace ``old`` (same key) with ``new`` iff ``old`` is still current."""
        vs = self.vshard_of(old.tenant, old.parent)
        eng = self.engine(vs)
        with eng.write() as cur:
            cur.execute(eng.sql(f"UPDATE entries SET {_SET_CONTENT} WHERE {_EXACT}"),
                        (*_values(new)[3:], old.tenant, old.parent, old.name, old.version, old.ino))
            if cur.rowcount != 1:
                raise ConcurrentChange(f"{old.name!r} changed concurrently")
        return new

    def remove(self, e: Entry, *, to_trash: bool = False) -> None:
        """Delete ``e`` iff still current; directories with children go to the trash so
        their subtree disappears atomically and is reclaimed in the background."""
        vs = self.vshard_of(e.tenant, e.parent)
        eng = self.engine(vs)
        with eng.write() as cur:
            self._delete_exact(eng, cur, e)
            if to_trash:
                cur.execute(eng.sql(
                    "INSERT INTO trash (tenant, ino, vshard, created) VALUES (?, ?, ?, ?)"),
                    (e.tenant, e.ino, vs, time.time()))

    def _delete_exact(self, eng: SqlEngine, cur: Any, e: Entry) -> None:
        cur.execute(eng.sql(f"DELETE FROM entries WHERE {_EXACT}"),
                    (e.tenant, e.parent, e.name, e.version, e.ino))
        if cur.rowcount != 1:
            raise ConcurrentChange(f"{e.name!r} changed concurrently")

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
        es, ed = self.engine(vs_s), self.engine(vs_d)
        if es is ed:
            with es.write() as cur:
                self._delete_exact(es, cur, src)
                if replaced is not None:
                    self._delete_exact(es, cur, replaced)
                try:
                    cur.execute(es.sql(_INSERT), (*_values(dst), vs_d, 0, None))
                except es.IntegrityError:
                    raise AlreadyExists(f"{dst.name!r} already exists") from None
            return dst
        intent = f"{vs_s}:{time.time():.3f}:{uuid.uuid4().hex}"
        # (1) pending destination
        with ed.write() as cur:
            if replaced is not None:
                cur.execute(ed.sql(
                    f"UPDATE entries SET state = ?, intent = ?, pending = ? WHERE {_EXACT}"),
                    (S_PENDING_REPLACE, intent, _pack_pending(dst), replaced.tenant,
                     replaced.parent, replaced.name, replaced.version, replaced.ino))
                if cur.rowcount != 1:
                    raise ConcurrentChange(f"{dst.name!r} changed concurrently")
            else:
                try:
                    cur.execute(ed.sql(_INSERT), (*_values(dst), vs_d, S_PENDING_NEW, intent))
                except ed.IntegrityError:
                    raise AlreadyExists(f"{dst.name!r} already exists") from None
        # (2) commit point
        try:
            with es.write() as cur:
                self._delete_exact(es, cur, src)
                cur.execute(es.sql(
                    "INSERT INTO intents (id, tenant, state, created) VALUES (?, ?, ?, ?)"),
                    (intent, src.tenant, "committed", time.time()))
        except (ConcurrentChange, es.IntegrityError) as exc:
            self._abort(vs_s, vs_d, intent, dst.tenant, dst.parent, dst.name)
            raise ConcurrentChange(f"{src.name!r} changed during the move; retry") from exc
        # (3) visible, (4) forget the intent
        self._finish(vs_d, intent, dst.tenant, dst.parent, dst.name)
        with es.write() as cur:
            cur.execute(es.sql("DELETE FROM intents WHERE id = ?"), (intent,))
        return dst

    def _finish(self, vs_d: int, intent: str, tenant: str, parent: int, name: str) -> Entry | None:
        eng = self.engine(vs_d)
        key = (tenant, parent, name, intent)
        with eng.write() as cur:
            cur.execute(eng.sql(f"SELECT {_ECOLS} FROM entries WHERE {_KEY} AND intent = ?"), key)
            row = cur.fetchone()
            if row is None:
                return None
            if row[12] == S_PENDING_REPLACE:
                new = unpack_pending(row[14])
                cur.execute(eng.sql(
                    f"UPDATE entries SET {_SET_CONTENT}, state = 0, intent = NULL, pending = NULL "
                    f"WHERE {_KEY} AND intent = ?"), (*_values(new)[3:], *key))
                return new
            cur.execute(eng.sql(
                "UPDATE entries SET state = 0, intent = NULL, pending = NULL "
                f"WHERE {_KEY} AND intent = ?"), key)
            return _entry(row)

    def _rollback_pending(self, vs_d: int, intent: str, tenant: str, parent: int, name: str) -> None:
        eng = self.engine(vs_d)
        key = (tenant, parent, name, intent)
        with eng.write() as cur:
            cur.execute(eng.sql(f"SELECT state FROM entries WHERE {_KEY} AND intent = ?"), key)
            row = cur.fetchone()
            if row is None:
                return
            if row[0] == S_PENDING_REPLACE:
                cur.execute(eng.sql("UPDATE entries SET state = 0, intent = NULL, pending = NULL "
                                    f"WHERE {_KEY} AND intent = ?"), key)
            else:
                cur.execute(eng.sql(f"DELETE FROM entries WHERE {_KEY} AND intent = ?"), key)

    def _intent_state(self, vs_s: int, intent: str) -> str | None:
        eng = self.engine(vs_s)
        with eng.read() as cur:
            cur.execute(eng.sql("SELECT state FROM intents WHERE id = ?"), (intent,))
            row = cur.fetchone()
        return row[0] if row else None

    def _abort(self, vs_s: int, vs_d: int, intent: str, tenant: str, parent: int, name: str) -> str:
        """Decide an undecided intent as aborted, unless it committed first."""
        es = self.engine(vs_s)
        try:
            with es.write() as cur:
                cur.execute(es.sql(
                    "INSERT INTO intents (id, tenant, state, created) VALUES (?, ?, ?, ?)"),
                    (intent, tenant, "aborted", time.time()))
        except es.IntegrityError:
            pass
        state = self._intent_state(vs_s, intent)
        if state == "committed":
            self._finish(vs_d, intent, tenant, parent, name)
        else:
            self._rollback_pending(vs_d, intent, tenant, parent, name)
        with es.write() as cur:
            cur.execute(es.sql("DELETE FROM intents WHERE id = ?"), (intent,))
        return state or "aborted"

    def _settle(self, vs_d: int, row: tuple) -> Entry | None:
        """What a reader sees of a row in the middle of a cross-engine move."""
        intent: str = row[13]
        vs_s = int(intent.split(":", 1)[0])
        started = float(intent.split(":")[1])
        state = self._intent_state(vs_s, intent)
        if state == "committed":
            return self._finish(vs_d, intent, row[0], row[1], row[2])
        if state is None and time.time() - started < PENDING_TIMEOUT:
            # undecided and young: the mover is still running; show the pre-move state
            return _entry(row) if row[12] == S_PENDING_REPLACE else None
        self._abort(vs_s, vs_d, intent, row[0], row[1], row[2])
        return self.get(row[0], row[1], row[2])

    def settle_all(self) -> int:
        """Resolve every undecided or unfinished move; returns how many were settled."""
        n = 0
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute(f"SELECT {_ECOLS} FROM entries WHERE state != 0")
                rows = cur.fetchall()
            for row in rows:
                self._settle(self.vshard_of(row[0], row[1]), row)
                n += 1
        # intents whose rows were already finished (a crash between steps 3 and 4)
        cutoff = time.time() - PENDING_TIMEOUT
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute(eng.sql("SELECT id FROM intents WHERE created < ?"), (cutoff,))
                stale = [r[0] for r in cur.fetchall()]
            for iid in stale:
                if not self._intent_referenced(iid):
                    with eng.write() as cur:
                        cur.execute(eng.sql("DELETE FROM intents WHERE id = ?"), (iid,))
                    n += 1
        return n

    def _intent_referenced(self, iid: str) -> bool:
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute(eng.sql("SELECT 1 FROM entries WHERE intent = ? LIMIT 1"), (iid,))
                if cur.fetchone():
                    return True
        return False

    def iter_entries(self, batch: int = 2000, with_data: bool = False
                     ) -> Iterator[tuple[Entry, int, bytes | None]]:
        """Every row on every engine as (entry, state, pending replacement). Inline file
        content is left out (``data`` None) unless ``with_data``: scans stay small."""
        cols = _ECOLS if with_data else _ECOLS.replace("data,", "NULL,", 1)
        for eng in self.engines:
            last: tuple[str, int, str] | None = None
            while True:
                with eng.read() as cur:
                    if last is None:
                        cur.execute(eng.sql(f"SELECT {cols} FROM entries "
                                            "ORDER BY tenant, parent, name LIMIT ?"), (batch,))
                    else:
                        cur.execute(eng.sql(
                            f"SELECT {cols} FROM entries WHERE tenant > ? OR "
                            "(tenant = ? AND parent > ?) OR (tenant = ? AND parent = ? AND name > ?) "
                            "ORDER BY tenant, parent, name LIMIT ?"),
                            (last[0], last[0], last[1], last[0], last[1], last[2], batch))
                    rows = cur.fetchall()
                if not rows:
                    break
                for r in rows:
                    yield _entry(r), r[12], _b(r[14])
                last = (rows[-1][0], rows[-1][1], rows[-1][2])

    def totals(self) -> list[dict[str, int]]:
        """Per engine: files, directories, logical bytes."""
        out = []
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute("SELECT kind, COUNT(*), COALESCE(SUM(size), 0) FROM entries GROUP BY kind")
                rows = cur.fetchall()
            d = {"files": 0, "directories": 0, "bytes": 0}
            for kind, n, size in rows:
                if kind == "f":
                    d["files"] += n
                    d["bytes"] += int(size)
                else:
                    d["directories"] += n
            out.append(d)
        return out

    def usage(self, tenant: str) -> tuple[int, int]:
        """(logical bytes, files) of one tenant across all engines."""
        size = files = 0
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute(eng.sql("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM entries "
                                    "WHERE tenant = ? AND kind = 'f'"), (tenant,))
                s, n = cur.fetchone()
            size += int(s)
            files += int(n)
        return size, files

    # -- chunk registry ----------------------------------------------------------------

    def chunk_get(self, tenant: str, cid: str) -> ChunkRecord | None:
        eng = self.engine(self.vshard_of(tenant, cid))
        row = eng.query_one(eng.sql(_CHUNK_GET), (tenant, cid))
        return _chunk(row) if row is not None else None

    def chunk_put(self, rec: ChunkRecord) -> None:
        """Register a chunk, or refresh its placement and touch time if known."""
        vs = self.vshard_of(rec.tenant, rec.cid)
        eng = self.engine(vs)
        placement = ",".join(rec.placement)
        try:
            with eng.write() as cur:
                cur.execute(eng.sql(
                    f"INSERT INTO chunks ({_CCOLS}, vshard) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                    (rec.tenant, rec.cid, rec.length, rec.k, rec.m, rec.share_len,
                     rec.block_size, placement, rec.created, rec.touched, rec.layout, vs))
        except eng.IntegrityError:
            with eng.write() as cur:
                cur.execute(eng.sql(
                    "UPDATE chunks SET placement = ?, touched = ? WHERE tenant = ? AND cid = ?"),
                    (placement, rec.touched, rec.tenant, rec.cid))

    def chunk_put_many(self, items: list[ChunkRecord | tuple[str, str]]) -> None:
        """Register new chunks and touch known ones: one transaction per engine."""
        by_engine: dict[int, list[ChunkRecord | tuple[str, str]]] = {}
        for it in items:
            tenant, cid = (it.tenant, it.cid) if isinstance(it, ChunkRecord) else it
            by_engine.setdefault(self.shard_map[self.vshard_of(tenant, cid)], []).append(it)
        now = time.time()
        for idx, group in by_engine.items():
            eng = self.engines[idx]
            upsert = eng.sql(
                f"INSERT INTO chunks ({_CCOLS}, vshard) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (tenant, cid) DO UPDATE SET placement = excluded.placement, "
                "touched = excluded.touched")
            touch = eng.sql("UPDATE chunks SET touched = ? WHERE tenant = ? AND cid = ?")
            with eng.write() as cur:
                for it in group:
                    if isinstance(it, ChunkRecord):
                        cur.execute(upsert, (
                            it.tenant, it.cid, it.length, it.k, it.m, it.share_len,
                            it.block_size, ",".join(it.placement), it.created, it.touched,
                            it.layout, self.vshard_of(it.tenant, it.cid)))
                    else:
                        cur.execute(touch, (now, it[0], it[1]))

    def chunk_touch(self, tenant: str, cid: str) -> bool:
        eng = self.engine(self.vshard_of(tenant, cid))
        with eng.write() as cur:
            cur.execute(eng.sql("UPDATE chunks SET touched = ? WHERE tenant = ? AND cid = ?"),
                        (time.time(), tenant, cid))
            return cur.rowcount == 1

    def chunk_set_placement(self, tenant: str, cid: str, placement: tuple[str, ...]) -> None:
        eng = self.engine(self.vshard_of(tenant, cid))
        with eng.write() as cur:
            cur.execute(eng.sql("UPDATE chunks SET placement = ? WHERE tenant = ? AND cid = ?"),
                        (",".join(placement), tenant, cid))

    def chunk_delete_if_idle(self, tenant: str, cid: str, touched_before: float) -> bool:
        eng = self.engine(self.vshard_of(tenant, cid))
        with eng.write() as cur:
            cur.execute(eng.sql("DELETE FROM chunks WHERE tenant = ? AND cid = ? AND touched < ?"),
                        (tenant, cid, touched_before))
            return cur.rowcount == 1

    def iter_chunks(self, batch: int = 1000) -> Iterator[ChunkRecord]:
        for eng in self.engines:
            last: tuple[str, str] | None = None
            while True:
                with eng.read() as cur:
                    if last is None:
                        cur.execute(eng.sql(f"SELECT {_CCOLS} FROM chunks "
                                            "ORDER BY tenant, cid LIMIT ?"), (batch,))
                    else:
                        cur.execute(eng.sql(
                            f"SELECT {_CCOLS} FROM chunks WHERE tenant > ? OR "
                            "(tenant = ? AND cid > ?) ORDER BY tenant, cid LIMIT ?"),
                            (last[0], last[0], last[1], batch))
                    rows = cur.fetchall()
                if not rows:
                    break
                for r in rows:
                    yield _chunk(r)
                last = (rows[-1][0], rows[-1][1])

    def count_chunks(self) -> int:
        total = 0
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute("SELECT COUNT(*) FROM chunks")
                total += cur.fetchone()[0]
        return total

    # -- trash -------------------------------------------------------------------------

    def trash_items(self) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for eng in self.engines:
            with eng.read() as cur:
                cur.execute("SELECT tenant, ino FROM trash")
                out += [(r[0], r[1]) for r in cur.fetchall()]
        return out

    def empty_trash_dir(self, tenant: str, ino: int, batch: int = 500) -> int:
        """Remove the children of a trashed directory (sub-directories go to the trash
        themselves), then the trash record. Returns entries removed."""
        removed = 0
        while True:
            kids = self.children(tenant, ino, limit=batch)
            if not kids:
                break
            progressed = False
            for kid in kids:
                try:
                    nonempty = kid.is_dir and self.has_children(tenant, kid.ino)
                    self.remove(kid, to_trash=nonempty)
                    removed += 1
                    progressed = True
                except ConcurrentChange:
                    continue
            if not progressed:
                time.sleep(0.01)
        for eng in self.engines:  # the record lives with the directory's old entry
            with eng.write() as cur:
                cur.execute(eng.sql("DELETE FROM trash WHERE tenant = ? AND ino = ?"),
                            (tenant, ino))
        return removed


__all__ = ["Entry", "ChunkRecord", "MetaStore", "ConcurrentChange", "ROOT_INO", "new_ino",
           "unpack_pending", "ConcurrentChange"]

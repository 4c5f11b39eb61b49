"""Full-text search over tenants' files, governed end to end: SQLite FTS5 (BM25) in the
embedded store, PostgreSQL full-text search where the store's metadata runs on PostgreSQL.

Where the index lives is chosen by the URL of the store's first metadata engine (one
interface here, one module per engine holding its SQL):

* ``sqlite:///…`` (the embedded default): one index database under the store home
  (``<home>/search/index.db``), FTS5 with BM25 ranking (``search_sqlite``).
* ``postgresql…``: tables ``search_docs`` and ``search_chunks`` in that engine's database,
  a ``tsvector`` per piece of text under a GIN index, ranked by PostgreSQL's cover density
  (``ts_rank_cd``; PostgreSQL has no BM25), so every server replica over the store shares
  one index; indexing leases keep replicas from doing the same work twice
  (``search_pg``).

Every row carries its tenant and every query is filtered by it. The index is fed by the
gateway's write hooks and reads content only through the gateway:

* **What is indexed**: the file's text with *every* tagged entity span masked (``*`` per
  byte, whatever any role's clearance), so PII values never enter the index; redacted
  values are already gone from the content. Binary files are skipped. A PII value is
  therefore never searchable, by anyone: a search cannot reveal that a file holds it.
* **When**: the write hook records the new version as ``pending``; when the gateway hands
  it the stored content of a small version (up to ``sync_bytes``, 1 MiB), the hook masks
  and indexes it right there, in the writer's call (no read back, so no nested QoS wait
  and no second audit event). Otherwise the file tools call :meth:`SearchIndex.flush`
  right after their write returns, which reads and indexes text up to ``sync_bytes`` at
  once, so a search that follows a ``write_file`` finds it. Larger files, and writes
  through other doors (the CLI), are indexed by a background worker thread. ``state()`` tells which
  (``indexed`` / ``pending`` / ``skipped``), for ``get_file_info``.
* **Who reads**: the indexer reads through the gateway as the principal
  ``search-indexer`` of the tenant, with the writer's role if that role may read the path
  and otherwise a role the tenant's policy lets read it. Its reads are audited and
  QoS-admitted like any other (at the tenant's priority class).
* **Deletes and moves** update the index in the hook (rows are dropped or renamed).

What a caller gets back is decided by the search tool, not here: it drops hits on paths
the caller's role may not read and builds every snippet from the caller's own gateway
read (masked for that role). Scores are "higher is better" on both engines.
"""

from __future__ import annotations

import codecs
import contextlib
import heapq
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from storage import FileInfo
from storage.errors import NotFound, StorageError

from .classify import is_binary
from .content import MASK
from .errors import Forbidden
from .principals import Principal
from .qos import RateLimited

if TYPE_CHECKING:
    from .gateway import Gateway
    from .policy import Compiled

log = logging.getLogger(__name__)

MiB = 1 << 20
SYNC_BYTES = 1 * MiB  # text up to this size is indexed in the call that wrote it
MAX_INDEX_BYTES = 32 * MiB  # only the first this-many bytes of a file are indexed
READ_PIECE = 1 * MiB  # the indexer reads large files in pieces of this size
OTHER_DOOR_DELAY_S = 2.0  # small files not flushed by a tool are picked up after this
MAX_ATTEMPTS = 5
POLL_S = 5.0  # the worker looks for pending rows other processes left this often
INDEXER_AGENT = "search-indexer"
MAX_TERMS = 32

_INDEXES: dict[int, SearchIndex] = {}


@dataclass(frozen=True)
class IndexState:
    state: str  # 'indexed' | 'pending' | 'skipped' | 'not_indexed'
    detail: str | None = None
    indexed_version: int | None = None


@dataclass(frozen=True)
class Hit:
    id: int
    path: str
    version: int
    indexed_version: int | None
    size: int
    mtime: float
    labels: list[str]
    score: float  # higher is better: negated BM25 (SQLite), ts_rank_cd cover density (PG)


@dataclass(frozen=True)
class Match:
    """A user query as an FTS5 expression plus the words to highlight, and its parts (each
    a word or phrase, the last word a prefix or not) from which other engines build their
    own query."""

    expr: str
    terms: list[tuple[str, bool]]  # (word, is_prefix)
    parts: tuple[tuple[tuple[str, ...], bool], ...] = ()  # ((words of a phrase), is_prefix)
    mode: str = "all"  # 'all' parts must match, or 'any'


_QUERY_TOKEN = re.compile(r'"([^"]*)"?|(\S+)')
_WORD = re.compile(r"\w+")


def build_match(query: str, mode: str = "all") -> Match:
    """Turn free text into a safe FTS5 query: words (AND, or OR with ``mode='any'``),
    ``"quoted phrases"`` and ``prefix*`` words. Operators and syntax of FTS5 itself are
    not passed through, so no query can fail to parse or reach other columns."""
    parts: list[str] = []
    terms: list[tuple[str, bool]] = []
    groups: list[tuple[tuple[str, ...], bool]] = []
    for m in _QUERY_TOKEN.finditer(query or ""):
        if m.group(1) is not None:
            words = _WORD.findall(m.group(1))
            prefix = False
        else:
            raw = m.group(2)
            words = _WORD.findall(raw)
            prefix = raw.endswith("*")
        if not words:
            continue
        words = words[:MAX_TERMS]
        phrase = '"' + " ".join(words) + '"'
        parts.append(phrase + ("*" if prefix else ""))
        groups.append((tuple(words), prefix))
        terms.extend((w, prefix and i == len(words) - 1) for i, w in enumerate(words))
        if len(terms) >= MAX_TERMS:
            break
    if not parts:
        raise ValueError("the query has no words to search for")
    joiner = " OR " if mode == "any" else " AND "
    return Match(joiner.join(parts), terms[:MAX_TERMS], tuple(groups),
                 "any" if mode == "any" else "all")


def mask_all(data: bytes, offset: int, spans: list[Any]) -> bytes:
    """``data`` (read at ``offset``) with every tagged span masked, whatever the role."""
    if not spans:
        return data
    end = offset + len(data)
    out: bytearray | None = None
    for s, e, _label in spans:
        if e <= offset or s >= end:
            continue
        if out is None:
            out = bytearray(data)
        a, b = max(s, offset) - offset, min(e, end) - offset
        out[a:b] = bytes([MASK]) * (b - a)
    return bytes(out) if out is not None else data


def reader_role(pol: Compiled, path: str, prefer: str | None) -> str | None:
    """A role that may read ``path``: ``prefer`` if it can, else one the governing rule
    names; None if no role may read it."""
    if prefer and pol.can_read(prefer, path):
        return prefer
    for prefix, read, _write in pol.rules:  # longest prefix first, as the policy decides
        if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
            if "*" in read:
                return prefer or "agent"
            return sorted(read)[0] if read else None
    return None


def index_for(gateway: Gateway) -> SearchIndex | None:
    """The search index attached to ``gateway`` (None when search is not enabled)."""
    return _INDEXES.get(id(gateway))


class IndexStore(Protocol):
    """What :class:`SearchIndex` needs of an engine (``search_sqlite``, ``search_pg``):
    the rows of ``docs`` (tenant, path, version, size, mtime, state, detail, role,
    indexed_version, attempts, …) and the indexed text, kept in step transactionally."""

    path: Path | None

    def close(self) -> None: ...
    def record(self, tenant: str, path: str, version: int, size: int, mtime: float,
               labels: list[str], state: str, detail: str | None, role: str | None,
               binary: bool) -> str: ...
    def forget(self, tenant: str, path: str) -> None: ...
    def rename(self, tenant: str, src: str, dst: str) -> int: ...
    def set(self, doc_id: int, **values: Any) -> None: ...
    def skip_binary(self, doc_id: int, version: int) -> None: ...
    def claim(self, doc_id: int) -> bool: ...
    def release(self, doc_id: int) -> None: ...
    def store(self, doc_id: int, tenant: str, body: str, version: int, detail: str | None,
              labels: list[str], size: int, mtime: float) -> None: ...
    def pending(self) -> list[tuple[str, str]]: ...
    def row(self, tenant: str, path: str) -> dict[str, Any] | None: ...
    def stats(self, tenant: str) -> dict[str, int]: ...
    def query(self, tenant: str, match: Match, *, prefix: str = "/",
              labels: list[str] | None = None, after: float | None = None,
              before: float | None = None, limit: int = 50, offset: int = 0) -> list[Hit]: ...
    def locate(self, doc_id: int, terms: list[tuple[str, bool]]) -> int | None: ...


def metadata_url(gateway: Gateway) -> str:
    """The URL of the first metadata engine of the store behind ``gateway`` ('' if unknown)."""
    from .gateway import _DOORS

    vol = _DOORS.get(id(gateway))
    engines = getattr(getattr(vol, "cfg", None), "engines", None) or []
    return str(engines[0]) if engines else ""


def open_store(gateway: Gateway, home: str | Path) -> IndexStore:
    """The index store for the store behind ``gateway``: PostgreSQL where its metadata
    runs on PostgreSQL, else SQLite FTS5 under ``home``."""
    url = metadata_url(gateway)
    if url.startswith("postgresql"):
        from .search_pg import PgSearchStore

        return PgSearchStore(url)
    from .search_sqlite import SqliteSearchStore

    return SqliteSearchStore(Path(home) / "search" / "index.db")


class SearchIndex:
    """The full-text index of one store, fed by one gateway's hooks. Thread-safe."""

    def __init__(self, gateway: Gateway, db_path: str | Path | None = None, *,
                 store: IndexStore | None = None, sync_bytes: int = SYNC_BYTES,
                 max_index_bytes: int = MAX_INDEX_BYTES,
                 other_door_delay_s: float = OTHER_DOOR_DELAY_S,
                 poll_s: float = POLL_S, start_worker: bool = True) -> None:
        """``store`` is where the index lives; without it, ``db_path`` names a SQLite FTS5
        database (:meth:`attach` picks the store by the metadata engine)."""
        self.gateway = gateway
        if store is None:
            if db_path is None:
                raise ValueError("give the index a store or a SQLite database path")
            from .search_sqlite import SqliteSearchStore

            store = SqliteSearchStore(db_path)
        self.store = store
        self.path = store.path
        self.sync_bytes = sync_bytes
        self.max_index_bytes = max_index_bytes
        self.other_door_delay_s = other_door_delay_s
        self.poll_s = poll_s
        self._stripes = [threading.Lock() for _ in range(64)]
        self._local = threading.local()
        self._queue: list[tuple[float, int, str, str]] = []
        self._seq = 0
        self._cv = threading.Condition()
        self._closed = False
        self._busy = 0
        self._worker: threading.Thread | None = None
        if start_worker:
            self.start()

    def start(self) -> None:
        """Start the background worker (queues what earlier runs left pending)."""
        if self._worker is not None:
            return
        for tenant, path in self.store.pending():
            self._enqueue(tenant, path, time.monotonic())
        self._worker = threading.Thread(target=self._run, name="lodestore-search-indexer",
                                        daemon=True)
        self._worker.start()

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def attach(cls, gateway: Gateway, home: str | Path, **kw: Any) -> SearchIndex:
        """Open the store's index (``<home>/search/index.db``, or the tables in the
        PostgreSQL database of the first metadata engine), subscribe to the gateway's
        hooks, and make the index findable with :func:`index_for`. Close it with
        :meth:`close`."""
        idx = cls(gateway, store=open_store(gateway, home), **kw)
        gateway.hooks.append(idx.on_change)
        _INDEXES[id(gateway)] = idx
        return idx

    def close(self) -> None:
        """Unsubscribe, stop the worker (what is pending stays pending in the database and
        is picked up by the next index over this store), close the database. Call it
        before closing the gateway."""
        with contextlib.suppress(ValueError):
            self.gateway.hooks.remove(self.on_change)
        if _INDEXES.get(id(self.gateway)) is self:
            _INDEXES.pop(id(self.gateway), None)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=30)
        self.store.close()

    # -- the write hook -----------------------------------------------------------------

    def on_change(self, p: Principal, what: str, path: str, info: FileInfo | None,
                  content: bytes | None = None) -> None:
        """Gateway hook: ('write', path, info) / ('delete', path, None) / a move, which
        the gateway reports as ('move', src, None) then ('write', dst, info). With the
        stored ``content`` of a small written version, it is indexed right here, in the
        writer's call: no read back through the gateway, no second audit event."""
        moving = getattr(self._local, "moving", None)
        self._local.moving = None
        if what == "move":
            self._local.moving = (p.tenant, path)
            return
        if what == "delete":
            self._forget(p.tenant, path)
            return
        if what != "write" or info is None:
            return
        if moving is not None and moving[0] == p.tenant:
            self._rename(p.tenant, moving[1], path, info, p.role)
            return
        if info.is_dir:
            return
        self._record(p.tenant, info, p.role)
        if content is not None and len(content) == info.size and info.size <= self.sync_bytes:
            try:
                self._index(p.tenant, info.path, self.sync_bytes,
                            given=(info.version, content, info))
            except Exception:  # noqa: BLE001 - indexing never fails the write that caused it
                log.exception("indexing %s failed", info.path)

    def _record(self, tenant: str, info: FileInfo, role: str | None) -> None:
        """A new version exists: remember it as pending (or skipped) and queue it."""
        attrs = info.attrs or {}
        labels = sorted(attrs.get("labels") or [])
        binary = attrs.get("scanned") == "binary"
        state = "skipped" if binary else "pending"
        detail = "binary content is not indexed" if binary else None
        state = self.store.record(tenant, info.path, info.version, info.size, info.mtime,
                                  labels, state, detail, role, binary)
        if state == "pending":
            delay = 0.0 if info.size > self.sync_bytes else self.other_door_delay_s
            self._enqueue(tenant, info.path, time.monotonic() + delay)

    def _forget(self, tenant: str, path: str) -> None:
        self.store.forget(tenant, path)

    def _rename(self, tenant: str, src: str, dst: str, info: FileInfo, role: str) -> None:
        """Entries under ``src`` now live under ``dst`` (content unchanged)."""
        moved = self.store.rename(tenant, src, dst)  # whatever the move replaced goes
        if not info.is_dir and (moved == 0 or self._row(tenant, dst) is None):
            self._record(tenant, info, role)  # never indexed before: index it now
        elif not info.is_dir:
            row = self._row(tenant, dst)
            if row is not None and row["version"] != info.version:
                self._record(tenant, info, role)
            elif row is not None and row["state"] == "pending":
                self._enqueue(tenant, dst, time.monotonic())

    # -- the queue and the worker -------------------------------------------------------

    def _enqueue(self, tenant: str, path: str, due: float) -> None:
        with self._cv:
            self._seq += 1
            heapq.heappush(self._queue, (due, self._seq, tenant, path))
            self._cv.notify()

    def _run(self) -> None:
        next_poll = time.monotonic() + self.poll_s
        while True:
            poll = False
            with self._cv:
                while not self._closed:
                    now = time.monotonic()
                    if self._queue and self._queue[0][0] <= now:
                        break
                    if now >= next_poll:
                        poll = True
                        break
                    wait = next_poll - now
                    if self._queue:
                        wait = min(wait, self._queue[0][0] - now)
                    self._cv.wait(wait)
                if self._closed:
                    return
                if not poll:
                    _due, _seq, tenant, path = heapq.heappop(self._queue)
                    self._busy += 1
            if poll:  # pending rows left by other processes (the CLI, replicas) or earlier runs
                next_poll = time.monotonic() + self.poll_s
                try:
                    pending = self.store.pending()
                except Exception:  # noqa: BLE001 - the database may be away for a while
                    log.exception("polling the search index failed")
                    continue
                with self._cv:
                    queued = {(t, p) for _d, _s, t, p in self._queue}
                for tenant, path in pending:
                    if (tenant, path) not in queued:
                        self._enqueue(tenant, path, time.monotonic())
                continue
            try:
                self._index(tenant, path, None)
            except Exception:  # noqa: BLE001 - the worker must survive anything
                log.exception("indexing %s failed", path)
            finally:
                with self._cv:
                    self._busy -= 1
                    self._cv.notify_all()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until the queue is empty and nothing is being indexed (tests, shutdown);
        False if that did not happen within ``timeout`` (or the worker is not running)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                now = time.monotonic()
                if not self._queue and not self._busy:
                    return True
                if now >= deadline:
                    return False
                self._cv.wait(min(0.05, deadline - now))

    # -- indexing -----------------------------------------------------------------------

    def flush(self, tenant: str, path: str) -> IndexState:
        """Index ``path`` now if it is pending and small enough (called by the file tools
        after a write, outside the write's QoS admission)."""
        try:
            self._index(tenant, path, self.sync_bytes)
        except Exception:  # noqa: BLE001 - indexing never fails the write that caused it
            log.exception("indexing %s failed", path)
        return self.state(tenant, path)

    def ensure(self, tenant: str, info: FileInfo, role: str | None) -> IndexState:
        """Queue ``info`` if the index does not know this version (e.g. it was written
        through a door without the hook); returns the state."""
        if info.is_dir:
            return IndexState("not_indexed", "directories are not indexed")
        row = self._row(tenant, info.path)
        if row is None or (row["version"] != info.version and row["state"] != "pending"):
            self._record(tenant, info, role)
        return self.state(tenant, info.path)

    def _row(self, tenant: str, path: str) -> dict[str, Any] | None:
        return self.store.row(tenant, path)

    def _set(self, doc_id: int, **values: Any) -> None:
        self.store.set(doc_id, **values)

    def _claim(self, tenant: str, path: str, row: dict[str, Any],
               wait_s: float) -> dict[str, Any] | None:
        """Take the row's indexing lease (another process may be indexing it: the worker
        leaves it to that one, a flush waits up to ``wait_s`` for it); the row to index,
        or None when there is nothing (left) to do here."""
        deadline = time.monotonic() + wait_s
        while True:
            if self.store.claim(row["id"]):
                return row
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
            fresh = self._row(tenant, path)
            if fresh is None or fresh["state"] != "pending":
                return None
            row = fresh

    def _index(self, tenant: str, path: str, max_size: int | None,
               given: tuple[int, bytes, FileInfo] | None = None) -> None:
        """Index ``path``'s pending version; ``given`` = (version, stored content, info)
        from the writer, used instead of a read when it is that version."""
        lock = self._stripes[hash((tenant, path)) % len(self._stripes)]
        with lock:
            row = self._row(tenant, path)
            if row is None or row["state"] != "pending":
                return
            if max_size is not None and row["size"] > max_size:
                return  # the worker takes it
            if given is not None and given[0] != row["version"]:
                return  # a newer version was recorded meanwhile: its own write indexes it
            wait = 0.0 if given is not None or max_size is None else 2.0
            claimed = self._claim(tenant, path, row, wait)
            if claimed is None:
                return  # another process is indexing it
            row = claimed
            try:
                self._index_row(tenant, path, row, given)
            except NotFound:
                self._forget(tenant, path)
            except Forbidden as exc:
                self._set(row["id"], state="skipped", detail=f"the indexer may not read it: {exc}")
            except RateLimited as exc:
                self._enqueue(tenant, path, time.monotonic() + exc.retry_after_ms / 1000.0)
            except StorageError as exc:
                attempts = row["attempts"] + 1
                if attempts >= MAX_ATTEMPTS:
                    self._set(row["id"], state="skipped", attempts=attempts,
                              detail=f"indexing failed {attempts} times ({exc.code})")
                else:
                    self._set(row["id"], attempts=attempts, detail=f"retrying ({exc.code})")
                    self._enqueue(tenant, path, time.monotonic() + 0.5 * 2 ** attempts)
            finally:
                self.store.release(row["id"])

    def _index_row(self, tenant: str, path: str, row: dict[str, Any],
                   given: tuple[int, bytes, FileInfo] | None = None) -> None:
        gw = self.gateway
        pol = gw.policy(Principal(tenant, INDEXER_AGENT, row["role"] or "agent"))
        role = reader_role(pol, path, row["role"])
        if role is None:
            self._set(row["id"], state="skipped",
                      detail="no role in the tenant's policy may read this path")
            return
        if given is not None:  # the writer's stored content: masked here like a read
            _version, content, info = given
            attrs = info.attrs or {}
            if attrs.get("scanned") == "binary" or (
                    attrs.get("scanned") != "text" and is_binary(content[: 64 << 10])):
                self.store.skip_binary(row["id"], info.version)
                return
            body = mask_all(content, 0, list(attrs.get("spans") or [])).decode(
                "utf-8", "replace")
            self.store.store(row["id"], tenant, body, info.version, None,
                             sorted(attrs.get("labels") or []), info.size, info.mtime)
            return
        who = Principal(tenant, INDEXER_AGENT, role)
        first = gw.read(who, path, 0, min(READ_PIECE, self.max_index_bytes))
        info = first.info
        attrs = info.attrs or {}
        spans = list(attrs.get("spans") or [])
        scanned = attrs.get("scanned")
        if scanned == "binary" or (scanned != "text" and is_binary(first.data[: 64 << 10])):
            self.store.skip_binary(row["id"], info.version)
            return
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = [decoder.decode(mask_all(first.data, 0, spans))]
        pos, nxt = len(first.data), first.next_offset
        while nxt is not None and pos < self.max_index_bytes:
            piece = gw.read(who, path, pos, min(READ_PIECE, self.max_index_bytes - pos))
            if piece.info.version != info.version:  # replaced while we read: start over later
                self._enqueue(tenant, path, time.monotonic())
                return
            text.append(decoder.decode(mask_all(piece.data, pos, spans)))
            pos, nxt = pos + len(piece.data), piece.next_offset
        text.append(decoder.decode(b"", final=True))
        body = "".join(text)
        detail = (f"only the first {self.max_index_bytes // MiB} MiB are indexed"
                  if nxt is not None else None)
        self.store.store(row["id"], tenant, body, info.version, detail,
                         sorted(attrs.get("labels") or []), info.size, info.mtime)

    # -- reading the index --------------------------------------------------------------

    def state(self, tenant: str, path: str) -> IndexState:
        row = self._row(tenant, path)
        if row is None:
            return IndexState("not_indexed", "the index has no record of this file yet")
        return IndexState(row["state"], row["detail"], row["indexed_version"])

    def stats(self, tenant: str) -> dict[str, int]:
        out = {"indexed": 0, "pending": 0, "skipped": 0}
        out.update(self.store.stats(tenant))
        return out

    def query(self, tenant: str, match: Match, *, prefix: str = "/",
              labels: list[str] | None = None, after: float | None = None,
              before: float | None = None, limit: int = 50, offset: int = 0) -> list[Hit]:
        """Hits of ``match`` within ``tenant``, best first (BM25 on SQLite, cover density
        on PostgreSQL; ``score`` is higher for better hits on both). Filters: path prefix,
        any of ``labels``, modified time in [after, before)."""
        return self.store.query(tenant, match, prefix=prefix, labels=labels, after=after,
                                before=before, limit=limit, offset=offset)

    def locate(self, doc_id: int, terms: list[tuple[str, bool]]) -> int | None:
        """The byte offset of a place where one of ``terms`` occurs in the indexed text (a
        hint for where to read a snippet; the index text is masked, so offsets match the
        file as long as the indexed version is current)."""
        return self.store.locate(doc_id, terms)

    def drop(self, tenant: str, path: str) -> None:
        """Forget a path the gateway says no longer exists."""
        self._forget(tenant, path)


__all__ = ["SearchIndex", "IndexState", "IndexStore", "Hit", "Match", "build_match",
           "index_for", "open_store", "mask_all", "reader_role", "SYNC_BYTES",
           "MAX_INDEX_BYTES", "INDEXER_AGENT"]

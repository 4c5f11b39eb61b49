"""The search index in PostgreSQL full-text search, for stores whose metadata runs on
PostgreSQL: the tables live in the database of the store's first metadata engine, so every
server replica over the store shares one index.

* **Tables**: ``search_docs`` (one row per tenant and path: versions, state, labels, the
  indexing lease) and ``search_chunks`` (the masked text of a document in pieces, each with
  a ``tsvector`` under a GIN index). A document is cut into pieces of at most
  ``CHUNK_WORDS`` words because a ``tsvector`` holds positions only up to 16383 and at most
  1 MB; consecutive pieces overlap by ``MAX_TERMS`` words, so any phrase the query syntax
  allows lies whole in one piece. A document matches when every part of the query (every
  word or phrase; any part with ``match='any'``) matches some piece of it.
* **Words**: the lexemes are made here, not by a text search configuration, with the same
  rule the SQLite index uses (FTS5's ``unicode61 remove_diacritics 2``): runs of letters
  and digits (``_`` and punctuation separate words), lower-cased, diacritics removed. The
  query side goes through the same function and is built as a ``tsquery`` literal from the
  parsed :class:`~governance.search.Match` (``&`` / ``|`` between parts, ``<->`` inside a
  phrase, ``:*`` for a prefix word), so matching does not depend on the database's locale
  or parser (which reads ``a.b@c.com`` or ``2024-05-01`` as single tokens), and nothing the
  user types is parsed as tsquery syntax. Stop words and stemming are not applied (as
  FTS5 does not).
* **Ranking**: PostgreSQL has no BM25. The score is PostgreSQL's cover density,
  ``ts_rank_cd`` (normalised by the log of the piece's length), summed over the pieces of
  a document that match; higher is better, as with the negated BM25 of SQLite. Scores are
  comparable within one search, not across engines.
* **Replicas**: writes are transactions on the row (upserts, ``SELECT … FOR UPDATE``), so
  two processes never leave a document half-written. Indexing a pending row first takes a
  lease on it (``lease_owner``/``lease_until``, the database's clock): the other replicas'
  workers skip rows leased by someone else until the lease ends, so a large file is read
  once, not once per replica. A lease left by a process that died runs out after
  ``LEASE_S``. A new version clears the lease (its writer indexes it); once the newest
  version is indexed, no slower process replaces it with the text of an older one.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url

from .search import MAX_TERMS, Hit, Match

T = TypeVar("T")

CHUNK_WORDS = 8000  # words per piece (tsvector positions stop at 16383)
CHUNK_CHARS = 64 * 1024  # characters per piece (a tsvector holds at most 1 MB)
OVERLAP = MAX_TERMS  # words shared by consecutive pieces: a phrase always fits in one
MAX_LEXEME_BYTES = 2046  # longer words cannot be lexemes; they are not indexed
MAX_POSITIONS = 256  # positions PostgreSQL keeps per lexeme
LEASE_S = 300.0  # an indexing lease held by a process that died runs out after this
RETRIES = 4  # deadlocks and serialization failures are retried this often
SCHEMA_LOCK = 0x10DE5EA4C4  # advisory lock key: one process creates the tables

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS search_docs (
        id BIGSERIAL PRIMARY KEY,
        tenant TEXT NOT NULL,
        path TEXT NOT NULL,
        version BIGINT NOT NULL,             -- the newest version the hooks reported
        size BIGINT NOT NULL,
        mtime DOUBLE PRECISION NOT NULL,
        labels TEXT[] NOT NULL DEFAULT '{}', -- entity types of the newest version
        state TEXT NOT NULL,                 -- pending | indexed | skipped
        detail TEXT,
        role TEXT,                           -- the writer's role (the indexer prefers it)
        indexed_version BIGINT,              -- the version whose text is in search_chunks
        indexed_at DOUBLE PRECISION,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,                    -- the process indexing it now
        lease_until TIMESTAMPTZ,
        UNIQUE (tenant, path)
    )""",
    "CREATE INDEX IF NOT EXISTS search_docs_state ON search_docs (state, tenant)",
    """CREATE TABLE IF NOT EXISTS search_chunks (
        doc_id BIGINT NOT NULL REFERENCES search_docs (id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        tenant TEXT NOT NULL,
        start_byte BIGINT NOT NULL,          -- where the piece starts in the file
        body TEXT NOT NULL,                  -- the masked text of the piece
        tsv TSVECTOR NOT NULL,
        PRIMARY KEY (doc_id, seq)
    )""",
    "CREATE INDEX IF NOT EXISTS search_chunks_tsv ON search_chunks USING GIN (tsv)",
]

_TOKEN = re.compile(r"[^\W_]+")


def lexeme(word: str) -> str:
    """A word as the index holds it: lower case, diacritics removed."""
    word = word.lower()
    if word.isascii():
        return word
    return "".join(ch for ch in unicodedata.normalize("NFKD", word)
                   if not unicodedata.combining(ch))


def lexemes(text: str) -> list[str]:
    """The index words of ``text`` (for a query word: one, or several as a phrase)."""
    out = []
    for m in _TOKEN.finditer(text):
        lex = lexeme(m.group(0))
        if lex and len(lex.encode("utf-8")) <= MAX_LEXEME_BYTES:
            out.append(lex)
    return out


def _quote(lex: str) -> str:
    return "'" + lex.replace("\\", "\\\\").replace("'", "''") + "'"


def _tsvector(words: list[str]) -> str:
    positions: dict[str, list[int]] = {}
    for i, w in enumerate(words, 1):
        pos = positions.setdefault(w, [])
        if len(pos) < MAX_POSITIONS:
            pos.append(i)
    return " ".join(_quote(w) + ":" + ",".join(map(str, p)) for w, p in positions.items())


def chunks(text: str) -> Iterator[tuple[int, int, str, str]]:
    """``(seq, start_byte, body, tsvector literal)`` for the pieces of ``text``."""
    buf: list[tuple[int, int, str]] = []  # (start char, end char, lexeme)
    fresh = 0  # words in buf not yet in an emitted piece
    seq = 0
    cur_char = cur_byte = 0

    def piece() -> tuple[int, int, str, str]:
        nonlocal cur_char, cur_byte
        start = 0 if seq == 0 else buf[0][0]
        cur_byte += len(text[cur_char:start].encode("utf-8"))
        cur_char = start
        return seq, cur_byte, text[start:buf[-1][1]], _tsvector([w for _s, _e, w in buf])

    for m in _TOKEN.finditer(text):
        lex = lexeme(m.group(0))
        if not lex or len(lex.encode("utf-8")) > MAX_LEXEME_BYTES:
            continue
        buf.append((m.start(), m.end(), lex))
        fresh += 1
        if len(buf) >= CHUNK_WORDS or buf[-1][1] - buf[0][0] >= CHUNK_CHARS:
            yield piece()
            seq += 1
            keep = min(OVERLAP, len(buf) - 1)
            buf = buf[len(buf) - keep:]
            fresh = 0
    if buf and fresh:
        yield piece()


def _part_query(words: tuple[str, ...], prefix: bool) -> str:
    lexs = [lx for w in words for lx in lexemes(w)]
    if not lexs:
        return ""
    quoted = [_quote(lx) for lx in lexs]
    if prefix:
        quoted[-1] += ":*"
    return " <-> ".join(quoted) if len(quoted) > 1 else quoted[0]


def tsqueries(match: Match) -> list[str]:
    """One ``tsquery`` literal per part (word or phrase) of ``match``."""
    return [q for q in (_part_query(tuple(w), p) for w, p in match.parts) if q]


def conninfo(url: str) -> str:
    """libpq's URL for a SQLAlchemy one (``postgresql+psycopg://…``)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class _Pool:
    """A few autocommit connections, reused (explicit transactions where needed)."""

    def __init__(self, dsn: str, keep: int = 4) -> None:
        self.dsn = dsn
        self.keep = keep
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    @contextlib.contextmanager
    def conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self._lock:
            c = self._idle.pop() if self._idle else None
        if c is None or c.closed:
            c = psycopg.connect(self.dsn, autocommit=True)
        try:
            yield c
        finally:
            ok = (not c.closed and c.info.transaction_status
                  == psycopg.pq.TransactionStatus.IDLE)
            with self._lock:
                if ok and not self._closed and len(self._idle) < self.keep:
                    self._idle.append(c)
                    c = None
            if c is not None:
                c.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for c in idle:
            c.close()


def _subtree(column: str = "path") -> str:
    return f"({column} = %(p)s OR left({column}, %(n)s) = %(pd)s)"


class PgSearchStore:
    """The index tables in one PostgreSQL database, shared by every process over the
    store. Thread-safe."""

    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.path = None
        self.url = url
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._pool = _Pool(conninfo(url))

        def create(c: psycopg.Connection[Any]) -> None:
            c.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for stmt in _SCHEMA:
                c.execute(stmt)

        self._tx(create)

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            self._tx(lambda c: c.execute(
                "UPDATE search_docs SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = %s", (self.owner,)))
        self._pool.close()

    def _tx(self, fn: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``fn`` in one transaction, retried on deadlocks, serialization failures and
        lost connections."""
        for attempt in range(RETRIES):
            try:
                with self._pool.conn() as c, c.transaction():
                    return fn(c)
            except psycopg.OperationalError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.02 * 2 ** attempt)
        raise AssertionError("unreachable")

    def _one(self, query: str, args: Any = None) -> Any:
        with self._pool.conn() as c:
            return c.execute(query, args).fetchone()

    # -- writes -------------------------------------------------------------------------

    def record(self, tenant: str, path: str, version: int, size: int, mtime: float,
               labels: list[str], state: str, detail: str | None, role: str | None,
               binary: bool) -> str:
        args = {"t": tenant, "p": path, "v": version, "s": size, "m": mtime, "l": labels,
                "st": state, "d": detail, "r": role, "b": binary}

        def fn(c: psycopg.Connection[Any]) -> str:
            doc_id, new_state = c.execute(
                "INSERT INTO search_docs AS x (tenant, path, version, size, mtime, labels, "
                "state, detail, role) VALUES (%(t)s, %(p)s, %(v)s, %(s)s, %(m)s, %(l)s, "
                "%(st)s, %(d)s, %(r)s) "
                "ON CONFLICT (tenant, path) DO UPDATE SET version = EXCLUDED.version, "
                "size = EXCLUDED.size, mtime = EXCLUDED.mtime, labels = EXCLUDED.labels, "
                "state = CASE WHEN x.indexed_version = EXCLUDED.version AND NOT %(b)s "
                "THEN 'indexed' ELSE EXCLUDED.state END, "
                "detail = EXCLUDED.detail, role = EXCLUDED.role, attempts = 0, "
                "lease_owner = NULL, lease_until = NULL, "
                "indexed_version = CASE WHEN %(b)s THEN NULL ELSE x.indexed_version END "
                "RETURNING id, state", args).fetchone()
            if binary:
                c.execute("DELETE FROM search_chunks WHERE doc_id = %s", (doc_id,))
            return str(new_state)

        return self._tx(fn)

    def forget(self, tenant: str, path: str) -> None:
        args = {"t": tenant, "p": path, "pd": path.rstrip("/") + "/", "n": len(path) + 1}
        self._tx(lambda c: c.execute(
            "DELETE FROM search_docs WHERE tenant = %(t)s AND " + _subtree(), args))

    def rename(self, tenant: str, src: str, dst: str) -> int:
        """Entries under ``src`` now live under ``dst``, whatever was at ``dst`` forgotten
        first, in one transaction; returns how many rows moved."""
        gone = {"t": tenant, "p": dst, "pd": dst.rstrip("/") + "/", "n": len(dst) + 1}
        args = {"t": tenant, "p": src, "pd": src + "/", "n": len(src) + 1, "dst": dst,
                "cut": len(src) + 1}

        def fn(c: psycopg.Connection[Any]) -> int:
            c.execute("DELETE FROM search_docs WHERE tenant = %(t)s AND " + _subtree(), gone)
            cur = c.execute("UPDATE search_docs SET path = %(dst)s || substr(path, %(cut)s) "
                            "WHERE tenant = %(t)s AND " + _subtree(), args)
            return cur.rowcount

        return self._tx(fn)

    def set(self, doc_id: int, **values: Any) -> None:
        cols = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Placeholder(k))
                                  for k in values)
        q = sql.SQL("UPDATE search_docs SET {} WHERE id = {}").format(
            cols, sql.Placeholder("_id"))
        self._tx(lambda c: c.execute(q, {**values, "_id": doc_id}))

    def skip_binary(self, doc_id: int, version: int) -> None:
        def fn(c: psycopg.Connection[Any]) -> None:
            c.execute("UPDATE search_docs SET state = 'skipped', version = %s, "
                      "detail = 'binary content is not indexed' WHERE id = %s",
                      (version, doc_id))
            c.execute("DELETE FROM search_chunks WHERE doc_id = %s", (doc_id,))

        self._tx(fn)

    def claim(self, doc_id: int) -> bool:
        """Take the indexing lease on a pending row; False when another process holds it
        (or the row is no longer pending)."""
        row = self._tx(lambda c: c.execute(
            "UPDATE search_docs SET lease_owner = %(me)s, "
            "lease_until = clock_timestamp() + make_interval(secs => %(ttl)s) "
            "WHERE id = %(id)s AND state = 'pending' AND (lease_owner IS NULL OR "
            "lease_owner = %(me)s OR lease_until < clock_timestamp()) RETURNING id",
            {"me": self.owner, "ttl": LEASE_S, "id": doc_id}).fetchone())
        return row is not None

    def release(self, doc_id: int) -> None:
        self._tx(lambda c: c.execute(
            "UPDATE search_docs SET lease_owner = NULL, lease_until = NULL "
            "WHERE id = %s AND lease_owner = %s", (doc_id, self.owner)))

    def store(self, doc_id: int, tenant: str, body: str, version: int, detail: str | None,
              labels: list[str], size: int, mtime: float) -> None:
        """Replace the indexed text of ``doc_id`` with ``body`` (of ``version``), unless
        another process has indexed the newest version meanwhile and ours is not it."""
        body = body.replace("\x00", " ")  # PostgreSQL text cannot hold NUL

        def fn(c: psycopg.Connection[Any]) -> None:
            r = c.execute("SELECT version, indexed_version FROM search_docs WHERE id = %s "
                          "FOR UPDATE", (doc_id,)).fetchone()
            if r is None:  # deleted meanwhile
                return
            newest, have = r
            if have == newest and version != newest:  # the newest is indexed: ours is older
                return
            c.execute("DELETE FROM search_chunks WHERE doc_id = %s", (doc_id,))
            with c.cursor() as cur:
                cur.executemany(
                    "INSERT INTO search_chunks (doc_id, seq, tenant, start_byte, body, tsv) "
                    "VALUES (%s, %s, %s, %s, %s, %s::tsvector)",
                    ((doc_id, seq, tenant, start, text, tsv)
                     for seq, start, text, tsv in chunks(body)))
            current = newest == version
            c.execute(
                "UPDATE search_docs SET state = %(st)s, detail = %(d)s, indexed_version = %(v)s, "
                "indexed_at = %(at)s, attempts = 0, "
                "labels = CASE WHEN %(cur)s THEN %(l)s ELSE labels END, "
                "size = CASE WHEN %(cur)s THEN %(s)s ELSE size END, "
                "mtime = CASE WHEN %(cur)s THEN %(m)s ELSE mtime END, "
                "lease_until = CASE WHEN lease_owner = %(me)s THEN NULL ELSE lease_until END, "
                "lease_owner = CASE WHEN lease_owner = %(me)s THEN NULL ELSE lease_owner END "
                "WHERE id = %(id)s",
                {"st": "indexed" if current else "pending", "d": detail, "v": version,
                 "at": time.time(), "cur": current, "l": labels, "s": size, "m": mtime,
                 "me": self.owner, "id": doc_id})

        self._tx(fn)

    # -- reads --------------------------------------------------------------------------

    def pending(self) -> list[tuple[str, str]]:
        """Pending rows no other live process is indexing."""
        with self._pool.conn() as c:
            return [(r[0], r[1]) for r in c.execute(
                "SELECT tenant, path FROM search_docs WHERE state = 'pending' AND "
                "(lease_owner IS NULL OR lease_owner = %s OR lease_until < clock_timestamp())",
                (self.owner,))]

    def row(self, tenant: str, path: str) -> dict[str, Any] | None:
        with self._pool.conn() as c, c.cursor(row_factory=dict_row) as cur:
            return cur.execute("SELECT * FROM search_docs WHERE tenant = %s AND path = %s",
                               (tenant, path)).fetchone()

    def stats(self, tenant: str) -> dict[str, int]:
        with self._pool.conn() as c:
            rows = c.execute("SELECT state, count(*) FROM search_docs WHERE tenant = %s "
                             "GROUP BY state", (tenant,)).fetchall()
        return {r[0]: int(r[1]) for r in rows}

    def query(self, tenant: str, match: Match, *, prefix: str = "/",
              labels: list[str] | None = None, after: float | None = None,
              before: float | None = None, limit: int = 50, offset: int = 0) -> list[Hit]:
        """Hits best first by cover density (``ts_rank_cd``), ties by age of the row."""
        parts = tsqueries(match)
        if not parts:
            return []
        joined = [f"({p})" for p in parts]
        q_any = " | ".join(joined)
        q_rank = q_any if match.mode == "any" else " & ".join(joined)
        args: dict[str, Any] = {"t": tenant, "qa": q_any, "qr": q_rank, "lim": limit,
                                "off": offset}
        where = ["c.tsv @@ %(qa)s::tsquery", "c.tenant = %(t)s", "d.tenant = %(t)s"]
        if prefix and prefix != "/":
            where.append(_subtree("d.path"))
            args.update(p=prefix, pd=prefix + "/", n=len(prefix) + 1)
        if after is not None:
            where.append("d.mtime >= %(after)s")
            args["after"] = after
        if before is not None:
            where.append("d.mtime < %(before)s")
            args["before"] = before
        if labels:
            where.append("d.labels && %(labels)s::text[]")
            args["labels"] = list(labels)
        having = ""
        if match.mode != "any" and len(parts) > 1:
            having = " HAVING " + " AND ".join(
                f"bool_or(c.tsv @@ %(q{i})s::tsquery)" for i in range(len(parts)))
            args.update({f"q{i}": p for i, p in enumerate(parts)})
        query = ("SELECT d.id, d.path, d.version, d.indexed_version, d.size, d.mtime, "
                 "d.labels, sum(ts_rank_cd(c.tsv, %(qr)s::tsquery, 1)) AS score "
                 "FROM search_chunks c JOIN search_docs d ON d.id = c.doc_id "
                 "WHERE " + " AND ".join(where) + " GROUP BY d.id" + having +
                 " ORDER BY score DESC, d.id LIMIT %(lim)s OFFSET %(off)s")
        with self._pool.conn() as c:
            rows = c.execute(query, args).fetchall()
        return [Hit(r[0], r[1], r[2], r[3], r[4], r[5], list(r[6] or []), float(r[7]))
                for r in rows]

    def locate(self, doc_id: int, terms: list[tuple[str, bool]]) -> int | None:
        """The byte offset of the first place any of ``terms`` occurs in the indexed text:
        the first piece that matches, then the word within it."""
        alts, qs = [], []
        for word, prefix in terms:
            for i, lx in enumerate(lex_list := lexemes(word)):
                last = prefix and i == len(lex_list) - 1
                qs.append(_quote(lx) + (":*" if last else ""))
            alts.append(re.escape(word) + (r"[^\W_]*" if prefix else r"(?![^\W_])"))
        if not qs:
            return None
        with self._pool.conn() as c:
            r = c.execute("SELECT start_byte, body FROM search_chunks WHERE doc_id = %s AND "
                          "tsv @@ %s::tsquery ORDER BY seq LIMIT 1",
                          (doc_id, " | ".join(qs))).fetchone()
        if r is None:
            return None
        start, body = int(r[0]), r[1]
        m = re.search(r"(?<![^\W_])(?:" + "|".join(alts) + ")", body, re.IGNORECASE)
        return start if m is None else start + len(body[:m.start()].encode("utf-8"))


__all__ = ["PgSearchStore", "lexeme", "lexemes", "chunks", "tsqueries", "conninfo"]

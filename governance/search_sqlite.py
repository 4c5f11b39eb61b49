"""The search index in SQLite FTS5: ``<home>/search/index.db`` (the embedded store).

BM25 ranking (``bm25(fts)``, negated so that higher is better). One connection shared by
the index's threads under a lock; write transactions take the write lock up front
(``BEGIN IMMEDIATE``), so a second process over the same home (the CLI) waits its turn.
What is indexed and when is decided by :class:`governance.search.SearchIndex`; this module
only holds the SQL.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from .search import Hit, Match

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    path TEXT NOT NULL,
    version INTEGER NOT NULL,          -- the newest version the hooks reported
    size INTEGER NOT NULL,
    mtime REAL NOT NULL,
    labels TEXT NOT NULL DEFAULT '[]', -- entity types of the newest version (JSON list)
    state TEXT NOT NULL,               -- pending | indexed | skipped
    detail TEXT,
    role TEXT,                         -- the writer's role (the indexer prefers it)
    indexed_version INTEGER,           -- the version whose text is in fts
    indexed_at REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    UNIQUE (tenant, path)
);
CREATE INDEX IF NOT EXISTS docs_state ON docs (state, tenant);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(
    body, tenant UNINDEXED, tokenize = 'unicode61 remove_diacritics 2'
);
"""


def _subtree(column: str = "path") -> str:
    return f"({column} = :p OR substr({column}, 1, :n) = :pd)"


class SqliteSearchStore:
    """The index tables of one home in SQLite FTS5. Thread-safe."""

    kind = "sqlite"

    def __init__(self, db_path: str | Path) -> None:
        self.path = Path(db_path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False,
                                   isolation_level=None, timeout=10.0)
        self._dbl = threading.RLock()
        with self._dbl:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._dbl:
            self._db.close()

    # -- writes -------------------------------------------------------------------------

    def record(self, tenant: str, path: str, version: int, size: int, mtime: float,
               labels: list[str], state: str, detail: str | None, role: str | None,
               binary: bool) -> str:
        """Upsert the newest version of ``path``; returns the state it now has."""
        labels_json = json.dumps(labels)
        with self._dbl:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT id, indexed_version FROM docs "
                                       "WHERE tenant=? AND path=?", (tenant, path)).fetchone()
                if row is None:
                    self._db.execute(
                        "INSERT INTO docs (tenant, path, version, size, mtime, labels, state, "
                        "detail, role) VALUES (?,?,?,?,?,?,?,?,?)",
                        (tenant, path, version, size, mtime, labels_json, state, detail, role))
                else:
                    if row[1] == version and not binary:
                        state = "indexed"  # a no-op notification of what is indexed
                    self._db.execute(
                        "UPDATE docs SET version=?, size=?, mtime=?, labels=?, state=?, detail=?, "
                        "role=?, attempts=0 WHERE id=?",
                        (version, size, mtime, labels_json, state, detail, role, row[0]))
                    if binary:
                        self._db.execute("DELETE FROM fts WHERE rowid=?", (row[0],))
                        self._db.execute("UPDATE docs SET indexed_version=NULL WHERE id=?",
                                         (row[0],))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return state

    def forget(self, tenant: str, path: str) -> None:
        args = {"t": tenant, "p": path, "pd": path.rstrip("/") + "/", "n": len(path) + 1}
        where = "tenant = :t AND " + _subtree()
        with self._dbl:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(f"DELETE FROM fts WHERE rowid IN (SELECT id FROM docs WHERE "
                                 f"{where})", args)
                self._db.execute(f"DELETE FROM docs WHERE {where}", args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def rename(self, tenant: str, src: str, dst: str) -> int:
        """Entries under ``src`` now live under ``dst`` (whatever was at ``dst`` is
        forgotten first); returns how many rows moved."""
        self.forget(tenant, dst)  # whatever the move replaced
        args = {"t": tenant, "p": src, "pd": src + "/", "n": len(src) + 1, "dst": dst,
                "cut": len(src) + 1}
        with self._dbl:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute(
                    "UPDATE docs SET path = :dst || substr(path, :cut) WHERE tenant = :t AND "
                    + _subtree(), args)
                moved = cur.rowcount
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return moved

    def set(self, doc_id: int, **values: Any) -> None:
        cols = ", ".join(f"{k}=?" for k in values)
        with self._dbl:
            self._db.execute(f"UPDATE docs SET {cols} WHERE id=?", (*values.values(), doc_id))

    def skip_binary(self, doc_id: int, version: int) -> None:
        self.set(doc_id, state="skipped", detail="binary content is not indexed",
                 version=version)
        with self._dbl:
            self._db.execute("DELETE FROM fts WHERE rowid=?", (doc_id,))

    def claim(self, doc_id: int) -> bool:
        """One process indexes a home's rows at a time per path (the caller's stripe
        lock); a CLI process racing the server only repeats work, so always True."""
        return True

    def release(self, doc_id: int) -> None:
        return None

    def store(self, doc_id: int, tenant: str, body: str, version: int, detail: str | None,
              labels: list[str], size: int, mtime: float) -> None:
        """Replace the indexed text of ``doc_id`` with ``body`` (of ``version``)."""
        with self._dbl:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cur = self._db.execute("SELECT version FROM docs WHERE id=?", (doc_id,))
                now_row = cur.fetchone()
                if now_row is None:  # deleted meanwhile
                    self._db.execute("COMMIT")
                    return
                self._db.execute("DELETE FROM fts WHERE rowid=?", (doc_id,))
                self._db.execute("INSERT INTO fts (rowid, body, tenant) VALUES (?,?,?)",
                                 (doc_id, body, tenant))
                newest = now_row[0]
                state = "indexed" if newest == version else "pending"
                self._db.execute(
                    "UPDATE docs SET state=?, detail=?, indexed_version=?, indexed_at=?, "
                    "attempts=0 WHERE id=?",
                    (state, detail, version, time.time(), doc_id))
                if newest == version:
                    self._db.execute("UPDATE docs SET labels=?, size=?, mtime=? WHERE id=?",
                                     (json.dumps(labels), size, mtime, doc_id))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- reads --------------------------------------------------------------------------

    def pending(self) -> list[tuple[str, str]]:
        with self._dbl:
            return [(r[0], r[1]) for r in self._db.execute(
                "SELECT tenant, path FROM docs WHERE state='pending'")]

    def row(self, tenant: str, path: str) -> dict[str, Any] | None:
        with self._dbl:
            cur = self._db.execute("SELECT * FROM docs WHERE tenant=? AND path=?", (tenant, path))
            r = cur.fetchone()
            return None if r is None else dict(zip([d[0] for d in cur.description], r,
                                                   strict=True))

    def stats(self, tenant: str) -> dict[str, int]:
        with self._dbl:
            rows = self._db.execute("SELECT state, count(*) FROM docs WHERE tenant=? "
                                    "GROUP BY state", (tenant,)).fetchall()
        return {r[0]: r[1] for r in rows}

    def query(self, tenant: str, match: Match, *, prefix: str = "/",
              labels: list[str] | None = None, after: float | None = None,
              before: float | None = None, limit: int = 50, offset: int = 0) -> list[Hit]:
        sql = ["SELECT d.id, d.path, d.version, d.indexed_version, d.size, d.mtime, d.labels, "
               "bm25(fts) AS score FROM fts JOIN docs d ON d.id = fts.rowid "
               "WHERE fts MATCH :q AND fts.tenant = :t AND d.tenant = :t"]
        args: dict[str, Any] = {"q": match.expr, "t": tenant, "lim": limit, "off": offset}
        if prefix and prefix != "/":
            sql.append("AND " + _subtree("d.path"))
            args.update(p=prefix, pd=prefix + "/", n=len(prefix) + 1)
        if after is not None:
            sql.append("AND d.mtime >= :after")
            args["after"] = after
        if before is not None:
            sql.append("AND d.mtime < :before")
            args["before"] = before
        if labels:
            names = [f":l{i}" for i in range(len(labels))]
            sql.append("AND EXISTS (SELECT 1 FROM json_each(d.labels) j WHERE j.value IN ("
                       + ", ".join(names) + "))")
            args.update({f"l{i}": v for i, v in enumerate(labels)})
        sql.append("ORDER BY score LIMIT :lim OFFSET :off")
        with self._dbl:
            rows = self._db.execute(" ".join(sql), args).fetchall()
        return [Hit(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "[]"),
                    -float(r[7])) for r in rows]

    def locate(self, doc_id: int, terms: list[tuple[str, bool]]) -> int | None:
        with self._dbl:
            for word, _prefix in terms:
                r = self._db.execute(
                    "SELECT instr(lower(body), :w) AS i, "
                    "length(CAST(substr(body, 1, max(instr(lower(body), :w) - 1, 0)) AS BLOB)) "
                    "FROM fts WHERE rowid = :id", {"w": word.lower(), "id": doc_id}).fetchone()
                if r is not None and r[0]:
                    return int(r[1])
        return None


__all__ = ["SqliteSearchStore"]

"""Embedded KV backend: one SQLite file in WAL mode, durable on commit.

With ``durability: fsync`` every commit is synced (``synchronous=FULL``): an acknowledged
put survives a power cut, not just a killed process. Expired rows read as absent and are
deleted lazily by scans and ``purge``.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .base import KVStore, check_key, check_ttl, check_value, expiry

_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    ns TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, expires REAL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
"""


def _prefix_end(prefix: str) -> str | None:
    """The smallest string greater than every string starting with ``prefix``."""
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class SqliteKV(KVStore):
    def __init__(self, path: str | Path, durability: str = "fsync") -> None:
        self.path = str(path)
        self.url = f"sqlite:///{self.path}"
        self._sync = "FULL" if durability == "fsync" else "NORMAL"
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._conn().executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                timeout=30.0)
            c.execute("PRAGMA journal_mode=WAL")
            c.execute(f"PRAGMA synchronous={self._sync}")
            self._local.conn = c
            with self._lock:
                self._all.append(c)
        return c

    def get(self, ns: str, key: str) -> bytes | None:
        row = self._conn().execute(
            "SELECT value, expires FROM kv WHERE ns=? AND key=?",
            (self._ns(ns), check_key(key))).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return row[0]

    def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]:
        ns = self._ns(ns)
        keys = [check_key(k) for k in keys]
        found: dict[str, bytes] = {}
        now = time.time()
        c = self._conn()
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            marks = ",".join("?" * len(part))
            for k, v, exp in c.execute(
                    f"SELECT key, value, expires FROM kv WHERE ns=? AND key IN ({marks})",
                    (ns, *part)):
                if exp is None or exp > now:
                    found[k] = v
        return [found.get(k) for k in keys]

    def put(self, ns: str, key: str, value: bytes, ttl: float | None = None) -> None:
        self.put_many(ns, [(key, value)], ttl)

    def put_many(self, ns: str, items: Sequence[tuple[str, bytes]],
                 ttl: float | None = None) -> None:
        ns = self._ns(ns)
        exp = expiry(check_ttl(ttl))
        rows = [(ns, check_key(k), check_value(v), exp) for k, v in items]
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            c.executemany("INSERT OR REPLACE INTO kv (ns, key, value, expires) VALUES (?,?,?,?)",
                          rows)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def delete(self, ns: str, key: str) -> bool:
        c = self._conn()
        cur = c.execute("DELETE FROM kv WHERE ns=? AND key=? AND "
                        "(expires IS NULL OR expires > ?)",
                        (self._ns(ns), check_key(key), time.time()))
        c.execute("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))  # an expired leftover
        return cur.rowcount > 0

    def delete_many(self, ns: str, keys: Sequence[str]) -> int:
        ns = self._ns(ns)
        rows = [(ns, check_key(k)) for k in keys]
        if not rows:
            return 0
        now = time.time()
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            live = 0
            for i in range(0, len(rows), 500):
                part = [k for _ns, k in rows[i:i + 500]]
                marks = ",".join("?" * len(part))
                live += c.execute(f"SELECT count(*) FROM kv WHERE ns=? AND key IN ({marks}) "
                                  "AND (expires IS NULL OR expires > ?)",
                                  (ns, *part, now)).fetchone()[0]
            c.executemany("DELETE FROM kv WHERE ns=? AND key=?", rows)
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        return int(live)

    def cas(self, ns: str, key: str, expected: bytes | None, value: bytes | None,
            ttl: float | None = None) -> bool:
        ns, key = self._ns(ns), check_key(key)
        if value is not None:
            value = check_value(value)
        exp = expiry(check_ttl(ttl))
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT value, expires FROM kv WHERE ns=? AND key=?",
                            (ns, key)).fetchone()
            cur = None if row is None or (row[1] is not None and row[1] <= time.time()) \
                else row[0]
            if cur != expected:
                c.execute("ROLLBACK")
                return False
            if value is None:
                c.execute("DELETE FROM kv WHERE ns=? AND key=?", (ns, key))
            else:
                c.execute("INSERT OR REPLACE INTO kv (ns, key, value, expires) "
                          "VALUES (?,?,?,?)", (ns, key, value, exp))
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        return True

    def scan(self, ns: str, prefix: str = "", *, start_after: str | None = None,
             limit: int | None = None) -> list[tuple[str, bytes]]:
        ns = self._ns(ns)
        sql = "SELECT key, value, expires FROM kv WHERE ns=? AND key >= ?"
        args: list = [ns, prefix]
        if start_after is not None and start_after >= prefix:
            sql = "SELECT key, value, expires FROM kv WHERE ns=? AND key > ?"
            args = [ns, start_after]
        end = _prefix_end(prefix)
        if end is not None:
            sql += " AND key < ?"
            args.append(end)
        sql += " ORDER BY key"
        now = time.time()
        out: list[tuple[str, bytes]] = []
        expired = 0
        for k, v, exp in self._conn().execute(sql, args):
            if exp is not None and exp <= now:
                expired += 1
                continue
            if not k.startswith(prefix):
                continue
            out.append((k, v))
            if limit is not None and len(out) >= limit:
                break
        if expired:
            self.purge(ns)
        return out

    def count_range(self, ns: str, lo: str, hi: str) -> int:
        row = self._conn().execute(
            "SELECT count(*) FROM kv WHERE ns=? AND key >= ? AND key <= ? AND "
            "(expires IS NULL OR expires > ?)",
            (self._ns(ns), check_key(lo), check_key(hi), time.time())).fetchone()
        return int(row[0])

    def incr(self, ns: str, key: str, by: int = 1) -> int:
        ns, key = self._ns(ns), check_key(key)
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            row = c.execute("SELECT value FROM kv WHERE ns=? AND key=?", (ns, key)).fetchone()
            n = (int(row[0]) if row else 0) + by
            c.execute("INSERT OR REPLACE INTO kv (ns, key, value, expires) VALUES (?,?,?,NULL)",
                      (ns, key, str(n).encode()))
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        return n

    def purge(self, ns: str | None = None) -> int:
        c = self._conn()
        if ns is None:
            cur = c.execute("DELETE FROM kv WHERE expires IS NOT NULL AND expires <= ?",
                            (time.time(),))
        else:
            cur = c.execute("DELETE FROM kv WHERE ns=? AND expires IS NOT NULL AND "
                            "expires <= ?", (self._ns(ns), time.time()))
        return cur.rowcount

    def drop_namespace(self, ns: str) -> int:
        return self._conn().execute("DELETE FROM kv WHERE ns=?", (self._ns(ns),)).rowcount

    def close(self) -> None:
        with self._lock:
            for c in self._all:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
            self._all.clear()
        self._local = threading.local()

"""SQL engines for metadata, chosen by URL (any SQLAlchemy URL; SQLite and PostgreSQL
are tested).

SQLAlchemy owns what it is good at: URLs, drivers, dialects and the schema. The hot path
(a point lookup is most of a ``stat``) runs plain parameterised SQL on the driver's own
connection, one per thread, because statement construction in SQLAlchemy Core costs more
than the SQLite query itself. SQLite runs in WAL mode; write transactions take the write
lock up front (``BEGIN IMMEDIATE``) so two writers never deadlock on a lock upgrade.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..errors import ConfigError


def make_engine(url: str, durability: str = "fsync") -> Engine:
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
            db = engine.url.database
            if db and db != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
            _sqlite_setup(engine, durability)
        else:
            engine = create_engine(url, pool_size=8, max_overflow=56, pool_pre_ping=True,
                                   pool_timeout=30)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"cannot use metadata engine {url!r}: {exc}") from exc
    except ImportError as exc:
        raise ConfigError(
            f"metadata engine {url!r} needs a driver: pip install 'lodestore[postgres]' ({exc})"
        ) from exc
    return engine


def _pragmas(dbapi_conn: Any, durability: str) -> None:
    sync = "FULL" if durability == "fsync" else "NORMAL"
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={sync}")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def _sqlite_setup(engine: Engine, durability: str) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None
        _pragmas(dbapi_conn, durability)


class SqlEngine:
    """One physical metadata engine: schema via SQLAlchemy, queries via the driver."""

    def __init__(self, url: str, durability: str = "fsync") -> None:
        self.url = url
        self.durability = durability
        self.sa = make_engine(url, durability)
        self.sqlite = self.sa.dialect.name == "sqlite"
        dbapi = self.sa.dialect.loaded_dbapi
        self.IntegrityError: type[Exception] = dbapi.IntegrityError
        self.OperationalError: type[Exception] = dbapi.OperationalError
        self._qmark = self.sa.dialect.paramstyle == "qmark"
        self._sql: dict[str, str] = {}
        self._local = threading.local()
        # SQLite: one connection per thread, closed when its thread has ended
        self._owned: dict[int, tuple[weakref.ref[threading.Thread], Any]] = {}
        self._lock = threading.Lock()

    def sql(self, text: str) -> str:
        """Our SQL uses ``?`` placeholders; translate once for ``%s`` drivers."""
        if self._qmark:
            return text
        s = self._sql.get(text)
        if s is None:
            s = self._sql[text] = text.replace("%", "%%").replace("?", "%s")
        return s

    def _sqlite_conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.sa.url.database, isolation_level=None,
                                   check_same_thread=False, timeout=30)
            _pragmas(conn, self.durability)
            self._local.conn = conn
            me = threading.current_thread()
            with self._lock:
                dead = [k for k, (t, _c) in self._owned.items() if t() is None
                        or not t().is_alive()]  # type: ignore[union-attr]
                stale = [self._owned.pop(k)[1] for k in dead]
                self._owned[id(me)] = (weakref.ref(me), conn)
            for c in stale:
                with contextlib.suppress(Exception):
                    c.close()
        return conn

    @contextmanager
    def _checkout(self) -> Iterator[Any]:
        """A driver connection: this thread's own on SQLite, a pooled one elsewhere."""
        if self.sqlite:
            yield self._sqlite_conn()
            return
        try:
            conn = self.sa.raw_connection()
            conn.driver_connection.autocommit = True
        except Exception as exc:  # noqa: BLE001 - driver-specific connection errors
            raise _unavailable(self.url, exc) from exc
        try:
            yield conn
        except self.OperationalError:
            conn.invalidate()
            raise
        finally:
            conn.close()  # back to the pool

    def _reset(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with self._lock:
                self._owned.pop(id(threading.current_thread()), None)
            with contextlib.suppress(Exception):  # the connection is already broken
                conn.close()

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A cursor in autocommit mode: each statement sees committed data."""
        with self._checkout() as conn:
            try:
                cur = conn.cursor()
            except self.OperationalError as exc:
                self._reset()
                raise _unavailable(self.url, exc) from exc
            try:
                yield cur
            except self.OperationalError:
                if self.sqlite:
                    self._reset()
                raise
            finally:
                cur.close()

    @contextmanager
    def write(self) -> Iterator[Any]:
        """A cursor inside one transaction, committed on success, rolled back on error."""
        if self.sqlite:  # the hot path: no pool, no nested context managers
            cur = self._sqlite_conn().cursor()
            try:
                cur.execute("BEGIN IMMEDIATE")
            except self.OperationalError as exc:
                cur.close()
                self._reset()
                raise _unavailable(self.url, exc) from exc
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - connection gone: drop it
                    self._reset()
                raise
            finally:
                cur.close()
            return
        with self._checkout() as conn:
            cur = conn.cursor()
            try:
                cur.execute("BEGIN")
            except self.OperationalError as exc:
                cur.close()
                raise _unavailable(self.url, exc) from exc
            try:
                yield cur
                cur.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(Exception):
                    cur.execute("ROLLBACK")
                raise
            finally:
                cur.close()

    def query_one(self, sql: str, params: tuple) -> Any:
        """One row of a read-only statement: the stat hot path, without context managers
        on SQLite (``sql`` is already in this driver's placeholder style)."""
        if self.sqlite:
            conn = self._sqlite_conn()
            try:
                return conn.execute(sql, params).fetchone()
            except self.OperationalError:
                self._reset()
                raise
        with self.read() as cur:
            cur.execute(sql, params)
            return cur.fetchone()

    def open_connections(self) -> int:
        with self._lock:
            return len(self._owned)

    def dispose(self) -> None:
        with self._lock:
            conns = [c for _t, c in self._owned.values()]
            self._owned.clear()
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()
        self._local = threading.local()
        self.sa.dispose()


def _unavailable(url: str, exc: Exception) -> Exception:
    from ..errors import TargetUnavailable

    safe = url.split("@")[-1] if "@" in url else url
    return TargetUnavailable(f"metadata engine {safe} is unavailable: {exc}".strip())

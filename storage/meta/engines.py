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
            engine = create_engine(url, pool_size=4, max_overflow=64, pool_pre_ping=True)
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
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def sql(self, text: str) -> str:
        """Our SQL uses ``?`` placeholders; translate once for ``%s`` drivers."""
        if self._qmark:
            return text
        s = self._sql.get(text)
        if s is None:
            s = self._sql[text] = text.replace("%", "%%").replace("?", "%s")
        return s

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self.sqlite:
                conn = sqlite3.connect(self.sa.url.database, isolation_level=None,
                                       check_same_thread=False, timeout=30)
                _pragmas(conn, self.durability)
            else:
                conn = self.sa.raw_connection()
                conn.driver_connection.autocommit = True
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _reset(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(Exception):  # the connection is already broken
                conn.close()

    @contextmanager
    def read(self) -> Iterator[Any]:
        """A cursor in autocommit mode: each statement sees committed data."""
        try:
            cur = self._conn().cursor()
        except self.OperationalError as exc:
            self._reset()
            raise _unavailable(self.url, exc) from exc
        try:
            yield cur
        except self.OperationalError:
            self._reset()
            raise
        finally:
            cur.close()

    @contextmanager
    def write(self) -> Iterator[Any]:
        """A cursor inside one transaction, committed on success, rolled back on error."""
        conn = self._conn()
        cur = conn.cursor()
        try:
            cur.execute("BEGIN IMMEDIATE" if self.sqlite else "BEGIN")
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

    def dispose(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()
        self._local = threading.local()
        self.sa.dispose()


def _unavailable(url: str, exc: Exception) -> Exception:
    from ..errors import TargetUnavailable

    safe = url.split("@")[-1] if "@" in url else url
    return TargetUnavailable(f"metadata engine {safe} is unavailable: {exc}".strip())

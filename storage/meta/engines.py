"""SQL engines for metadata, chosen by URL (any SQLAlchemy URL; SQLite and PostgreSQL
are tested). SQLite runs in WAL mode; write transactions take the write lock up front
(``BEGIN IMMEDIATE``) so two writers never deadlock on a lock upgrade."""

from __future__ import annotations

import os
from urllib.parse import urlparse

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..errors import ConfigError


def make_engine(url: str, durability: str = "fsync") -> Engine:
    try:
        if url.startswith("sqlite"):
            path = urlparse(url).path
            if path and path != "/:memory:":
                os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            engine = create_engine(
                url,
                connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=8,
                max_overflow=32,
            )
            _sqlite_setup(engine, durability)
        else:
            engine = create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(f"cannot use metadata engine {url!r}: {exc}") from exc
    except ImportError as exc:
        raise ConfigError(
            f"metadata engine {url!r} needs a driver: pip install 'lodestore[postgres]' ({exc})"
        ) from exc
    return engine


def _sqlite_setup(engine: Engine, durability: str) -> None:
    sync = "FULL" if durability == "fsync" else "NORMAL"

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):  # type: ignore[no-untyped-def]
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={sync}")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA cache_size=-65536")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        if conn.get_execution_options().get("write"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")

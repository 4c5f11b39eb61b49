"""Shared fixtures. Services (PostgreSQL, S3 via moto, Redis) skip with a reason when they
cannot be had, and fail instead when LODESTORE_REQUIRE_SERVICES=1 (as CI sets it)."""

from __future__ import annotations

import os
import uuid

import pytest

REQUIRE_SERVICES = os.environ.get("LODESTORE_REQUIRE_SERVICES") == "1"
PG_ADMIN_URL = os.environ.get(
    "LODESTORE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def service_missing(reason: str) -> None:
    """Skip, or fail when the environment requires real services."""
    if REQUIRE_SERVICES:
        pytest.fail(f"required service unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError as exc:
        service_missing(f"psycopg not installed: {exc}")
    name = f"lodestore_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 - any connection failure means no service
        admin.dispose()
        service_missing(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    yield url
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


REDIS_TEST_URL = os.environ.get("LODESTORE_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
def redis_kv_url():
    """A Redis KV URL with a key prefix of its own; every key under it is deleted after."""
    try:
        import redis
    except ImportError as exc:
        service_missing(f"redis package not installed: {exc}")
    client = redis.Redis.from_url(REDIS_TEST_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        service_missing(f"Redis not reachable at {REDIS_TEST_URL}: {exc}")
    prefix = f"lodestore-test-{uuid.uuid4().hex[:10]}:"
    yield f"{REDIS_TEST_URL}?prefix={prefix}"
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()

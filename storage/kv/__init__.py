"""The KV tier: small durable values for session context and memories.

``open_kv(url)`` picks the backend by URL, like the metadata engines and targets:
``sqlite:///path/kv.db`` (the embedded default, in the store's home) or
``redis://host:6379/0?prefix=lodestore:`` (Redis or Valkey, for many server replicas).
"""

from __future__ import annotations

from ..errors import ConfigError
from .base import MAX_KEY_BYTES, MAX_VALUE_BYTES, KVStore
from .sqlite import SqliteKV


def open_kv(url: str, durability: str = "fsync") -> KVStore:
    if url.startswith("sqlite:///"):
        return SqliteKV(url[len("sqlite:///"):], durability)
    if url.startswith(("redis://", "rediss://", "valkey://", "unix://")):
        try:
            from .redis_kv import RedisKV
        except ImportError as exc:  # pragma: no cover - redis is a declared dependency
            raise ConfigError("the Redis KV backend needs `pip install lodestore[redis]`") \
                from exc
        return RedisKV(url.replace("valkey://", "redis://", 1))
    raise ConfigError(f"KV URL {url!r} is not supported; use sqlite:///PATH or "
                      "redis://HOST:PORT/DB")


__all__ = ["KVStore", "MAX_KEY_BYTES", "MAX_VALUE_BYTES", "SqliteKV", "open_kv"]

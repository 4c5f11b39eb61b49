"""The KV tier's one interface: small values by (namespace, key), with TTL, CAS and scans.

Session turns, memories and their indexes live here. The namespace is always a tenant id,
so a key of one tenant can never name a value of another; each backend keeps namespaces
apart in its own key layout. Values are bytes; callers choose the encoding.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

from ..errors import InvalidArgument
from ..paths import check_tenant_id

MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 16 << 20


def check_key(key: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidArgument(f"KV key must be a non-empty string, got {key!r}")
    if "\x00" in key:
        raise InvalidArgument("KV key contains a NUL byte; remove it")
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise InvalidArgument(f"KV key is longer than {MAX_KEY_BYTES} bytes; shorten it")
    return key


def check_value(value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument(f"KV value must be bytes, got {type(value).__name__}")
    if len(value) > MAX_VALUE_BYTES:
        raise InvalidArgument(
            f"KV value is {len(value)} bytes; the limit is {MAX_VALUE_BYTES} (store large "
            "data as a file)")
    return bytes(value)


def check_ttl(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not ttl > 0:
        raise InvalidArgument(f"ttl must be a positive number of seconds, got {ttl!r}")
    return float(ttl)


def expiry(ttl: float | None) -> float | None:
    return None if ttl is None else time.time() + ttl


class KVStore(ABC):
    """Thread-safe. Every method takes the tenant namespace first."""

    url: str

    @abstractmethod
    def get(self, ns: str, key: str) -> bytes | None: ...

    @abstractmethod
    def get_many(self, ns: str, keys: Sequence[str]) -> list[bytes | None]: ...

    @abstractmethod
    def put(self, ns: str, key: str, value: bytes, ttl: float | None = None) -> None:
        """Store ``value``; durable when this returns (per the store's durability)."""

    @abstractmethod
    def put_many(self, ns: str, items: Sequence[tuple[str, bytes]],
                 ttl: float | None = None) -> None:
        """Store several values in one atomic, durable step."""

    @abstractmethod
    def delete(self, ns: str, key: str) -> bool: ...

    @abstractmethod
    def delete_many(self, ns: str, keys: Sequence[str]) -> int:
        """Delete several keys in one atomic step; returns how many existed."""

    @abstractmethod
    def cas(self, ns: str, key: str, expected: bytes | None, value: bytes | None,
            ttl: float | None = None) -> bool:
        """Set ``key`` to ``value`` (None deletes) only if it now holds ``expected``
        (None: absent). Returns whether it did."""

    @abstractmethod
    def scan(self, ns: str, prefix: str = "", *, start_after: str | None = None,
             limit: int | None = None) -> list[tuple[str, bytes]]:
        """Live pairs whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def count_range(self, ns: str, lo: str, hi: str) -> int:
        """Live keys with ``lo <= key <= hi``, counted without reading values. (Redis: keys
        whose TTL ran out count until a scan or ``purge`` drops them from the index.)"""

    @abstractmethod
    def incr(self, ns: str, key: str, by: int = 1) -> int:
        """Atomically add ``by`` to an integer counter (absent: 0) and return it."""

    @abstractmethod
    def purge(self, ns: str | None = None) -> int:
        """Drop expired entries now (backends also expire lazily); returns how many."""

    @abstractmethod
    def drop_namespace(self, ns: str) -> int: ...

    @abstractmethod
    def close(self) -> None: ...

    @staticmethod
    def _ns(ns: str) -> str:
        return check_tenant_id(ns)

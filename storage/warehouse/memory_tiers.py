"""The warehouse's in-memory state: the hot tier of block bytes and per-tenant recency."""

from __future__ import annotations

import threading
from collections import OrderedDict


class HotTier:
    """A size-bounded LRU of block bytes with their expiry, shared by all threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self.bytes = 0
        self._d: OrderedDict[tuple[str, str], tuple[bytes, float | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], now: float) -> bytes | None:
        with self._lock:
            hit = self._d.get(key)
            if hit is None:
                return None
            if hit[1] is not None and hit[1] <= now:
                self._drop(key)
                return None
            self._d.move_to_end(key)
            return hit[0]

    def put(self, key: tuple[str, str], data: bytes, expires: float | None) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            self._drop(key)
            self._d[key] = (data, expires)
            self.bytes += len(data)
            while self.bytes > self.max_bytes:
                _k, (old, _e) = self._d.popitem(last=False)
                self.bytes -= len(old)

    def _drop(self, key: tuple[str, str]) -> None:
        old = self._d.pop(key, None)
        if old is not None:
            self.bytes -= len(old[0])

    def pop(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._drop(key)

    def pop_under(self, tenant: str, prefix: str) -> None:
        with self._lock:
            for k in [k for k in self._d if k[0] == tenant and k[1].startswith(prefix)]:
                self._drop(k)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self._d)


class _Usage:
    """One tenant's KV files in recency order (LRU first) and their total bytes."""

    def __init__(self) -> None:
        self.order: OrderedDict[str, int] = OrderedDict()
        self.total = 0

    def add(self, path: str, size: int) -> None:
        old = self.order.pop(path, None)
        if old is not None:
            self.total -= old
        self.order[path] = size
        self.total += size

    def touch(self, path: str) -> None:
        if path in self.order:
            self.order.move_to_end(path)

    def remove(self, path: str) -> None:
        old = self.order.pop(path, None)
        if old is not None:
            self.total -= old

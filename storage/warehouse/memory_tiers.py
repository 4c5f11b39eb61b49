"""The warehouse's in-memory state: the hot tier of block bytes, per-tenant recency and
the chain-hash cache of recent puts."""

from __future__ import annotations

import threading
from array import array
from collections import OrderedDict

import blake3


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


class ChainCache:
    """The hash of the last block of token prefixes recently put, so that a put of blocks
    n.. of a prompt whose blocks ..n-1 came in an earlier call hashes only the new blocks
    (re-hashing the prefix made a prompt's puts quadratic in its length).

    Keyed by tenant, block size, root and blake3 of the prefix's token ids: a prefix
    built to collide with another tenant's (or another prompt's) cannot be found."""

    def __init__(self, entries: int = 4096) -> None:
        self.entries = entries
        self._d: OrderedDict[tuple[str, int, bytes, bytes], bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(tenant: str, tokens: list[int], bs: int, root: bytes, n: int
             ) -> tuple[str, int, bytes, bytes]:
        digest = blake3.blake3(array("q", tokens[:n * bs]).tobytes()).digest()
        return tenant, bs, root, digest

    def get(self, tenant: str, tokens: list[int], bs: int, root: bytes, n: int
            ) -> bytes | None:
        """Hash of block n-1 of ``tokens``, if known."""
        key = self._key(tenant, tokens, bs, root, n)
        with self._lock:
            h = self._d.get(key)
            if h is not None:
                self._d.move_to_end(key)
            return h

    def put(self, tenant: str, tokens: list[int], bs: int, root: bytes, n: int,
            h: bytes) -> None:
        key = self._key(tenant, tokens, bs, root, n)
        with self._lock:
            self._d[key] = h
            self._d.move_to_end(key)
            while len(self._d) > self.entries:
                self._d.popitem(last=False)

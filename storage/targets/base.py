"""The target interface: a flat, immutable-object store for fragments.

A target is one failure domain (a disk, a bucket). Keys are ``/``-separated relative
names chosen by the chunk layer; values are written whole and atomically, never modified
in place, so any backend with atomic object creation (rename, conditional put) fits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum

Buffer = bytes | bytearray | memoryview


class Durability(StrEnum):
    """When a fragment write is acknowledged.

    ``fsync``: after the bytes (and, on folders, the directory entry) reached stable
    storage; survives power loss. ``none``: after the OS has the bytes; survives a process
    crash, not a power cut. Object stores are durable on acknowledgement either way.
    """

    FSYNC = "fsync"
    NONE = "none"


@dataclass(frozen=True)
class TargetHealth:
    healthy: bool
    detail: str = "ok"
    capacity_bytes: int | None = None
    free_bytes: int | None = None


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float


class Target(ABC):
    """One fragment store. Implementations must be safe to call from many threads."""

    id: str
    url: str

    @abstractmethod
    def put(self, key: str, parts: Sequence[Buffer], pending_sync: set[str] | None = None
            ) -> None:
        """Store the concatenation of ``parts`` under ``key``, atomically.

        Readers see either no object or the whole object. Re-putting an existing key with
        the same bytes is allowed (fragments are content-addressed). With
        ``pending_sync``, a target may leave the last step of durability (a folder
        fsync) undone and note what is left in the set; the caller runs ``sync`` on it
        once for many puts, before it relies on them.
        """

    def sync(self, pending: set[str]) -> None:  # noqa: B027 - optional hook
        """Finish the durability work ``put`` deferred into ``pending``."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Whole object. Raises ``NotFound`` if absent, ``TargetUnavailable`` on I/O failure."""

    @abstractmethod
    def get_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end of the object)."""

    def get_range_into(self, key: str, start: int, views: list[memoryview]) -> int:
        """Read from ``start`` into ``views`` one after the other (a scatter read);
        returns the bytes read (fewer at the end of the object). Folders read straight
        into the views; this default copies from ``get_range``."""
        data = memoryview(self.get_range(key, start, sum(len(v) for v in views)))
        pos = 0
        for v in views:
            n = min(len(v), len(data) - pos)
            v[:n] = data[pos:pos + n]
            pos += n
        return pos

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; absent keys are not an error."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects whose key starts with ``prefix`` (any order)."""

    @abstractmethod
    def health(self) -> TargetHealth:
        """Cheap probe: reachable, writable, and still the target it was (marker present)."""

    @abstractmethod
    def ensure(self) -> None:
        """Create the target's root and identity marker if missing (init and repair)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients and file handles."""

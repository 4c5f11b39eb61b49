"""Fragment targets, chosen by URL: ``file:///…`` folders, ``s3://bucket/prefix?…`` stores."""

from __future__ import annotations

from urllib.parse import urlparse

from ..errors import ConfigError
from .base import Durability, ObjectInfo, Target, TargetHealth
from .local import LocalDirTarget

__all__ = ["Durability", "ObjectInfo", "Target", "TargetHealth", "LocalDirTarget", "open_target"]


def open_target(id: str, url: str, durability: Durability | str = Durability.FSYNC,
                direct_writes: bool = True) -> Target:
    scheme = urlparse(url).scheme
    if scheme == "file":
        return LocalDirTarget(id, url, Durability(durability), direct_writes)
    if scheme in ("s3", "gs", "az", "memory"):
        try:
            from .objectstore import ObjectStoreTarget
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError(
                f"target {url!r} needs the object-store extra: pip install 'lodestore[s3]' ({exc})"
            ) from exc
        return ObjectStoreTarget(id, url)
    raise ConfigError(
        f"unsupported target URL {url!r}: use file:///absolute/folder or s3://bucket/prefix"
    )

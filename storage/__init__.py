"""Lodestore's storage layer: erasure-coded chunks on targets, metadata on SQL shards.

Knows tenants only as opaque ids and nothing of policy; ``governance`` wraps it.
"""

from .config import StoreConfig, TargetSpec, default_home
from .errors import (
    AlreadyExists,
    ConfigError,
    DataLost,
    DirectoryNotEmpty,
    InvalidArgument,
    InvalidPath,
    IsADirectory,
    NotADirectory,
    NotFound,
    StorageError,
    TargetUnavailable,
    UnknownTenant,
    VersionMismatch,
)
from .volume import FileInfo, FileReader, Volume

__all__ = [
    "AlreadyExists", "ConfigError", "DataLost", "DirectoryNotEmpty", "FileInfo", "FileReader",
    "InvalidArgument", "InvalidPath", "IsADirectory", "NotADirectory", "NotFound",
    "StorageError", "StoreConfig", "TargetSpec", "TargetUnavailable", "UnknownTenant",
    "VersionMismatch", "Volume", "default_home",
]

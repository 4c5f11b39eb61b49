"""Errors the storage layer raises.

Every error carries a message a person or an agent can act on: what was wrong and what to
do. Callers map them to CLI exit codes and MCP ``isError`` results by class, never by text.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class. ``code`` is a stable machine-readable name."""

    code = "storage_error"


class InvalidPath(StorageError, ValueError):
    code = "invalid_path"


class InvalidArgument(StorageError, ValueError):
    code = "invalid_argument"


class NotFound(StorageError, FileNotFoundError):
    code = "not_found"


class AlreadyExists(StorageError, FileExistsError):
    code = "already_exists"


class NotADirectory(StorageError, NotADirectoryError):
    code = "not_a_directory"


class IsADirectory(StorageError, IsADirectoryError):
    code = "is_a_directory"


class DirectoryNotEmpty(StorageError, OSError):
    code = "directory_not_empty"


class VersionMismatch(StorageError):
    code = "version_mismatch"

    def __init__(self, path: str, expected: int, actual: int | None) -> None:
        self.path, self.expected, self.actual = path, expected, actual
        have = "it does not exist" if actual is None else f"it is at version {actual}"
        super().__init__(
            f"version mismatch on {path}: expected version {expected} but {have}; "
            "re-read the file and retry with its current version"
        )


class UnknownTenant(StorageError, LookupError):
    code = "unknown_tenant"

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        super().__init__(
            f"unknown tenant {tenant!r}: create it first with `lodestore tenant add {tenant}`"
        )


class TargetUnavailable(StorageError, OSError):
    code = "target_unavailable"


class DataLost(StorageError, OSError):
    """Fewer than k intact fragments of a chunk could be read."""

    code = "data_lost"


class CorruptFragment(StorageError):
    """A fragment failed its checksum; readers treat it as lost."""

    code = "corrupt_fragment"


class ConfigError(StorageError):
    code = "config_error"


class ConcurrentChange(StorageError):
    """The entry kept changing under us; re-read and retry."""

    code = "concurrent_change"

"""Governance errors. Like storage errors they say what was wrong and what to do, and
they never carry PII values (entity types only)."""

from __future__ import annotations

from storage.errors import StorageError


class Unauthorized(StorageError):
    """No valid identity: missing, unknown, malformed or revoked token (HTTP 401)."""

    code = "unauthorized"


class Forbidden(StorageError, PermissionError):
    """A known identity without the right (HTTP 403)."""

    code = "forbidden"


class PolicyError(StorageError, ValueError):
    """A policy document is invalid; the message names the field."""

    code = "invalid_policy"


class DeniedByPolicy(StorageError, PermissionError):
    """The content holds entity types the tenant's policy refuses to store."""

    code = "denied_by_policy"

    def __init__(self, path: str, entity_types: list[str]) -> None:
        self.entity_types = sorted(set(entity_types))
        super().__init__(
            f"write to {path} denied by policy: the content contains "
            f"{', '.join(self.entity_types)}; remove those values (or ask an admin to change "
            "the tenant's pii policy) and retry"
        )

"""Object-store target: fragments as objects in an S3-compatible bucket (or GCS, Azure).

Built on obstore (Rust ``object_store``): its clients are thread-safe, release the GIL,
and give atomic whole-object puts. Writes are conditional creates (``If-None-Match: *``),
so two writers of the same content-addressed fragment never race; an object that already
exists counts as written. Client timeouts and retries are kept short so that a target
that cannot be reached is reported within seconds instead of stalling the chunk layer.

URL: ``s3://bucket/prefix?endpoint=http://host:9000&region=us-east-1&allow_http=true``.
Query keys go to obstore's store config (``endpoint``, ``region``, ``access_key_id``,
``secret_access_key``, ``session_token``, …), except the client keys ``allow_http``,
``allow_invalid_certificates``, ``connect_timeout``, ``read_timeout``, ``timeout`` and
``max_retries``.
Credentials otherwise come from the usual ``AWS_*`` environment variables.
``memory://name`` is an in-process store (shared by name) for tests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlparse, urlunparse

import obstore
import obstore.exceptions as obx
from obstore.store import MemoryStore, from_url

from ..errors import ConfigError, NotFound, TargetUnavailable
from .base import Buffer, ObjectInfo, Target, TargetHealth

MARKER = ".lodestore-target"

# Data operations: fail over to other targets quickly rather than wait out an outage.
# A stalled server is caught by the per-read timeout, so the whole-request one can stay
# long enough for MiB-sized fragments over a slow link.
_CLIENT: dict[str, Any] = {"connect_timeout": "2s", "read_timeout": "5s", "timeout": "120s"}
_RETRY: dict[str, Any] = {
    "max_retries": 2,
    "retry_timeout": timedelta(seconds=8),
    "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2)},
}
# Health probes: one attempt, answer within a few seconds even for a black-holed host.
_HEALTH_CLIENT = {"connect_timeout": "1s", "read_timeout": "3s", "timeout": "3s"}
_HEALTH_RETRY: dict[str, Any] = {"max_retries": 0, "retry_timeout": timedelta(seconds=3)}

_CLIENT_BOOLS = ("allow_http", "allow_invalid_certificates")
_CLIENT_DURATIONS = ("connect_timeout", "read_timeout", "timeout")
_SECRET_KEYS = ("secret_access_key", "session_token", "token", "access_key")

_memory_stores: dict[str, MemoryStore] = {}
_memory_lock = threading.Lock()


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def _first_line(exc: BaseException, limit: int = 240) -> str:
    """obstore messages carry a multi-line debug dump; the first line says what happened."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ObjectStoreTarget(Target):
    def __init__(self, id: str, url: str) -> None:
        self.id = id
        self.url = url
        p = urlparse(url)
        self.scheme = p.scheme
        if p.scheme == "memory":
            name = p.netloc + p.path
            with _memory_lock:
                store = _memory_stores.setdefault(name, MemoryStore())
            self._store: Any = store
            self._probe: Any = store
            self.endpoint = "in-process memory"
            self.location = url
            self._conditional = True
            return
        if not p.netloc:
            raise ConfigError(f"target {id}: URL {url!r} names no bucket; use s3://bucket/prefix")
        query = dict(parse_qsl(p.query, keep_blank_values=True))
        client: dict[str, Any] = {}
        retry = dict(_RETRY)
        for key in _CLIENT_BOOLS:
            if key in query:
                client[key] = _truthy(query.pop(key))
        for key in _CLIENT_DURATIONS:
            if key in query:
                client[key] = query.pop(key)
        if "max_retries" in query:
            try:
                retry["max_retries"] = int(query.pop("max_retries"))
            except ValueError as exc:
                raise ConfigError(f"target {id}: max_retries must be an integer") from exc
        endpoint = query.get("endpoint", "")
        if endpoint.startswith("http://"):
            client.setdefault("allow_http", True)  # an explicit http:// endpoint means it
        client = {**_CLIENT, **client}
        base = urlunparse((p.scheme, p.netloc, p.path.rstrip("/"), "", "", ""))
        self.location = base
        self.endpoint = endpoint or f"the default {p.scheme} endpoint"
        try:
            self._store = from_url(base, config=query, client_options=client, retry_config=retry)
            self._probe = from_url(
                base,
                config=query,
                client_options={**client, **_HEALTH_CLIENT},
                retry_config=_HEALTH_RETRY,
            )
        except (obx.BaseError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"target {id}: cannot configure object store from {self._redacted()}: "
                f"{_first_line(exc)}"
            ) from exc
        self._conditional = True  # cleared once the store says it cannot do If-None-Match

    # -- helpers ---------------------------------------------------------------------------

    def _redacted(self) -> str:
        p = urlparse(self.url)
        q = [(k, "***" if k in _SECRET_KEYS else v) for k, v in parse_qsl(p.query, True)]
        return urlunparse(p._replace(query="&".join(f"{k}={v}" for k, v in q)))

    def _unavailable(self, exc: BaseException, what: str) -> TargetUnavailable:
        if isinstance(exc, obx.PermissionDeniedError | obx.UnauthenticatedError):
            hint = "check the credentials (AWS_* variables or the URL's access keys)"
        else:
            hint = (
                "check that the endpoint is reachable and the bucket exists, "
                "then run `lodestore repair` once it is back"
            )
        return TargetUnavailable(
            f"target {self.id} ({self.location} at {self.endpoint}): {what} failed: "
            f"{_first_line(exc)}; {hint}"
        )

    def _no_bucket(self, exc: BaseException) -> TargetUnavailable:
        return TargetUnavailable(
            f"target {self.id}: bucket of {self.location} does not exist at {self.endpoint}; "
            f"create it first (e.g. `aws s3 mb s3://{urlparse(self.location).netloc}`), "
            "then run `lodestore repair`"
        )

    @staticmethod
    def _check_key(key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"bad fragment key {key!r}")
        return key

    @staticmethod
    def _is_missing(exc: BaseException) -> bool:
        return isinstance(exc, FileNotFoundError | obx.NotFoundError)

    @staticmethod
    def _is_no_bucket(exc: BaseException) -> bool:
        return "NoSuchBucket" in str(exc)

    @staticmethod
    def _is_unsupported(exc: BaseException) -> bool:
        if isinstance(exc, obx.NotSupportedError):
            return True
        text = str(exc)
        return isinstance(exc, obx.GenericError) and ("501" in text or "NotImplemented" in text)

    def _put_bytes(self, key: str, data: Buffer) -> None:
        """Conditional create; an existing object is the same immutable fragment."""
        if self._conditional:
            try:
                obstore.put(self._store, key, data, mode="create", use_multipart=False)
                return
            except (obx.AlreadyExistsError, FileExistsError):
                return
            except Exception as exc:
                if not self._is_unsupported(exc):
                    raise
                self._conditional = False
        obstore.put(self._store, key, data, use_multipart=False)

    # -- Target ----------------------------------------------------------------------------

    def put(self, key: str, parts: Sequence[Buffer], pending_sync: set[str] | None = None
            ) -> None:
        self._check_key(key)
        data: Buffer = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            self._put_bytes(key, data)
        except Exception as exc:
            if self._is_missing(exc):  # a PUT only 404s when the bucket is gone
                raise self._no_bucket(exc) from exc
            raise self._unavailable(exc, "write") from exc

    def get(self, key: str) -> bytes:
        self._check_key(key)
        try:
            return bytes(obstore.get(self._store, key).bytes())
        except Exception as exc:
            raise self._read_error(exc, key) from exc

    def _read_error(self, exc: BaseException, key: str) -> Exception:
        if self._is_missing(exc):
            if self._is_no_bucket(exc):
                return self._no_bucket(exc)
            return NotFound(f"fragment {key} not on target {self.id}")
        return self._unavailable(exc, "read")

    def get_range(self, key: str, start: int, length: int) -> bytes:
        self._check_key(key)
        if start < 0 or length < 0:
            raise ValueError(f"bad range start={start} length={length}")
        try:
            if length > 0:
                return bytes(obstore.get_range(self._store, key, start=start, length=length))
        except Exception as exc:
            if self._is_missing(exc):
                raise self._read_error(exc, key) from exc
            # S3 answers 416 for a range starting at or past the end: read as empty.
            size = self._size(key)
            if start >= size:
                return b""
            raise self._unavailable(exc, "read") from exc
        self._size(key)  # zero-length read: still report a missing object
        return b""

    def _size(self, key: str) -> int:
        try:
            return int(obstore.head(self._store, key)["size"])
        except Exception as exc:
            raise self._read_error(exc, key) from exc

    def delete(self, key: str) -> None:
        self._check_key(key)
        try:
            obstore.delete(self._store, key)
        except Exception as exc:
            if self._is_missing(exc) and not self._is_no_bucket(exc):
                return
            raise self._unavailable(exc, "delete") from exc

    def exists(self, key: str) -> bool:
        self._check_key(key)
        try:
            obstore.head(self._store, key)
            return True
        except Exception as exc:
            if self._is_missing(exc) and not self._is_no_bucket(exc):
                return False
            raise self._unavailable(exc, "stat") from exc

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        # obstore matches prefixes by whole path segment; the contract is a string prefix,
        # so list the enclosing "folder" and filter.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else None
        try:
            for batch in obstore.list(self._store, folder, chunk_size=1000):
                for meta in batch:
                    key = meta["path"]
                    if key == MARKER or not key.startswith(prefix):
                        continue
                    yield ObjectInfo(key, int(meta["size"]), meta["last_modified"].timestamp())
        except Exception as exc:
            raise self._unavailable(exc, "list") from exc

    def health(self) -> TargetHealth:
        try:
            found = bytes(obstore.get(self._probe, MARKER).bytes()).decode().strip()
        except Exception as exc:
            if self._is_missing(exc) and not self._is_no_bucket(exc):
                return TargetHealth(
                    False, f"{self.location} has no {MARKER} marker; run `lodestore repair`"
                )
            return TargetHealth(False, str(self._unavailable(exc, "health probe")))
        if found != self.id:
            return TargetHealth(
                False, f"{self.location} belongs to target {found!r}, not {self.id!r}"
            )
        return TargetHealth(True, "ok")

    def ensure(self) -> None:
        """Write the marker; never overwrites one (a foreign marker shows up in health())."""
        data = (self.id + "\n").encode()
        try:
            if not self._conditional and self.exists(MARKER):
                return
            self._put_bytes(MARKER, data)
        except TargetUnavailable:
            raise
        except Exception as exc:
            if self._is_missing(exc):
                raise self._no_bucket(exc) from exc
            raise self._unavailable(exc, "create marker") from exc

"""The audit log: one hash-chained event per governed operation.

Every call the gateway governs becomes one :class:`AuditEvent` (time, tenant, agent,
operation, path, bytes, decision, labels, latency; never a raw PII value: ``labels`` holds
entity *types*, ``error`` a short code). :meth:`AuditLog.append` writes it durably before it
returns, and raises :class:`AuditWriteError` when it cannot, so the caller fails the
operation instead of running it unaudited.

On disk (one folder)::

    seg-0000000000000001.parquet   converted segments (pyarrow, zstd), never rewritten
    seg-0000000000010001.jsonl     a sealed segment waiting for conversion (if any)
    seg-0000000000020001.jsonl     the active segment (the newest): one JSON line per event
    HEAD                           anchor: "<seq> <hash>" of the newest committed event
    audit.lock                     fcntl.flock serializing writers across processes; its
                                   first 8 bytes count layout changes (seals)
    roll.lock                      fcntl.flock: one converter at a time
    .snap/                         short-lived hard links that queries read

A segment is named after the ``seq`` of its first event. Each line is the event's canonical
JSON with ``"hash"`` appended; ``hash`` is the sha256 of that canonical JSON, which holds
``seq`` and ``prev_hash`` (the previous event's hash, 64 zeros for the first), so the events
form one chain across segments.

Writers. Threads of one process share a group commit: the first waiting thread becomes the
leader, takes every queued event, and under the file lock writes them with one ``write``
and (``fsync=True``) one ``fdatasync``; the others wait for that batch. Processes serialize
on ``audit.lock``; each caches the tail (seq, hash, file size, layout generation) and
re-reads it only when something changed under it (size, generation, lock file replaced).
A failed write is cut back to where it started, so a failed append leaves nothing behind.

Rolling, in two steps so that no append waits for Parquet. (1) Sealing, in the commit that
fills the active segment to ``segment_events`` (or on :meth:`roll`): the successor JSONL
is created and the generation bumped; a segment with a successor is never appended to
again. (2) Converting, on a background thread (one process at a time, ``roll.lock``): the
sealed JSONL is parsed (pyarrow's JSON reader, fixed schema), written to a unique
``*.tmp`` and fsynced; then, under the writers' lock, it is checked unchanged, renamed to
``.parquet``, the folder fsynced, the JSONL removed. A crash at any point leaves either the
JSONL, or both (the Parquet is whole: it was fsynced before its rename; readers prefer it),
plus perhaps a ``.tmp``; opening the log finishes the job: ``.tmp`` files are removed,
sealed JSONLs converted, a JSONL whose Parquet twin ends in the same hash removed. If
conversion fails (disk full), events stay in JSONL, still queryable and verifiable, and
conversion is retried at the next seal, :meth:`roll` or open.

Verification (:meth:`AuditLog.verify`) recomputes every hash in seq order. It detects an
edited field (hash mismatch), a deleted event (seq gap), reordered events, a missing or
replaced segment (seq gap or a broken prev_hash link), and truncation of the tail through
HEAD. Detection windows, honestly:

* HEAD is rewritten after every commit (one ``pwrite``) and fdatasync'ed on every seal and
  at least once a second while events flow (``fsync=True``). So a tail cut while the system runs is always
  caught; after a power loss HEAD may lag the log by up to about a second of events, and
  cutting exactly those events would go unnoticed.
* A writer that rescans the log (on open, after a seal, when the file shrank) compares it
  with HEAD and with the tail it saw last itself; if the log is shorter (or HEAD is missing
  or does not match) it records an ``audit_gap`` event before appending, so the evidence
  survives the next append overwriting HEAD. ``verify`` reports such an event as a problem.
  So a running writer notices a cut tail even when HEAD was rewritten to match it.
* With ``fsync=False`` a power loss can lose the newest events; that is then reported the
  same way, because it is a loss.
* A chain kept on the same disk cannot stop someone who rewrites *every* hash after an edit
  and HEAD with it. Against that, copy ``VerifyReport.last_hash`` somewhere else from time
  to time (a ticket, another machine): any later rewrite of the events up to it shows.

Queries (:meth:`AuditLog.query`) run in an in-memory DuckDB whose only table is the view
``audit`` over all Parquet segments and the JSONL ones (``read_json`` with explicit
columns; JSONL files are hard-linked under the lock first, so a conversion cannot pull
them away mid-query). The view is made with ``allowed_paths`` set to exactly those files;
then ``enable_external_access`` goes off and ``lock_configuration`` on, so the query can
read no other file, write none, load no extension and change no setting. Only one
``SELECT``/``EXPLAIN`` statement is accepted, and it is interrupted after ``timeout`` s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import StorageError
from storage.fsutil import fsync_dir, write_all

__all__ = [
    "FIELDS",
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "AuditQueryError",
    "AuditWriteError",
    "VerifyReport",
    "event_hash",
]

log = logging.getLogger("lodestore.audit")

GENESIS_HASH = "0" * 64
"""``prev_hash`` of the first event."""

FIELDS = (
    "seq", "ts", "tenant", "agent", "operation", "path", "bytes", "decision", "labels",
    "latency_ms", "error", "request_id", "transport", "prev_hash", "hash",
)
"""Columns of every segment (and of the ``audit`` view, which adds ``time``)."""

_BODY = FIELDS[1:-2]  # the caller-supplied fields, in canonical order
_SEG_RE = re.compile(r"^seg-(\d{16})\.(jsonl|parquet)$")
_LOCK, _ROLL_LOCK, _HEAD, _SNAP = "audit.lock", "roll.lock", "HEAD", ".snap"
_HEAD_SYNC_S = 1.0
LAZY_SYNC_S = 0.05  # events appended with durable=False are fsynced within this
_MAX_STR = 8192
_LABEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,63}$")
_CODE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.:\-]{0,63}$")
_DECISION_RE = re.compile(r"^[a-z][a-z_]{0,31}$")
_GAP_OP = "audit_gap"


class AuditWriteError(StorageError):
    """The event could not be written; the operation it describes must fail."""

    code = "audit_write_failed"


class AuditQueryError(StorageError, ValueError):
    """An audit query was refused or failed."""

    code = "audit_query_error"


@dataclass(kw_only=True)
class AuditEvent:
    """One governed operation. Holds entity types and codes, never content or PII values.

    ``seq``, ``prev_hash`` and ``hash`` are filled in by :meth:`AuditLog.append`.
    """

    ts: float = field(default_factory=time.time)  # epoch seconds (query column ``time``: UTC)
    tenant: str
    agent: str
    operation: str  # e.g. "write_file"
    path: str | None = None
    bytes: int = 0
    decision: str = "allow"  # allow | deny | redact | tag | rate_limited | error | ...
    labels: list[str] = field(default_factory=list)  # entity TYPES, e.g. ["EMAIL_ADDRESS"]
    latency_ms: float = 0.0
    error: str | None = None  # short error code, e.g. "not_found"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    transport: str | None = None  # stdio | http | sse | cli
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> AuditEvent:
        return cls(**{k: rec.get(k) for k in FIELDS if k in rec})


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    events: int
    problem: str | None = None
    at_seq: int | None = None
    last_hash: str | None = None  # hash of the newest event checked: keep a copy elsewhere


# --------------------------------------------------------------------------- chain format


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _text(name: str, v: Any, optional: bool = False, pattern: re.Pattern | None = None) -> Any:
    if v is None and optional:
        return None
    if type(v) is not str:
        if not isinstance(v, str):
            raise AuditWriteError(f"audit event rejected: {name} must be a string, not {v!r:.40}")
        v = str.__str__(v)
    if len(v) > _MAX_STR:
        raise AuditWriteError(f"audit event rejected: {name} is longer than {_MAX_STR}")
    if pattern is not None and not pattern.match(v):
        raise AuditWriteError(
            f"audit event rejected: {name} {v[:40]!r} is not a short code "
            "(letters, digits, _ . : -)"
        )
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates cannot be stored in Parquet
            v = v.encode("utf-8", "backslashreplace").decode("utf-8")
    return v


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise AuditWriteError(f"audit event rejected: {name} must be a finite number")
    return float(v)


def _code(v: Any) -> Any:
    """Exit-status-like integer codes (``SystemExit.code``) become ``code_<n>``."""
    return f"code_{v}" if isinstance(v, int) and not isinstance(v, bool) else v


def _body_json(ev: AuditEvent) -> str:
    """Validate an event and return the JSON of its body fields (canonical order)."""
    text, number = _text, _number
    n = ev.bytes
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n < 2**63:
        raise AuditWriteError("audit event rejected: bytes must be an int >= 0")
    labels = ev.labels or []
    if isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        raise AuditWriteError("audit event rejected: labels must be a list of entity types")
    for lab in labels:
        if not _LABEL_RE.match(lab):
            raise AuditWriteError(
                f"audit event rejected: label {lab[:12]!r}… is not an entity type name; "
                "labels carry types such as EMAIL_ADDRESS, never values"
            )
    decision = ev.decision
    if not isinstance(decision, str) or not _DECISION_RE.match(decision):
        raise AuditWriteError(f"audit event rejected: decision {decision!r:.40} is not valid")
    body = {
        "ts": number("ts", ev.ts),
        "tenant": text("tenant", ev.tenant),
        "agent": text("agent", ev.agent),
        "operation": text("operation", ev.operation, pattern=_CODE_RE),
        "path": text("path", ev.path, optional=True),
        "bytes": n,
        "decision": decision,
        "labels": sorted(set(labels)),
        "latency_ms": number("latency_ms", ev.latency_ms),
        "error": text("error", _code(ev.error), optional=True, pattern=_CODE_RE),
        "request_id": text("request_id", ev.request_id),
        "transport": text("transport", ev.transport, optional=True),
    }
    try:
        return _ENCODER.encode(body)
    except ValueError as exc:  # pragma: no cover - numbers are checked above
        raise AuditWriteError(f"audit event rejected: {exc}") from exc


def _canonical(seq: int, prev_hash: str, body_json: str) -> str:
    return f'{{"seq":{seq},"prev_hash":"{prev_hash}",{body_json[1:]}'


def _digest(canonical: str) -> str:
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def event_hash(rec: dict[str, Any]) -> str:
    """The chain hash of a stored record (a dict with every field of :data:`FIELDS`)."""
    body = {k: rec[k] for k in _BODY}
    return _digest(_canonical(rec["seq"], rec["prev_hash"], _ENCODER.encode(body)))


def _seg_name(first: int, ext: str) -> str:
    return f"seg-{first:016d}.{ext}"


# --------------------------------------------------------------------------- file helpers


def _datasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)  # macOS has no fdatasync




def _scan_tail(fd: int, size: int) -> tuple[int, bytes | None]:
    """(end, last): ``end`` is the offset just past the file's last newline (0 if none), and
    ``last`` the last complete line without its newline (None if there is none)."""
    pos, chunk = size, b""
    while True:
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            prev = chunk.rfind(b"\n", 0, nl)
            if prev >= 0 or pos == 0:
                return pos + nl + 1, chunk[prev + 1 : nl]
        elif pos == 0:
            return 0, None
        n = min(65536, pos)
        pos -= n
        chunk = os.pread(fd, n, pos) + chunk


def _read_head(path: Path) -> tuple[int, str] | None:
    """HEAD as (seq, hash); None if missing; ValueError if unreadable."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    parts = raw.decode("ascii", "replace").split()
    if len(parts) != 2 or not parts[0].isdigit() or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
        raise ValueError(f"HEAD is unreadable: {raw[:100]!r}")
    return int(parts[0]), parts[1]


def _head_bytes(seq: int, h: str) -> bytes:
    return f"{seq:020d} {h}\n".encode("ascii")


def _parquet_schema():
    import pyarrow as pa

    return pa.schema([
        ("seq", pa.int64()), ("ts", pa.float64()), ("tenant", pa.string()),
        ("agent", pa.string()), ("operation", pa.string()), ("path", pa.string()),
        ("bytes", pa.int64()), ("decision", pa.string()), ("labels", pa.list_(pa.string())),
        ("latency_ms", pa.float64()), ("error", pa.string()), ("request_id", pa.string()),
        ("transport", pa.string()), ("prev_hash", pa.string()), ("hash", pa.string()),
    ])


_JSON_COLUMNS = (
    "{'seq': 'BIGINT', 'ts': 'DOUBLE', 'tenant': 'VARCHAR', 'agent': 'VARCHAR', "
    "'operation': 'VARCHAR', 'path': 'VARCHAR', 'bytes': 'BIGINT', 'decision': 'VARCHAR', "
    "'labels': 'VARCHAR[]', 'latency_ms': 'DOUBLE', 'error': 'VARCHAR', "
    "'request_id': 'VARCHAR', 'transport': 'VARCHAR', 'prev_hash': 'VARCHAR', "
    "'hash': 'VARCHAR'}"
)
_VIEW_COLUMNS = (
    "seq, ts, make_timestamp(CAST(round(ts * 1000000) AS BIGINT)) AS time, tenant, agent, "
    "operation, path, bytes, decision, labels, latency_ms, error, request_id, transport, "
    "prev_hash, hash"
)
_EMPTY_SELECT = (
    "SELECT CAST(NULL AS BIGINT) AS seq, CAST(NULL AS DOUBLE) AS ts, "
    "CAST(NULL AS VARCHAR) AS tenant, CAST(NULL AS VARCHAR) AS agent, "
    "CAST(NULL AS VARCHAR) AS operation, CAST(NULL AS VARCHAR) AS path, "
    "CAST(NULL AS BIGINT) AS bytes, CAST(NULL AS VARCHAR) AS decision, "
    "CAST(NULL AS VARCHAR[]) AS labels, CAST(NULL AS DOUBLE) AS latency_ms, "
    "CAST(NULL AS VARCHAR) AS error, CAST(NULL AS VARCHAR) AS request_id, "
    "CAST(NULL AS VARCHAR) AS transport, CAST(NULL AS VARCHAR) AS prev_hash, "
    "CAST(NULL AS VARCHAR) AS hash WHERE false"
)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


# --------------------------------------------------------------------------- the log


def _jsonl_to_table(raw: bytes, first: int):
    """Parse a sealed JSONL segment (natively, with the fixed schema) into an Arrow table."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = _parquet_schema()
    table = pj.read_json(
        pa.BufferReader(raw),
        read_options=pj.ReadOptions(block_size=max(1 << 20, len(raw) + 1)),
        parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"),
    ).select(list(FIELDS))
    return table.cast(schema.with_metadata({
        "lodestore.audit.first_seq": str(first),
        "lodestore.audit.last_seq": str(table["seq"][-1].as_py()),
        "lodestore.audit.last_hash": str(table["hash"][-1].as_py()),
    }))


# --------------------------------------------------------------------------- the log


class _Pending:
    __slots__ = ("event", "body", "done", "error", "future", "loop", "durable")

    def __init__(self, event: AuditEvent, body: str, future=None, loop=None,
                 durable: bool = True) -> None:
        self.event, self.body = event, body
        self.done, self.error = False, None
        self.future, self.loop = future, loop
        self.durable = durable


@dataclass
class _Segment:
    first: int
    path: Path
    fd: int | None = None  # a JSONL opened under the lock (verify)
    size: int = 0
    link: Path | None = None  # a JSONL hard link made under the lock (query)


@dataclass
class _Snapshot:
    segments: list[_Segment]
    head: tuple[int, str] | None
    head_error: str | None

    def release(self) -> None:
        for s in self.segments:
            if s.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(s.fd)
            if s.link is not None:
                with contextlib.suppress(OSError):
                    os.unlink(s.link)


def _resolve(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


class AuditLog:
    """An append-only, hash-chained audit log in one folder. Safe for threads and processes.

    ``append`` returns once the event is written (and, with ``fsync=True``, on stable
    storage); it raises :class:`AuditWriteError` otherwise.
    """

    def __init__(
        self, directory: Path | str, fsync: bool = True, segment_events: int = 10_000
    ) -> None:
        if segment_events < 1:
            raise ValueError("segment_events must be >= 1")
        self._dir = Path(directory).absolute()
        self._lock_path = str(self._dir / _LOCK)
        self._head_path = str(self._dir / _HEAD)
        self._fsync = fsync
        self._segment_events = segment_events
        # group commit
        self._cond = threading.Condition(threading.Lock())
        self._pending: list[_Pending] = []
        self._leader = False
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        # background conversion of sealed segments
        self._conv_lock = threading.Lock()
        self._conv_thread: threading.Thread | None = None
        self._conv_again = False
        # file state, guarded by _io (threads) and the flock (processes)
        self._io = threading.Lock()
        self._lock_fd: int | None = None
        self._lock_id: tuple[int, int] | None = None
        self._gen = -1  # structure generation, kept in the lock file
        self._head_fd: int | None = None
        self._head_synced = 0.0
        self._fd: int | None = None  # active JSONL, O_APPEND
        self._seg_first = 1
        self._size = 0
        self._seq = 0
        self._hash = GENESIS_HASH
        self._stale = True
        self._sealed_waiting = False
        self._pq_cache: dict[str, tuple[int, int, int, str]] = {}
        # events appended with durable=False: written, fsynced within LAZY_SYNC_S
        self._dirty_since: float | None = None
        self._lazy_writes = 0  # lazy batches written (the flusher's fsync covers those before)
        self._head_dirty = False  # HEAD's fsync left to the flusher
        self._flusher: threading.Thread | None = None
        self._flush_wake = threading.Event()
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditWriteError(
                f"cannot create the audit folder {self._dir}: {exc.strerror or exc}; "
                "make it writable (or point LODESTORE_HOME elsewhere)"
            ) from exc
        try:
            with self._io:
                work = self._locked_commit([])
        except BaseException:
            self._drop_files()
            raise
        if work:  # finish what an earlier roll left, unless another process is at it
            for err in self._convert_sealed(blocking=False):
                log.error("audit segment conversion failed (will retry): %s", err)

    @property
    def directory(self) -> Path:
        return self._dir

    def busy(self) -> bool:
        """Is a commit running or queued? (A hint, read without the lock: an append now
        would likely wait behind it.)"""
        return self._leader or bool(self._pending) or self._closed

    # ------------------------------------------------------------------ public: append

    def append(self, event: AuditEvent, durable: bool = True) -> None:
        """Write one event; fills ``event.seq``, ``prev_hash`` and ``hash``.

        ``durable`` (the default): fsynced before this returns. ``durable=False`` (allowed
        reads): written to the file before this returns, so a killed process never loses
        it, and fsynced within ``LAZY_SYNC_S`` (or with the next durable event), as
        auditd's ``incremental_async`` flush does; only a power cut in that window can
        lose it. Either way a failed write raises and the operation fails."""
        entry = _Pending(event, _body_json(event), durable=durable)
        with self._cond:
            if self._closed:
                raise AuditWriteError("the audit log is closed; the operation cannot be audited")
            self._pending.append(entry)
            while not entry.done:
                if not self._leader:
                    self._leader = True
                    break
                self._cond.wait()
        if not entry.done:
            self._lead()
        if entry.error is not None:
            raise entry.error

    async def append_async(self, event: AuditEvent, durable: bool = True) -> None:
        """Like :meth:`append`, without blocking the event loop (the batch is written on a
        commit thread). Cancelling the caller does not withdraw the event."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        entry = _Pending(event, _body_json(event), fut, loop, durable)
        with self._cond:
            if self._closed:
                raise AuditWriteError("the audit log is closed; the operation cannot be audited")
            self._pending.append(entry)
            start = not self._leader
            if start:
                self._leader = True
        if start:
            self._submit_leader()
        await fut

    def _submit_leader(self) -> None:
        if self._executor is None:
            with self._cond:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="audit-commit")
        self._executor.submit(self._lead)

    def _lead(self) -> None:
        """Commit one batch (everything queued), then hand leadership on."""
        with self._cond:
            batch, self._pending = self._pending, []
        err: BaseException | None = None
        sealed = False
        try:
            with self._io:
                sealed = self._locked_commit(batch)
        except AuditWriteError as exc:
            err = exc
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
            err = AuditWriteError(f"audit event could not be written: {exc!r}")
            err.__cause__ = exc
        for p in batch:
            if err is not None:
                p.event.seq = p.event.prev_hash = p.event.hash = None
        again = False
        with self._cond:
            for p in batch:
                p.done, p.error = True, err
            self._leader = False
            if self._pending and all(p.future is not None for p in self._pending):
                self._leader = again = True  # only async waiters: run on the commit thread
            self._cond.notify_all()  # sync waiters wake; one of them leads the next batch
        for p in batch:
            if p.future is not None:
                with contextlib.suppress(RuntimeError):  # the caller's loop is closed
                    p.loop.call_soon_threadsafe(_resolve, p.future, err)
        if again:
            self._submit_leader()
        if sealed:
            self._kick_converter()

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def _flock(self) -> Iterator[None]:
        """Hold the cross-process lock (caller holds ``_io``)."""
        for _ in range(5):
            if self._lock_fd is None:
                self._open_lock()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                st = os.stat(self._lock_path)
            except OSError as exc:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                self._drop_files()
                raise self._dir_error(exc) from exc
            if (st.st_dev, st.st_ino) == self._lock_id:
                break
            # the lock file (or the whole folder) was replaced: everything cached is stale
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._drop_files()
        else:  # pragma: no cover - someone keeps replacing the lock file
            raise AuditWriteError(f"the audit lock file in {self._dir} keeps being replaced")
        fd = self._lock_fd
        try:
            if st.st_size < 8:  # room for the generation, so bumping it never allocates
                try:
                    os.pwrite(fd, bytes(8), 0)
                except OSError as exc:
                    raise self._dir_error(exc) from exc
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _dir_error(self, exc: OSError) -> AuditWriteError:
        return AuditWriteError(
            f"the audit folder {self._dir} is unusable ({exc.strerror or exc}); "
            "operations fail until it is restored"
        )

    def _open_lock(self) -> None:
        try:
            st = os.stat(self._dir)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self._dir_error(exc) from exc
        st = os.fstat(fd)
        self._lock_fd, self._lock_id = fd, (st.st_dev, st.st_ino)
        self._stale = True

    def _read_gen(self) -> int:
        raw = os.pread(self._lock_fd, 8, 0)
        return int.from_bytes(raw, "little") if len(raw) == 8 else 0

    def _bump_gen(self) -> None:
        """Tell every writer (all processes) that the segment layout changed."""
        gen = self._read_gen() + 1
        os.pwrite(self._lock_fd, gen.to_bytes(8, "little"), 0)
        self._gen = gen

    def _drop_files(self) -> None:
        for name in ("_fd", "_head_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
        self._lock_id = None
        self._stale = True

    # ------------------------------------------------------------------ commit

    def _locked_commit(self, batch: list[_Pending], seal: bool = False) -> bool:
        """Under the flock: bring the tail up to date, write the batch, seal a full segment.
        Returns whether sealed segments wait for conversion to Parquet."""
        with self._flock():
            gap = self._sync_tail()
            if gap is not None:
                body = _body_json(AuditEvent(
                    tenant="_system", agent="audit", operation=_GAP_OP, decision="error",
                    error=gap[0], request_id=f"gap:{gap[0]}:{gap[1]}", transport=None,
                ))
                self._write_batch([_Pending(AuditEvent(tenant="", agent="", operation=""), body)])
                log.error("audit log tail did not match what was written (%s); recorded an "
                          "audit_gap event", gap)
            if batch:
                self._write_batch(batch)
            count = self._seq - self._seg_first + 1 if self._fd is not None else 0
            if count > 0 and (seal or count >= self._segment_events):
                self._seal_locked()
            waiting, self._sealed_waiting = self._sealed_waiting, False
            return waiting

    def _write_batch(self, batch: list[_Pending]) -> None:
        if self._fd is None:
            self._create_segment()
        seq, prev = self._seq, self._hash
        lines = []
        for p in batch:
            seq += 1
            canon = _canonical(seq, prev, p.body)
            h = _digest(canon)
            lines.append(f'{canon[:-1]},"hash":"{h}"}}\n')
            p.event.seq, p.event.prev_hash, p.event.hash = seq, prev, h
            prev = h
        data = "".join(lines).encode("ascii")
        start = self._size
        sync = self._fsync and any(p.durable for p in batch)
        try:
            write_all(self._fd, data)
            if sync:
                _datasync(self._fd)  # covers every earlier lazy event of this segment too
        except OSError as exc:
            self._cut_back(start)
            raise AuditWriteError(
                f"audit event could not be written to {self._dir} ({exc.strerror or exc}); "
                "the operation was not performed. Free space or fix the audit folder."
            ) from exc
        self._size = start + len(data)
        self._seq, self._hash = seq, prev
        if sync:
            self._dirty_since = None
        elif self._fsync:
            self._lazy_writes += 1
            if self._dirty_since is None:
                self._dirty_since = time.monotonic()
                self._start_flusher()
        # a lazy batch leaves HEAD's once-a-second fsync to the flusher (within LAZY_SYNC_S)
        self._write_head(sync=False, defer=self._fsync and not sync)

    def _start_flusher(self) -> None:
        self._flush_wake.set()
        if self._flusher is None or not self._flusher.is_alive():
            self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                             name="audit-lazy-sync")
            self._flusher.start()

    def _flush_loop(self) -> None:
        """fsync lazily written events at most LAZY_SYNC_S after the first of them."""
        while not self._closed:
            self._flush_wake.wait(1.0)
            self._flush_wake.clear()
            since = self._dirty_since
            if since is None:
                continue
            delay = since + LAZY_SYNC_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._sync_lazy()

    def _sync_lazy(self) -> None:
        """fsync lazily written events (and a deferred HEAD) through duplicates of the fds,
        outside the writers' lock: an append made meanwhile (an allowed read's event, on
        the event loop) does not wait behind this fsync."""
        with self._io:
            if self._dirty_since is None or self._fd is None:
                return
            mark = self._lazy_writes
            try:
                fds = [os.dup(self._fd)]
                if self._head_dirty and self._head_fd is not None:
                    fds.append(os.dup(self._head_fd))
                self._head_dirty = False
            except OSError:
                log.exception("audit log fsync failed; retrying with the next event")
                return
        ok = True
        for fd in fds:
            try:
                _datasync(fd)
            except OSError:
                ok = False
                log.exception("audit log fsync failed; retrying with the next event")
            finally:
                os.close(fd)
        with self._io:
            if not ok:
                self._head_dirty = self._head_dirty or len(fds) > 1
            if ok and self._lazy_writes == mark:
                self._dirty_since = None
            elif self._dirty_since is not None:
                self._flush_wake.set()  # written during the fsync (or it failed): again

    def _cut_back(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
            if self._fsync:
                _datasync(self._fd)
        except OSError:
            log.exception("could not cut a failed audit write back; the next writer will")
        self._stale = True

    def _write_head(self, sync: bool, defer: bool = False) -> None:
        """Rewrite HEAD in place; at least once a second (and when ``sync``) also check that
        HEAD is still the file we hold open and fdatasync it (``defer``: leave that fsync to
        the lazy flusher, which runs within LAZY_SYNC_S)."""
        try:
            now = time.monotonic()
            owed = self._head_dirty and not defer  # a deferred fsync the flusher may skip
            tick = sync or owed or now - self._head_synced >= _HEAD_SYNC_S
            if tick and self._head_fd is not None:
                try:
                    st = os.stat(self._head_path)
                    same = os.path.samestat(st, os.fstat(self._head_fd))
                except FileNotFoundError:
                    same = False
                if not same:  # replaced or deleted behind our back
                    os.close(self._head_fd)
                    self._head_fd = None
            if self._head_fd is None:
                self._head_fd = os.open(
                    self._head_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
                )
            os.pwrite(self._head_fd, _head_bytes(self._seq, self._hash), 0)
            if tick:
                self._head_synced = now
                if defer and not sync:
                    self._head_dirty = True
                elif sync or self._fsync:
                    _datasync(self._head_fd)
                    self._head_dirty = False
        except OSError as exc:
            # the event itself is durable; only the truncation anchor lags
            log.error("could not update the audit HEAD anchor: %r", exc)

    def _create_segment(self) -> None:
        path = self._dir / _seg_name(self._seq + 1, "jsonl")
        try:
            fd = os.open(
                path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
            )
            if self._fsync:
                fsync_dir(self._dir)
        except OSError as exc:
            raise AuditWriteError(
                f"cannot create the audit segment {path} ({exc.strerror or exc}); "
                "the operation was not performed"
            ) from exc
        self._fd, self._seg_first, self._size = fd, self._seq + 1, 0

    def _seal_locked(self) -> None:
        """Start the successor of the active segment. The full one is now sealed (nobody
        appends to a segment that has a successor) and left to the converter."""
        if self._dirty_since is not None and self._fd is not None:
            _datasync(self._fd)  # a sealed segment is whole on disk
            self._dirty_since = None
        old, old_first, old_size = self._fd, self._seg_first, self._size
        self._fd = None
        try:
            self._create_segment()
            self._bump_gen()
        except (AuditWriteError, OSError) as exc:
            # stay on the current segment; the next commit tries again
            if self._fd is not None:
                os.close(self._fd)
                with contextlib.suppress(OSError):
                    os.unlink(self._dir / _seg_name(self._seg_first, "jsonl"))
            self._fd, self._seg_first, self._size = old, old_first, old_size
            self._stale = True
            log.error("could not start a new audit segment: %s", exc)
            return
        os.close(old)
        self._write_head(sync=True)
        self._sealed_waiting = True

    # ------------------------------------------------------------------ tail sync

    def _sync_tail(self) -> tuple[str, str] | None:
        """Make the cached tail match the files (under the flock). Returns a gap to record
        (reason, detail) when the log is shorter than HEAD or than what we saw before."""
        gen = self._read_gen()
        if gen != self._gen:
            self._gen, self._stale = gen, True
        if not self._stale and self._fd is not None:
            try:
                st = os.fstat(self._fd)
            except OSError:
                st = None
            if st is not None and st.st_nlink > 0:
                if st.st_size == self._size:
                    return None
                if st.st_size > self._size:  # another process appended
                    known = self._seq, self._hash
                    self._load_active_tail(st.st_size)
                    if self._seq > known[0]:
                        return None
                    self._seq, self._hash = known  # grew, yet older: rewritten under us
        return self._rescan()

    def _load_active_tail(self, size: int) -> None:
        end, last = _scan_tail(self._fd, size)
        if end != size:  # an incomplete line: a writer died mid-write, never committed
            log.warning("removing %d bytes of an incomplete audit line", size - end)
            try:
                os.ftruncate(self._fd, end)
            except OSError as exc:
                raise AuditWriteError(
                    f"cannot repair the audit segment tail ({exc.strerror or exc})"
                ) from exc
        self._size = end
        if last is None:  # empty segment: the chain ends in the previous one
            self._seq, self._hash = self._prev_tail(self._seg_first)
            return
        self._seq, self._hash = self._parse_tail(last)

    def _parse_tail(self, line: bytes) -> tuple[int, str]:
        try:
            rec = json.loads(line)
            return int(rec["seq"]), str(rec["hash"])
        except (ValueError, KeyError, TypeError) as exc:
            raise AuditWriteError(
                f"the last audit record in {self._dir} is unreadable; run "
                "`lodestore audit verify` and restore the log before operations resume"
            ) from exc

    def _prev_tail(self, before: int) -> tuple[int, str]:
        """(seq, hash) at the end of the newest segment that starts before ``before``."""
        parquet, jsonl = self._list_segments()
        cands = [(f, 1, n) for f, n in parquet if f < before]
        cands += [(f, 0, n) for f, n in jsonl if f < before]
        if not cands:
            return 0, GENESIS_HASH
        first, is_parquet, name = max(cands)
        if is_parquet:
            return self._parquet_last(self._dir / name)
        fd = os.open(self._dir / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _, last = _scan_tail(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        return self._prev_tail(first) if last is None else self._parse_tail(last)

    def _parquet_last(self, path: Path) -> tuple[int, str]:
        import pyarrow.parquet as pq

        st = os.stat(path)
        cached = self._pq_cache.get(path.name)
        if cached and cached[:2] == (st.st_mtime_ns, st.st_size):
            return cached[2], cached[3]
        pf = pq.ParquetFile(path)
        meta = pf.schema_arrow.metadata or {}
        if b"lodestore.audit.last_seq" in meta:
            seq = int(meta[b"lodestore.audit.last_seq"])
            h = meta[b"lodestore.audit.last_hash"].decode()
        else:
            t = pf.read(columns=["seq", "hash"])
            seq, h = int(t["seq"][-1].as_py()), str(t["hash"][-1].as_py())
        self._pq_cache[path.name] = (st.st_mtime_ns, st.st_size, seq, h)
        return seq, h

    def _list_segments(self) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        parquet, jsonl = [], []
        for name in os.listdir(self._dir):
            m = _SEG_RE.match(name)
            if m:
                (parquet if m.group(2) == "parquet" else jsonl).append((int(m.group(1)), name))
        return sorted(parquet), sorted(jsonl)

    def _rescan(self) -> tuple[str, str] | None:
        """Re-read the folder: find the active segment and the tail, check them against HEAD
        and against the tail this process saw last."""
        known_seq, known_hash = self._seq, self._hash
        for name in ("_fd", "_head_fd"):  # reopened from their paths
            fd = getattr(self, name)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, None)
        try:
            if _SNAP in os.listdir(self._dir):
                _clean_snap(self._dir / _SNAP)
            parquet, jsonl = self._list_segments()
            top_parquet = parquet[-1][0] if parquet else 0
            # the newest JSONL is the active segment; any older one is sealed
            if jsonl and jsonl[-1][0] > top_parquet:
                self._sealed_waiting = len(jsonl) > 1
                self._open_active(jsonl[-1][0])
            else:
                self._sealed_waiting = bool(jsonl)
                self._seq, self._hash = self._prev_tail(2**62)
                self._seg_first, self._size = self._seq + 1, 0
            self._sealed_waiting |= any(n.endswith(".tmp") for n in os.listdir(self._dir))
        except AuditWriteError:
            raise
        except Exception as exc:
            raise AuditWriteError(
                f"cannot read the audit log in {self._dir} ({exc}); the operation was not "
                "performed"
            ) from exc
        self._stale = False
        gap = self._check_head()
        if gap is None and known_seq > self._seq:
            gap = "tail_truncated", f"{self._seq + 1}-{known_seq}"
        elif gap is None and known_seq == self._seq and known_hash != self._hash:
            gap = "tail_replaced", f"{known_seq}"
        return gap

    def _open_active(self, first: int) -> None:
        self._fd = os.open(
            self._dir / _seg_name(first, "jsonl"), os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        )
        self._seg_first = first
        self._load_active_tail(os.fstat(self._fd).st_size)

    def _check_head(self) -> tuple[str, str] | None:
        try:
            head = _read_head(Path(self._head_path))
        except ValueError:
            return "anchor_unreadable", f"log-{self._seq}"
        except OSError as exc:
            raise self._dir_error(exc) from exc
        if head is None:
            if self._seq == 0:
                self._write_head(sync=True)
                if self._fsync:
                    with contextlib.suppress(OSError):
                        fsync_dir(self._dir)
                return None
            return "anchor_missing", f"log-{self._seq}"
        hseq, hhash = head
        if hseq > self._seq:
            return "tail_truncated", f"{self._seq + 1}-{hseq}"
        if hseq == self._seq and hhash != self._hash:
            return "tail_replaced", f"{hseq}"
        return None

    # ------------------------------------------------------------------ rolling

    def roll(self) -> None:
        """Seal the active segment (if it holds events) and convert every sealed segment to
        Parquet before returning. Raises :class:`AuditWriteError` if that fails."""
        with self._io:
            self._locked_commit([], seal=True)
        errors = self._convert_sealed(blocking=True)
        if errors:
            raise AuditWriteError(f"audit segment roll failed: {errors[0]}")

    def _kick_converter(self) -> None:
        with self._conv_lock:
            if self._conv_thread is not None:
                self._conv_again = True
                return
            self._conv_thread = threading.Thread(
                target=self._converter, name="audit-roll", daemon=True
            )
            self._conv_thread.start()

    def _converter(self) -> None:
        while True:
            try:
                for err in self._convert_sealed(blocking=True):
                    log.error("audit segment conversion failed (will retry at the next "
                              "roll): %s", err)
            except Exception:  # noqa: BLE001 - a background thread must not die silently
                log.exception("audit segment conversion failed")
            with self._conv_lock:
                if not self._conv_again or self._closed:
                    self._conv_thread = None
                    return
                self._conv_again = False

    def _convert_sealed(self, blocking: bool) -> list[str]:
        """Convert every sealed JSONL to Parquet and finish conversions a crash cut short.
        One converter at a time across processes (``roll.lock``); returns the errors."""
        try:
            lfd = os.open(self._dir / _ROLL_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            return [f"cannot open {_ROLL_LOCK}: {exc}"]
        errors: list[str] = []
        try:
            try:
                fcntl.flock(lfd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                return errors  # another process is converting
            for name in os.listdir(self._dir):
                if name.startswith("seg-") and name.endswith(".tmp"):
                    with contextlib.suppress(OSError):  # a conversion that died
                        os.unlink(self._dir / name)
            parquet, jsonl = self._list_segments()
            pfirsts = {f for f, _ in parquet}
            top_parquet = max(pfirsts, default=0)
            for first, _name in jsonl:
                if first == jsonl[-1][0] and first > top_parquet:
                    break  # the active segment
                try:
                    if first in pfirsts:
                        self._finish_conversion(first)
                    else:
                        self._convert_one(first)
                except Exception as exc:  # noqa: BLE001 - report, go on with the others
                    errors.append(f"{_seg_name(first, 'jsonl')}: {exc!r}")
        finally:
            os.close(lfd)
        return errors

    def _convert_one(self, first: int) -> None:
        import pyarrow.parquet as pq

        jpath = self._dir / _seg_name(first, "jsonl")
        ppath = self._dir / _seg_name(first, "parquet")
        tmp = ppath.with_name(f"{ppath.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(jpath, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, size, 0)
            if len(raw) != size or not raw.endswith(b"\n"):
                raise ValueError("the sealed segment ends in an incomplete line")
            table = _jsonl_to_table(raw, first)
            try:
                pq.write_table(table, tmp, compression="zstd")
                tfd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(tfd)
                finally:
                    os.close(tfd)
                # publish: under the writers' lock, so no append or snapshot sees a half
                with self._io, self._flock():
                    st = os.fstat(fd)
                    if st.st_size != size or st.st_nlink == 0 or ppath.exists():
                        raise RuntimeError("the segment changed while it was converted")
                    os.rename(tmp, ppath)
                    fsync_dir(self._dir)
                    os.unlink(jpath)
                    fsync_dir(self._dir)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        finally:
            os.close(fd)

    def _finish_conversion(self, first: int) -> None:
        """Both the JSONL and its Parquet exist: a conversion died before removing the JSONL
        (the Parquet was fsynced before its rename, so it is whole)."""
        jpath = self._dir / _seg_name(first, "jsonl")
        ppath = self._dir / _seg_name(first, "parquet")
        with self._io, self._flock():
            fd = os.open(jpath, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _, last = _scan_tail(fd, os.fstat(fd).st_size)
            finally:
                os.close(fd)
            try:
                same = last is None or self._parquet_last(ppath)[1] == json.loads(last)["hash"]
            except Exception:  # noqa: BLE001 - an unreadable Parquet is simply not the twin
                same = False
            if same:
                os.unlink(jpath)
            else:  # keep both as evidence; the JSONL is converted again
                aside = ppath.with_name(f"{ppath.name}.conflict-{int(time.time())}")
                os.rename(ppath, aside)
                log.error("audit conversion conflict: %s moved aside to %s", ppath, aside)
            fsync_dir(self._dir)

    # ------------------------------------------------------------------ reading

    def _snapshot(self, link_jsonl: bool) -> _Snapshot:
        """A consistent view of the segments, taken under the flock (read-only). JSONL
        segments are pinned (an open fd, or a hard link for DuckDB) so that a conversion
        that removes them afterwards does not disturb the reader."""
        with self._io, self._flock():
            parquet, jsonl = self._list_segments()
            pfirsts = {f for f, _ in parquet}
            segments = [_Segment(f, self._dir / n) for f, n in parquet]
            snap = _Snapshot(segments, None, None)
            try:
                for f, n in jsonl:
                    if f in pfirsts:  # a conversion died before removing it: Parquet wins
                        continue
                    seg = _Segment(f, self._dir / n)
                    segments.append(seg)
                    if link_jsonl:
                        with contextlib.suppress(OSError):
                            (self._dir / _SNAP).mkdir(exist_ok=True)
                            link = self._dir / _SNAP / f"{os.getpid()}-{uuid.uuid4().hex}.jsonl"
                            os.link(seg.path, link)
                            seg.link = link
                    else:
                        seg.fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                        seg.size = os.fstat(seg.fd).st_size
                segments.sort(key=lambda s: s.first)
                try:
                    snap.head = _read_head(Path(self._head_path))
                except ValueError as exc:
                    snap.head_error = str(exc)
            except BaseException:
                snap.release()
                raise
            return snap

    def _iter_segment(self, seg: _Segment) -> Iterator[dict]:
        if seg.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(seg.path)
            if tuple(table.column_names) != FIELDS:
                raise ValueError(f"unexpected columns {table.column_names}")
            yield from table.to_pylist()
            return
        raw = os.pread(seg.fd, seg.size, 0)
        end = raw.rfind(b"\n") + 1  # an incomplete last line was never committed
        for line in raw[:end].splitlines():
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("a line is not a JSON object")
            yield rec

    def verify(self) -> VerifyReport:
        """Recompute the whole chain; report the first problem found."""
        snap = self._snapshot(link_jsonl=False)
        try:
            return self._verify(snap)
        finally:
            snap.release()

    def _verify(self, snap: _Snapshot) -> VerifyReport:
        expect, prev, count = 1, GENESIS_HASH, 0
        hash_at_head: str | None = None
        head_seq = snap.head[0] if snap.head else None

        def bad(problem: str, at: int | None) -> VerifyReport:
            return VerifyReport(False, count, problem, at, prev)

        for seg in snap.segments:
            name = seg.path.name
            try:
                records = list(self._iter_segment(seg))
            except Exception as exc:  # noqa: BLE001 - any unreadable segment is a finding
                return bad(f"segment {name} is unreadable: {exc}", expect)
            if not records:
                continue
            if seg.first != expect:
                if seg.first > expect:
                    return bad(f"events {expect}..{seg.first - 1} are missing: the segment "
                               f"holding them was deleted (next segment is {name})", expect)
                return bad(f"segment {name} overlaps earlier events (starts at {seg.first}, "
                           f"expected {expect}): a segment was added or replaced", seg.first)
            seqs = [r.get("seq") for r in records]
            for i, rec in enumerate(records):
                if set(rec) != set(FIELDS):
                    return bad(f"event at position {i + 1} of {name} has wrong fields "
                               f"{sorted(set(rec) ^ set(FIELDS))}", expect)
                try:
                    h = event_hash(rec)
                except (TypeError, ValueError) as exc:
                    return bad(f"event seq {rec.get('seq')} in {name} is malformed: {exc}",
                               expect)
                if h != rec["hash"]:
                    return bad(f"event seq {rec['seq']} in {name} was modified "
                               "(its hash does not match its fields)", rec["seq"])
                if rec["seq"] != expect:
                    if expect in seqs[i + 1:]:
                        return bad(f"events are out of order in {name}: seq {rec['seq']} "
                                   f"stands where seq {expect} belongs", expect)
                    return bad(f"event seq {expect} is missing from {name} (deleted); "
                               f"the next event is seq {rec['seq']}", expect)
                if rec["prev_hash"] != prev:
                    return bad(f"the chain is broken at seq {expect} in {name}: its "
                               "prev_hash does not match the previous event (an event or "
                               "segment was replaced)", expect)
                if rec["operation"] == _GAP_OP:
                    return bad(f"the log lost events before seq {expect}: a writer found the "
                               f"tail cut or the HEAD anchor altered ({rec['request_id']})",
                               expect)
                if rec["seq"] == head_seq:
                    hash_at_head = h
                prev, expect, count = h, expect + 1, count + 1
        last = expect - 1
        if snap.head_error:
            return bad(f"the HEAD anchor is damaged: {snap.head_error}", None)
        if snap.head is None:
            if count:
                return bad("the HEAD anchor is missing, so truncation of the tail cannot be "
                           "ruled out", None)
        elif snap.head[0] > last:
            return bad(f"the log ends at seq {last} but HEAD records seq {snap.head[0]}: "
                       "events were deleted from the end", last + 1)
        elif snap.head[0] > 0 and hash_at_head != snap.head[1]:
            return bad(f"event seq {snap.head[0]} does not match the HEAD anchor: the tail "
                       "was replaced", snap.head[0])
        return VerifyReport(True, count, None, None, prev)

    def query(
        self, sql: str, limit: int = 10_000, *, timeout: float | None = 60.0
    ) -> tuple[list[str], list[tuple]]:
        """Run one read-only SQL statement over the table ``audit``; at most ``limit`` rows.

        The view has the columns of :data:`FIELDS` plus ``time`` (TIMESTAMP, UTC).
        """
        try:
            import duckdb
        except ImportError as exc:
            raise AuditQueryError("audit queries need DuckDB: pip install duckdb") from exc
        try:
            stmts = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise AuditQueryError(f"invalid SQL: {_first_line(exc)}") from exc
        if len(stmts) != 1:
            raise AuditQueryError("give exactly one SQL statement (a SELECT over `audit`)")
        if stmts[0].type not in (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN):
            raise AuditQueryError(
                f"only SELECT queries are allowed on the audit log, not {stmts[0].type.name}"
            )
        for attempt in range(3):
            snap = self._snapshot(link_jsonl=True)
            pinned = all(s.link is not None for s in snap.segments if s.path.suffix == ".jsonl")
            try:
                return self._run_query(duckdb, snap, sql, limit, timeout)
            except duckdb.IOException as exc:
                # an unpinned JSONL can be converted away under us: try again
                if attempt == 2 or pinned or not _missing_file(exc):
                    raise AuditQueryError(f"audit query failed: {_first_line(exc)}") from exc
            finally:
                snap.release()
        raise AssertionError("unreachable")  # pragma: no cover

    def _run_query(self, duckdb, snap: _Snapshot, sql: str, limit: int,
                   timeout: float | None) -> tuple[list[str], list[tuple]]:
        files = [str(s.path) for s in snap.segments if s.path.suffix == ".parquet"]
        jsonls = [str(s.link or s.path) for s in snap.segments if s.path.suffix == ".jsonl"]
        parts = []
        if files:
            parts.append(f"SELECT {', '.join(FIELDS)} FROM read_parquet("
                         f"[{', '.join(map(_sql_str, files))}])")
        if jsonls:
            parts.append(_json_select(jsonls))
        parts.append(_EMPTY_SELECT)
        con = duckdb.connect(":memory:")
        timer = None
        try:
            for setting in (
                "SET autoinstall_known_extensions = false",
                "SET autoload_known_extensions = false",
                "SET allow_community_extensions = false",
            ):
                con.execute(setting)
            source = f"SELECT {_VIEW_COLUMNS} FROM (" + " UNION ALL ".join(parts) + ")"
            try:
                con.execute(f"SET allowed_paths = [{', '.join(map(_sql_str, files + jsonls))}]")
                con.execute(f"CREATE VIEW audit AS {source}")
            except duckdb.CatalogException:  # DuckDB < 1.3: no allowed_paths; load it all
                con.execute(f"CREATE TABLE audit AS {source}")
            # from here on the connection reads nothing but those segment files
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            if timeout is not None:
                timer = threading.Timer(timeout, con.interrupt)
                timer.daemon = True
                timer.start()
            try:
                cur = con.execute(sql)
                columns = [d[0] for d in cur.description] if cur.description else []
                rows = cur.fetchmany(limit) if columns else []
            except duckdb.InterruptException as exc:
                raise AuditQueryError(f"the audit query ran over {timeout} s and was "
                                      "stopped; narrow it (WHERE time > ...)") from exc
            except duckdb.IOException as exc:
                if _missing_file(exc):
                    raise
                raise AuditQueryError(f"audit query failed: {_first_line(exc)}") from exc
            except duckdb.Error as exc:
                raise AuditQueryError(f"audit query failed: {_first_line(exc)}") from exc
            return columns, [tuple(r) for r in rows]
        finally:
            if timer is not None:
                timer.cancel()
            con.close()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wait for queued events and a running conversion, sync HEAD, release files.
        Appends after this fail."""
        with self._cond:
            self._closed = True
            while self._pending or self._leader:
                self._cond.wait(0.05)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._conv_lock:
            conv = self._conv_thread
        if conv is not None:
            conv.join(timeout=120)
        self._flush_wake.set()
        with self._io:
            if self._dirty_since is not None and self._fd is not None:
                with contextlib.suppress(OSError):
                    _datasync(self._fd)
                self._dirty_since = None
            if self._head_fd is not None and self._fsync:
                with contextlib.suppress(OSError):
                    _datasync(self._head_fd)
            self._drop_files()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if not self._leader and not self._pending:
                self._drop_files()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _json_select(paths: list[str]) -> str:
    return (f"SELECT {', '.join(FIELDS)} FROM read_json([{', '.join(map(_sql_str, paths))}], "
            f"format = 'newline_delimited', columns = {_JSON_COLUMNS}, "
            "ignore_errors = true) WHERE seq IS NOT NULL AND hash IS NOT NULL")


def _clean_snap(snap: Path) -> None:
    """Remove query links left by processes that died mid-query."""
    for name in os.listdir(snap):
        pid = name.split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(snap / name)
        except OSError:
            pass


def _missing_file(exc: BaseException) -> bool:
    text = str(exc)
    return "No files found" in text or "No such file" in text or "does not exist" in text


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

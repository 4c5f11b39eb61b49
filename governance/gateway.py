"""The gateway: the one door to data.

Every call goes principal → authorize (path rules) → QoS admit → classify (presidio) →
policy actions → storage → audit. Tools receive a ``Gateway`` and nothing else; the
volume is held in a closure-private slot so there is no attribute to reach around it.

The gateway's methods are synchronous and thread-safe (storage, hashing, erasure coding
and classification are blocking CPU or I/O work); each has an ``a``-prefixed async twin
that waits for QoS on the event loop and runs the body in a worker thread, so the loop
never blocks.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import functools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, TypeVar

import anyio

from storage import FileInfo, Volume, paths
from storage.errors import InvalidArgument, InvalidPath, StorageError, VersionMismatch

from .audit import AuditEvent, AuditLog, AuditWriteError
from .classify import Classifier, is_binary
from .content import WriteDecision, decide, mask, shift_attrs
from .errors import DeniedByPolicy, Forbidden
from .policy import Compiled
from .principals import Principal, Principals
from .qos import QosPolicy, Quota, RateLimited, Scheduler

if TYPE_CHECKING:
    from .memory import MemoryDoor

T = TypeVar("T")
_SLOW = object()  # a fast body's answer: this call needs I/O, run the full body in a thread

# Volumes live here, keyed by their gateway, not on the gateway: nothing a tool can reach
# from the object it is handed leads around the door.
_DOORS: dict[int, Volume] = {}
RESERVED = "/" + paths.RESERVED_ROOT
# Operations that change nothing. Their allowed (or masked) events are written before the
# call returns and fsynced within audit.LAZY_SYNC_S; every other event (writes, deletes,
# refusals, errors) is fsynced before the call returns.
READ_OPS = frozenset({
    "read_file", "read_multiple_files", "get_file_info", "list_directory", "find_files",
    "search", "query_table", "storage_status", "session_context", "list_sessions", "recall",
    "kv_get", "kv_lookup", "kv_exists", "kv_list", "kv_model", "kv_models", "kv_hashes",
    "kv_get_object", "kv_exists_object", "kv_list_objects"})

_BOMS = ((b"\xef\xbb\xbf", "utf-8"), (b"\xff\xfe\x00\x00", "utf-32-le"),
         (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
         (b"\xfe\xff", "utf-16-be"))
# Binary content is scanned through a view with one character per byte, in which
# everything but printable ASCII is a space: PII embedded in binary is still found.
_PRINTABLE = bytes(b if 32 <= b < 127 else 32 for b in range(256))
_PRINTABLE_STR = {i: (i if 32 <= i < 127 else 32) for i in range(256)}
APPEND_REWRITE_MAX = 8 << 20  # appends to files up to this size re-scan the whole file
APPEND_CONTEXT = 4096  # bytes of the existing tail scanned with a larger file's append

WINDOW_CHARS = 4 << 20  # streamed text is classified in windows of this many characters
OVERLAP_CHARS = 2048  # carried into the next window so no entity is cut at a boundary
SNIFF_BYTES = 64 << 10  # bytes looked at to decide text or binary for streams
USAGE_TTL = 2.0


@dataclass
class ReadResult:
    data: bytes
    info: FileInfo
    offset: int
    next_offset: int | None  # None at end of file
    masked: list[str] = field(default_factory=list)  # entity types masked for this reader


@dataclass
class WriteResult:
    info: FileInfo
    labels: list[str]  # entity types found and kept (tagged) or redacted
    redacted: dict[str, int]
    scanned: str  # 'text', 'binary', 'skipped' (classification disabled)


def _audit_path(path: str | None) -> str | None:
    """A path as the audit log keeps it: bad input is recorded, escaped and bounded."""
    if path is None:
        return None
    if not isinstance(path, str):
        return f"<{type(path).__name__}>"
    safe = path.encode("unicode_escape").decode("ascii") if not path.isprintable() else path
    return safe[:512]


class _Call:
    """One governed operation's audit record under construction."""

    __slots__ = ("event", "t0", "raw_path", "ticket", "audited", "reader")

    def __init__(self, p: Principal, op: str, path: str | None, transport: str | None) -> None:
        self.raw_path = path
        self.event = AuditEvent(tenant=p.tenant, agent=p.agent, operation=op,
                                path=_audit_path(path), transport=transport)
        self.t0 = time.perf_counter()
        self.ticket: Any = None
        self.audited = False
        self.reader: Any = None  # a FileReader a fast attempt opened, for the full body

    @property
    def path(self) -> str:
        """The normalised path (an invalid one raises, and is audited as an error)."""
        norm = public(self.raw_path if self.raw_path is not None else "/")
        self.event.path = norm
        return norm


def public(path: str) -> str:
    """Normalise a path an agent gave; refuse Lodestore's reserved folder."""
    norm = paths.normalize(path)
    if norm == RESERVED or norm.startswith(RESERVED + "/"):
        raise InvalidPath(f"{norm} is reserved for Lodestore's own data (KV-cache blocks); "
                          "choose a path outside /" + paths.RESERVED_ROOT)
    return norm


class Gateway:
    """Governed access for one store. Construct once per process; share across threads."""

    __slots__ = ("_v", "principals", "_audit", "_qos", "_classifiers", "_lock", "_usage",
                 "_qos_seen", "transport", "hooks", "_memory")

    def __init__(self, vol: Volume, principals: Principals, audit: AuditLog,
                 scheduler: Scheduler | None = None, transport: str | None = None) -> None:
        _DOORS[id(self)] = vol
        self._v: Callable[[], Volume] = functools.partial(_DOORS.__getitem__, id(self))
        self.principals = principals
        self._audit = audit
        self._qos = scheduler or Scheduler()
        self._classifiers: dict[tuple, _Serialized] = {}
        self._lock = threading.Lock()
        self._usage: dict[str, tuple[int, int, float]] = {}
        self._qos_seen: dict[str, int] = {}
        self.transport = transport
        # Called after a successful write/delete/move with (principal, what, path,
        # info|None, stored content|None); the search index subscribes here. Exceptions in
        # hooks are logged, not raised.
        self.hooks: list[Callable[[Principal, str, str, FileInfo | None, bytes | None],
                                  None]] = []
        self._memory: Any = None

    @property
    def memory(self) -> MemoryDoor:
        """Session context and memories (governance/memory.py), on the store's KV tier."""
        if self._memory is None:
            from .memory import MemoryDoor

            with self._lock:
                if self._memory is None:
                    self._memory = MemoryDoor(self, self._v().kv)
        return self._memory

    def close(self) -> None:
        for c in self._classifiers.values():
            c.close()
        self._audit.close()
        _DOORS.pop(id(self), None)

    # -- identity -----------------------------------------------------------------------

    def authenticate(self, token: str | None) -> Principal:
        return self.principals.authenticate(token)

    def policy(self, p: Principal) -> Compiled:
        compiled = self.principals.policy(p.tenant)
        if self._qos_seen.get(p.tenant) != compiled.version:
            self._qos.configure(p.tenant, QosPolicy.from_spec(compiled.policy.qos))
            self._qos_seen[p.tenant] = compiled.version
        return compiled

    # -- the call pipeline --------------------------------------------------------------

    def _finish(self, call: _Call, exc: BaseException | None) -> None:
        ev = call.event
        ev.latency_ms = round((time.perf_counter() - call.t0) * 1000.0, 3)
        if exc is not None:
            if isinstance(exc, Forbidden | DeniedByPolicy):
                ev.decision = "deny"
            elif isinstance(exc, RateLimited):
                ev.decision = "rate_limited"
            else:
                ev.decision = "error"
            if isinstance(exc, DeniedByPolicy):
                ev.labels = list(exc.entity_types)
            ev.error = getattr(exc, "code", type(exc).__name__)
        durable = exc is not None or ev.operation not in READ_OPS or \
            ev.decision not in ("allow", "masked")
        self._audit.append(ev, durable)  # raises AuditWriteError: then the call fails

    @contextlib.asynccontextmanager
    async def audited(self, p: Principal, op: str, path: str | None = None
                      ) -> AsyncIterator[AuditEvent]:
        """One audit event for a composite call (search, query_table) whose data access
        goes through the gateway's own governed reads (each audited and QoS-admitted
        itself). The call itself is admitted for one operation of the tenant's rate
        (a rate-limited tenant waits or is refused here), but holds no concurrency slot
        while it runs: a nested admit could starve its own reads. The body may set
        ``bytes``, ``labels`` and ``decision`` on the yielded event; it must never put
        content or query text there."""
        call = _Call(p, op, path, self.transport)
        try:
            priority = self.policy(p).policy.qos.priority
            ticket = await self._qos.acquire(p.tenant, 0, priority)
            await ticket.arelease()
            yield call.event
        except BaseException as exc:
            await anyio.to_thread.run_sync(self._finish, call, exc)
            raise
        await anyio.to_thread.run_sync(self._finish, call, None)

    def _audit_ready(self) -> None:
        """Refuse before changing anything if the audit log cannot take the event."""
        d = self._audit.directory
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            raise AuditWriteError(
                f"audit log at {d} is not writable, so the operation was not performed; "
                "restore the folder (see `lodestore audit verify`) and retry")

    def _run(self, p: Principal, op: str, path: str | None, body: Callable[[_Call], T],
             cost_bytes: int = 0) -> T:
        call = _Call(p, op, path, self.transport)
        try:
            priority = self.policy(p).policy.qos.priority
            with self._qos.admit_sync(p.tenant, cost_bytes, priority) as ticket:
                call.ticket = ticket
                result = body(call)
        except BaseException as exc:
            self._finish(call, exc)
            raise
        self._finish(call, None)
        return result

    async def _arun(self, p: Principal, op: str, path: str | None,
                    body: Callable[[_Call], T], cost_bytes: int = 0,
                    then: Callable[[T], object] | None = None) -> T:
        call = _Call(p, op, path, self.transport)
        try:
            priority = self.policy(p).policy.qos.priority
            async with self._qos.admit(p.tenant, cost_bytes, priority) as ticket:
                call.ticket = ticket
                # one hop to a worker thread for the body and its audit event together
                return await anyio.to_thread.run_sync(self._body_then_audit, call, body, then)
        except BaseException as exc:
            if not call.audited:  # refused before the body ran (QoS, policy lookup)
                await anyio.to_thread.run_sync(self._finish, call, exc)
            raise

    async def _arun_fast(self, p: Principal, op: str, path: str | None,
                         fast: Callable[[_Call], Any], body: Callable[[_Call], T]) -> T:
        """Like ``_arun``, but first tries ``fast`` on the event loop: a body that only
        touches metadata rows (a stat, a read of a file inlined in its row) takes ~50 us,
        less than the ~70 us hop to a worker thread and back. ``fast`` returns ``_SLOW``
        when the call needs I/O after all; then ``body`` runs in a thread as usual. Only
        tried while the audit log is idle (an allowed read's event is then one write on
        the loop, no fsync); failures are audited from a thread (their events fsync)."""
        call = _Call(p, op, path, self.transport)
        try:
            priority = self.policy(p).policy.qos.priority
            async with self._qos.admit(p.tenant, 0, priority) as ticket:
                call.ticket = ticket
                if not self._audit.busy():
                    try:
                        result = fast(call)
                    except BaseException as exc:
                        call.audited = True
                        await anyio.to_thread.run_sync(self._finish, call, exc)
                        raise
                    if result is not _SLOW:
                        call.audited = True
                        if call.event.decision in ("allow", "masked"):
                            self._finish(call, None)  # lazy event: one write, no fsync
                        else:
                            await anyio.to_thread.run_sync(self._finish, call, None)
                        return result
                return await anyio.to_thread.run_sync(self._body_then_audit, call, body)
        except BaseException as exc:
            if not call.audited:  # refused before the body ran (QoS, policy lookup)
                await anyio.to_thread.run_sync(self._finish, call, exc)
            raise

    def _body_then_audit(self, call: _Call, body: Callable[[_Call], T],
                         then: Callable[[T], object] | None = None) -> T:
        try:
            result = body(call)
        except BaseException as exc:
            call.audited = True
            self._finish(call, exc)
            raise
        call.audited = True
        self._finish(call, None)
        if then is not None:
            if call.ticket is not None:
                call.ticket.release()  # the follow-up is not part of the admitted operation
            then(result)
        return result

    # -- authorization ------------------------------------------------------------------

    def _can(self, p: Principal, path: str, write: bool) -> Compiled:
        pol = self.policy(p)
        ok = pol.can_write(p.role, path) if write else pol.can_read(p.role, path)
        if not ok:
            verb = "write" if write else "read"
            raise Forbidden(f"role {p.role!r} may not {verb} {path} under tenant "
                            f"{p.tenant}'s policy; ask an admin for access")
        return pol

    # -- classification -----------------------------------------------------------------

    def _classifier(self, pol: Compiled) -> _Serialized | None:
        if not pol.policy.pii.enabled or not pol.thresholds:
            return None
        key = (tuple(sorted(pol.thresholds.items())), pol.policy.pii.ner_model)
        c = self._classifiers.get(key)
        if c is None:
            with self._lock:
                c = self._classifiers.get(key)
                if c is None:
                    c = _Serialized(Classifier(entities=sorted(pol.thresholds),
                                               thresholds=pol.thresholds,
                                               ner_model=pol.policy.pii.ner_model))
                    self._classifiers[key] = c
        return c

    def _govern_bytes(self, path: str, data: bytes, pol: Compiled) -> tuple[WriteDecision, str]:
        clf = self._classifier(pol)
        if clf is None:
            return WriteDecision(data), "skipped"
        for bom, enc in _BOMS:
            if data.startswith(bom):
                body = data[len(bom):]
                try:
                    text = body.decode(enc)
                except UnicodeDecodeError:
                    break
                d = decide(path, text, clf.analyze(text), pol, encoding=enc)
                d.content = bom + d.content
                d.spans = [(a + len(bom), b + len(bom), t) for a, b, t in d.spans]
                return d, "text"
        if is_binary(data):
            view = data.translate(_PRINTABLE).decode("latin-1")
            return decide(path, view, clf.analyze(view), pol, encoding="latin-1",
                          source=data), "binary"
        try:
            text, enc = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, enc = data.decode("latin-1"), "latin-1"  # round-trips byte for byte
        return decide(path, text, clf.analyze(text), pol, encoding=enc), "text"

    def _govern_stream(self, path: str, src: IO[bytes] | Iterable[bytes], pol: Compiled,
                       state: dict[str, Any]) -> Iterator[bytes]:
        """Classify and apply policy to a stream in windows, never holding it whole."""
        pieces = iter(lambda: src.read(1 << 20), b"") if hasattr(src, "read") else iter(src)
        clf = self._classifier(pol)
        head = bytearray()
        for piece in pieces:
            head += piece
            if len(head) >= SNIFF_BYTES:
                break
        if clf is None:
            state["scanned"] = "skipped"
            yield bytes(head)
            yield from pieces
            return
        binary = is_binary(bytes(head[:SNIFF_BYTES])) and not any(
            head.startswith(b) for b, _e in _BOMS)
        state["scanned"] = "binary" if binary else "text"
        if binary:  # one character per byte: offsets are byte offsets
            decoder = codecs.getincrementaldecoder("latin-1")()
            enc = "latin-1"
        else:
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            enc = "utf-8"
        pending = ""
        raw_pending = bytearray()  # binary: the original bytes behind ``pending``
        out_pos = 0

        def emit(text: str) -> bytes:
            nonlocal out_pos, raw_pending
            if binary:
                source = bytes(raw_pending[: len(text)])
                del raw_pending[: len(text)]
                view = text.translate(_PRINTABLE_STR)
                d = decide(path, view, clf.analyze(view), pol, encoding=enc, source=source)
            else:
                d = decide(path, text, clf.analyze(text), pol, encoding=enc)
            window = d.attrs(pol.version, "text")
            state["attrs"] = shift_attrs(state.get("attrs"), window, out_pos)
            out_pos += len(d.content)
            return d.content

        def feed(raw: bytes, final: bool) -> Iterator[bytes]:
            nonlocal pending, decoder, enc
            if binary:
                raw_pending.extend(raw)
            buffered = decoder.getstate()[0] if enc == "utf-8" else b""
            try:
                pending += decoder.decode(raw, final=final)
            except UnicodeDecodeError:
                # not UTF-8 after all: re-decode what is pending as Latin-1 (lossless),
                # including the bytes the decoder was holding back
                rest = pending.encode("utf-8") + buffered + raw
                decoder = codecs.getincrementaldecoder("latin-1")()
                enc = "latin-1"
                pending = decoder.decode(rest, final=final)
            while len(pending) >= WINDOW_CHARS + OVERLAP_CHARS or (final and pending):
                if final and len(pending) < WINDOW_CHARS + OVERLAP_CHARS:
                    text, pending = pending, ""
                    yield emit(text)
                    break
                cut = len(pending) - OVERLAP_CHARS
                # never cut through an entity: move the cut before any finding across it
                for f in clf.analyze(pending[max(0, cut - OVERLAP_CHARS):cut + OVERLAP_CHARS]):
                    s = f.start + max(0, cut - OVERLAP_CHARS)
                    e = f.end + max(0, cut - OVERLAP_CHARS)
                    if s < cut < e:
                        cut = s
                text, pending = pending[:cut], pending[cut:]
                yield emit(text)

        yield from feed(bytes(head), False)
        for piece in pieces:
            yield from feed(piece, False)
        yield from feed(b"", True)

    # -- quotas -------------------------------------------------------------------------

    def _usage_of(self, tenant: str) -> tuple[int, int]:
        hit = self._usage.get(tenant)
        now = time.monotonic()
        if hit is not None and hit[2] > now:
            return hit[0], hit[1]
        b, f = self._v().usage(tenant)
        self._usage[tenant] = (b, f, now + USAGE_TTL)
        return b, f

    def _adjust_usage(self, tenant: str, dbytes: int, dfiles: int) -> None:
        hit = self._usage.get(tenant)
        if hit is not None:
            self._usage[tenant] = (hit[0] + dbytes, hit[1] + dfiles, hit[2])

    def _check_quota(self, p: Principal, pol: Compiled, add_bytes: int, add_files: int) -> None:
        q = pol.policy.quotas
        if q.bytes is None and q.files is None:
            return
        used_b, used_f = self._usage_of(p.tenant)
        Quota(bytes=q.bytes, files=q.files).check(p.tenant, used_b, used_f, add_bytes, add_files)

    # -- file operations ----------------------------------------------------------------

    def read(self, p: Principal, path: str, offset: int = 0, length: int | None = None
             ) -> ReadResult:
        return self._run(p, "read_file", path, lambda c: self._read(p, c, offset, length))

    async def aread(self, p: Principal, path: str, offset: int = 0, length: int | None = None
                    ) -> ReadResult:
        return await self._arun_fast(
            p, "read_file", path, lambda c: self._read(p, c, offset, length, inline_only=True),
            lambda c: self._read(p, c, offset, length))

    def _read(self, p: Principal, call: _Call, offset: int, length: int | None,
              inline_only: bool = False) -> Any:
        path = call.path
        pol = self._can(p, path, write=False)
        reader = call.reader or self._v().open_file(p.tenant, path)
        if inline_only and not reader.inline:
            call.reader = reader  # the threaded body reads this snapshot: no second lookup
            return _SLOW
        data = reader.read(offset, length)
        if call.ticket is not None:
            call.ticket.charge(len(data))
        attrs = reader.info.attrs or {}
        data, masked = mask(data, offset, attrs.get("spans") or [], p.role, pol)
        end = offset + len(data)
        call.event.bytes = len(data)
        call.event.labels = list(attrs.get("labels") or [])
        if masked:
            call.event.decision = "masked"
        return ReadResult(data, reader.info, offset, end if end < reader.size else None, masked)

    def open_stream(self, p: Principal, path: str) -> tuple[FileInfo, Iterator[bytes]]:
        """A whole-file stream for large downloads (CLI get), masked like ``read``."""
        def body(call: _Call) -> tuple[FileInfo, Iterator[bytes]]:
            path_ = call.path
            pol = self._can(p, path_, write=False)
            reader = self._v().open_file(p.tenant, path_)
            attrs = reader.info.attrs or {}
            spans = attrs.get("spans") or []
            call.event.bytes = reader.size
            call.event.labels = list(attrs.get("labels") or [])
            if any(not pol.is_cleared(p.role, t) for _s, _e, t in spans):
                call.event.decision = "masked"

            def gen() -> Iterator[bytes]:
                pos = 0
                for piece in reader.iter():
                    yield mask(piece, pos, spans, p.role, pol)[0]
                    pos += len(piece)
            return reader.info, gen()
        return self._run(p, "read_file", path, body)

    def write(self, p: Principal, path: str, data: bytes | IO[bytes] | Iterable[bytes], *,
              mode: str = "overwrite", expected_version: int | None = None,
              size_hint: int | None = None) -> WriteResult:
        cost = len(data) if isinstance(data, bytes | bytearray) else (size_hint or 0)
        return self._run(p, "write_file", path,
                         lambda c: self._write(p, c, data, mode, expected_version, size_hint),
                         cost_bytes=cost)

    async def awrite(self, p: Principal, path: str, data: bytes, *, mode: str = "overwrite",
                     expected_version: int | None = None,
                     then: Callable[[WriteResult], object] | None = None) -> WriteResult:
        """``write`` off the event loop. ``then(result)`` runs in the same worker thread
        once the write is committed and audited, outside its QoS admission: follow-up work
        (indexing the new version) without a second hop to a thread (~50 us)."""
        return await self._arun(p, "write_file", path,
                                lambda c: self._write(p, c, data, mode, expected_version, None),
                                cost_bytes=len(data), then=then)

    def _write(self, p: Principal, call: _Call, data: Any, mode: str,
               expected_version: int | None, size_hint: int | None) -> WriteResult:
        path = call.path
        pol = self._can(p, path, write=True)
        self._audit_ready()
        vol = self._v()
        if mode not in ("overwrite", "create", "append"):
            raise InvalidArgument("mode must be 'overwrite', 'create' or 'append'")
        try:
            existed: FileInfo | None = vol.stat(p.tenant, path)
        except StorageError:
            existed = None
        if isinstance(data, bytes | bytearray | memoryview):
            data = bytes(data)
            if mode == "append":
                return self._append(p, call, pol, data, expected_version, existed)
            decision, scanned = self._govern_bytes(path, data, pol)
            attrs = decision.attrs(pol.version, scanned)
            self._check_quota(p, pol, len(decision.content) - (existed.size if existed else 0),
                              0 if existed else 1)
            info = vol.write(p.tenant, path, decision.content, mode=mode,
                             expected_version=expected_version, attrs=attrs)
            labels, redacted = decision.labels, decision.redacted
            content: bytes | None = decision.content
        else:
            content = None
            if mode == "append":
                raise InvalidArgument("appends take bytes, not a stream; read the data first")
            self._check_quota(p, pol, size_hint or 0, 0 if existed else 1)
            state: dict[str, Any] = {}
            stream = self._govern_stream(path, data, pol, state)
            counted = _Counted(stream)

            def late_attrs() -> dict[str, Any]:
                # known only once the stream is consumed; committed with the content, and
                # the quota is checked on the real size before anything becomes visible
                self._check_quota(p, pol, counted.n - (existed.size if existed else 0),
                                  0 if existed else 1)
                a = state.get("attrs") or {"labels": [], "spans": [], "redacted": {}}
                a["scanned"] = state.get("scanned", "text")
                a["policy_version"] = pol.version
                state["final"] = a
                return a

            info = vol.write(p.tenant, path, counted, mode=mode,
                             expected_version=expected_version, attrs=late_attrs)
            if call.ticket is not None and info.size > (size_hint or 0):
                call.ticket.charge(info.size - (size_hint or 0))
            scanned = state["final"]["scanned"]
            labels, redacted = state["final"]["labels"], state["final"]["redacted"]
        return self._written(p, call, path, info, existed, labels, redacted, scanned, content)

    def _written(self, p: Principal, call: _Call, path: str, info: FileInfo,
                 existed: FileInfo | None, labels: list[str], redacted: dict[str, int],
                 scanned: str, content: bytes | None = None) -> WriteResult:
        self._adjust_usage(p.tenant, info.size - (existed.size if existed else 0),
                           0 if existed else 1)
        call.event.bytes = info.size
        call.event.labels = list(labels)
        call.event.decision = "redact" if redacted else ("tag" if labels else "allow")
        self._notify(p, "write", path, info, content)
        return WriteResult(info, list(labels), dict(redacted), scanned)

    def _append(self, p: Principal, call: _Call, pol: Compiled, data: bytes,
                expected_version: int | None, existed: FileInfo | None) -> WriteResult:
        """Append, classifying the new bytes together with what they join.

        Small files are re-scanned whole and replaced (compare-and-swap on the version
        read), so an entity split across two appends is still found. Larger files scan
        the appended bytes with the existing tail before them."""
        path = call.path
        vol = self._v()
        for attempt in range(20):
            if attempt:
                time.sleep(0.001 * attempt)
                try:
                    existed = vol.stat(p.tenant, path)
                except StorageError:
                    existed = None
            if existed is not None and existed.is_dir:
                vol.write(p.tenant, path, b"", mode="append")  # raises IsADirectory
            version = existed.version if existed is not None else 0
            if expected_version is not None and expected_version != version:
                raise VersionMismatch(path, expected_version,
                                      existed.version if existed else None)
            try:
                if existed is None or existed.size <= APPEND_REWRITE_MAX:
                    old = vol.read(p.tenant, path) if existed is not None else b""
                    decision, scanned = self._govern_bytes(path, old + data, pol)
                    # earlier redactions are markers now: carry their labels and counts
                    before = (existed.attrs or {}) if existed is not None else {}
                    for t, n in (before.get("redacted") or {}).items():
                        decision.redacted[t] = decision.redacted.get(t, 0) + n
                    decision.labels = sorted(set(decision.labels)
                                             | set(before.get("labels") or []))
                    self._check_quota(p, pol, len(decision.content) - len(old),
                                      0 if existed else 1)
                    info = vol.write(p.tenant, path, decision.content,
                                     expected_version=version,
                                     attrs=decision.attrs(pol.version, scanned))
                    return self._written(p, call, path, info, existed, decision.labels,
                                         decision.redacted, scanned, decision.content)
                return self._append_large(p, call, pol, data, existed)
            except VersionMismatch:
                if expected_version is not None:
                    raise
                continue  # another writer got there first: re-read and re-scan
        raise VersionMismatch(path, version, None)

    def _append_large(self, p: Principal, call: _Call, pol: Compiled, data: bytes,
                      existed: FileInfo) -> WriteResult:
        path = call.path
        vol = self._v()
        start = max(0, existed.size - APPEND_CONTEXT)
        tail = vol.read(p.tenant, path, start, existed.size - start)
        decision, scanned = self._govern_bytes(path, tail + data, pol)
        if decision.content[: len(tail)] != tail:
            raise InvalidArgument(
                f"appending to {path} completes a value the policy redacts across the old "
                "end of the file; rewrite the file instead of appending")
        new_spans = [(a - len(tail), b - len(tail), t) for a, b, t in decision.spans
                     if b > len(tail)]
        part = {"labels": decision.labels, "spans": new_spans, "redacted": decision.redacted,
                "policy_version": pol.version, "scanned": scanned}
        self._check_quota(p, pol, len(data), 0)
        info = vol.write(p.tenant, path, decision.content[len(tail):], mode="append",
                         expected_version=existed.version,
                         merge_attrs=lambda old, size: shift_attrs(old, part, size))
        return self._written(p, call, path, info, existed, decision.labels,
                             decision.redacted, scanned)

    def stat(self, p: Principal, path: str) -> FileInfo:
        return self._run(p, "get_file_info", path, lambda c: self._stat(p, c))

    async def astat(self, p: Principal, path: str) -> FileInfo:
        """``stat`` for async callers: metadata only, so it runs on the loop (see
        ``_arun_fast``)."""
        return await self._arun_fast(p, "get_file_info", path, lambda c: self._stat(p, c),
                                     lambda c: self._stat(p, c))

    def _stat(self, p: Principal, call: _Call) -> FileInfo:
        path_ = call.path
        pol = self.policy(p)
        if not (pol.can_read(p.role, path_) or pol.can_list(p.role, path_)):
            self._can(p, path_, write=False)
        return self._v().stat(p.tenant, path_)

    def list_dir(self, p: Principal, path: str, cursor: str | None = None, limit: int = 1000
                 ) -> tuple[list[FileInfo], str | None]:
        def body(call: _Call) -> tuple[list[FileInfo], str | None]:
            path_ = call.path
            pol = self.policy(p)
            if not pol.can_list(p.role, path_):
                self._can(p, path_, write=False)
            items, nxt = self._v().list_dir(p.tenant, path_, cursor, limit)
            items = [i for i in items if i.path != RESERVED and (
                pol.can_read(p.role, i.path) or (i.is_dir and pol.can_list(p.role, i.path)))]
            return items, nxt
        return self._run(p, "list_directory", path, body)

    def mkdir(self, p: Principal, path: str, parents: bool = True) -> FileInfo:
        def body(call: _Call) -> FileInfo:
            path_ = call.path
            self._can(p, path_, write=True)
            self._audit_ready()
            return self._v().mkdir(p.tenant, path_, parents=parents, exist_ok=True)
        return self._run(p, "create_directory", path, body)

    def move(self, p: Principal, src: str, dst: str, overwrite: bool = False) -> FileInfo:
        def body(call: _Call) -> FileInfo:
            src_n = call.path
            dst_n = public(dst)
            # moving takes the content: the role must be able to read it and write both
            self._can(p, src_n, write=False)
            self._can(p, src_n, write=True)
            self._can(p, dst_n, write=True)
            self._audit_ready()
            info = self._v().move(p.tenant, src_n, dst_n, overwrite=overwrite)
            self._notify(p, "move", src_n, None)
            self._notify(p, "write", dst_n, info)
            return info
        return self._run(p, "move_file", src, body)

    def delete(self, p: Principal, path: str, recursive: bool = False,
               expected_version: int | None = None) -> None:
        def body(call: _Call) -> None:
            path_ = call.path
            self._can(p, path_, write=True)
            self._audit_ready()
            vol = self._v()
            info = vol.stat(p.tenant, path_)
            vol.delete(p.tenant, path_, recursive=recursive, expected_version=expected_version)
            call.event.bytes = info.size
            if not info.is_dir:
                self._adjust_usage(p.tenant, -info.size, -1)
            else:
                self._usage.pop(p.tenant, None)
            self._notify(p, "delete", path_, None)
        return self._run(p, "delete_file", path, body)

    def find(self, p: Principal, pattern: str, root: str = "/", limit: int = 1000
             ) -> list[FileInfo]:
        """Entries under ``root`` whose name (or path, if the pattern has '/') matches a glob."""
        def body(call: _Call) -> list[FileInfo]:
            if not isinstance(pattern, str) or not pattern or len(pattern) > 512:
                raise InvalidArgument(
                    "pattern must be 1-512 characters, e.g. '*.md' or '/notes/*'")
            pol = self.policy(p)
            root_ = call.path
            out: list[FileInfo] = []
            on_path = "/" in pattern
            for info in self._walk(p, pol, root_):
                target = info.path if on_path else info.name
                if fnmatch.fnmatchcase(target, pattern) and pol.can_read(p.role, info.path):
                    out.append(info)
                    if len(out) >= limit:
                        break
            return out
        return self._run(p, "find_files", root, body)

    def _walk(self, p: Principal, pol: Compiled, root: str) -> Iterator[FileInfo]:
        vol = self._v()
        stack = [root]
        while stack:
            d = stack.pop()
            for info in vol.iter_dir(p.tenant, d):
                if info.path == RESERVED:
                    continue
                if info.is_dir:
                    if pol.can_list(p.role, info.path):
                        stack.append(info.path)
                    if pol.can_read(p.role, info.path):
                        yield info
                else:
                    yield info

    def usage(self, p: Principal) -> dict[str, Any]:
        def body(call: _Call) -> dict[str, Any]:
            pol = self.policy(p)
            b, f = self._v().usage(p.tenant)
            q = pol.policy.quotas
            return {"tenant": p.tenant, "bytes": b, "files": f,
                    "quota_bytes": q.bytes, "quota_files": q.files,
                    "policy_version": pol.version}
        return self._run(p, "storage_status", None, body)

    def dry_run(self, tenant: str, text: str, path: str = "/policy-test") -> dict[str, Any]:
        """What a write of ``text`` would do under the tenant's policy; stores nothing."""
        self.principals.require_tenant(tenant)
        pol = self.principals.policy(tenant)
        clf = self._classifier(pol)
        findings = clf.analyze(text) if clf is not None else []
        rows = [{"entity_type": f.entity_type, "start": f.start, "end": f.end,
                 "score": round(f.score, 4), "action": pol.action_for(f.entity_type)}
                for f in findings]
        report: dict[str, Any] = {"tenant": tenant, "policy_version": pol.version,
                                  "findings": rows, "reason": None}
        try:
            d = decide(path, text, findings, pol)
        except DeniedByPolicy as exc:
            report.update(decision="deny", reason=str(exc), labels=exc.entity_types)
            return report
        report.update(decision="redact" if d.redacted else ("tag" if d.labels else "allow"),
                      labels=d.labels, redacted=d.redacted)
        return report

    def _notify(self, p: Principal, what: str, path: str, info: FileInfo | None,
                content: bytes | None = None) -> None:
        """Tell the hooks; ``content`` is the whole stored content of a written version
        when the write had it at hand (the search index then needs no read back)."""
        for hook in self.hooks:
            try:
                hook(p, what, path, info, content)
            except Exception:  # noqa: BLE001 - an index must never fail a committed write
                import logging

                logging.getLogger(__name__).exception("write hook failed for %s", what)


class _Serialized:
    """A classifier shared by worker threads: it is not thread-safe, and loading one per
    thread costs seconds, so calls take turns (the work is mostly under the GIL anyway;
    inputs over a few MB fan out to the classifier's own process pool)."""

    def __init__(self, inner: Classifier) -> None:
        self.inner = inner
        self.lock = threading.Lock()

    def analyze(self, text: str) -> list[Any]:
        with self.lock:
            return self.inner.analyze(text)

    def close(self) -> None:
        self.inner.close()


class _Counted:
    """Counts the bytes a stream yields (the stored size, after redaction)."""

    def __init__(self, it: Iterator[bytes]) -> None:
        self.it, self.n = it, 0

    def __iter__(self) -> Iterator[bytes]:
        for piece in self.it:
            self.n += len(piece)
            yield piece


__all__ = ["Gateway", "ReadResult", "WriteResult"]

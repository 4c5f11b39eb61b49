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
import fnmatch
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import anyio

from storage import FileInfo, Volume, paths
from storage.errors import InvalidArgument, NotFound, StorageError

from .audit import AuditEvent, AuditLog
from .classify import Classifier, is_binary
from .content import WriteDecision, decide, mask, shift_attrs
from .errors import DeniedByPolicy, Forbidden
from .policy import Compiled
from .principals import Principal, Principals
from .qos import QosPolicy, Quota, RateLimited, Scheduler

T = TypeVar("T")

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


class _Call:
    """One governed operation's audit record under construction."""

    __slots__ = ("event", "t0")

    def __init__(self, p: Principal, op: str, path: str | None, transport: str | None) -> None:
        self.event = AuditEvent(tenant=p.tenant, agent=p.agent, operation=op, path=path,
                                transport=transport)
        self.t0 = time.perf_counter()


class Gateway:
    """Governed access for one store. Construct once per process; share across threads."""

    __slots__ = ("_v", "principals", "_audit", "_qos", "_classifiers", "_lock", "_usage",
                 "_qos_seen", "transport", "hooks")

    def __init__(self, vol: Volume, principals: Principals, audit: AuditLog,
                 scheduler: Scheduler | None = None, transport: str | None = None) -> None:
        self._v: Callable[[], Volume] = (lambda v: lambda: v)(vol)
        self.principals = principals
        self._audit = audit
        self._qos = scheduler or Scheduler()
        self._classifiers: dict[tuple, Classifier] = {}
        self._lock = threading.Lock()
        self._usage: dict[str, tuple[int, int, float]] = {}
        self._qos_seen: dict[str, int] = {}
        self.transport = transport
        # Called after a successful write/delete/move with (principal, path, info|None);
        # the search index subscribes here. Exceptions in hooks are logged, not raised.
        self.hooks: list[Callable[[Principal, str, str, FileInfo | None], None]] = []

    def close(self) -> None:
        for c in self._classifiers.values():
            c.close()
        self._audit.close()

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
        self._audit.append(ev)  # raises AuditWriteError: then the call fails

    def _run(self, p: Principal, op: str, path: str | None, body: Callable[[_Call], T],
             cost_bytes: int = 0) -> T:
        call = _Call(p, op, path, self.transport)
        try:
            priority = self.policy(p).policy.qos.priority
            with self._qos.admit_sync(p.tenant, cost_bytes, priority):
                result = body(call)
        except BaseException as exc:
            self._finish(call, exc)
            raise
        self._finish(call, None)
        return result

    async def _arun(self, p: Principal, op: str, path: str | None,
                    body: Callable[[_Call], T], cost_bytes: int = 0) -> T:
        call = _Call(p, op, path, self.transport)
        try:
            priority = self.policy(p).policy.qos.priority
            async with self._qos.admit(p.tenant, cost_bytes, priority):
                result = await anyio.to_thread.run_sync(body, call)
        except BaseException as exc:
            await anyio.to_thread.run_sync(self._finish, call, exc)
            raise
        await anyio.to_thread.run_sync(self._finish, call, None)
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

    def _classifier(self, pol: Compiled) -> Classifier | None:
        if not pol.policy.pii.enabled or not pol.thresholds:
            return None
        key = (tuple(sorted(pol.thresholds.items())), pol.policy.pii.ner_model)
        c = self._classifiers.get(key)
        if c is None:
            with self._lock:
                c = self._classifiers.get(key)
                if c is None:
                    c = Classifier(entities=sorted(pol.thresholds), thresholds=pol.thresholds,
                                   ner_model=pol.policy.pii.ner_model)
                    self._classifiers[key] = c
        return c

    def _govern_bytes(self, path: str, data: bytes, pol: Compiled) -> tuple[WriteDecision, str]:
        clf = self._classifier(pol)
        if clf is None:
            return WriteDecision(data), "skipped"
        if is_binary(data):
            return WriteDecision(data), "binary"
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
        if clf is None or is_binary(bytes(head[:SNIFF_BYTES])):
            state["scanned"] = "skipped" if clf is None else "binary"
            yield bytes(head)
            yield from pieces
            return
        state["scanned"] = "text"
        decoder = codecs.getincrementaldecoder("utf-8")("strict")
        enc = "utf-8"
        pending = ""
        out_pos = 0

        def emit(text: str) -> bytes:
            nonlocal out_pos
            findings = clf.analyze(text)
            d = decide(path, text, findings, pol, encoding=enc)
            window = d.attrs(pol.version, "text")
            state["attrs"] = shift_attrs(state.get("attrs"), window, out_pos)
            out_pos += len(d.content)
            return d.content

        def feed(raw: bytes, final: bool) -> Iterator[bytes]:
            nonlocal pending, decoder, enc
            try:
                pending += decoder.decode(raw, final=final)
            except UnicodeDecodeError:
                # not UTF-8 after all: re-decode what is pending as Latin-1 (lossless)
                rest = pending.encode(enc) + raw if enc == "utf-8" else raw
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

    # -- file operations (sync) ---------------------------------------------------------

    def read(self, p: Principal, path: str, offset: int = 0, length: int | None = None
             ) -> ReadResult:
        return self._run(p, "read_file", _norm(path), lambda c: self._read(p, c, offset, length))

    async def aread(self, p: Principal, path: str, offset: int = 0, length: int | None = None
                    ) -> ReadResult:
        return await self._arun(p, "read_file", _norm(path),
                                lambda c: self._read(p, c, offset, length))

    def _read(self, p: Principal, call: _Call, offset: int, length: int | None) -> ReadResult:
        path = call.event.path or "/"
        pol = self._can(p, path, write=False)
        reader = self._v().open_file(p.tenant, path)
        data = reader.read(offset, length)
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
            pol = self._can(p, call.event.path or "/", write=False)
            reader = self._v().open_file(p.tenant, call.event.path or "/")
            spans = (reader.info.attrs or {}).get("spans") or []
            call.event.bytes = reader.size
            call.event.labels = list((reader.info.attrs or {}).get("labels") or [])

            def gen() -> Iterator[bytes]:
                pos = 0
                for piece in reader.iter():
                    yield mask(piece, pos, spans, p.role, pol)[0]
                    pos += len(piece)
            return reader.info, gen()
        return self._run(p, "read_file", _norm(path), body)

    def write(self, p: Principal, path: str, data: bytes | IO[bytes] | Iterable[bytes], *,
              mode: str = "overwrite", expected_version: int | None = None,
              size_hint: int | None = None) -> WriteResult:
        cost = len(data) if isinstance(data, bytes | bytearray) else (size_hint or 0)
        return self._run(p, "write_file", _norm(path),
                         lambda c: self._write(p, c, data, mode, expected_version, size_hint),
                         cost_bytes=cost)

    async def awrite(self, p: Principal, path: str, data: bytes, *, mode: str = "overwrite",
                     expected_version: int | None = None) -> WriteResult:
        return await self._arun(p, "write_file", _norm(path),
                                lambda c: self._write(p, c, data, mode, expected_version, None),
                                cost_bytes=len(data))

    def _write(self, p: Principal, call: _Call, data: Any, mode: str,
               expected_version: int | None, size_hint: int | None) -> WriteResult:
        path = call.event.path or "/"
        pol = self._can(p, path, write=True)
        vol = self._v()
        existed = None
        if pol.policy.quotas.bytes is not None or pol.policy.quotas.files is not None:
            try:
                existed = vol.stat(p.tenant, path)
            except (NotFound, StorageError):
                existed = None
        if isinstance(data, bytes | bytearray | memoryview):
            data = bytes(data)
            decision, scanned = self._govern_bytes(path, data, pol)
            attrs = decision.attrs(pol.version, scanned)
            add = len(decision.content) - (existed.size if existed and mode != "append" else 0)
            self._check_quota(p, pol, add, 0 if existed else 1)
            merge = (lambda old, size: shift_attrs(old, attrs, size)) if mode == "append" else None
            info = vol.write(p.tenant, path, decision.content, mode=mode,
                             expected_version=expected_version,
                             attrs=None if merge else attrs, merge_attrs=merge)
            labels, redacted = decision.labels, decision.redacted
        else:
            self._check_quota(p, pol, size_hint or 0, 0 if existed else 1)
            state: dict[str, Any] = {}
            stream = self._govern_stream(path, data, pol, state)
            if mode == "append":
                raise InvalidArgument("streamed appends are not supported; append bytes instead")

            def late_attrs() -> dict[str, Any]:
                # known only once the stream is consumed; committed with the content
                a = state.get("attrs") or {"labels": [], "spans": [], "redacted": {}}
                a["scanned"] = state.get("scanned", "text")
                a["policy_version"] = pol.version
                state["final"] = a
                return a

            info = vol.write(p.tenant, path, stream, mode=mode,
                             expected_version=expected_version, attrs=late_attrs)
            scanned = state["final"]["scanned"]
            labels, redacted = state["final"]["labels"], state["final"]["redacted"]
        self._adjust_usage(p.tenant, info.size - (existed.size if existed else 0),
                           0 if existed else 1)
        call.event.bytes = info.size
        call.event.labels = list(labels)
        call.event.decision = "redact" if redacted else ("tag" if labels else "allow")
        self._notify(p, "write", path, info)
        return WriteResult(info, list(labels), dict(redacted), scanned)

    def stat(self, p: Principal, path: str) -> FileInfo:
        def body(call: _Call) -> FileInfo:
            path_ = call.event.path or "/"
            pol = self.policy(p)
            if not (pol.can_read(p.role, path_) or pol.can_list(p.role, path_)):
                self._can(p, path_, write=False)
            return self._v().stat(p.tenant, path_)
        return self._run(p, "get_file_info", _norm(path), body)

    def list_dir(self, p: Principal, path: str, cursor: str | None = None, limit: int = 1000
                 ) -> tuple[list[FileInfo], str | None]:
        def body(call: _Call) -> tuple[list[FileInfo], str | None]:
            path_ = call.event.path or "/"
            pol = self.policy(p)
            if not pol.can_list(p.role, path_):
                self._can(p, path_, write=False)
            items, nxt = self._v().list_dir(p.tenant, path_, cursor, limit)
            items = [i for i in items
                     if pol.can_read(p.role, i.path) or (i.is_dir and pol.can_list(p.role, i.path))]
            return items, nxt
        return self._run(p, "list_directory", _norm(path), body)

    def mkdir(self, p: Principal, path: str, parents: bool = True) -> FileInfo:
        def body(call: _Call) -> FileInfo:
            self._can(p, call.event.path or "/", write=True)
            return self._v().mkdir(p.tenant, call.event.path or "/", parents=parents,
                                   exist_ok=True)
        return self._run(p, "create_directory", _norm(path), body)

    def move(self, p: Principal, src: str, dst: str, overwrite: bool = False) -> FileInfo:
        dst_n = _norm(dst)

        def body(call: _Call) -> FileInfo:
            src_n = call.event.path or "/"
            self._can(p, src_n, write=True)
            self._can(p, dst_n, write=True)
            info = self._v().move(p.tenant, src_n, dst_n, overwrite=overwrite)
            self._notify(p, "move", src_n, None)
            self._notify(p, "write", dst_n, info)
            return info
        return self._run(p, "move_file", _norm(src), body)

    def delete(self, p: Principal, path: str, recursive: bool = False,
               expected_version: int | None = None) -> None:
        def body(call: _Call) -> None:
            path_ = call.event.path or "/"
            self._can(p, path_, write=True)
            vol = self._v()
            info = vol.stat(p.tenant, path_)
            vol.delete(p.tenant, path_, recursive=recursive, expected_version=expected_version)
            call.event.bytes = info.size
            if not info.is_dir:
                self._adjust_usage(p.tenant, -info.size, -1)
            else:
                self._usage.pop(p.tenant, None)
            self._notify(p, "delete", path_, None)
        return self._run(p, "delete_file", _norm(path), body)

    def find(self, p: Principal, pattern: str, root: str = "/", limit: int = 1000
             ) -> list[FileInfo]:
        """Entries under ``root`` whose name (or path, if the pattern has '/') matches a glob."""
        if not pattern or len(pattern) > 512:
            raise InvalidArgument("pattern must be 1-512 characters, e.g. '*.md' or 'notes/**'")

        def body(call: _Call) -> list[FileInfo]:
            pol = self.policy(p)
            root_ = call.event.path or "/"
            out: list[FileInfo] = []
            on_path = "/" in pattern
            for info in self._walk(p, pol, root_):
                target = info.path if on_path else info.name
                if fnmatch.fnmatchcase(target, pattern) and pol.can_read(p.role, info.path):
                    out.append(info)
                    if len(out) >= limit:
                        break
            return out
        return self._run(p, "find_files", _norm(root), body)

    def _walk(self, p: Principal, pol: Compiled, root: str) -> Iterator[FileInfo]:
        vol = self._v()
        stack = [root]
        while stack:
            d = stack.pop()
            for info in vol.iter_dir(p.tenant, d):
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

    def _notify(self, p: Principal, what: str, path: str, info: FileInfo | None) -> None:
        for hook in self.hooks:
            try:
                hook(p, what, path, info)
            except Exception:  # noqa: BLE001 - an index must never fail a committed write
                import logging

                logging.getLogger(__name__).exception("write hook failed for %s", what)


def _norm(path: str) -> str:
    return paths.normalize(path)


__all__ = ["Gateway", "ReadResult", "WriteResult"]

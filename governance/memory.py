"""Governed session context and memories: the gateway's door to the KV tier.

Content goes through the same pipeline as a file write — QoS admit, presidio
classification, the tenant's per-entity action (tag / redact / deny), audit — and comes
back masked for roles not cleared for its labels. Audit events name the session or memory
id and entity types, never content or recall queries (a query may itself hold PII).

Ownership: a session belongs to the agent that started it; other agents of the tenant see
it only when the policy sets ``memory.share_sessions``. Memories are private to their agent
unless written ``shared`` (allowed by ``memory.shared_memories``); shared memories are seen
by every agent of the tenant. A handle of someone else's private session reads as unknown,
so handles do not leak. Retention (``memory.retention_days``) becomes a TTL on every record
and is also applied on read, so shortening it takes effect at once.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from storage.errors import InvalidArgument, NotFound
from storage.memory import (
    Memory,
    MemoryStore,
    SessionMeta,
    SessionStore,
    check_memory_id,
    check_session,
)

from .content import mask
from .errors import Forbidden
from .tokens import count_tokens, tail_within

if TYPE_CHECKING:
    from .gateway import Gateway, _Call
    from .policy import Compiled
    from .principals import Principal

MAX_TURN_BYTES = 256 << 10
MAX_MEMORY_BYTES = 64 << 10
MAX_QUERY_CHARS = 2000
MAX_TAGS = 16
MAX_CONTEXT_TOKENS = 1_000_000
ROLES = ("user", "assistant", "system", "tool")
_TAG = re.compile(r"^[A-Za-z0-9_.:/-]{1,64}$")


@dataclass
class AppendResult:
    session: str
    seq: int
    created: bool
    tokens: int
    labels: list[str]
    redacted: dict[str, int]


@dataclass
class ContextTurn:
    seq: int
    role: str
    content: str
    ts: float
    tokens: int
    masked: list[str] = field(default_factory=list)
    truncated: bool = False


@dataclass
class ContextResult:
    session: str
    turns: list[ContextTurn]  # oldest first
    tokens: int  # content tokens of the turns plus the marker
    omitted: int  # older turns left out
    marker: str | None


@dataclass
class RecalledMemory:
    memory: Memory
    content: str
    score: float
    masked: list[str]


def _marker(n: int) -> str:
    return f"[{n} earlier turn{'s' if n != 1 else ''} omitted]"


def _text(value: Any, what: str, limit: int) -> bytes:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if value == "":
        raise InvalidArgument(f"{what} is empty; nothing to store")
    data = value.encode("utf-8", "surrogatepass")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} holds unpaired surrogates; send valid Unicode") from None
    if len(data) > limit:
        raise InvalidArgument(f"{what} is {len(data)} bytes; the limit is {limit} — split it "
                              "or store it as a file with write_file")
    return data


def _tags(tags: Any) -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
        raise InvalidArgument("tags must be a list of strings")
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(f"at most {MAX_TAGS} tags, got {len(tags)}")
    for t in tags:
        if not _TAG.match(t):
            raise InvalidArgument(f"tag {t[:70]!r} must be 1-64 letters, digits or _ . : / -")
    return sorted(set(tags))


# Like the gateway's volumes, the stores live here keyed by their door, not on it: nothing a
# tool can reach from ``gateway.memory`` leads to the raw KV tier.
_STORES: dict[int, tuple[SessionStore, MemoryStore]] = {}


class MemoryDoor:
    """Sessions and memories for principals, through one gateway."""

    __slots__ = ("g", "_s")

    def __init__(self, gateway: Gateway, kv: Any) -> None:
        self.g = gateway
        _STORES[id(self)] = (SessionStore(kv), MemoryStore(kv))
        self._s = functools.partial(_STORES.__getitem__, id(self))

    @property
    def _sessions(self) -> SessionStore:
        return self._s()[0]

    @property
    def _memories(self) -> MemoryStore:
        return self._s()[1]

    # -- shared helpers -----------------------------------------------------------------

    @staticmethod
    def _retention(pol: Compiled) -> float | None:
        days = pol.policy.memory.retention_days
        return None if days is None else days * 86400.0

    def _oldest(self, pol: Compiled) -> float | None:
        ttl = self._retention(pol)
        return None if ttl is None else time.time() - ttl

    def _govern(self, call: _Call, where: str, data: bytes, pol: Compiled
                ) -> tuple[bytes, list[list[Any]], list[str], dict[str, int]]:
        self.g._audit_ready()
        decision, _scanned = self.g._govern_bytes(where, data, pol)
        call.event.labels = list(decision.labels)
        call.event.decision = ("redact" if decision.redacted else
                               "tag" if decision.labels else "allow")
        spans = [list(s) for s in decision.spans]
        return decision.content, spans, list(decision.labels), dict(decision.redacted)

    def _session_for(self, p: Principal, pol: Compiled, sid: str) -> SessionMeta:
        meta = self._sessions.meta(p.tenant, sid)
        if meta.owner != p.agent and not pol.policy.memory.share_sessions:
            # indistinguishable from an unknown handle: handles of others do not leak
            raise NotFound(f"session {sid} not found (it may have expired under the tenant's "
                           "retention); omit the session to start a new one")
        return meta

    # -- sessions -----------------------------------------------------------------------

    def session_append(self, p: Principal, session: str | None, role: str, content: str
                       ) -> AppendResult:
        size = len(content.encode("utf-8", "replace")) if isinstance(content, str) else 0
        return self.g._run(p, "session_append", None,
                           lambda c: self._append(p, c, session, role, content), size)

    async def asession_append(self, p: Principal, session: str | None, role: str,
                              content: str) -> AppendResult:
        size = len(content.encode("utf-8", "replace")) if isinstance(content, str) else 0
        return await self.g._arun(p, "session_append", None,
                                  lambda c: self._append(p, c, session, role, content), size)

    def _append(self, p: Principal, call: _Call, session: str | None, role: str,
                content: str) -> AppendResult:
        if session is not None:
            call.event.path = f"session:{str(session)[:40]}"
            check_session(session)
        if role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}; got {role!r}")
        data = _text(content, "content", MAX_TURN_BYTES)
        pol = self.g.policy(p)
        ttl = self._retention(pol)
        meta = self._session_for(p, pol, session) if session is not None else None
        where = f"session {session}" if session else "a new session"
        stored, spans, labels, redacted = self._govern(call, where, data, pol)
        created = meta is None
        if meta is None:
            meta = self._sessions.create(p.tenant, p.agent, ttl)
            call.event.path = f"session:{meta.sid}"
        turn = self._sessions.append(p.tenant, meta, role, stored, spans, labels, ttl)
        call.event.bytes = len(stored)
        return AppendResult(meta.sid, turn.seq, created, count_tokens(stored.decode("utf-8")),
                            labels, redacted)

    def session_context(self, p: Principal, session: str, max_tokens: int) -> ContextResult:
        return self.g._run(p, "session_context", f"session:{str(session)[:40]}",
                           lambda c: self._context(p, c, session, max_tokens))

    async def asession_context(self, p: Principal, session: str, max_tokens: int
                               ) -> ContextResult:
        return await self.g._arun(p, "session_context", f"session:{str(session)[:40]}",
                                  lambda c: self._context(p, c, session, max_tokens))

    def _context(self, p: Principal, call: _Call, session: str, max_tokens: int
                 ) -> ContextResult:
        call.event.path = f"session:{str(session)[:40]}"
        check_session(session)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or \
                not 1 <= max_tokens <= MAX_CONTEXT_TOKENS:
            raise InvalidArgument(f"max_tokens must be an integer from 1 to "
                                  f"{MAX_CONTEXT_TOKENS}, got {max_tokens!r}")
        pol = self.g.policy(p)
        self._session_for(p, pol, session)
        picked: list[ContextTurn] = []
        used = 0
        omitted = 0
        labels: set[str] = set()
        masked_any: set[str] = set()
        oldest = self._oldest(pol)
        turns = self._sessions.latest(p.tenant, session, oldest=oldest)

        def older(seq: int) -> int:  # live turns from ``seq`` down
            return self._sessions.count_upto(p.tenant, session, seq, oldest)

        for t in turns:
            data, masked = mask(t.content, 0, t.spans, p.role, pol)
            text = data.decode("utf-8", "replace")
            n = count_tokens(text)
            # room for the marker in case this is not the oldest turn (an upper bound: the
            # marker's number can only be smaller than this turn's sequence number)
            reserve = count_tokens(_marker(t.seq)) if t.seq > 1 else 0
            if used + n + reserve <= max_tokens:
                picked.append(ContextTurn(t.seq, t.role, text, t.ts, n, masked))
            elif not picked:  # the newest turn alone is too long: keep its end
                tail, n = tail_within(text, max_tokens - reserve if max_tokens > reserve
                                      else max_tokens)
                if not tail:
                    omitted = older(t.seq)
                    break
                picked.append(ContextTurn(t.seq, t.role, tail, t.ts, n, masked, True))
            else:
                omitted = older(t.seq)  # this one and every older one
                break
            used += n
            labels.update(t.labels)
            masked_any.update(masked)
            if picked[-1].truncated:
                omitted = older(t.seq - 1)
                break
        picked.reverse()
        marker = None
        if omitted:
            marker = _marker(omitted)
            cost = count_tokens(marker)
            if used + cost <= max_tokens:
                used += cost
            else:
                marker = None  # a budget smaller than the marker itself gets just the turns
        call.event.labels = sorted(labels)
        call.event.bytes = sum(len(x.content.encode()) for x in picked)
        if masked_any:
            call.event.decision = "masked"
        return ContextResult(session, picked, used, omitted, marker)

    def list_sessions(self, p: Principal, limit: int = 100) -> list[SessionMeta]:
        return self.g._run(p, "list_sessions", None, lambda c: self._list(p, c, limit))

    async def alist_sessions(self, p: Principal, limit: int = 100) -> list[SessionMeta]:
        return await self.g._arun(p, "list_sessions", None, lambda c: self._list(p, c, limit))

    def _list(self, p: Principal, call: _Call, limit: int) -> list[SessionMeta]:
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
            raise InvalidArgument(f"limit must be an integer from 1 to 1000, got {limit!r}")
        pol = self.g.policy(p)
        owner = None if pol.policy.memory.share_sessions else p.agent
        return self._sessions.list(p.tenant, owner, self._oldest(pol))[:limit]

    # -- memories -----------------------------------------------------------------------

    def remember(self, p: Principal, content: str, tags: list[str] | None = None,
                 key: str | None = None, shared: bool = False
                 ) -> tuple[Memory, bool, dict[str, int]]:
        size = len(content.encode("utf-8", "replace")) if isinstance(content, str) else 0
        return self.g._run(p, "remember", None,
                           lambda c: self._remember(p, c, content, tags, key, shared), size)

    async def aremember(self, p: Principal, content: str, tags: list[str] | None = None,
                        key: str | None = None, shared: bool = False
                        ) -> tuple[Memory, bool, dict[str, int]]:
        size = len(content.encode("utf-8", "replace")) if isinstance(content, str) else 0
        return await self.g._arun(p, "remember", None,
                                  lambda c: self._remember(p, c, content, tags, key, shared),
                                  size)

    def _scope(self, p: Principal, pol: Compiled, shared: bool) -> str:
        if shared:
            if not pol.policy.memory.shared_memories:
                raise Forbidden(f"tenant {p.tenant}'s policy does not allow shared memories "
                                "(memory.shared_memories is false); remember it privately")
            return "shared"
        return f"agent:{p.agent}"

    @staticmethod
    def _key(key: Any) -> str | None:
        if key is None:
            return None
        if not isinstance(key, str) or not 1 <= len(key) <= 200 or "\x00" in key:
            raise InvalidArgument("key must be a string of 1-200 characters without NUL")
        return key

    def _remember(self, p: Principal, call: _Call, content: str, tags: list[str] | None,
                  key: str | None, shared: bool) -> tuple[Memory, bool, dict[str, int]]:
        data = _text(content, "content", MAX_MEMORY_BYTES)
        tag_list = _tags(tags)
        key = self._key(key)
        pol = self.g.policy(p)
        scope = self._scope(p, pol, bool(shared))
        stored, spans, labels, redacted = self._govern(call, "a memory", data, pol)
        m, updated = self._memories.put(p.tenant, scope, stored, tag_list, key, spans, labels,
                                       self._retention(pol))
        call.event.path = f"memory:{m.mid}"
        call.event.bytes = len(stored)
        return m, updated, redacted

    def recall(self, p: Principal, query: str, tags: list[str] | None = None, limit: int = 5
               ) -> list[RecalledMemory]:
        return self.g._run(p, "recall", None, lambda c: self._recall(p, c, query, tags, limit))

    async def arecall(self, p: Principal, query: str, tags: list[str] | None = None,
                      limit: int = 5) -> list[RecalledMemory]:
        return await self.g._arun(p, "recall", None,
                                  lambda c: self._recall(p, c, query, tags, limit))

    def _recall(self, p: Principal, call: _Call, query: str, tags: list[str] | None,
                limit: int) -> list[RecalledMemory]:
        if not isinstance(query, str) or len(query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"query must be a string of at most {MAX_QUERY_CHARS} "
                                  "characters")
        tag_list = _tags(tags)
        if not query.strip() and not tag_list:
            raise InvalidArgument("give a query, tags, or both")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100:
            raise InvalidArgument(f"limit must be an integer from 1 to 100, got {limit!r}")
        pol = self.g.policy(p)
        scopes = [f"agent:{p.agent}", "shared"]
        hits = self._memories.recall(p.tenant, scopes, query, tag_list, limit, self._oldest(pol))
        out: list[RecalledMemory] = []
        labels: set[str] = set()
        any_masked = False
        for m, score in hits:
            data, masked = mask(m.content, 0, m.spans, p.role, pol)
            out.append(RecalledMemory(m, data.decode("utf-8", "replace"), round(score, 4),
                                      masked))
            labels.update(m.labels)
            any_masked = any_masked or bool(masked)
        call.event.labels = sorted(labels)
        call.event.bytes = sum(len(r.content.encode()) for r in out)
        if any_masked:
            call.event.decision = "masked"
        return out

    def forget(self, p: Principal, id: str | None = None, key: str | None = None,
               shared: bool = False) -> Memory:
        return self.g._run(p, "forget", None, lambda c: self._forget(p, c, id, key, shared))

    async def aforget(self, p: Principal, id: str | None = None, key: str | None = None,
                      shared: bool = False) -> Memory:
        return await self.g._arun(p, "forget", None,
                                  lambda c: self._forget(p, c, id, key, shared))

    def _forget(self, p: Principal, call: _Call, mid: str | None, key: str | None,
                shared: bool) -> Memory:
        if (mid is None) == (key is None):
            raise InvalidArgument("give exactly one of id or key")
        pol = self.g.policy(p)
        mine = f"agent:{p.agent}"
        if mid is not None:
            call.event.path = f"memory:{str(mid)[:40]}"
            m = self._memories.get(p.tenant, check_memory_id(mid))
        else:
            scope = "shared" if shared else mine
            m = self._memories.by_key(p.tenant, scope, self._key(key) or "")
        if m is None or m.scope not in (mine, "shared"):
            raise NotFound("no such memory (it may have been forgotten or expired); recall "
                           "to find the right id")
        oldest = self._oldest(pol)
        if oldest is not None and m.updated < oldest:
            raise NotFound("no such memory (it expired under the tenant's retention)")
        call.event.path = f"memory:{m.mid}"
        self._memories.delete(p.tenant, m)
        return m


__all__ = ["AppendResult", "ContextResult", "ContextTurn", "MemoryDoor", "RecalledMemory"]

"""Session turns and memories over the KV tier: the data model, with no policy in it.

Key layout in a tenant's KV namespace (agents never choose keys; handles are minted here):

- ``ses/{sid}``                 session meta: owner agent, created
- ``ses/{sid}/n``               turn counter (``incr``: concurrent appends never collide)
- ``ses/{sid}/t/{seq:012d}``    one turn: role, content (as stored after policy), spans
- ``own/{agent}/{sid}``         the agent's session index (last activity), for listing
- ``mem/{mid}``                 one memory: scope, key, content, tags, spans, times
- ``memkey/{scope}/{key}``      the memory id behind an agent-chosen key (upserts)
- ``memver``                    bumped on every memory change: index caches revalidate

A turn or memory is acknowledged only after the KV write that holds it has committed, so a
killed process never loses an acknowledged append. TTLs carry retention.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument, NotFound
from .kv import KVStore

SESSION_RE = re.compile(r"^ses_[a-z2-7]{26}$")
MEMORY_RE = re.compile(r"^mem_[a-z2-7]{26}$")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def _handle(prefix: str) -> str:
    n = secrets.randbits(130)
    return prefix + "".join(_B32[(n >> (5 * i)) & 31] for i in range(26))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def check_session(sid: str) -> str:
    if not isinstance(sid, str) or not SESSION_RE.match(sid):
        raise InvalidArgument(
            f"session handle {str(sid)[:40]!r} is not one this server minted (they look like "
            "'ses_' + 26 letters/digits); omit it to start a new session")
    return sid


def check_memory_id(mid: str) -> str:
    if not isinstance(mid, str) or not MEMORY_RE.match(mid):
        raise InvalidArgument(f"memory id {str(mid)[:40]!r} is malformed (ids look like "
                              "'mem_' + 26 letters/digits); pass the id recall returned")
    return mid


@dataclass
class Turn:
    seq: int
    role: str
    content: bytes  # as stored (after redaction), UTF-8
    ts: float
    spans: list[list[Any]] = field(default_factory=list)  # byte offsets, tagged labels
    labels: list[str] = field(default_factory=list)


@dataclass
class SessionMeta:
    sid: str
    owner: str
    created: float
    last: float = 0.0
    turns: int = 0


class SessionStore:
    """Append-only turn logs per session. Thread-safe (the KV store is)."""

    def __init__(self, kv: KVStore) -> None:
        self.kv = kv

    def create(self, ns: str, owner: str, ttl: float | None) -> SessionMeta:
        sid = _handle("ses_")
        now = time.time()
        self.kv.put_many(ns, [(f"ses/{sid}", _dumps({"owner": owner, "created": now})),
                              (f"own/{owner}/{sid}", _dumps({"last": now}))], ttl)
        return SessionMeta(sid, owner, now, now, 0)

    def meta(self, ns: str, sid: str) -> SessionMeta:
        raw = self.kv.get(ns, f"ses/{check_session(sid)}")
        if raw is None:
            raise NotFound(f"session {sid} not found (it may have expired under the tenant's "
                           "retention); omit the session to start a new one")
        d = json.loads(raw)
        return SessionMeta(sid, d["owner"], d["created"])

    def append(self, ns: str, meta: SessionMeta, role: str, content: bytes,
               spans: list[list[Any]], labels: list[str], ttl: float | None) -> Turn:
        seq = self.kv.incr(ns, f"ses/{meta.sid}/n")
        now = time.time()
        rec = {"role": role, "content": content.decode("utf-8"), "ts": now}
        if spans:
            rec["spans"] = spans
        if labels:
            rec["labels"] = labels
        items = [(f"ses/{meta.sid}/t/{seq:012d}", _dumps(rec)),
                 (f"own/{meta.owner}/{meta.sid}", _dumps({"last": now, "turns": seq}))]
        if ttl is not None:  # retention counts from the last activity
            items.append((f"ses/{meta.sid}", _dumps({"owner": meta.owner,
                                                      "created": meta.created})))
        self.kv.put_many(ns, items, ttl)
        return Turn(seq, role, content, now, spans, labels)

    def latest(self, ns: str, sid: str, *, batch: int = 32, oldest: float | None = None
               ) -> Any:
        """Turns newest first (a generator), stopping at expired or retention-aged turns."""
        raw = self.kv.get(ns, f"ses/{sid}/n")
        top = int(raw) if raw else 0
        seq = top
        while seq > 0:
            lo = max(0, seq - batch)
            keys = [f"ses/{sid}/t/{s:012d}" for s in range(seq, lo, -1)]
            values = self.kv.get_many(ns, keys)
            if all(v is None for v in values):
                return
            for s, v in zip(range(seq, lo, -1), values, strict=True):
                if v is None:
                    continue  # a crash between incr and put leaves a gap; nothing acked
                d = json.loads(v)
                if oldest is not None and d["ts"] < oldest:
                    return
                yield Turn(s, d["role"], d["content"].encode("utf-8"), d["ts"],
                           d.get("spans") or [], d.get("labels") or [])
            seq = lo

    def count_upto(self, ns: str, sid: str, seq: int, oldest: float | None = None,
                   batch: int = 256) -> int:
        """Live turns numbered ``seq`` or lower (crash gaps and expired turns excluded)."""
        if seq <= 0:
            return 0
        if oldest is None:  # no retention cut-off to check per turn: count keys
            return self.kv.count_range(ns, f"ses/{sid}/t/{0:012d}", f"ses/{sid}/t/{seq:012d}")
        n = 0
        while seq > 0:
            lo = max(0, seq - batch)
            values = self.kv.get_many(ns, [f"ses/{sid}/t/{s:012d}" for s in range(seq, lo, -1)])
            for v in values:
                if v is None:
                    continue
                if oldest is not None and json.loads(v)["ts"] < oldest:
                    return n
                n += 1
            if all(v is None for v in values):
                return n
            seq = lo
        return n

    def list(self, ns: str, owner: str | None, oldest: float | None = None
             ) -> list[SessionMeta]:
        """Sessions of ``owner`` (or of every agent when None), most recent first."""
        out: list[SessionMeta] = []
        if owner is not None:
            rows = [(f"own/{owner}/", k, v) for k, v in self.kv.scan(ns, f"own/{owner}/")]
        else:
            rows = [(k[: k.rindex("/") + 1], k, v) for k, v in self.kv.scan(ns, "own/")]
        for pre, k, v in rows:
            d = json.loads(v)
            if oldest is not None and d["last"] < oldest:
                continue
            owner_name = pre[len("own/"):-1]
            out.append(SessionMeta(k[len(pre):], owner_name, 0.0, d["last"],
                                   int(d.get("turns", 0))))
        out.sort(key=lambda m: m.last, reverse=True)
        return out


# -- memories ---------------------------------------------------------------------------

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOP_WORDS = (
    "a an and are as at be but by for from has have i in is it its of on or that the this to "
    "was were will with we you your our my me what which who when where how do does did")
_STOP = frozenset(_STOP_WORDS.split())


def terms(text: str) -> list[str]:
    """Search terms: lowercase words without stopwords, light plural folding."""
    out = []
    for w in _WORD.findall(text.lower()):
        if w in _STOP:
            continue
        if len(w) > 4 and w.endswith("ies"):
            w = w[:-3] + "y"
        elif len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
            w = w[:-1]
        out.append(w)
    return out


@dataclass
class Memory:
    mid: str
    scope: str  # 'agent:<name>' (private) or 'shared'
    content: bytes
    tags: list[str]
    key: str | None
    created: float
    updated: float
    spans: list[list[Any]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"scope": self.scope, "content": self.content.decode("utf-8"),
                             "tags": self.tags, "created": self.created,
                             "updated": self.updated}
        if self.key is not None:
            d["key"] = self.key
        if self.spans:
            d["spans"] = self.spans
        if self.labels:
            d["labels"] = self.labels
        return _dumps(d)

    @classmethod
    def from_json(cls, mid: str, raw: bytes) -> Memory:
        d = json.loads(raw)
        return cls(mid, d["scope"], d["content"].encode("utf-8"), d.get("tags") or [],
                   d.get("key"), d["created"], d["updated"], d.get("spans") or [],
                   d.get("labels") or [])


@dataclass
class _Doc:
    scope: str
    tf: Counter[str]
    length: int
    updated: float
    tags: frozenset[str]


class _Index:
    """BM25 statistics of one tenant's memories, rebuilt when ``memver`` moves."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.docs: dict[str, _Doc] = {}
        self.df: Counter[str] = Counter()
        self.total_len = 0

    def add(self, m: Memory) -> None:
        self.remove(m.mid)
        tf = Counter(terms(m.content.decode("utf-8", "replace") + " " + " ".join(m.tags)))
        doc = _Doc(m.scope, tf, sum(tf.values()), m.updated, frozenset(m.tags))
        self.docs[m.mid] = doc
        self.df.update(tf.keys())
        self.total_len += doc.length

    def remove(self, mid: str) -> None:
        doc = self.docs.pop(mid, None)
        if doc is not None:
            self.df.subtract(doc.tf.keys())
            self.total_len -= doc.length


RECENCY_WEIGHT = 0.25  # a memory written now scores up to 25% above an old equal match
RECENCY_HALF_LIFE = 7 * 86400.0  # seconds for the recency boost to halve
BM25_K1, BM25_B = 1.2, 0.75


class MemoryStore:
    """Memories with key upserts and BM25 recall. Thread-safe."""

    def __init__(self, kv: KVStore) -> None:
        self.kv = kv
        self._idx: dict[str, _Index] = {}
        self._lock = threading.Lock()

    def get(self, ns: str, mid: str) -> Memory | None:
        raw = self.kv.get(ns, f"mem/{check_memory_id(mid)}")
        return None if raw is None else Memory.from_json(mid, raw)

    def by_key(self, ns: str, scope: str, key: str) -> Memory | None:
        mid = self.kv.get(ns, f"memkey/{scope}/{key}")
        return None if mid is None else self.get(ns, mid.decode())

    def put(self, ns: str, scope: str, content: bytes, tags: list[str], key: str | None,
            spans: list[list[Any]], labels: list[str], ttl: float | None) -> tuple[Memory, bool]:
        """Store a memory (replacing the one under ``key`` in ``scope``); (memory, updated)."""
        now = time.time()
        for _attempt in range(16):
            old_mid = self.kv.get(ns, f"memkey/{scope}/{key}") if key is not None else None
            old = self.get(ns, old_mid.decode()) if old_mid is not None else None
            mid = old.mid if old is not None else _handle("mem_")
            m = Memory(mid, scope, content, sorted(set(tags)), key,
                       old.created if old is not None else now, now, spans, labels)
            # claim the key first (CAS): two agents upserting one key agree on one id
            if key is not None and old is None and not self.kv.cas(
                    ns, f"memkey/{scope}/{key}", old_mid, mid.encode(), ttl):
                continue
            self.kv.put(ns, f"mem/{mid}", m.to_json(), ttl)
            if key is not None and ttl is not None:
                self.kv.put(ns, f"memkey/{scope}/{key}", mid.encode(), ttl)
            self._changed(ns, add=m)
            return m, old is not None
        raise InvalidArgument(f"memory key {key!r} is being changed concurrently; retry")

    def delete(self, ns: str, m: Memory) -> None:
        self.kv.delete(ns, f"mem/{m.mid}")
        if m.key is not None:
            self.kv.cas(ns, f"memkey/{m.scope}/{m.key}", m.mid.encode(), None)
        self._changed(ns, remove=m.mid)

    def _changed(self, ns: str, add: Memory | None = None, remove: str | None = None) -> None:
        v = self.kv.incr(ns, "memver")
        with self._lock:
            idx = self._idx.get(ns)
            if idx is not None and idx.version == v - 1:  # nobody else changed it meanwhile
                if add is not None:
                    idx.add(add)
                if remove is not None:
                    idx.remove(remove)
                idx.version = v
            else:
                self._idx.pop(ns, None)

    def _index(self, ns: str) -> _Index:
        raw = self.kv.get(ns, "memver")
        v = int(raw) if raw else 0
        with self._lock:
            idx = self._idx.get(ns)
            if idx is not None and idx.version == v:
                return idx
        idx = _Index(v)
        for k, val in self.kv.scan(ns, "mem/"):
            idx.add(Memory.from_json(k[4:], val))
        with self._lock:
            self._idx[ns] = idx
        return idx

    def recall(self, ns: str, scopes: Sequence[str], query: str, tags: Sequence[str] = (),
               limit: int = 5, oldest: float | None = None) -> list[tuple[Memory, float]]:
        """Best matches among memories in ``scopes``: BM25 times a recency boost."""
        idx = self._index(ns)
        want = set(scopes)
        need = frozenset(tags)
        q = Counter(terms(query))
        n = max(1, len(idx.docs))
        avg = (idx.total_len / n) or 1.0
        now = time.time()
        scored: list[tuple[float, str]] = []
        for mid, d in idx.docs.items():
            if d.scope not in want or not need <= d.tags:
                continue
            if oldest is not None and d.updated < oldest:
                continue
            s = 0.0
            for t, qn in q.items():
                f = d.tf.get(t)
                if not f:
                    continue
                df = idx.df.get(t, 0)
                idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
                s += qn * idf * f * (BM25_K1 + 1) / (f + BM25_K1 * (1 - BM25_B + BM25_B
                                                                   * d.length / avg))
            if not q:
                s = 1.0  # no query terms: tags (or nothing) select, recency orders
            if s <= 0:
                continue
            age = max(0.0, now - d.updated)
            s *= 1.0 + RECENCY_WEIGHT * 0.5 ** (age / RECENCY_HALF_LIFE)
            scored.append((s, mid))
        scored.sort(reverse=True)
        out: list[tuple[Memory, float]] = []
        for s, mid in scored:
            m = self.get(ns, mid)
            if m is None:  # expired or forgotten elsewhere since the index was built
                continue
            out.append((m, s))
            if len(out) >= limit:
                break
        return out


__all__ = ["Memory", "MemoryStore", "SessionMeta", "SessionStore", "Turn", "check_memory_id",
           "check_session", "terms"]

"""Context-memory tools: sessions (append, context within a token budget, list) and
memories (remember, recall, forget).

Content is governed like a file write: classified on the way in (tagged, redacted or
refused per the tenant's PII policy), masked on the way out for roles not cleared for its
labels, QoS-admitted and audited. Sessions are the calling agent's own unless the tenant's
policy shares them; memories are private unless written ``shared``. Handles (``ses_…``,
``mem_…``) are minted by the server: pass back the one a call returned.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .common import governed_tool, iso
from .registry import ToolContext

SessionArg = Annotated[str, Field(
    description="Session handle from an earlier session_append (starts with 'ses_')",
    min_length=1, max_length=64)]
TagsArg = Annotated[list[Annotated[str, Field(max_length=64)]] | None, Field(
    description="Tags: 1-64 characters each of letters, digits, _ . : / -; at most 16",
    max_length=16)]


class SessionAppendResult(BaseModel):
    session: str = Field(description="The session handle; pass it to later calls")
    created: bool = Field(description="True when this call started the session")
    seq: int = Field(description="Turn number within the session (1 for the first)")
    tokens: int = Field(description="Tokens in the stored turn (Lodestore's count)")
    labels: list[str] = Field(description="PII entity types found in the content")
    redacted: dict[str, int] = Field(description="Entity type -> values removed before storing")


@governed_tool(
    "session_append",
    "Append one turn (role + content) to a conversation session so it survives restarts. "
    "Omit `session` to start a new session: the reply carries its handle. Content is checked "
    "for PII under your tenant's policy (tagged, redacted or refused). Use session_context "
    "to get the session back within a token budget.",
    read_only=False, title="Append to session")
async def session_append(
    ctx: ToolContext,
    content: Annotated[str, Field(description="The turn's text (up to 256 KiB UTF-8)",
                                  min_length=1, max_length=262144)],
    role: Annotated[Literal["user", "assistant", "system", "tool"], Field(
        description="Who spoke this turn")] = "user",
    session: Annotated[str | None, Field(
        description="Session handle from an earlier call; omit to start a new session",
        max_length=64)] = None,
) -> SessionAppendResult:
    r = await ctx.gateway.memory.asession_append(ctx.principal, session, role, content)
    return SessionAppendResult(session=r.session, created=r.created, seq=r.seq,
                               tokens=r.tokens, labels=r.labels, redacted=r.redacted)


class TurnOut(BaseModel):
    seq: int = Field(description="Turn number within the session")
    role: str
    content: str
    time: str | None = Field(description="When the turn was appended, ISO 8601 UTC")
    tokens: int
    truncated: bool = Field(description="True when only the end of this turn fit the budget")
    masked: list[str] = Field(description="Entity types masked ('*') for your role")


class SessionContextResult(BaseModel):
    session: str
    turns: list[TurnOut] = Field(description="The most recent turns that fit, oldest first")
    tokens: int = Field(description="Tokens returned (turn contents plus the marker); never "
                                    "more than max_tokens")
    omitted: int = Field(description="Number of older turns left out to fit the budget")
    marker: str | None = Field(description="Text to put before the turns when older turns "
                                           "were left out, e.g. '[12 earlier turns omitted]'")


@governed_tool(
    "session_context",
    "Get a session's most recent turns that fit in `max_tokens` (oldest first), with a "
    "marker saying how many older turns were left out. Use it to rebuild your context after "
    "a restart. Tokens are counted by Lodestore's documented approximation of BPE tokenizers.",
    read_only=True, idempotent=True, title="Session context")
async def session_context(
    ctx: ToolContext,
    session: SessionArg,
    max_tokens: Annotated[int, Field(description="Token budget for the reply's turns",
                                     ge=1, le=1_000_000)] = 4000,
) -> SessionContextResult:
    r = await ctx.gateway.memory.asession_context(ctx.principal, session, max_tokens)
    return SessionContextResult(
        session=r.session, tokens=r.tokens, omitted=r.omitted, marker=r.marker,
        turns=[TurnOut(seq=t.seq, role=t.role, content=t.content, time=iso(t.ts),
                       tokens=t.tokens, truncated=t.truncated, masked=t.masked)
               for t in r.turns])


class SessionOut(BaseModel):
    session: str
    owner: str = Field(description="Agent that started the session")
    turns: int
    last_activity: str | None = Field(description="Time of the last append, ISO 8601 UTC")


class ListSessionsResult(BaseModel):
    sessions: list[SessionOut] = Field(description="Most recently active first")


@governed_tool(
    "list_sessions",
    "List your sessions (and, where your tenant's policy shares sessions, your colleagues'), "
    "most recently active first, with their handles and turn counts.",
    read_only=True, idempotent=True, title="List sessions")
async def list_sessions(
    ctx: ToolContext,
    limit: Annotated[int, Field(description="At most this many sessions", ge=1, le=1000)] = 100,
) -> ListSessionsResult:
    rows = await ctx.gateway.memory.alist_sessions(ctx.principal, limit)
    return ListSessionsResult(sessions=[
        SessionOut(session=m.sid, owner=m.owner, turns=m.turns, last_activity=iso(m.last))
        for m in rows])


class MemoryOut(BaseModel):
    id: str = Field(description="Memory id (starts with 'mem_'); use it with forget")
    key: str | None = Field(description="The key it was stored under, if any")
    content: str
    tags: list[str]
    shared: bool = Field(description="True for a tenant-shared memory")
    created: str | None
    updated: str | None
    masked: list[str] = Field(default_factory=list,
                              description="Entity types masked ('*') for your role")
    score: float | None = Field(None, description="Relevance (BM25 with a recency boost)")


class RememberResult(BaseModel):
    memory: MemoryOut
    updated: bool = Field(description="True when an existing memory with this key was replaced")
    labels: list[str] = Field(description="PII entity types found in the content")
    redacted: dict[str, int] = Field(description="Entity type -> values removed before storing")


@governed_tool(
    "remember",
    "Store a fact or note for later recall. With `key`, replaces the memory stored under "
    "that key (an upsert). Private to you unless `shared` is true (visible to every agent "
    "of your tenant, if policy allows). Content is checked for PII under your tenant's policy.",
    read_only=False, idempotent=False, title="Remember")
async def remember(
    ctx: ToolContext,
    content: Annotated[str, Field(description="What to remember (up to 64 KiB UTF-8)",
                                  min_length=1, max_length=65536)],
    tags: TagsArg = None,
    key: Annotated[str | None, Field(description="Optional stable key: remembering again with "
                                                 "the same key replaces the memory",
                                     min_length=1, max_length=200)] = None,
    shared: Annotated[bool, Field(description="Share with every agent of your tenant")] = False,
) -> RememberResult:
    m, updated, redacted = await ctx.gateway.memory.aremember(ctx.principal, content, tags,
                                                             key, shared)
    return RememberResult(memory=_out(m, m.content.decode("utf-8", "replace")),
                          updated=updated, labels=list(m.labels), redacted=redacted)


def _out(m: Any, content: str, masked: list[str] | None = None,
         score: float | None = None) -> MemoryOut:
    return MemoryOut(id=m.mid, key=m.key, content=content, tags=list(m.tags),
                     shared=m.scope == "shared", created=iso(m.created), updated=iso(m.updated),
                     masked=masked or [], score=score)


class RecallResult(BaseModel):
    memories: list[MemoryOut] = Field(description="Best matches first")


@governed_tool(
    "recall",
    "Find your memories (and tenant-shared ones) relevant to a query: full-text BM25 "
    "ranking with a boost for recent memories. Filter by tags (a memory must carry all of "
    "them). An empty query with tags lists the tagged memories, newest first.",
    read_only=True, idempotent=True, title="Recall")
async def recall(
    ctx: ToolContext,
    query: Annotated[str, Field(description="What you are looking for, in words",
                                max_length=2000)] = "",
    tags: TagsArg = None,
    limit: Annotated[int, Field(description="At most this many memories", ge=1, le=100)] = 5,
) -> RecallResult:
    hits = await ctx.gateway.memory.arecall(ctx.principal, query, tags, limit)
    return RecallResult(memories=[_out(h.memory, h.content, h.masked, h.score) for h in hits])


class ForgetResult(BaseModel):
    forgotten: MemoryOut


@governed_tool(
    "forget",
    "Delete one memory, by the id recall or remember returned, or by its key (with "
    "`shared` true for a tenant-shared key).",
    read_only=False, destructive=True, idempotent=False, title="Forget")
async def forget(
    ctx: ToolContext,
    id: Annotated[str | None, Field(description="Memory id (mem_…)", max_length=64)] = None,
    key: Annotated[str | None, Field(description="Key the memory was stored under",
                                     min_length=1, max_length=200)] = None,
    shared: Annotated[bool, Field(description="The key names a tenant-shared memory")] = False,
) -> ForgetResult:
    m = await ctx.gateway.memory.aforget(ctx.principal, id, key, shared)
    return ForgetResult(forgotten=_out(m, "", None))


__all__ = ["forget", "list_sessions", "recall", "remember", "session_append",
           "session_context"]

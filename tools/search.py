"""Full-text search: ranked hits with snippets (BM25 on SQLite FTS5, cover density on
PostgreSQL), governed for the caller.

The index (``governance.search``) holds every file's text with all PII spans masked, so a
PII value can never be found by search. This tool then keeps only hits on paths the
caller's role may read, and builds each snippet from the caller's own gateway read around
the match (masked for the caller's role, audited as a read), so neither snippets nor
highlights show anything the caller could not read with read_file.
"""

import re
from typing import Annotated, Literal

import anyio
from pydantic import BaseModel, Field

from governance.search import Hit, Match, SearchIndex, build_match
from storage import paths
from storage.errors import NotFound, StorageError

from .common import governed_tool, iso, parse_time, report
from .files import search_index
from .registry import ToolContext, ToolError

WINDOW_BYTES = 1024  # read around a match for its snippet
BEFORE_BYTES = 320
SNIPPET_BEFORE = 80  # characters of context before the first highlighted term
SNIPPET_AFTER = 160
BATCH = 100
MAX_SCANNED = 2000  # index hits looked at per call (many may be unreadable for the role)
ENTITY = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
_WORDCH = r"[^\W_]"  # FTS5's unicode61 tokenizer splits on '_' too


class SearchHitModel(BaseModel):
    path: str
    score: float = Field(description="Relevance, higher is better (BM25 on the embedded "
                                     "store, cover density on PostgreSQL)")
    snippet: str = Field(description="Text around the match as your role may read it; "
                                     "matched words are wrapped in « »")
    snippet_offset: int = Field(description="Byte offset in the file near which the snippet "
                                            "was read (pass to read_file to read on)")
    version: int = Field(description="Current version of the file")
    modified: str | None
    labels: list[str] = Field(description="PII entity types the file holds")
    masked: list[str] = Field(description="Entity types masked in the snippet for your role")
    stale: bool = Field(description="True when the file changed after it was indexed; it is "
                                    "being re-indexed")


class SearchResult(BaseModel):
    query: str
    results: list[SearchHitModel]
    more: bool = Field(description="True when more hits may exist (raise limit or narrow "
                                   "the query)")
    pending: int = Field(description="Files of your store still waiting to be indexed (large "
                                     "or just written elsewhere); they are not searchable yet")


def _pattern(match: Match) -> re.Pattern[str]:
    alts = []
    for word, prefix in match.terms:
        alts.append(re.escape(word) + (_WORDCH + "*" if prefix else f"(?!{_WORDCH})"))
    return re.compile(f"(?<!{_WORDCH})(?:" + "|".join(alts) + ")", re.IGNORECASE)


def _snippet_text(text: str, pat: re.Pattern[str]) -> tuple[str, bool]:
    m = pat.search(text)
    if m is None:
        s, e = 0, min(len(text), SNIPPET_BEFORE + SNIPPET_AFTER)
    else:
        s = max(0, m.start() - SNIPPET_BEFORE)
        e = min(len(text), m.end() + SNIPPET_AFTER)
    piece = text[s:e]
    marked = pat.sub(lambda mm: f"«{mm.group(0)}»", piece)
    marked = re.sub(r"\s+", " ", marked).strip()
    return ("…" if s > 0 else "") + marked + ("…" if e < len(text) else ""), m is not None


async def _hit(ctx: ToolContext, idx: SearchIndex, h: Hit, match: Match,
               pat: re.Pattern[str]) -> SearchHitModel | None:
    gw, p = ctx.gateway, ctx.principal
    hint = await anyio.to_thread.run_sync(idx.locate, h.id, match.terms)
    start = max(0, (hint or 0) - BEFORE_BYTES)
    try:
        res = await gw.aread(p, h.path, start, WINDOW_BYTES)
        text = res.data.decode("utf-8", "ignore")
        snippet, found = _snippet_text(text, pat)
        if not found and start > 0:  # the file moved on since it was indexed: look at its head
            start = 0
            res = await gw.aread(p, h.path, 0, WINDOW_BYTES)
            snippet, found = _snippet_text(res.data.decode("utf-8", "ignore"), pat)
    except NotFound:
        await anyio.to_thread.run_sync(idx.drop, p.tenant, h.path)
        return None
    except StorageError as exc:
        if getattr(exc, "code", "") in ("forbidden", "is_a_directory", "not_a_directory"):
            return None
        raise
    info = res.info
    stale = h.indexed_version != info.version
    if stale:
        await anyio.to_thread.run_sync(idx.ensure, p.tenant, info, p.role)
    labels = sorted((info.attrs or {}).get("labels") or [])
    return SearchHitModel(path=info.path, score=h.score, snippet=snippet, snippet_offset=start,
                          version=info.version, modified=iso(info.mtime), labels=labels,
                          masked=list(res.masked), stale=stale)


@governed_tool(
    "search",
    "Full-text search over the contents of your store's text files, ranked by relevance "
    "(BM25), with a snippet per hit. Words are matched whole and case-insensitively, all "
    "of them by default (match='any' for any); use \"quoted phrases\" and prefix* words. "
    "Filter by path_prefix, by PII labels (files holding any of these entity types, e.g. "
    "['EMAIL_ADDRESS']) and by modified time. PII values themselves are never searchable "
    "and snippets show only what your role may read (masked values appear as '*'). Use "
    "find_files to match file names, read_file to read a hit.",
    read_only=True, idempotent=True, title="Search file contents")
async def search(
    ctx: ToolContext,
    query: Annotated[str, Field(description="Words to find, e.g. 'quarterly budget' or "
                                            "'\"exact phrase\" draft*'",
                                min_length=1, max_length=1000)],
    path_prefix: Annotated[str, Field(description="Only files under this directory",
                                      min_length=1, max_length=4096)] = "/",
    labels: Annotated[list[str] | None, Field(
        description="Only files holding any of these PII entity types",
        max_length=20)] = None,
    modified_after: Annotated[str | None, Field(
        description="Only files modified at or after this time (ISO 8601, e.g. "
                    "'2024-05-01' or '2024-05-01T12:00:00Z')")] = None,
    modified_before: Annotated[str | None, Field(
        description="Only files modified before this time (ISO 8601)")] = None,
    match: Annotated[Literal["all", "any"], Field(
        description="'all' words must occur (default) or 'any' of them")] = "all",
    limit: Annotated[int, Field(description="Maximum hits (1-50)", ge=1, le=50)] = 10,
) -> SearchResult:
    idx = search_index(ctx)
    if idx is None:
        raise ToolError("unavailable", "full-text search is not enabled on this server; use "
                                       "find_files to search by name")
    try:
        m = build_match(query, match)
    except ValueError:
        raise ToolError("invalid_argument", "the query has no words to search for; give "
                                            "letters or digits, e.g. 'budget 2024'") from None
    prefix = paths.normalize(path_prefix)
    for lab in labels or []:
        if not ENTITY.match(lab):
            raise ToolError("invalid_argument", f"label {lab!r} is not an entity type; use "
                                                "names such as EMAIL_ADDRESS or US_SSN")
    after = parse_time(modified_after, "modified_after")
    before = parse_time(modified_before, "modified_before")
    p = ctx.principal
    async with ctx.gateway.audited(p, "search", prefix) as event:
        pol = await anyio.to_thread.run_sync(ctx.gateway.policy, p)
        pat = _pattern(m)
        out: list[SearchHitModel] = []
        seen, offset, more = 0, 0, False
        while len(out) < limit and seen < MAX_SCANNED:
            hits = await anyio.to_thread.run_sync(
                lambda off=offset: idx.query(p.tenant, m, prefix=prefix, labels=labels,
                                             after=after, before=before, limit=BATCH, offset=off))
            offset += len(hits)
            seen += len(hits)
            for i, h in enumerate(hits):
                if not pol.can_read(p.role, h.path):
                    continue  # never shown, never counted: a role learns nothing of these
                hit = await _hit(ctx, idx, h, m, pat)
                if hit is not None:
                    out.append(hit)
                    await report(ctx, len(out), limit, h.path)
                if len(out) >= limit:
                    more = i + 1 < len(hits) or len(hits) == BATCH
                    break
            if len(hits) < BATCH:
                break
        else:
            more = more or seen >= MAX_SCANNED
        event.labels = sorted({lab for h in out for lab in h.labels})
    pending = (await anyio.to_thread.run_sync(idx.stats, p.tenant)).get("pending", 0)
    return SearchResult(query=query, results=out, more=more, pending=pending)


__all__ = ["search", "SearchResult", "SearchHitModel"]

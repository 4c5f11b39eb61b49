"""storage_status: the caller's tenant usage, quotas and limits, and the search index."""

from typing import Any

import anyio
from pydantic import BaseModel, Field

from .common import DEFAULT_MAX_WRITE_BYTES, governed_tool, limit, max_reply_bytes
from .files import search_index
from .registry import ToolContext


class SearchStatus(BaseModel):
    indexed: int = Field(description="Files searchable now")
    pending: int = Field(description="Files waiting to be indexed")
    skipped: int = Field(description="Files not indexed (binary, unreadable)")


class StorageStatusResult(BaseModel):
    tenant: str
    agent: str
    role: str
    bytes: int = Field(description="Bytes stored by this tenant")
    files: int = Field(description="Files stored by this tenant")
    quota_bytes: int | None = Field(description="Byte quota (null: unlimited)")
    quota_files: int | None = Field(description="File quota (null: unlimited)")
    bytes_free: int | None = Field(description="Bytes left under the quota (null: unlimited)")
    files_free: int | None = Field(description="Files left under the quota (null: unlimited)")
    policy_version: int = Field(description="Version of the tenant's policy in force")
    max_reply_bytes: int = Field(description="Largest reply a read returns (page with offsets)")
    max_write_bytes: int = Field(description="Largest content one write_file call may carry")
    redundancy: dict[str, Any] | None = Field(
        None, description="How data is protected (erasure coding k of m), when the server "
                          "reports it")
    search: SearchStatus | None = Field(None, description="Search index of this tenant; null "
                                                          "when search is off")


@governed_tool(
    "storage_status",
    "Your tenant's storage: bytes and files used, quotas and what is left, the policy "
    "version in force, the size limits of reads and writes, and how many files are "
    "searchable or still being indexed. Cheap; call it before large writes.",
    read_only=True, idempotent=True, title="Storage status")
async def storage_status(ctx: ToolContext) -> StorageStatusResult:
    p = ctx.principal
    u: dict[str, Any] = await anyio.to_thread.run_sync(ctx.gateway.usage, p)
    qb, qf = u.get("quota_bytes"), u.get("quota_files")
    idx = search_index(ctx)
    search = None
    if idx is not None:
        s = await anyio.to_thread.run_sync(idx.stats, p.tenant)
        search = SearchStatus(indexed=s.get("indexed", 0), pending=s.get("pending", 0),
                              skipped=s.get("skipped", 0))
    red = u.get("redundancy")
    return StorageStatusResult(
        tenant=p.tenant, agent=p.agent, role=p.role, bytes=int(u.get("bytes") or 0),
        files=int(u.get("files") or 0), quota_bytes=qb, quota_files=qf,
        bytes_free=None if qb is None else max(0, qb - int(u.get("bytes") or 0)),
        files_free=None if qf is None else max(0, qf - int(u.get("files") or 0)),
        policy_version=int(u.get("policy_version") or 0),
        max_reply_bytes=max_reply_bytes(ctx),
        max_write_bytes=int(limit(ctx, "max_write_bytes", DEFAULT_MAX_WRITE_BYTES)),
        redundancy=red if isinstance(red, dict) else None, search=search)


__all__ = ["storage_status", "StorageStatusResult"]

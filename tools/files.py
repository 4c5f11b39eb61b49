"""File tools: read, write, edit, list, inspect, move, delete, make directories, find.

Every tool goes through the gateway with the caller's principal, so paths are relative to
the caller's tenant, the tenant's path rules apply, PII is tagged / redacted / refused on
write and masked on read per the caller's role, and every call is audited. Each result
says what governance did: ``labels`` (entity types the file holds), ``redacted`` (entity
type -> values removed on write) and ``masked`` (entity types hidden from this caller).
"""

import base64
import binascii
import difflib
import functools
from typing import Annotated, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field

from governance.gateway import WriteResult
from governance.search import SearchIndex, index_for
from storage import FileInfo, paths
from storage.errors import VersionMismatch

from .common import (
    DEFAULT_MAX_WRITE_BYTES,
    MiB,
    governance_of,
    governed_tool,
    iso,
    max_reply_bytes,
    report,
    resource_uri,
    tool_error,
)
from .common import limit as limit_of
from .registry import ToolContext, ToolError

# -- shared argument types --------------------------------------------------------------

PathArg = Annotated[str, Field(
    description="Absolute path inside your tenant's store, e.g. '/notes/todo.md'. '/' is the "
                "root. No '..', no backslashes.",
    min_length=1, max_length=4096)]
VersionArg = Annotated[int | None, Field(
    description="Optimistic concurrency: act only if the file is at this version (from "
                "get_file_info / read_file / a previous write); 0 means 'must not exist yet'. "
                "On a mismatch nothing changes and the error says the current version.",
    ge=0)]


def _empty(v: Any) -> bool:
    return not v


# Clients validate every entry of every page against the output schema, at a cost per
# field present (~5 us each with the SDK's jsonschema), so a listing entry carries only what
# it adds: no path (the listed path + name) and no labels when there are none.
class ListEntry(BaseModel):
    """A directory entry (its path is the listed path + '/' + name)."""

    name: str = Field(description="Entry name (last path component)")
    kind: Literal["file", "directory"]
    size: int = Field(description="Size in bytes (0 for directories)")
    version: int = Field(description="Version number; increases on every change")
    modified: str | None = Field(description="Last modification time, ISO 8601 UTC")
    labels: list[str] = Field(default_factory=list, exclude_if=_empty,
                              description="PII entity types found in the file (tagged or "
                                          "redacted on write); absent when none")


class Entry(ListEntry):
    """A file or directory found under a root, with its full path."""

    path: str = Field(description="Absolute path in your tenant's store")


def _entry_fields(info: FileInfo) -> dict[str, Any]:
    """An entry as plain fields: a whole page is validated in one pydantic call, ~3x
    cheaper than a model per entry."""
    attrs = info.attrs
    labels = attrs.get("labels") if attrs else None
    return {"name": info.name or "/", "kind": "directory" if info.is_dir else "file",
            "size": info.size, "version": info.version, "modified": iso(info.mtime),
            "labels": sorted(str(x) for x in labels) if labels else []}


def entry_of(info: FileInfo) -> Entry:
    return Entry(path=info.path, **_entry_fields(info))


def search_index(ctx: ToolContext) -> SearchIndex | None:
    idx = ctx.limits.get("search_index") if ctx.limits else None
    if isinstance(idx, SearchIndex):
        return idx
    return index_for(ctx.gateway)


async def index_now(ctx: ToolContext, path: str) -> str | None:
    """Index a just-written file (small ones synchronously); its index state, if any."""
    idx = search_index(ctx)
    if idx is None:
        return None
    st = await anyio.to_thread.run_sync(idx.flush, ctx.principal.tenant, path)
    return st.state


async def write_indexed(ctx: ToolContext, path: str, data: bytes, *, mode: str = "overwrite",
                        expected_version: int | None = None) -> tuple[WriteResult, str | None]:
    """Write through the gateway and index the new version (as ``index_now``) in the
    write's own worker thread: one hop to a thread instead of two."""
    idx = search_index(ctx)
    state: list[str | None] = [None]

    def index(res: WriteResult) -> None:
        if idx is not None:
            state[0] = idx.flush(ctx.principal.tenant, res.info.path).state

    res = await ctx.gateway.awrite(ctx.principal, path, data, mode=mode,
                                   expected_version=expected_version, then=index)
    return res, state[0]


async def _sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a blocking gateway method in a worker thread (keeps the event loop free)."""
    return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs))


def _decode_text(data: bytes, at_end: bool) -> tuple[str, int] | None:
    """``data`` as UTF-8 text, dropping at most one multi-byte character cut off at the end
    of a partial read; returns (text, bytes used) or None when it is not UTF-8."""
    try:
        return data.decode("utf-8"), len(data)
    except UnicodeDecodeError as exc:
        if (not at_end and exc.reason == "unexpected end of data"
                and exc.start >= len(data) - 3 and exc.start > 0):
            try:
                return data[: exc.start].decode("utf-8"), exc.start
            except UnicodeDecodeError:
                return None
        return None


_CONTROL = {c for c in range(32) if c not in (9, 10, 12, 13)} | {127}


def _looks_binary(text: str) -> bool:
    """NULs or many control characters: JSON would escape each to six bytes."""
    if "\x00" in text:
        return True
    sample = text[:65536]
    n = len(sample) - len(sample.translate(_DROP_CONTROL))  # counted in C, not per char
    return n * 20 > len(sample)  # over 5 %


_DROP_CONTROL = dict.fromkeys(_CONTROL)


def _skip_continuation(data: bytes, offset: int) -> int:
    """Bytes to skip when a read starts inside a multi-byte UTF-8 character."""
    if offset == 0:
        return 0
    n = 0
    while n < min(3, len(data)) and 0x80 <= data[n] <= 0xBF:
        n += 1
    return n


# -- read_file --------------------------------------------------------------------------


class ReadFileResult(BaseModel):
    path: str
    content: str = Field(description="The bytes read: UTF-8 text, or base64 (see encoding)")
    encoding: Literal["text", "base64"]
    offset: int = Field(description="Byte offset the content starts at")
    length: int = Field(description="Number of bytes of the file in content")
    size: int = Field(description="Total file size in bytes")
    version: int
    modified: str | None
    next_offset: int | None = Field(
        description="Pass as offset to read on; null when the end of the file was reached")
    eof: bool = Field(description="True when content reaches the end of the file")
    capped: bool = Field(description="True when the reply was cut to the server's reply cap")
    labels: list[str] = Field(description="PII entity types the file holds")
    redacted: dict[str, int] = Field(description="Entity type -> values removed on write")
    masked: list[str] = Field(description="Entity types masked ('*' per byte) for your role "
                                          "in this content")
    resource_uri: str | None = Field(
        None, description="When the file is larger than one reply: its resource URI, to "
                          "fetch it whole with resources/read instead of paging")


@governed_tool(
    "read_file",
    "Read a file from your store. Returns UTF-8 text, or base64 when the bytes are not "
    "text (invalid UTF-8, NULs or many control bytes) or you ask with encoding='base64'. "
    "Large files come in pages: read from `offset` for `length` bytes; replies are capped (1 MiB by default) and carry "
    "`next_offset` to continue, so call again with offset=next_offset until it is null. "
    "PII your role is not cleared for comes masked as '*' (listed in `masked`). Use "
    "read_multiple_files for several small files, get_file_info for metadata only.",
    read_only=True, idempotent=True, title="Read file")
async def read_file(
    ctx: ToolContext,
    path: PathArg,
    offset: Annotated[int, Field(description="Byte offset to start at (default 0)", ge=0)] = 0,
    length: Annotated[int | None, Field(
        description="Maximum bytes to return (default: as much as the reply cap allows)",
        ge=1)] = None,
    encoding: Annotated[Literal["auto", "text", "base64"], Field(
        description="'auto' (text if valid UTF-8, else base64), 'text' (fail if not UTF-8) "
                    "or 'base64'")] = "auto",
) -> ReadFileResult:
    cap = max_reply_bytes(ctx)
    return await _read_one(ctx, path, offset, length, encoding, cap)


async def _read_one(ctx: ToolContext, path: str, offset: int, length: int | None,
                    encoding: str, cap: int) -> ReadFileResult:
    want = cap if length is None else min(length, cap)
    res = await ctx.gateway.aread(ctx.principal, path, offset, want)
    info, data = res.info, res.data
    size = info.size
    start = offset
    out_enc = "base64"
    text: str | None = None
    if encoding in ("auto", "text"):
        skip = _skip_continuation(data, offset)
        body = data[skip:]
        decoded = _decode_text(body, start + skip + len(body) >= size) if body or not skip else None
        if decoded is not None and encoding == "auto" and _looks_binary(decoded[0]):
            decoded = None  # valid UTF-8, but control bytes: base64 is shorter and exact
        if decoded is not None:
            text, used = decoded
            start, data, out_enc = offset + skip, body[:used], "text"
        elif encoding == "text":
            raise ToolError("invalid_argument",
                            f"{info.path} is not valid UTF-8 text at bytes {offset}.."
                            f"{offset + len(data)}; call read_file with encoding='base64'")
    if out_enc == "base64":
        raw_cap = max(3, (cap // 4) * 3)
        if len(data) > raw_cap:
            data = data[:raw_cap]
        text = base64.b64encode(data).decode("ascii")
    end = start + len(data)
    labels, redacted = governance_of(info.attrs)
    return ReadFileResult(
        path=info.path, content=text or "", encoding=out_enc, offset=start, length=len(data),
        size=size, version=info.version, modified=iso(info.mtime),
        next_offset=end if end < size else None, eof=end >= size,
        capped=end < size and (length is None or len(data) < length),
        labels=labels, redacted=redacted, masked=list(res.masked),
        resource_uri=resource_uri(info.path)
        if cap < size <= int(limit_of(ctx, "max_resource_bytes", 0) or 0) else None)


# -- read_multiple_files ----------------------------------------------------------------


class ErrorInfo(BaseModel):
    code: str = Field(description="Machine-readable error code, e.g. not_found, forbidden")
    message: str = Field(description="What was wrong and what to do")


class FileRead(BaseModel):
    path: str = Field(description="The path as requested")
    ok: bool
    content: str | None = None
    encoding: Literal["text", "base64"] | None = None
    offset: int = 0
    length: int = 0
    size: int | None = None
    version: int | None = None
    next_offset: int | None = Field(
        None, description="Where to continue with read_file when the file was cut short")
    eof: bool | None = None
    labels: list[str] = Field(default_factory=list)
    redacted: dict[str, int] = Field(default_factory=dict)
    masked: list[str] = Field(default_factory=list)
    error: ErrorInfo | None = Field(None, description="Why this file could not be read")


class ReadMultipleResult(BaseModel):
    files: list[FileRead]
    total_bytes: int = Field(description="File bytes returned over all files")
    complete: bool = Field(description="True when every file was read to its end without error")


@governed_tool(
    "read_multiple_files",
    "Read several files in one call (up to 100 paths). Each file gets its own result: "
    "content (text or base64, as in read_file) or an error (e.g. not_found, forbidden) "
    "that does not fail the others. The whole reply shares one size cap (1 MiB by "
    "default); files cut short carry `next_offset` for read_file. Prefer this to many "
    "read_file calls when you need several small files.",
    read_only=True, idempotent=True, title="Read multiple files")
async def read_multiple_files(
    ctx: ToolContext,
    paths: Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(
        description="Absolute paths to read, e.g. ['/notes/a.md', '/notes/b.md']",
        min_length=1, max_length=100)],
    encoding: Annotated[Literal["auto", "text", "base64"], Field(
        description="As in read_file: 'auto', 'text' or 'base64'")] = "auto",
    max_bytes_per_file: Annotated[int | None, Field(
        description="Read at most this many bytes of each file", ge=1)] = None,
) -> ReadMultipleResult:
    budget = max_reply_bytes(ctx)
    out: list[FileRead] = []
    total = 0
    complete = True
    n = len(paths)
    for i, path in enumerate(paths):
        await report(ctx, i, n, f"reading {path}")
        if budget <= 0:
            complete = False
            out.append(FileRead(path=path, ok=False, error=ErrorInfo(
                code="reply_cap_reached",
                message="the reply size cap was used up by earlier files; read this one "
                        "with read_file")))
            continue
        try:
            r = await _read_one(ctx, path, 0, max_bytes_per_file, encoding, budget)
        except Exception as exc:  # noqa: BLE001 - one file's error never fails the others
            err = tool_error(exc)
            complete = False
            out.append(FileRead(path=path, ok=False,
                                error=ErrorInfo(code=err.code, message=err.message)))
            continue
        budget -= len(r.content)
        total += r.length
        complete = complete and r.eof
        out.append(FileRead(path=path, ok=True, content=r.content, encoding=r.encoding,
                            offset=r.offset, length=r.length, size=r.size, version=r.version,
                            next_offset=r.next_offset, eof=r.eof, labels=r.labels,
                            redacted=r.redacted, masked=r.masked))
    await report(ctx, n, n, "done")
    return ReadMultipleResult(files=out, total_bytes=total, complete=complete)


# -- write_file -------------------------------------------------------------------------


class WriteFileResult(BaseModel):
    path: str
    version: int = Field(description="The new version (pass as expected_version next time)")
    size: int = Field(description="File size after the write, as stored (after redaction)")
    bytes_received: int = Field(description="Bytes of content this call carried")
    mode: str
    modified: str | None
    labels: list[str] = Field(description="PII entity types found and kept (tagged) or "
                                          "redacted")
    redacted: dict[str, int] = Field(description="Entity type -> values replaced by a "
                                                 "marker such as <US_SSN> before storing")
    scanned: str = Field(description="How the content was classified: text, binary, skipped")
    index_state: str | None = Field(
        None, description="Search index state: indexed, pending (large files are indexed in "
                          "the background), skipped; null when search is off")


def _payload(ctx: ToolContext, content: str, encoding: str) -> bytes:
    cap = int(limit_of(ctx, "max_write_bytes", DEFAULT_MAX_WRITE_BYTES))
    too_big = ToolError(
        "too_large",
        f"content is larger than the {cap // MiB if cap >= MiB else cap} "
        f"{'MiB' if cap >= MiB else 'bytes'} a single write may carry; nothing was stored. "
        "Write the first part, then add the rest with mode='append' in pieces under the limit")
    if encoding == "base64":
        if len(content) > (cap + 2) // 3 * 4 + 1024:
            raise too_big
        try:
            data = base64.b64decode("".join(content.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ToolError("invalid_argument",
                            "content is not valid base64 (standard alphabet, '=' padding); "
                            "nothing was stored") from None
    else:
        if len(content) > cap:
            raise too_big
        try:
            data = content.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolError("invalid_argument",
                            "content holds unpaired surrogates and is not valid text; send it "
                            "base64-encoded with encoding='base64'") from None
    if len(data) > cap:
        raise too_big
    return data


@governed_tool(
    "write_file",
    "Create, overwrite or append to a file. `content` is UTF-8 text, or base64 for binary "
    "data with encoding='base64'. mode='overwrite' (default) replaces the file, 'create' "
    "fails with already_exists if it exists, 'append' adds to the end. Pass "
    "expected_version to make the write conditional (version_mismatch if someone changed "
    "it). One call carries at most 16 MiB (larger: append in pieces). The tenant's PII "
    "policy applies: values may be tagged (see `labels`), replaced by markers (`redacted`) "
    "or the write refused (denied_by_policy names the entity types). Parent directories "
    "are created as needed.",
    read_only=False, destructive=True, idempotent=False, title="Write file")
async def write_file(
    ctx: ToolContext,
    path: PathArg,
    content: Annotated[str, Field(description="The data: UTF-8 text, or base64 when "
                                              "encoding='base64'")],
    mode: Annotated[Literal["overwrite", "create", "append"], Field(
        description="'overwrite' (default), 'create' (only if absent) or 'append'")
    ] = "overwrite",
    encoding: Annotated[Literal["text", "base64"], Field(
        description="How `content` is encoded: 'text' (default) or 'base64'")] = "text",
    expected_version: VersionArg = None,
) -> WriteFileResult:
    data = _payload(ctx, content, encoding)
    res, state = await write_indexed(ctx, path, data, mode=mode,
                                     expected_version=expected_version)
    return WriteFileResult(
        path=res.info.path, version=res.info.version, size=res.info.size,
        bytes_received=len(data), mode=mode, modified=iso(res.info.mtime),
        labels=sorted(res.labels), redacted=dict(res.redacted), scanned=res.scanned,
        index_state=state)


# -- edit_file --------------------------------------------------------------------------


class Edit(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    old_text: str = Field(description="Exact text to find (must occur exactly once unless "
                                      "replace_all)", min_length=1)
    new_text: str = Field(description="Replacement text (may be empty to delete)")
    replace_all: bool = Field(False, description="Replace every occurrence instead of "
                                                 "requiring exactly one")


class EditFileResult(BaseModel):
    path: str
    dry_run: bool
    changed: bool = Field(description="Whether the edits change the file")
    replacements: int = Field(description="Occurrences replaced over all edits")
    diff: str = Field(description="Unified diff of the change")
    diff_truncated: bool = False
    version: int = Field(description="Version written (or the current one for a dry run)")
    size: int
    labels: list[str] = Field(default_factory=list)
    redacted: dict[str, int] = Field(default_factory=dict)
    index_state: str | None = None


@governed_tool(
    "edit_file",
    "Edit a text file by exact replacements: each edit's old_text must occur exactly once "
    "(add surrounding lines to make it unique) unless replace_all is set; edits apply in "
    "order. dry_run=true returns the unified diff without writing. The write is "
    "conditional on the version read, so if someone else changed the file meanwhile you get "
    "version_mismatch and nothing is written: re-run the edit. Files with PII masked for "
    "your role cannot be edited (the masked values would be lost). Cheaper and safer than "
    "rewriting a whole file with write_file.",
    read_only=False, destructive=True, idempotent=False, title="Edit file")
async def edit_file(
    ctx: ToolContext,
    path: PathArg,
    edits: Annotated[list[Edit], Field(description="Replacements to apply, in order",
                                       min_length=1, max_length=200)],
    dry_run: Annotated[bool, Field(description="Only show the diff; write nothing")] = False,
    expected_version: VersionArg = None,
) -> EditFileResult:
    cap = int(limit_of(ctx, "max_write_bytes", DEFAULT_MAX_WRITE_BYTES))
    res = await ctx.gateway.aread(ctx.principal, path, 0, cap)
    info = res.info
    if res.next_offset is not None:
        raise ToolError("too_large", f"{info.path} is larger than the {cap} bytes edit_file "
                                     "handles; use write_file with mode='append' or rewrite it")
    if expected_version is not None and expected_version != info.version:
        raise ToolError("version_mismatch", str(VersionMismatch(info.path, expected_version,
                                                                info.version)))
    if res.masked:
        raise ToolError("forbidden",
                        f"{info.path} holds {', '.join(res.masked)} values masked for your role; "
                        "an edit would overwrite them with the mask. Ask an agent whose role "
                        "is cleared for these entity types to make the change")
    try:
        old = res.data.decode("utf-8")
    except UnicodeDecodeError:
        raise ToolError("invalid_argument",
                        f"{info.path} is not UTF-8 text; edit_file edits text only "
                        "(use write_file with encoding='base64' for binary data)") from None
    new = old
    total = 0
    for i, e in enumerate(edits, 1):
        n = new.count(e.old_text)
        if n == 0:
            raise ToolError("invalid_argument",
                            f"edit {i}: old_text was not found in {info.path} (after the "
                            f"edits before it); read the file and copy the text exactly, "
                            "including whitespace. Nothing was written")
        if n > 1 and not e.replace_all:
            raise ToolError("invalid_argument",
                            f"edit {i}: old_text occurs {n} times in {info.path}; include more "
                            "surrounding text to make it unique, or set replace_all=true. "
                            "Nothing was written")
        new = new.replace(e.old_text, e.new_text) if e.replace_all else new.replace(
            e.old_text, e.new_text, 1)
        total += n if e.replace_all else 1
    diff = _unified_diff(old, new, info.path)
    budget = max(1024, max_reply_bytes(ctx) // 2)
    cut = len(diff.encode("utf-8")) > budget
    if cut:
        diff = diff.encode("utf-8")[:budget].decode("utf-8", "ignore") + "\n... (diff truncated)\n"
    labels, redacted = governance_of(info.attrs)
    if dry_run or new == old:
        return EditFileResult(path=info.path, dry_run=dry_run, changed=new != old,
                              replacements=total, diff=diff, diff_truncated=cut,
                              version=info.version, size=info.size, labels=labels,
                              redacted=redacted)
    data = new.encode("utf-8")
    if len(data) > cap:
        raise ToolError("too_large", f"the edited file would be {len(data)} bytes, over the "
                                     f"{cap}-byte write limit; nothing was written")
    try:
        w, state = await write_indexed(ctx, info.path, data, expected_version=info.version)
    except VersionMismatch as exc:
        raise ToolError("version_mismatch",
                        f"{info.path} changed after edit_file read it at version "
                        f"{info.version} (now {exc.actual if exc.actual is not None else 'gone'}); "
                        "nothing was written. Re-run edit_file to apply the edits to the new "
                        "content") from None
    return EditFileResult(path=w.info.path, dry_run=False, changed=True, replacements=total,
                          diff=diff, diff_truncated=cut, version=w.info.version,
                          size=w.info.size, labels=sorted(w.labels), redacted=dict(w.redacted),
                          index_state=state)


def _unified_diff(old: str, new: str, path: str) -> str:
    lines = []
    for line in difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                     fromfile=f"a{path}", tofile=f"b{path}"):
        lines.append(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")
    return "".join(lines)


# -- list_directory ---------------------------------------------------------------------


class ListDirectoryResult(BaseModel):
    path: str
    entries: list[ListEntry] = Field(description="Entries in name order; an entry's path is "
                                                 "this path + '/' + its name")
    next_cursor: str | None = Field(
        description="Pass as cursor to get the next page; null on the last page")


@governed_tool(
    "list_directory",
    "List a directory's entries (name, kind, size, version, modified time, PII labels), "
    "in name order, one page at a time: up to `limit` entries (default 100, max 1000) and a "
    "`next_cursor` to pass back for the next page. Entries your role may not read are "
    "left out. Use find_files to search a whole tree by name.",
    read_only=True, idempotent=True, title="List directory")
async def list_directory(
    ctx: ToolContext,
    path: PathArg = "/",
    cursor: Annotated[str | None, Field(description="next_cursor from the previous page",
                                        max_length=2048)] = None,
    limit: Annotated[int, Field(description="Entries per page (1-1000)", ge=1,
                                le=1000)] = 100,
) -> ListDirectoryResult:
    items, nxt = await _sync(ctx.gateway.list_dir, ctx.principal, path, cursor or None, limit)
    return ListDirectoryResult.model_validate({
        "path": paths.normalize(path), "entries": [_entry_fields(i) for i in items],
        "next_cursor": nxt})


# -- get_file_info ----------------------------------------------------------------------


class Redundancy(BaseModel):
    inline: bool = Field(description="Small files live inline in their metadata row")
    chunks: int = Field(description="Number of erasure-coded chunks (0 when inline)")


class FileInfoResult(BaseModel):
    path: str
    name: str
    kind: Literal["file", "directory"]
    size: int
    version: int
    created: str | None = Field(description="Creation (or last move) time, ISO 8601 UTC")
    modified: str | None = Field(description="Last content change, ISO 8601 UTC")
    labels: list[str] = Field(description="PII entity types in the file")
    redacted: dict[str, int] = Field(description="Entity type -> values redacted on write")
    scanned: str | None = Field(None, description="Classification: text, binary, skipped")
    policy_version: int | None = Field(None, description="Tenant policy version applied to "
                                                         "this version of the file")
    redundancy: Redundancy
    index_state: str | None = Field(
        None, description="Search index: indexed, pending, skipped, not_indexed; null when "
                          "search is off or for directories")
    index_detail: str | None = None


@governed_tool(
    "get_file_info",
    "Metadata of a file or directory without reading it: size, version (for "
    "expected_version), created/modified times, PII labels and redaction counts, how it is "
    "stored (inline or number of erasure-coded chunks) and its search-index state.",
    read_only=True, idempotent=True, title="Get file info")
async def get_file_info(ctx: ToolContext, path: PathArg) -> FileInfoResult:
    info: FileInfo = await ctx.gateway.astat(ctx.principal, path)
    labels, redacted = governance_of(info.attrs)
    attrs = info.attrs or {}
    state = detail = None
    idx = search_index(ctx)
    if idx is not None and not info.is_dir:
        st = await anyio.to_thread.run_sync(idx.ensure, ctx.principal.tenant, info,
                                            ctx.principal.role)
        state, detail = st.state, st.detail
    return FileInfoResult(
        path=info.path, name=info.name or "/", kind="directory" if info.is_dir else "file",
        size=info.size, version=info.version, created=iso(info.ctime), modified=iso(info.mtime),
        labels=labels, redacted=redacted, scanned=attrs.get("scanned"),
        policy_version=attrs.get("policy_version"),
        redundancy=Redundancy(inline=info.inline, chunks=info.chunks),
        index_state=state, index_detail=detail)


# -- move_file --------------------------------------------------------------------------


class MoveResult(BaseModel):
    source: str
    destination: str
    kind: Literal["file", "directory"]
    version: int
    size: int
    index_state: str | None = None


@governed_tool(
    "move_file",
    "Move or rename a file or directory within your store. Fails with already_exists if "
    "the destination exists unless overwrite=true (a directory can only replace an empty "
    "directory). The destination's parent directory must exist (create_directory). Your "
    "role needs read and write on the source and write on the destination.",
    read_only=False, destructive=True, idempotent=False, title="Move file")
async def move_file(
    ctx: ToolContext,
    source: PathArg,
    destination: PathArg,
    overwrite: Annotated[bool, Field(description="Replace an existing destination")] = False,
) -> MoveResult:
    info: FileInfo = await _sync(ctx.gateway.move, ctx.principal, source, destination,
                                 overwrite)
    state = None if info.is_dir else await index_now(ctx, info.path)
    return MoveResult(source=paths.normalize(source), destination=info.path,
                      kind="directory" if info.is_dir else "file", version=info.version,
                      size=info.size, index_state=state)


# -- delete_file ------------------------------------------------------------------------


class DeleteResult(BaseModel):
    path: str
    deleted: bool


@governed_tool(
    "delete_file",
    "Delete a file, or a directory: an empty one, or with recursive=true everything under "
    "it (cannot be undone). Pass expected_version to delete only an unchanged file.",
    read_only=False, destructive=True, idempotent=False, title="Delete file")
async def delete_file(
    ctx: ToolContext,
    path: PathArg,
    recursive: Annotated[bool, Field(description="Delete a non-empty directory and all it "
                                                 "contains")] = False,
    expected_version: VersionArg = None,
) -> DeleteResult:
    await _sync(ctx.gateway.delete, ctx.principal, path, recursive, expected_version)
    return DeleteResult(path=paths.normalize(path), deleted=True)


# -- create_directory -------------------------------------------------------------------


class CreateDirectoryResult(BaseModel):
    path: str
    version: int
    created: str | None


@governed_tool(
    "create_directory",
    "Create a directory, with any missing parents. Succeeds if it already exists "
    "(idempotent); fails with not_a_directory if a file is in the way.",
    read_only=False, destructive=False, idempotent=True, title="Create directory")
async def create_directory(ctx: ToolContext, path: PathArg) -> CreateDirectoryResult:
    info: FileInfo = await _sync(ctx.gateway.mkdir, ctx.principal, path, True)
    return CreateDirectoryResult(path=info.path, version=info.version, created=iso(info.ctime))


# -- find_files -------------------------------------------------------------------------


class FindFilesResult(BaseModel):
    pattern: str
    root: str
    matches: list[Entry]
    truncated: bool = Field(description="True when more entries match than `limit`")


@governed_tool(
    "find_files",
    "Find files and directories by glob under `root` (default '/'), recursively. A pattern "
    "without '/' matches entry names ('*.md', 'report-202?-*.csv'); with '/' it matches "
    "whole paths ('/projects/*/README.md'). '*' and '?' match any characters (including '/' "
    "in path patterns), [abc] a set. Returns up to `limit` entries (default 100, max "
    "1000); use search for full-text search of contents.",
    read_only=True, idempotent=True, title="Find files")
async def find_files(
    ctx: ToolContext,
    pattern: Annotated[str, Field(description="Glob, e.g. '*.md' or '/notes/*/todo.txt'",
                                  min_length=1, max_length=512)],
    root: PathArg = "/",
    limit: Annotated[int, Field(description="Maximum matches (1-1000)", ge=1, le=1000)] = 100,
) -> FindFilesResult:
    await report(ctx, 0, None, f"searching {root} for {pattern}")
    found: list[FileInfo] = await _sync(ctx.gateway.find, ctx.principal, pattern, root,
                                        limit + 1)
    await report(ctx, 1, 1, f"{min(len(found), limit)} matches")
    return FindFilesResult.model_validate({
        "pattern": pattern, "root": paths.normalize(root),
        "matches": [{"path": i.path, **_entry_fields(i)} for i in found[:limit]],
        "truncated": len(found) > limit})


__all__ = ["read_file", "read_multiple_files", "write_file", "edit_file", "list_directory",
           "get_file_info", "move_file", "delete_file", "create_directory", "find_files",
           "Entry", "ListEntry", "Edit", "search_index", "index_now", "entry_of"]

"""What every tool module shares: argument validation, error mapping, limits, time stamps.

``governed_tool`` registers a tool in ``TOOLS`` (through ``registry.tool``) wrapped so that

* its arguments are validated against the annotated signature (the same pydantic rules the
  server's JSON schema publishes), so a direct call with a wrong type or an out-of-range
  value fails like an MCP call would, as ``ToolError('invalid_argument', ...)``;
* storage and governance errors become ``ToolError(code, message)`` (:func:`tool_error`);
* anything else is logged and reported as ``internal_error`` without a stack trace.

The wrapper keeps the function's signature (``functools.wraps``), so the server derives
input and output schemas from the original annotations. Tool modules must not use
``from __future__ import annotations``: their annotations have to be real objects.
"""

import functools
import inspect
import logging
import time
import typing
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from governance.errors import DeniedByPolicy
from governance.qos import RateLimited
from storage.errors import StorageError

from .registry import ToolContext, ToolError, tool

log = logging.getLogger("lodestore.tools")

MiB = 1 << 20
FILES_URI = "lodestore://files/"  # files are MCP resources under FILES_URI + path


def resource_uri(path: str) -> str:
    """The resource URI of a tenant-relative path (``/notes/a.md`` → ``lodestore://files/notes/a.md``)."""
    return FILES_URI + quote(path.lstrip("/"), safe="/")

DEFAULT_MAX_REPLY_BYTES = 1 * MiB  # ctx.limits['max_reply_bytes']
DEFAULT_MAX_WRITE_BYTES = 16 * MiB  # ctx.limits['max_write_bytes']


def limit(ctx: ToolContext, key: str, default: int | float) -> Any:
    """A server-set limit from ``ctx.limits``, or the default when absent or invalid."""
    v = ctx.limits.get(key) if ctx.limits else None
    if isinstance(v, int | float) and not isinstance(v, bool) and v > 0:
        return v
    return default


def max_reply_bytes(ctx: ToolContext) -> int:
    return int(limit(ctx, "max_reply_bytes", DEFAULT_MAX_REPLY_BYTES))


def iso(ts: float | None) -> str | None:
    """A POSIX time stamp as ISO 8601 in UTC (what models read best), None for unknown."""
    if ts is None or ts <= 0:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def parse_time(value: str | None, name: str) -> float | None:
    """ISO 8601 (``2024-05-01``, ``2024-05-01T12:00:00Z``) or POSIX seconds -> POSIX seconds."""
    if value is None or value == "":
        return None
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise ToolError("invalid_argument",
                        f"{name} must be an ISO 8601 time such as 2024-05-01 or "
                        f"2024-05-01T12:00:00Z (or POSIX seconds), got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def tool_error(exc: BaseException) -> ToolError:
    """Map a storage/governance error to the ToolError a model can act on.

    The code is the error class's stable ``code`` (``not_found``, ``already_exists``,
    ``version_mismatch``, ``invalid_path``, ``invalid_argument``, ``forbidden``,
    ``denied_by_policy``, ``rate_limited``, ``quota_exceeded``, ``is_a_directory``, ...);
    the message is the error's own, which says what was wrong and what to do. Messages
    never carry PII: governance errors name entity types only.
    """
    if isinstance(exc, ToolError):
        return exc
    if isinstance(exc, RateLimited):
        return ToolError("rate_limited",
                         f"rate limited: retry after {exc.retry_after_ms} ms ({exc.limit} limit "
                         "of this tenant); wait that long, then repeat the same call")
    if isinstance(exc, DeniedByPolicy):
        return ToolError("denied_by_policy", str(exc))
    if isinstance(exc, StorageError):
        code = getattr(exc, "code", None) or "storage_error"
        return ToolError(code, str(exc) or code.replace("_", " "))
    if isinstance(exc, ValidationError):
        return ToolError("invalid_argument", describe_validation(exc))
    return ToolError("internal_error",
                     f"internal error ({type(exc).__name__}); it was logged on the server. "
                     "Retry once; if it persists, report it")


def describe_validation(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "arguments"
        msg = err.get("msg", "invalid")
        got = err.get("input")
        shown = "" if err.get("type") == "missing" else f" (got {type(got).__name__})"
        parts.append(f"argument `{where}`: {msg}{shown}")
    more = len(exc.errors()) - 5
    tail = f"; and {more} more" if more > 0 else ""
    return "invalid arguments: " + "; ".join(parts) + tail


def _arg_model(fn: Callable[..., Any]) -> type[BaseModel]:
    hints = typing.get_type_hints(fn, include_extras=True)
    params = list(inspect.signature(fn).parameters.values())[1:]  # skip ctx
    fields: dict[str, Any] = {}
    for p in params:
        ann = hints.get(p.name, Any)
        fields[p.name] = (ann, ...) if p.default is inspect.Parameter.empty else (ann, p.default)
    return create_model(f"{fn.__name__}_arguments",
                        __config__=ConfigDict(extra="forbid", strict=True,
                                            arbitrary_types_allowed=True),
                        **fields)


def governed_tool(name: str, description: str, *, read_only: bool, destructive: bool = False,
                  idempotent: bool = False, title: str | None = None
                  ) -> Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]]:
    """Register ``fn(ctx, **args)`` as an MCP tool, with validation and error mapping."""
    def deco(fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        model = _arg_model(fn)
        names = list(model.model_fields)

        @functools.wraps(fn)
        async def wrapper(ctx: ToolContext, *args: Any, **kwargs: Any) -> Any:
            if len(args) > len(names):
                raise ToolError("invalid_argument",
                                f"{name} takes at most {len(names)} arguments")
            raw = dict(zip(names, args, strict=False))
            dup = set(raw) & set(kwargs)
            if dup:
                raise ToolError("invalid_argument", f"argument(s) given twice: {sorted(dup)}")
            raw.update(kwargs)
            try:
                checked = model.model_validate(raw)
            except ValidationError as exc:
                raise ToolError("invalid_argument", describe_validation(exc)) from None
            values = {n: getattr(checked, n) for n in names}
            t0 = time.perf_counter()
            try:
                return await fn(ctx, **values)
            except ToolError:
                raise
            except (StorageError, ValidationError) as exc:
                raise tool_error(exc) from None
            except Exception as exc:  # noqa: BLE001 - never a stack trace to an agent
                log.exception("tool %s failed after %.1f ms", name,
                              (time.perf_counter() - t0) * 1000.0)
                raise tool_error(exc) from None

        tool(name, description, read_only=read_only, destructive=destructive,
             idempotent=idempotent, title=title)(wrapper)
        return wrapper
    return deco


async def report(ctx: ToolContext, done: float, total: float | None, message: str | None
                 ) -> None:
    """Progress for long calls; a failing progress sink never fails the call."""
    if ctx.progress is None:
        return
    try:
        await ctx.progress(done, total, message)
    except Exception:  # noqa: BLE001 - the client went away or does not want progress
        log.debug("progress report failed", exc_info=True)


def governance_of(attrs: dict[str, Any] | None) -> tuple[list[str], dict[str, int]]:
    """Labels and redaction counts recorded with a file version (entity types only)."""
    a = attrs or {}
    labels = [str(x) for x in (a.get("labels") or [])]
    redacted = {str(k): int(v) for k, v in (a.get("redacted") or {}).items()}
    return sorted(labels), redacted

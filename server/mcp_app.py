"""The MCP server: every ``ToolSpec`` in ``tools.registry.TOOLS`` as an MCP tool, files as
resources under ``lodestore://files/{path}``.

Schemas come from the SDK: each tool's input schema is derived from the tool function's
signature without its first ``ctx`` parameter (``Annotated``/``Field`` descriptions kept),
its output schema from the return annotation. Calls do not go through the SDK's
``Context`` injection: a ``tools/call`` handler of our own builds a ``ToolContext`` with the
principal of the verified token (never from arguments), validates the arguments with the
SDK's argument model, runs the tool and maps every failure to an ``isError`` result with
an actionable message. Nothing of a failure's stack reaches the agent; the server log gets
the exception type and stack frames, never argument values or file content.

``LodestoreMCP.call_tool`` is that runner without the SDK's request context, so the stdio
transport's fast path (``server.transports``) can call it straight from the pipe.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import mimetypes
import os
import pkgutil
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import anyio
import pydantic_core
from mcp.server.context import ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.tools import Tool
from mcp.shared.exceptions import MCPError
from mcp_types import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    BlobResourceContents,
    CallToolRequestParams,
    CallToolResult,
    ListResourcesResult,
    ListResourceTemplatesResult,
    PaginatedRequestParams,
    ReadResourceRequestParams,
    ReadResourceResult,
    Resource,
    ResourceLink,
    ResourceTemplate,
    TextContent,
    TextResourceContents,
    ToolAnnotations,
)
from pydantic import BaseModel, ValidationError

from governance.errors import Unauthorized
from governance.principals import Principal
from storage.errors import StorageError
from tools.common import FILES_URI, resource_uri
from tools.registry import Progress, ToolContext, ToolError, ToolSpec

from .metrics import Metrics
from .wiring import App

log = logging.getLogger("lodestore.mcp")

DEFAULT_MAX_REPLY_BYTES = 1 << 20
# a resource read is asked for by the host application, not typed into a model's context:
# it may return a whole file up to this size (read_file links to files up to it)
DEFAULT_MAX_RESOURCE_BYTES = 64 << 20
DEFAULT_MAX_WRITE_BYTES = 16 << 20
FILES_TEMPLATE = FILES_URI + "{path}"
RESOURCE_LIST_MAX = 200

# ``None``: a call that came without an SDK request context (the stdio fast path); an
# identity that needs the request (HTTP) then refuses it
Identity = Callable[[ServerRequestContext[Any, Any] | None], Awaitable[Principal]]


def load_tools() -> list[ToolSpec]:
    """Import the ``tools`` package and every module in it, then return the registry."""
    import tools
    from tools import registry

    for mod in pkgutil.iter_modules(tools.__path__):
        if mod.name != "registry" and not mod.name.startswith("_"):
            importlib.import_module(f"tools.{mod.name}")
    seen: dict[str, ToolSpec] = {}
    for spec in registry.TOOLS:
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def _otel_configured() -> bool:
    """Tracing is wanted when an OpenTelemetry exporter or SDK is configured."""
    return any(k.startswith(("OTEL_EXPORTER_", "OTEL_TRACES_")) for k in os.environ) or \
        os.environ.get("OTEL_SDK_DISABLED", "").lower() == "false"




def _schema_stub(spec: ToolSpec) -> Callable[..., Any]:
    """A function with the tool's signature minus ``ctx``: what the SDK derives schemas from."""
    sig = inspect.signature(spec.fn, eval_str=True)
    params = list(sig.parameters.values())
    if not params:
        raise TypeError(f"tool {spec.name}: the function must take a ToolContext first")
    rest = params[1:]

    async def stub(**kwargs: Any) -> Any:  # never called: calls go through _call_tool
        raise RuntimeError("schema stub called")

    stub.__signature__ = sig.replace(parameters=rest)  # type: ignore[attr-defined]
    stub.__name__ = spec.name
    stub.__qualname__ = spec.name
    stub.__doc__ = spec.description
    stub.__annotations__ = {p.name: p.annotation for p in rest
                            if p.annotation is not inspect.Parameter.empty}
    if sig.return_annotation is not inspect.Signature.empty:
        stub.__annotations__["return"] = sig.return_annotation
    return stub


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """An output schema that validates the same documents, faster.

    Clients validate every structured result against the tool's output schema (the SDK's
    ``jsonschema`` validator costs ~30 us per object of a list); ``$ref`` lookups and
    ``anyOf: [{type: X}, {type: null}]`` branches are the slow parts, and every keyword is
    checked once per value. This inlines ``$defs`` (our models are not recursive), turns
    nullable ``anyOf`` into ``type: [X, "null"]``, drops ``type: string`` beside an enum of
    strings and drops ``title`` keywords (descriptions stay).
    """
    defs = schema.get("$defs") or {}

    def walk(node: Any, depth: int) -> Any:
        if depth > 32:
            raise ValueError("output schema nests too deep to inline (recursive model?)")
        if isinstance(node, list):
            return [walk(x, depth + 1) for x in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node and node["$ref"].startswith("#/$defs/"):
            target = walk(defs[node["$ref"].rsplit("/", 1)[1]], depth + 1)
            extra = {k: walk(v, depth + 1) for k, v in node.items() if k != "$ref"}
            return {**target, **extra}
        out: dict[str, Any] = {}
        for k, v in node.items():
            if k in ("$defs", "title"):
                continue
            if k == "properties" and isinstance(v, dict):
                out[k] = {name: walk(sub, depth + 1) for name, sub in v.items()}
            else:
                out[k] = walk(v, depth + 1)
        enum = out.get("enum")
        if out.get("type") == "string" and isinstance(enum, list) and enum and all(
                isinstance(e, str) for e in enum):
            del out["type"]  # an enum of strings admits only those strings anyway
        branches = out.get("anyOf")
        if isinstance(branches, list) and branches and all(
                isinstance(b, dict) and set(b) == {"type"} and isinstance(b["type"], str)
                for b in branches):
            del out["anyOf"]
            out["type"] = [b["type"] for b in branches]
        return out

    return walk(schema, 0)


@dataclass
class _Entry:
    spec: ToolSpec
    tool: Tool


class StructuredResult(dict[str, Any]):
    """A structured tool result in wire form that also keeps ``structured_json``: the
    serialized ``structuredContent`` (its text block is the same bytes). The SDK treats it
    as the plain dict it is; the stdio fast path splices the bytes into the reply instead
    of serializing the structured content a second (and third) time."""

    __slots__ = ("structured_json",)

    def __init__(self, wire: dict[str, Any], structured_json: bytes) -> None:
        super().__init__(wire)
        self.structured_json = structured_json


def _error(code: str, message: str) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=f"{code}: {message}")],
                          is_error=True)


def _outcome(exc: BaseException) -> str:
    code = getattr(exc, "code", "")
    if code in ("forbidden", "denied_by_policy"):
        return "denied"
    if code == "rate_limited":
        return "rate_limited"
    if code == "unauthorized":
        return "unauthorized"
    return "error"


def _log_crash(what: str, name: str, exc: BaseException) -> str:
    """Log an unexpected failure without its message (it may hold caller data)."""
    ref = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("%s %s failed unexpectedly (ref %s): %s\n%s", what, name, ref,
              type(exc).__name__, frames)
    return ref


class LodestoreMCP:
    """One MCP server over one store. ``identity`` turns a request into its principal."""

    def __init__(self, app: App, identity: Identity, *, specs: Iterable[ToolSpec] | None = None,
                 max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
                 max_resource_bytes: int = DEFAULT_MAX_RESOURCE_BYTES,
                 max_write_bytes: int = DEFAULT_MAX_WRITE_BYTES, metrics: Metrics | None = None,
                 name: str = "lodestore", instructions: str | None = None) -> None:
        self.app = app
        self.gateway = app.gateway
        self.identity = identity
        self.max_reply_bytes = max_reply_bytes
        self.metrics = metrics or Metrics()
        self.max_write_bytes = max_write_bytes
        self.max_resource_bytes = max(max_reply_bytes, max_resource_bytes)
        self.limits = {"max_reply_bytes": max_reply_bytes, "max_write_bytes": max_write_bytes,
                       "max_resource_bytes": self.max_resource_bytes}
        specs = load_tools() if specs is None else list(specs)
        self.entries: dict[str, _Entry] = {}
        tools: list[Tool] = []
        for spec in specs:
            if spec.name in self.entries:
                raise ValueError(f"tool {spec.name} is registered twice")
            tool = Tool.from_function(
                _schema_stub(spec), name=spec.name, title=spec.title,
                description=spec.description,
                annotations=ToolAnnotations(
                    title=spec.title, read_only_hint=spec.read_only,
                    destructive_hint=spec.destructive if not spec.read_only else False,
                    idempotent_hint=spec.idempotent, open_world_hint=False))
            meta = tool.fn_metadata
            if meta.output_schema is not None:
                meta.output_schema = compact_schema(meta.output_schema)
            self.entries[spec.name] = _Entry(spec, tool)
            tools.append(tool)
        try:
            from importlib.metadata import version
            ver = version("lodestore")
        except Exception:  # noqa: BLE001 - running from a source tree
            ver = "0"
        self.server: MCPServer = MCPServer(
            name=name, title="Lodestore", version=ver, tools=tools,
            instructions=instructions or (
                "Governed storage: files and search for this agent's tenant. Paths are "
                "tenant-relative (/notes/a.md). Files are also resources under "
                f"{FILES_TEMPLATE}. Reads may come masked where the tenant's policy hides "
                "labelled values from this agent's role. Conversation context survives "
                "restarts: session_append each turn, session_context to get it back within a "
                "token budget; remember / recall / forget keep facts across sessions."),
            log_level="WARNING")
        low = self.server._lowlevel_server  # the SDK's own Client reaches it the same way
        if not _otel_configured():
            # a span per message costs tens of microseconds even with no tracer installed
            low.middleware[:] = [m for m in low.middleware
                                 if type(m).__name__ != "OpenTelemetryMiddleware"]
        self.metrics.known_tools = set(self.entries) | {"unknown", "resources/read"}
        low.add_request_handler("tools/call", CallToolRequestParams, self._call_tool)
        low.add_request_handler("resources/list", PaginatedRequestParams, self._list_resources)
        low.add_request_handler("resources/templates/list", PaginatedRequestParams,
                                self._list_templates)
        low.add_request_handler("resources/read", ReadResourceRequestParams,
                                self._read_resource)
        sdk_run = low.run

        async def run(read_stream: Any, write_stream: Any, initialization_options: Any,
                      raise_exceptions: bool = False) -> None:
            """The SDK's server loop; on our stdio transport's stream it first hands the
            transport this app's ``tools/call`` fast path (``lodestore serve`` runs the loop
            as ``low.run(read, write, ...)``: the one place that sees app and transport)."""
            attach = getattr(read_stream, "attach_tool_calls", None)
            if attach is not None and not raise_exceptions:
                from .transports import ToolCallFastPath
                attach(ToolCallFastPath.for_app(self))
            await sdk_run(read_stream, write_stream, initialization_options, raise_exceptions)

        low.run = run  # type: ignore[method-assign]

    @property
    def lowlevel(self) -> Any:
        return self.server._lowlevel_server

    # -- tools ---------------------------------------------------------------------------

    async def _call_tool(self, ctx: ServerRequestContext[Any, Any],
                         params: CallToolRequestParams) -> CallToolResult | dict[str, Any]:
        """The SDK's ``tools/call`` handler: progress goes through the SDK session."""
        session = ctx.session

        async def progress(done: float, total: float | None = None,
                           message: str | None = None) -> None:
            await session.report_progress(done, total, message)

        return await self.call_tool(params.name, params.arguments or {}, progress, ctx=ctx)

    async def call_tool(self, name: str, arguments: dict[str, Any], progress: Progress, *,
                        ctx: ServerRequestContext[Any, Any] | None = None
                        ) -> CallToolResult | dict[str, Any]:
        """Run one tool call as the caller's principal; every failure an ``isError`` result.

        Needs no SDK request context (``ctx`` only reaches ``identity``), so a transport
        can call it directly; ``progress`` reports to the caller (a no-op when the caller
        asked for none)."""
        entry = self.entries.get(name)
        t0 = time.perf_counter()
        if entry is None:
            self.metrics.call("unknown", "invalid", 0.0)
            return _error("unknown_tool", f"no tool named {name!r}; call tools/list to see "
                          f"the tools: {', '.join(sorted(self.entries))}")
        outcome = "ok"
        try:
            result = await self._run(ctx, entry, arguments, progress)
            if isinstance(result, CallToolResult) and result.is_error:
                outcome = "invalid"
            return result
        except (ToolError, StorageError) as exc:
            outcome = _outcome(exc)
            code = getattr(exc, "code", "error")
            msg = exc.message if isinstance(exc, ToolError) else str(exc)
            log.info("tool %s: %s", name, code)
            return _error(code, msg)
        except Exception as exc:  # noqa: BLE001 - never a stack trace to the agent
            outcome = "internal"
            ref = _log_crash("tool", name, exc)
            return _error("internal_error", f"{name} failed unexpectedly. Check with a read "
                          f"whether it took effect, retry later, or report reference {ref} to "
                          "the operator (the server log has the details).")
        finally:
            self.metrics.call(name, outcome, time.perf_counter() - t0)

    async def _run(self, ctx: ServerRequestContext[Any, Any] | None, entry: _Entry,
                   arguments: dict[str, Any], progress: Progress
                   ) -> CallToolResult | dict[str, Any]:
        principal = await self.identity(ctx)
        meta = entry.tool.fn_metadata
        try:
            args = meta.validate_arguments(arguments)
        except ValidationError as exc:
            problems = []
            for err in exc.errors()[:8]:
                where = ".".join(str(p) for p in err["loc"]) or "(arguments)"
                problems.append(f"{where}: {err['msg']}")
            return _error("invalid_arguments", f"{entry.spec.name}: " + "; ".join(problems) +
                          "; see the tool's input schema")
        tctx = ToolContext(self.gateway, principal, progress, dict(self.limits))
        result = await entry.spec.fn(tctx, **args)
        return self._shape(entry, result)

    def _shape(self, entry: _Entry, result: Any) -> CallToolResult | dict[str, Any]:
        """The tool's answer in wire form. A structured answer is returned as the result
        dict itself: the SDK validates and dumps a handler's result anyway, so building a
        ``CallToolResult`` first would dump the whole structured content once more."""
        if isinstance(result, CallToolResult):
            return result
        meta = entry.tool.fn_metadata
        if meta.output_schema is None:
            if isinstance(result, BaseModel):
                text = result.model_dump_json(by_alias=True)
            elif isinstance(result, str):
                text = result
            else:
                text = json.dumps(result, ensure_ascii=False, default=str)
            return CallToolResult(content=[TextContent(type="text", text=text)])
        if isinstance(result, BaseModel):
            structured = result.model_dump(mode="json", by_alias=True)
        else:
            adapter = meta._output_adapter(meta.output_model)
            structured = adapter.dump_python(
                adapter.validate_python(result, by_alias=True, by_name=True),
                mode="json", by_alias=True)
        if meta.wrap_output:
            structured = {"result": structured}
        raw = pydantic_core.to_json(structured)  # compact, UTF-8; 2-3x json.dumps
        text = raw.decode()
        if len(text) > 4 * self.max_reply_bytes + 65536:
            return _error("reply_too_large",
                          f"{entry.spec.name} produced a {len(text)}-byte reply, over this "
                          f"server's limit ({self.max_reply_bytes} bytes); ask for less "
                          "(a smaller length or limit, or page with offset)")
        content: list[dict[str, Any]] = [{"type": "text", "text": text}]
        link = structured.get("resource_uri") if isinstance(structured, dict) else None
        if isinstance(link, str) and link.startswith(FILES_URI):
            # a file larger than one reply: clients that speak resources can fetch it whole
            content.append(ResourceLink(
                type="resource_link", uri=link, name=link.rsplit("/", 1)[-1] or "file",
                mime_type=mimetypes.guess_type(link)[0] or "application/octet-stream",
                size=structured.get("size")).model_dump(by_alias=True, mode="json",
                                                        exclude_none=True))
        return StructuredResult({"content": content, "structuredContent": structured,
                                 "isError": False, "resultType": "complete"}, raw)

    # -- resources -----------------------------------------------------------------------

    async def _list_templates(self, ctx: ServerRequestContext[Any, Any],
                              params: PaginatedRequestParams | None
                              ) -> ListResourceTemplatesResult:
        return ListResourceTemplatesResult(resource_templates=[ResourceTemplate(
            uri_template=FILES_TEMPLATE, name="file", title="Lodestore file",
            description="A file of this agent's tenant, by tenant-relative path "
                        "(lodestore://files/notes/a.md is /notes/a.md), read through the "
                        "governed gateway and masked per the caller's clearance.")])

    async def _list_resources(self, ctx: ServerRequestContext[Any, Any],
                              params: PaginatedRequestParams | None) -> ListResourcesResult:
        """The files at the top of the caller's tenant (a first page, for browsing)."""
        principal = await self._resource_principal(ctx)
        try:
            items, _ = await anyio.to_thread.run_sync(
                lambda: self.gateway.list_dir(principal, "/", None, RESOURCE_LIST_MAX))
        except StorageError as exc:
            raise MCPError(code=INVALID_PARAMS, message=str(exc)) from None
        return ListResourcesResult(resources=[
            Resource(uri=resource_uri(i.path), name=i.name, size=i.size,
                     mime_type=mimetypes.guess_type(i.name)[0])
            for i in items if not i.is_dir])

    async def _resource_principal(self, ctx: ServerRequestContext[Any, Any]) -> Principal:
        try:
            return await self.identity(ctx)
        except Unauthorized as exc:
            raise MCPError(code=INVALID_PARAMS, message=f"unauthorized: {exc}") from None

    async def _read_resource(self, ctx: ServerRequestContext[Any, Any],
                             params: ReadResourceRequestParams) -> ReadResourceResult:
        uri = str(params.uri)
        t0 = time.perf_counter()
        outcome = "ok"
        try:
            if not uri.startswith(FILES_URI):
                outcome = "invalid"
                raise MCPError(code=INVALID_PARAMS, message=(
                    f"unknown resource {uri!r}: Lodestore files are {FILES_TEMPLATE}"),
                    data={"uri": uri})
            path = "/" + unquote(uri[len(FILES_URI):].split("?", 1)[0].split("#", 1)[0])
            principal = await self._resource_principal(ctx)
            try:
                res = await self.gateway.aread(principal, path, 0, self.max_resource_bytes)
            except StorageError as exc:
                outcome = _outcome(exc)
                raise MCPError(code=INVALID_PARAMS, message=str(exc), data={"uri": uri}) from None
            if res.next_offset is not None:
                outcome = "invalid"
                raise MCPError(code=INVALID_PARAMS, data={"uri": uri}, message=(
                    f"{path} is {res.info.size} bytes, more than a resource read returns "
                    f"({self.max_resource_bytes}); read it in pages with the read_file tool "
                    "(offset and length)"))
            mime = mimetypes.guess_type(path)[0]
            meta = {"version": res.info.version}
            if res.masked:
                meta["masked"] = list(res.masked)
            try:
                text = res.data.decode("utf-8")
            except UnicodeDecodeError:
                import base64
                return ReadResourceResult(contents=[BlobResourceContents(
                    uri=uri, blob=base64.b64encode(res.data).decode(),
                    mime_type=mime or "application/octet-stream", _meta=meta)])
            return ReadResourceResult(contents=[TextResourceContents(
                uri=uri, text=text, mime_type=mime or "text/plain", _meta=meta)])
        except MCPError:
            if outcome == "ok":
                outcome = "error"
            raise
        except Exception as exc:  # noqa: BLE001
            outcome = "internal"
            ref = _log_crash("resource read", "", exc)
            raise MCPError(code=INTERNAL_ERROR,
                           message=f"reading the resource failed unexpectedly (ref {ref})"
                           ) from None
        finally:
            self.metrics.call("resources/read", outcome, time.perf_counter() - t0)


# -- identities ---------------------------------------------------------------------------


def token_identity(app: App, token: str) -> Identity:
    """stdio: every call runs as the agent of one token, re-checked (cached for 2 s) so a
    revocation takes effect during a session too."""
    gateway = app.gateway

    async def identity(ctx: ServerRequestContext[Any, Any] | None) -> Principal:
        return gateway.authenticate(token)
    return identity


def http_identity() -> Identity:
    """HTTP: the principal the bearer middleware verified for the request carrying this
    message; never anything from the message itself."""
    from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser

    async def identity(ctx: ServerRequestContext[Any, Any] | None) -> Principal:
        request = ctx.request if ctx is not None else None
        user = request.scope.get("user") if request is not None else None
        if isinstance(user, AuthenticatedUser):
            p = (user.access_token.claims or {}).get("principal")
            if isinstance(p, Principal):
                return p
        raise Unauthorized("this request carries no verified token; send "
                           "Authorization: Bearer <agent token>")
    return identity


__all__ = ["LodestoreMCP", "load_tools", "resource_uri", "token_identity", "http_identity",
           "DEFAULT_MAX_REPLY_BYTES", "FILES_TEMPLATE"]

"""A lean stdio transport for the MCP server.

The SDK's ``stdio_server`` reads and writes stdin/stdout through ``anyio.wrap_file``: every
line read and every reply written (and flushed) is a hop to a worker thread and back, which
is most of a small call's latency. This transport does the same job on the event loop:
``asyncio`` pipe transports on private duplicates of fd 0 and 1, newline-delimited JSON-RPC,
the same message models and the same memory-stream pair the SDK's server loop consumes, so
the protocol is the SDK's own and only the byte shuffling differs.

Like the SDK's transport it claims the standard streams while serving: fd 0 reads
``/dev/null`` and fd 1 points at stderr, so a stray ``print`` (ours or a library's) can
never corrupt the wire. When stdin or stdout is not a pipe or socket (a terminal, a regular
file), or the event loop is not asyncio, it falls back to the SDK's transport.

Fast path for ``tools/call``. Through the SDK's server loop a call costs ~0.2 ms of server
CPU before the tool runs and more after (message models, a connection, session and context
per request, the middleware chain, validating and re-dumping the result, dumping the
reply). At the 2026-07-28 revision there is no handshake: the SDK locks a connection's
protocol era on its first request, and on a modern connection every request carries its
own envelope (version, client info, capabilities in ``_meta``) and is served "born ready".
So once the first request has opened a modern connection, a ``tools/call`` line is checked
here with the SDK's own validators (the envelope ladder, the method's surface model for the
envelope's version, the handler's params model), run by ``LodestoreMCP.call_tool`` and
answered straight to the pipe with the bytes the SDK would have written. Progress
notifications, peer cancellation (``notifications/cancelled``: the call is interrupted and
never answered) and the shutdown answer (``Connection closed`` for calls in flight at EOF)
follow the SDK's dispatcher. Everything else takes the SDK's path unchanged: other methods,
notifications (a cancel is also passed on), a legacy (``initialize``) connection, input
that does not parse or validate, ids that are not int or str, ``requestState`` /
``inputResponses``, middleware other than the SDK's request-state boundary, cache hints.
``LODESTORE_STDIO_FASTPATH=0`` turns it off (for A/B comparisons).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import stat
import sys

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
import pydantic_core
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.server.connection import Connection
from mcp.server.lowlevel.server import HandlerEntry
from mcp.server.request_state import RequestStateBoundary
from mcp.server.runner import ServerRunner
from mcp.server.stdio import stdio_server
from mcp.shared._context_streams import (
    ContextReceiveStream,
    ContextSendStream,
    create_context_streams,
)
from mcp.shared.dispatcher import coerce_request_id
from mcp.shared.inbound import InboundModernRoute, classify_inbound_request
from mcp.shared.jsonrpc_dispatcher import (
    cancelled_request_id_from_params,
    handler_exception_to_error_data,
    progress_token_from_params,
)
from mcp.shared.message import SessionMessage
from mcp_types import (
    CONNECTION_CLOSED,
    INTERNAL_ERROR,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
    ErrorData,
    JSONRPCError,
    JSONRPCNotification,
    JSONRPCRequest,
    JSONRPCResponse,
)
from mcp_types import methods as _methods
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from tools.registry import Progress

from .mcp_app import StructuredResult

if TYPE_CHECKING:
    from .mcp_app import LodestoreMCP

log = logging.getLogger(__name__)

FASTPATH_ENV = "LODESTORE_STDIO_FASTPATH"  # "0": every message through the SDK's loop

MAX_LINE = 256 << 20  # the longest JSON-RPC message accepted (a line); larger is an error
PIPE_SIZE = 1 << 20  # Linux caps it at /proc/sys/fs/pipe-max-size (1 MiB by default)
_BUFFER = 32  # messages queued between the pipe tasks and the server loop


def _streamable(fd: int) -> bool:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def fast_stdio_possible(stdin_fd: int = 0, stdout_fd: int = 1) -> bool:
    """True when both ends are pipes or sockets and the loop is asyncio."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return _streamable(stdin_fd) and _streamable(stdout_fd)


def freeze_heap() -> None:
    """Move everything a started server holds (modules, schemas, tools: ~180k objects)
    out of the cyclic collector's reach. Otherwise every full collection walks them all,
    a ~120 ms pause that lands on some call's latency a few times per thousand calls."""
    gc.collect()
    gc.freeze()


class _Claim:
    """Take fd 0 and 1 for the wire; point them at /dev/null and stderr meanwhile."""

    def __init__(self) -> None:
        self.rfd = os.dup(0)
        self.wfd = os.dup(1)
        os.set_inheritable(self.rfd, False)
        os.set_inheritable(self.wfd, False)
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            os.dup2(null, 0)
        finally:
            os.close(null)
        os.dup2(2, 1)

    def restore(self) -> None:
        with contextlib.suppress(OSError):
            os.dup2(self.rfd, 0)
        with contextlib.suppress(OSError):
            os.dup2(self.wfd, 1)


# -- tools/call fast path -------------------------------------------------------------------

_REQUEST_KEYS = frozenset({"jsonrpc", "id", "method", "params"})
_TOOLS_CALL = "tools/call"
_CLOSED = ErrorData(code=CONNECTION_CLOSED, message="Connection closed")
_NON_FINITE = (b"Infinity", b"NaN")  # to_json writes these; the SDK's reply dump writes null


def _has_envelope(params: Any) -> bool:
    """The SDK's era test (``runner._has_modern_envelope``): the 2026 version key in _meta."""
    meta = params.get("_meta") if isinstance(params, Mapping) else None
    return isinstance(meta, Mapping) and PROTOCOL_VERSION_META_KEY in meta


def _line(message: Any) -> bytes:
    """A message model as the transport writes it (what ``pump_out`` does)."""
    return message.model_dump_json(by_alias=True, exclude_unset=True).encode()


def error_line(request_id: int | str, error: ErrorData) -> bytes:
    """A JSON-RPC error reply, as the SDK's dispatcher writes one."""
    return _line(JSONRPCError(jsonrpc="2.0", id=request_id, error=error))


@dataclass(slots=True)
class ToolCall:
    """A ``tools/call`` the SDK would accept, reduced to what running it needs."""

    id: int | str
    name: str
    arguments: dict[str, Any]
    version: str
    progress_token: int | str | None


class ToolCallFastPath:
    """``tools/call`` for one ``LodestoreMCP``: accepted, run and answered as the SDK would.

    Acceptance reuses the SDK's validators, so what is accepted here is exactly what the
    SDK's modern path accepts (a request it would refuse goes to it and is refused there).
    A reply is built from the SDK's own result shaping (``ServerRunner._serialize``) and
    reply model, except the common one (structured content with its one text block),
    whose bytes are spliced together; a self-check at start compares the two encodings
    and keeps the fast path off for a protocol version where they differ.
    """

    def __init__(self, app: LodestoreMCP) -> None:
        self.app = app
        self.low = app.lowlevel
        self._meta = pydantic_core.to_json({SERVER_INFO_META_KEY: self.low.server_info_stamp})
        self._runners = {v: ServerRunner(self.low, Connection.from_envelope(v, None, None), None)
                         for v in MODERN_PROTOCOL_VERSIONS}
        self.versions = frozenset(v for v in MODERN_PROTOCOL_VERSIONS if self._self_check(v))

    @classmethod
    def for_app(cls, app: LodestoreMCP) -> ToolCallFastPath | None:
        """The fast path for ``app``, or None when switched off or not safe with this SDK."""
        if os.environ.get(FASTPATH_ENV, "1").strip() == "0":
            return None
        try:
            fast = cls(app)
        except Exception as exc:  # noqa: BLE001 - an SDK we do not know: use its path
            log.warning("tools/call fast path off: %s: %s", type(exc).__name__, exc)
            return None
        if not fast.versions:
            log.warning("tools/call fast path off: replies would differ from the SDK's")
            return None
        return fast

    def _self_check(self, version: str) -> bool:
        structured = {"path": '/a "b"\n\u00e9\u2028/\\', "n": [1, -2.5, 1e300, None, True],
                      "big": 2 ** 70, "nested": {"k": [], "e": {}}, "next_offset": None}
        raw = pydantic_core.to_json(structured)
        sample = StructuredResult({"content": [{"type": "text", "text": raw.decode()}],
                                   "structuredContent": structured, "isError": False,
                                   "resultType": "complete"}, raw)
        return all(self._spliced(rid, sample) == self._sdk_reply(rid, version, sample)
                   for rid in (7, "req-\u00e9\"1"))

    def _entry(self) -> HandlerEntry[Any] | None:
        """The SDK's ``tools/call`` entry while its path would do nothing more than our
        handler: no other middleware, our handler still registered, no cache hint."""
        low = self.low
        if any(type(m) is not RequestStateBoundary for m in low.middleware):
            return None
        entry = low.get_request_handler(_TOOLS_CALL)
        if (entry is None or entry.handler != self.app._call_tool
                or _TOOLS_CALL in low.cache_hints):
            return None
        return entry

    def prepare(self, msg: Any) -> ToolCall | None:
        """``msg`` (a parsed line) as a call to run here, or None for the SDK's path."""
        if type(msg) is not dict or msg.get("method") != _TOOLS_CALL:
            return None
        rid = msg.get("id")
        params = msg.get("params")
        # a float or bool id makes the SDK read the message as a notification: leave it be
        if (type(rid) not in (int, str) or msg.get("jsonrpc") != "2.0"
                or not msg.keys() <= _REQUEST_KEYS or type(params) is not dict
                or "requestState" in params or "inputResponses" in params):
            return None
        entry = self._entry()
        if entry is None:
            return None
        route = classify_inbound_request(msg)
        if not isinstance(route, InboundModernRoute) or route.protocol_version not in self.versions:
            return None
        version = route.protocol_version
        try:
            _methods.validate_client_request(_TOOLS_CALL, version, params)
            typed = entry.params_type.model_validate(params, by_name=False)
        except (ValidationError, KeyError, ValueError):
            return None  # the SDK answers it (INVALID_PARAMS and the like)
        return ToolCall(rid, typed.name, typed.arguments or {}, version,
                        progress_token_from_params(params))

    async def run(self, call: ToolCall, progress: Progress) -> bytes:
        """The reply line for ``call``: a result, or the error the SDK's modern path sends."""
        try:
            result = await self.app.call_tool(call.name, call.arguments, progress)
            return self.reply(call.id, call.version, result)
        except Exception as exc:  # noqa: BLE001 - mapped as the SDK maps a handler's failure
            error = handler_exception_to_error_data(exc)
            if error is None:
                log.exception("modern request handler raised")
                error = ErrorData(code=INTERNAL_ERROR, message="Internal server error")
            return error_line(call.id, error)

    def reply(self, request_id: int | str, version: str, result: Any) -> bytes:
        if (type(result) is StructuredResult and version in self.versions
                and len(result) == 4 and result.get("isError") is False
                and result.get("resultType") == "complete"
                and not any(t in result.structured_json for t in _NON_FINITE)):
            content = result.get("content")
            if (type(content) is list and len(content) == 1 and type(content[0]) is dict
                    and len(content[0]) == 2 and content[0].get("type") == "text"
                    and type(content[0].get("text")) is str and "structuredContent" in result):
                return self._spliced(request_id, result)
        return self._sdk_reply(request_id, version, result)

    def _spliced(self, request_id: int | str, result: StructuredResult) -> bytes:
        """The SDK's reply bytes for a structured result, without re-serializing it: the
        sieve orders result keys by its model (content, isError, resultType,
        structuredContent), text blocks as text, type; the serverInfo stamp comes last."""
        return b"".join((
            b'{"jsonrpc":"2.0","id":', pydantic_core.to_json(request_id),
            b',"result":{"content":[{"text":', pydantic_core.to_json(result["content"][0]["text"]),
            b',"type":"text"}],"isError":false,"resultType":"complete","structuredContent":',
            result.structured_json, b',"_meta":', self._meta, b"}}"))

    def _sdk_reply(self, request_id: int | str, version: str, result: Any) -> bytes:
        """The reply exactly as the SDK builds it (its result shaping, its reply model)."""
        dumped = self._runners[version]._serialize(_TOOLS_CALL, version, result)
        return _line(JSONRPCResponse(jsonrpc="2.0", id=request_id, result=dumped))

    @staticmethod
    def progress_line(token: int | str, done: float, total: float | None,
                      message: str | None) -> bytes:
        """``notifications/progress`` as the SDK's dispatch context sends it."""
        params: dict[str, Any] = {"progressToken": token, "progress": done}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        return _line(JSONRPCNotification(jsonrpc="2.0", method="notifications/progress",
                                         params=params))


@dataclass(slots=True)
class _Flight:
    """A fast-path call in flight (the SDK dispatcher's ``_InFlight``)."""

    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    peer_cancelled: bool = False  # notifications/cancelled: never answered
    closing: bool = False  # transport shutting down: answered "Connection closed"
    done: bool = False  # the handler returned: progress is dropped from here on


class _FastLane:
    """Per connection: which era the SDK's loop serves, the fast calls in flight, and the
    cancels and shutdown that concern them. Lives in the transport's read task."""

    def __init__(self, write: Callable[[bytes], Awaitable[None]],
                 write_now: Callable[[bytes], bool]) -> None:
        self.fast: ToolCallFastPath | None = None
        self.modern: bool | None = None  # None until the first request reaches the SDK
        self.in_flight: dict[int | str, _Flight] = {}
        self.spawn: Callable[..., Any] | None = None  # the transport's task group, once open
        self._write = write
        self._write_now = write_now

    def offer(self, line: bytes) -> bool:
        """Serve ``line`` here if it is a fast-path ``tools/call``; False: the SDK's turn."""
        fast = self.fast
        if fast is None or not self.modern:
            return False
        try:
            call = fast.prepare(pydantic_core.from_json(line))
        except Exception:  # noqa: BLE001 - not parsable here (or a surprise): the SDK's turn
            return False
        if call is None or self.spawn is None:
            return False
        flight = _Flight()
        key = coerce_request_id(call.id)
        self.in_flight[key] = flight  # a duplicate id replaces the entry, as in the SDK
        self.spawn(self._serve, fast, call, key, flight)
        return True

    def observe(self, msg: Any) -> None:
        """A message on its way to the SDK: the first request fixes the era (as the SDK's
        dual-era loop decides it); a cancel also interrupts a fast call with that id."""
        if isinstance(msg, JSONRPCRequest):
            if self.modern is None:
                self.modern = msg.method != "initialize" and _has_envelope(msg.params)
        elif isinstance(msg, JSONRPCNotification) and msg.method == "notifications/cancelled":
            rid = cancelled_request_id_from_params(msg.params)
            flight = self.in_flight.get(coerce_request_id(rid)) if rid is not None else None
            if flight is not None:
                flight.peer_cancelled = True
                flight.scope.cancel()

    def close(self) -> None:
        """EOF or shutdown: cancel the calls in flight; each answers "Connection closed"."""
        for flight in list(self.in_flight.values()):
            flight.closing = True
            flight.scope.cancel()

    async def _serve(self, fast: ToolCallFastPath, call: ToolCall, key: int | str,
                     flight: _Flight) -> None:
        answered = False
        token = call.progress_token

        async def progress(done: float, total: float | None = None,
                           message: str | None = None) -> None:
            if token is not None and not flight.done:
                await self._write(fast.progress_line(token, done, total, message))

        try:
            with flight.scope:
                try:
                    data = await fast.run(call, progress)
                finally:
                    flight.done = True
                    if self.in_flight.get(key) is flight:
                        del self.in_flight[key]
                if not flight.peer_cancelled:
                    answered = True
                    await self._write(data)
        except anyio.get_cancelled_exc_class():
            if not answered and not flight.peer_cancelled:
                self._write_now(error_line(call.id, _CLOSED))
            raise
        if flight.closing and not answered and not flight.peer_cancelled:
            self._write_now(error_line(call.id, _CLOSED))


class _StdioReadStream(ContextReceiveStream[SessionMessage | Exception]):
    """The server loop's read stream. ``attach_tool_calls`` hands the transport a fast path;
    ``LodestoreMCP`` calls it as its server loop starts on this stream."""

    __slots__ = ("_lane",)

    def __init__(self, inner: MemoryObjectReceiveStream[Any], lane: _FastLane) -> None:
        super().__init__(inner)
        self._lane = lane

    def attach_tool_calls(self, fast: ToolCallFastPath | None) -> None:
        self._lane.fast = fast


@contextlib.asynccontextmanager
async def fast_stdio_server(stdin_fd: int | None = None, stdout_fd: int | None = None
                            ) -> AsyncIterator[tuple[Any, Any]]:
    """Yield ``(read_stream, write_stream)`` for ``Server.run``, served from stdin/stdout.

    With explicit ``stdin_fd``/``stdout_fd`` (tests, benchmarks) those are used as they
    are and nothing is claimed.
    """
    claim: _Claim | None = None
    if stdin_fd is None or stdout_fd is None:
        if not fast_stdio_possible():
            async with stdio_server() as streams:
                yield streams
            return
        claim = _Claim()
        stdin_fd, stdout_fd = claim.rfd, claim.wfd
        freeze_heap()
    for fd in (stdin_fd, stdout_fd):  # bigger pipes: a 2 MB reply in a few writes, not 32
        with contextlib.suppress(OSError, AttributeError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE, loop=loop)
    rpipe = os.fdopen(stdin_fd, "rb", buffering=0, closefd=False)
    wpipe = os.fdopen(stdout_fd, "wb", buffering=0, closefd=False)
    rtransport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), rpipe)
    wtransport, wprotocol = await loop.connect_write_pipe(
        lambda: asyncio.streams.FlowControlMixin(loop=loop), wpipe)
    writer = asyncio.StreamWriter(wtransport, wprotocol, None, loop)

    def write_now(data: bytes) -> bool:
        """One whole line into the pipe's buffer (no await: lines never interleave)."""
        if wtransport.is_closing():
            return False
        writer.writelines((data, b"\n"))
        return True

    async def write(data: bytes) -> None:
        if write_now(data) and wtransport.get_write_buffer_size() > (1 << 20):
            try:
                await writer.drain()
            except (BrokenPipeError, ConnectionResetError):
                log.info("stdout closed by the client")

    lane = _FastLane(write, write_now)
    raw_send, raw_recv = anyio.create_memory_object_stream[Any](_BUFFER)
    read_send = ContextSendStream[SessionMessage | Exception](raw_send)
    read_recv = _StdioReadStream(raw_recv, lane)
    write_send, write_recv = create_context_streams[SessionMessage](_BUFFER)
    validate = types.jsonrpc_message_adapter.validate_json

    async def pump_in() -> None:
        async with read_send:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE: skip to the next newline
                    log.warning("dropped a stdio message longer than %d bytes", MAX_LINE)
                    with contextlib.suppress(Exception):
                        await reader.readuntil(b"\n")
                    continue
                if not line:
                    lane.close()  # as the SDK's loop cancels its calls in flight at EOF
                    return  # EOF: the client went away
                if line.isspace() or lane.offer(line):
                    continue
                try:
                    msg = validate(line, by_name=False)
                except Exception as exc:  # noqa: BLE001 - the server loop answers parse errors
                    await read_send.send(exc)
                    continue
                lane.observe(msg)
                try:
                    await read_send.send(SessionMessage(msg))
                except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                    return

    async def pump_out() -> None:
        try:
            async with write_recv:
                async for sm in write_recv:
                    data = sm.message.model_dump_json(by_alias=True, exclude_unset=True)
                    writer.writelines((data.encode(), b"\n"))
                    if wtransport.get_write_buffer_size() > (1 << 20):
                        await writer.drain()
        except (BrokenPipeError, ConnectionResetError):
            log.info("stdout closed by the client")

    try:
        async with anyio.create_task_group() as tg:
            reading = anyio.CancelScope()

            async def pump_in_scoped() -> None:
                with reading:
                    await pump_in()

            lane.spawn = tg.start_soon
            tg.start_soon(pump_in_scoped)
            tg.start_soon(pump_out)
            try:
                yield read_recv, write_send
            finally:
                reading.cancel()
                lane.close()
                # replies already queued still go out; then the writer ends by itself
                await write_send.aclose()
    finally:
        with contextlib.suppress(Exception):
            if not wtransport.is_closing():
                await asyncio.wait_for(writer.drain(), 5)
        rtransport.close()
        wtransport.close()
        if claim is not None:
            claim.restore()

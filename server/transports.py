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
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
from mcp.server.stdio import stdio_server
from mcp.shared._context_streams import create_context_streams
from mcp.shared.message import SessionMessage

log = logging.getLogger(__name__)

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

    read_send, read_recv = create_context_streams[SessionMessage | Exception](_BUFFER)
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
                    return  # EOF: the client went away
                if line.isspace():
                    continue
                try:
                    msg = validate(line, by_name=False)
                except Exception as exc:  # noqa: BLE001 - the server loop answers parse errors
                    await read_send.send(exc)
                    continue
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

            tg.start_soon(pump_in_scoped)
            tg.start_soon(pump_out)
            try:
                yield read_recv, write_send
            finally:
                reading.cancel()
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

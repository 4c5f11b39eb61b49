#!/usr/bin/env python
"""The floor under MCP per-call latency with the Python SDK client: what a call costs
before any server work, beside the reference server's read, in the same run.

Issue 4 asks for our p50 <= the reference Node filesystem server's p50 per call, over
stdio and streamable HTTP, driven by the same Python ``mcp.Client``. Two parts of that
are bounded by the client, not by any server:

- **streamable HTTP**: a bare SDK ``MCPServer`` whose only tool returns ``"ok"``, served
  by uvicorn on 127.0.0.1 and called through ``mcp.Client`` over streamable HTTP, against
  the reference server's ``read_text_file`` of 1 KiB over stdio. (The in-memory transport,
  no I/O at all, is printed for scale.)
- **typed listings**: the client re-validates every structured result against the tool's
  output schema with ``jsonschema`` (compiled once, as the SDK does). Printed: the cost of
  validating ``list_directory``'s result for 100 entries, against the reference's whole
  ``list_directory`` call (whose output schema is one string).

Run from the repository root (needs node and the reference package; see bench_mcp.py)::

    .venv/bin/python benchmarks/bench_mcp_floor.py --ref-dir /tmp/refnpm
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks", ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import mcp_support as ms  # noqa: E402
import uvicorn  # noqa: E402
from bench_mcp import install_reference  # noqa: E402
from jsonschema import exceptions as jsonschema_exceptions  # noqa: E402
from jsonschema.validators import validator_for  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402
from mcp.server.mcpserver import MCPServer  # noqa: E402


async def p50(client: Client, name: str, args: dict[str, Any], n: int) -> float:
    for _ in range(min(30, n)):
        await client.call_tool(name, args)
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.call_tool(name, args)
        lat.append(time.perf_counter() - t0)
    lat.sort()
    return lat[len(lat) // 2] * 1e3


def validation_ms(n_entries: int, rounds: int = 200) -> float:
    """The SDK client's check of one list_directory result (our output schema as served)."""
    from server.mcp_app import compact_schema
    from tools.files import ListDirectoryResult

    schema = compact_schema(ListDirectoryResult.model_json_schema())
    validator = validator_for(schema)(schema)
    result = {"path": "/d", "next_cursor": None, "entries": [
        {"name": f"f{i:03d}.txt", "kind": "file", "size": 1, "version": 1,
         "modified": "2026-11-26T21:00:00.123456Z"} for i in range(n_entries)]}
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(rounds // 5):
            if jsonschema_exceptions.best_match(validator.iter_errors(result)) is not None:
                raise RuntimeError("the sample listing does not match the schema")
        best = min(best, (time.perf_counter() - t0) / (rounds // 5))
    return best * 1e3


async def run(args: argparse.Namespace) -> None:
    logging.disable(logging.INFO)  # httpx logs every request at INFO
    noop = MCPServer("noop")

    @noop.tool()
    def ping() -> str:
        """Return "ok" (no work: what the transport and the SDK cost)."""
        return "ok"

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(noop.streamable_http_app(), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        await asyncio.sleep(0.05)
    entry = install_reference(Path(args.ref_dir))
    if entry is None:
        raise SystemExit("the reference server is not installed (npm + --ref-dir)")
    root = Path(tempfile.mkdtemp(prefix="lodestore-floor-"))
    (root / "one.txt").write_text("k" * 1024)
    (root / "dir").mkdir()
    for i in range(100):
        (root / "dir" / f"f{i:03d}.txt").write_text("x")
    print(f"{'round':>5}  {'no-op, SDK over HTTP':>21}  {'no-op, in-memory':>17}  "
          f"{'reference read, stdio':>22}  {'reference list (100), stdio':>28}   (p50 ms)")
    async with Client(ms.http_transport(f"http://127.0.0.1:{port}/mcp", None)) as http, \
            Client(noop) as memory, \
            Client(StdioServerParameters(command="node", args=[str(entry), str(root)])) as ref:
        for r in range(args.rounds):
            a = await p50(http, "ping", {}, args.calls)
            b = await p50(memory, "ping", {}, args.calls)
            c = await p50(ref, "read_text_file", {"path": str(root / "one.txt")}, args.calls)
            d = await p50(ref, "list_directory", {"path": str(root / "dir")}, args.calls)
            print(f"{r + 1:>5}  {a:>21.3f}  {b:>17.3f}  {c:>22.3f}  {d:>28.3f}")
    server.should_exit = True
    v = validation_ms(100)
    print(f"client-side validation of one 100-entry list_directory result: {v:.3f} ms "
          "(jsonschema, compiled once, as mcp.Client does)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref-dir", default="/tmp/refnpm", help="where the reference npm "
                    "package is (installed there if missing)")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()

"""Shared by the MCP tests and benchmarks/bench_mcp.py (not a test module).

- ``DEMO_SPECS``: a few tiny tools built on the gateway, registered next to the real tools
  so the transport, identity and error paths are tested whatever tools exist yet.
- Run as a script it is ``lodestore`` itself with those demo tools added:
  ``python tests/mcp_support.py serve --transport stdio`` (the real ``server.cli.main``).
- ``lodestore_argv()``: how to start the real CLI in a subprocess.
- ``make_agents()``: tenants and agents in a store, tokens returned.
"""

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from tools.registry import ToolContext, ToolError, ToolSpec  # noqa: E402

PY = sys.executable
SUPPORT = str(Path(__file__).resolve())


class WhoAmI(BaseModel):
    tenant: str
    agent: str
    role: str
    echo: str


class Written(BaseModel):
    path: str
    size: int
    version: int


class ReadOut(BaseModel):
    path: str
    content: str
    next_offset: int | None = None
    masked: list[str] = []


class Listing(BaseModel):
    entries: list[str]


async def demo_whoami(ctx: ToolContext,
                      echo: Annotated[str, Field(description="Text to send back.")] = ""
                      ) -> WhoAmI:
    p = ctx.principal
    return WhoAmI(tenant=p.tenant, agent=p.agent, role=p.role, echo=echo)


async def demo_write(ctx: ToolContext,
                     path: Annotated[str, Field(description="Tenant-relative path.")],
                     content: Annotated[str, Field(description="UTF-8 text to store.")]
                     ) -> Written:
    res = await ctx.gateway.awrite(ctx.principal, path, content.encode())
    return Written(path=res.info.path, size=res.info.size, version=res.info.version)


async def demo_read(ctx: ToolContext, path: str, offset: int = 0,
                    length: int | None = None) -> ReadOut:
    cap = int(ctx.limits.get("max_reply_bytes", 1 << 20))
    length = cap if length is None else min(length, cap)
    res = await ctx.gateway.aread(ctx.principal, path, offset, length)
    return ReadOut(path=res.info.path, content=res.data.decode("utf-8", "replace"),
                   next_offset=res.next_offset, masked=res.masked)


async def demo_list(ctx: ToolContext, path: str = "/") -> Listing:
    items, _ = await anyio.to_thread.run_sync(
        lambda: ctx.gateway.list_dir(ctx.principal, path))
    return Listing(entries=[i.name for i in items])


async def demo_fail(ctx: ToolContext, kind: Literal["tool", "crash"]) -> WhoAmI:
    if kind == "tool":
        raise ToolError("demo_refused", "the demo refuses; pass kind='crash' to see a crash")
    raise RuntimeError("secret-value-4111-1111")  # must never reach the agent


async def demo_progress(ctx: ToolContext, steps: int = 3) -> Listing:
    for i in range(steps):
        if ctx.progress is not None:
            await ctx.progress(i + 1, steps, f"step {i + 1}")
    return Listing(entries=[str(i) for i in range(steps)])


DEMO_SPECS = [
    ToolSpec("demo_whoami", demo_whoami, "Who the server thinks is calling.", True, False, True,
             "Who am I"),
    ToolSpec("demo_write", demo_write, "Write a text file.", False, True, True),
    ToolSpec("demo_read", demo_read, "Read a text file.", True, False, True),
    ToolSpec("demo_list", demo_list, "List a directory.", True, False, True),
    ToolSpec("demo_fail", demo_fail, "Fail on purpose.", True, False, True),
    ToolSpec("demo_progress", demo_progress, "Report progress.", True, False, True),
]


def cli_serve_registered() -> bool:
    return "cli_serve" in (ROOT / "server" / "cli.py").read_text()


def lodestore_argv(demo: bool = False) -> list[str]:
    """The command line of ``lodestore`` (optionally with the demo tools)."""
    script = Path(PY).parent / "lodestore"  # the console script (`python -m server.cli`
    # runs cli.py as __main__, a second copy of the module the other commands register on)
    if demo or not cli_serve_registered() or not script.exists():
        return [PY, SUPPORT] if demo else [PY, SUPPORT, "--no-demo"]
    return [str(script)]


def make_agents(home: Path, agents: list[tuple[str, str, str]]) -> dict[str, str]:
    """Create tenants/agents (tenant, agent, role); return {"tenant/agent": token}."""
    from server.wiring import open_app
    from storage.errors import AlreadyExists

    app = open_app(home, transport="cli", create=True)
    try:
        out = {}
        for tenant, agent, role in agents:
            with contextlib.suppress(AlreadyExists):
                app.principals.add_tenant(tenant)
            out[f"{tenant}/{agent}"] = app.principals.add_agent(tenant, agent, role)
        return out
    finally:
        app.close()


def env_for(home: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LODESTORE_")}
    env["LODESTORE_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if token is not None:
        env["LODESTORE_TOKEN"] = token
    return env


def _main() -> None:
    import server.cli_serve  # noqa: F401  (registers serve and claude-config if cli.py does not)
    from server.cli import main

    args = sys.argv[1:]
    if args[:1] == ["--no-demo"]:
        args = args[1:]
    else:
        from tools import registry
        registry.TOOLS.extend(DEMO_SPECS)
    main(args=args, prog_name="lodestore")


if __name__ == "__main__":
    _main()


class HttpServer:
    """``lodestore serve --transport http|sse --port 0`` in a subprocess."""

    def __init__(self, home: Path, *extra: str, transport: str = "http", demo: bool = True,
                 token: str | None = None) -> None:
        import re
        import subprocess
        import threading
        import time

        import httpx2

        argv = lodestore_argv(demo=demo)
        self.proc = subprocess.Popen(
            [*argv, "serve", "--transport", transport, "--port", "0", *extra],
            env=env_for(home, token), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.stderr: list[str] = []
        found = threading.Event()
        self.base = ""

        def drain() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.stderr.append(line)
                m = re.search(r"(http://\S+?)/(mcp|sse)\s*$", line)
                if m and not self.base:
                    self.base = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(60) or not self.base:
            self.stop()
            raise RuntimeError("server did not start:\n" + "".join(self.stderr))
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx2.get(self.base + "/healthz", timeout=2).status_code in (200, 503):
                    break
            except httpx2.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("server not healthy:\n" + "".join(self.stderr))
            time.sleep(0.05)

    def token_line(self) -> str | None:
        for line in self.stderr:
            if "LODESTORE_TOKEN=" in line:
                return line.split("LODESTORE_TOKEN=", 1)[1].strip()
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "HttpServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def bearer_client(token: str | None) -> "Any":
    """An httpx2 client with the SDK's MCP timeouts and a bearer token."""
    from mcp.shared._httpx_utils import create_mcp_http_client

    return create_mcp_http_client(
        headers={"Authorization": f"Bearer {token}"} if token else None)


@contextlib.asynccontextmanager
async def http_transport(url: str, token: str | None) -> "Any":
    """A streamable-HTTP transport for ``mcp.Client`` sending ``Authorization: Bearer``."""
    from mcp.client.streamable_http import streamable_http_client

    async with bearer_client(token) as http, streamable_http_client(
            url, http_client=http) as streams:
        yield streams


def sse_transport(url: str, token: str | None) -> "Any":
    from mcp.client.sse import sse_client

    return sse_client(url, headers={"Authorization": f"Bearer {token}"} if token else None)

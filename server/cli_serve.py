"""``lodestore serve`` and ``lodestore claude-config``. Registered on ``lodestore``.

Identity: a stdio server runs as the agent whose token is in ``LODESTORE_TOKEN``; HTTP
transports take a bearer token on every request. ``--tenant T --agent A`` is the
local-development shortcut: it creates the tenant if missing and mints (or, when
``LODESTORE_TOKEN`` already is that agent's token, reuses) the agent's token.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

import click

from governance.errors import Unauthorized
from storage.errors import AlreadyExists

from .cli import home_of, main
from .wiring import App, open_app

TRANSPORT_TAG = {"stdio": "stdio", "http": "http", "sse": "sse"}


def _fail(message: str) -> None:
    raise click.ClickException(message)


def _dev_token(app: App, tenant: str, agent: str, role: str) -> tuple[str, bool]:
    """The token of TENANT/AGENT for local development: (token, minted)."""
    env = os.environ.get("LODESTORE_TOKEN")
    if env:
        try:
            p = app.principals.authenticate(env)
        except Unauthorized:
            p = None
        if p is not None and (p.tenant, p.agent) == (tenant, agent):
            return env, False
    with contextlib.suppress(AlreadyExists):
        app.principals.add_tenant(tenant)
    return app.principals.reissue(tenant, agent, role), True


def _stdio_token(app: App, home: Path) -> str:
    token = os.environ.get("LODESTORE_TOKEN", "").strip()
    try:
        app.principals.authenticate(token)
    except Unauthorized as exc:
        _fail(f"LODESTORE_TOKEN is not valid for the store at {home} ({exc}); mint a new one "
              "with `lodestore agent add TENANT NAME` and check LODESTORE_HOME")
    return token


def _logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(level)
    logging.getLogger("lodestore").setLevel(logging.INFO)
    for noisy in ("mcp", "httpx", "httpx2", "uvicorn.access", "sse_starlette"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)  # language notes at load


@main.command()
@click.option("--transport", type=click.Choice(["stdio", "http", "sse"]), default="stdio",
              show_default=True,
              help="stdio for a local client (Claude Desktop); http serves streamable HTTP at "
                   "/mcp and legacy SSE at /sse; sse serves only the legacy SSE transport.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (HTTP). Anything but loopback exposes the server.")
@click.option("--port", type=int, default=8765, show_default=True,
              help="Port to bind (HTTP); 0 picks a free one.")
@click.option("--tenant", default=None, help="Local development: run as (stdio) or mint a "
              "token for (http) this tenant's agent --agent; the tenant is created if missing.")
@click.option("--agent", default=None, help="Agent name for --tenant.")
@click.option("--role", default="agent", show_default=True,
              help="Role of an agent that --tenant/--agent creates.")
@click.option("--public-url", default=None,
              help="Base URL clients use to reach this server (default http://HOST:PORT); it "
                   "is the resource tokens are accepted for.")
@click.option("--allow-origin", "allow_origins", multiple=True,
              help="An Origin (e.g. https://app.example.com) allowed besides loopback ones; "
                   "repeatable.")
@click.option("--max-reply-bytes", type=int, default=1 << 20, show_default=True,
              help="Largest data a tool returns inline; larger reads are paged.")
@click.option("--max-resource-bytes", type=int, default=64 << 20, show_default=True,
              help="Largest file a resources/read returns whole (read_file links to it).")
@click.option("--max-write-bytes", type=int, default=16 << 20, show_default=True,
              help="Largest content one write carries (larger: append in pieces).")
@click.option("--kv-hot-mib", type=click.IntRange(min=0), default=512, show_default=True,
              help="Token warehouse (/v1/kv): memory for hot KV-cache blocks.")
@click.option("--kv-capacity-gib", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Token warehouse: per-tenant block capacity; least recently used blocks "
                   "are evicted past it (default: no limit).")
@click.option("--kv-ttl", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Token warehouse: seconds a block lives unless its put says otherwise "
                   "(default: no expiry).")
@click.option("--json-response", is_flag=True,
              help="HTTP: answer POSTs with plain JSON instead of an SSE stream (no progress "
                   "notifications).")
@click.option("--stdio-sdk", is_flag=True, hidden=True,
              help="Use the SDK's threaded stdio transport instead of the event-loop one.")
@click.option("-v", "--verbose", is_flag=True, help="Log each refusal and error to stderr.")
@click.pass_context
def serve(ctx: click.Context, transport: str, host: str, port: int, tenant: str | None,
          agent: str | None, role: str, public_url: str | None, allow_origins: tuple[str, ...],
          max_reply_bytes: int, max_resource_bytes: int, max_write_bytes: int,
          kv_hot_mib: int, kv_capacity_gib: float | None, kv_ttl: float | None,
          json_response: bool, stdio_sdk: bool,
          verbose: bool) -> None:
    """Serve the MCP tools over stdio, streamable HTTP (/mcp) or SSE (/sse).

    The first run creates the embedded store at LODESTORE_HOME. stdio runs as the agent of
    LODESTORE_TOKEN; HTTP requires `Authorization: Bearer <token>` on every request.
    """
    if (tenant is None) != (agent is None):
        raise click.UsageError("--tenant and --agent go together")
    if max_reply_bytes < 4096 or max_write_bytes < 4096:
        raise click.UsageError("--max-reply-bytes and --max-write-bytes must be at least 4096")
    limits = {"max_reply_bytes": max_reply_bytes, "max_write_bytes": max_write_bytes,
              "max_resource_bytes": max_resource_bytes}
    kv_settings = {"hot_bytes": kv_hot_mib << 20, "default_ttl": kv_ttl,
                   "capacity_bytes": None if kv_capacity_gib is None
                   else int(kv_capacity_gib * (1 << 30))}
    if transport == "stdio" and tenant is None and not os.environ.get("LODESTORE_TOKEN", "").strip():
        _fail("LODESTORE_TOKEN is not set: a stdio server runs as the agent whose token it "
              "holds; mint one with `lodestore agent add TENANT NAME` (or run `lodestore serve "
              "--tenant T --agent A` for local development)")
    _logging(verbose)
    from governance.qos import Scheduler

    from .metrics import Metrics

    home = home_of(ctx)
    scheduler = Scheduler()
    app = open_app(home, transport=TRANSPORT_TAG[transport], create=True, scheduler=scheduler)
    ctx.call_on_close(app.close)
    _attach_search(ctx, app)
    metrics = Metrics(qos_stats=scheduler.stats)
    if transport == "stdio":
        if tenant is not None and agent is not None:
            token, _ = _dev_token(app, tenant, agent, role)
        else:
            token = _stdio_token(app, home)
        _serve_stdio(app, token, metrics, limits, stdio_sdk)
        return
    dev = None
    if tenant is not None and agent is not None:
        dev = (tenant, agent, *_dev_token(app, tenant, agent, role))
    from governance.warehouse import WarehouseDoor

    WarehouseDoor.for_gateway(app.gateway, **kv_settings)  # /v1/kv serves this door
    _serve_http(app, metrics, transport, host, port, public_url, allow_origins,
                limits, json_response, dev, home)


def _attach_search(ctx: click.Context, app: App) -> None:
    """Full-text search for the ``search`` tool: the index under the home, fed by writes."""
    try:
        from governance.search import SearchIndex, index_for
    except ImportError:  # a build without search
        return
    if index_for(app.gateway) is None:
        idx = SearchIndex.attach(app.gateway, app.vol.home)
        ctx.call_on_close(idx.close)  # runs before app.close (click closes LIFO)


def _loop_options() -> dict[str, Any]:
    """uvloop when installed (a faster event loop: pipes, sockets, thread wake-ups)."""
    if os.environ.get("LODESTORE_UVLOOP", "1") == "0":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _serve_stdio(app: App, token: str, metrics: Any, limits: dict[str, int],
                 sdk_transport: bool) -> None:
    import anyio

    from .mcp_app import LodestoreMCP, token_identity
    from .transports import fast_stdio_server

    p = app.principals.authenticate(token)
    mcp = LodestoreMCP(app, token_identity(app, token), metrics=metrics, **limits)
    low = mcp.lowlevel
    click.echo(f"lodestore: MCP over stdio as agent {p.agent} of tenant {p.tenant} "
               f"(store {app.vol.home}); {len(mcp.entries)} tools", err=True)

    async def run() -> None:
        if sdk_transport:
            from mcp.server.stdio import stdio_server
            cm = stdio_server()
        else:
            cm = fast_stdio_server()
        async with cm as (read, write):
            await low.run(read, write, low.create_initialization_options())

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(run, backend_options=_loop_options())


def _serve_http(app: App, metrics: Any, transport: str, host: str, port: int,
                public_url: str | None, allow_origins: tuple[str, ...], limits: dict[str, int],
                json_response: bool, dev: tuple[str, str, str, bool] | None, home: Path) -> None:
    import uvicorn

    from .http_app import DEFAULT_MAX_BODY, build_http_app, connection_help
    from .mcp_app import LodestoreMCP, http_identity

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio only sets TCP_NODELAY on accepted sockets whose
    # proto says TCP, and without it every small reply waits ~40 ms for a delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        _fail(f"cannot bind {host}:{port}: {exc.strerror or exc}; pick another --port "
              "(0 picks a free one)")
    sock.listen(2048)
    sock.setblocking(False)
    bound = sock.getsockname()[1]
    shown = host if family == socket.AF_INET else f"[{host.strip('[]')}]"
    if host in ("0.0.0.0", "::"):
        shown = socket.gethostname()
    base = (public_url or f"http://{shown}:{bound}").rstrip("/")
    transports = ("mcp", "sse") if transport == "http" else ("sse",)
    mcp = LodestoreMCP(app, http_identity(), metrics=metrics, **limits)
    web = build_http_app(mcp, public_url=base, bind_host=host, transports=transports,
                         allowed_origins=allow_origins, json_response=json_response,
                         max_body=max(DEFAULT_MAX_BODY, limits["max_write_bytes"] * 3 // 2
                                      + (1 << 20)))
    say = lambda s="": click.echo(s, err=True)  # noqa: E731
    say(f"lodestore: MCP over HTTP, store {home}, {len(mcp.entries)} tools")
    say(connection_help(base, transports))
    say("  every request needs the header  Authorization: Bearer <agent token>")
    if dev is not None:
        tenant, agent, token, minted = dev
        say(f"  token of agent {agent} in tenant {tenant}"
            f"{' (newly minted; the previous one no longer works)' if minted else ''}:")
        say(f"  LODESTORE_TOKEN={token}")
    else:
        say("  mint a token: lodestore tenant add T && lodestore agent add T NAME")
    if host.strip("[]") not in ("127.0.0.1", "localhost", "::1"):
        say(f"  WARNING: bound to {host}: reachable from other machines; put TLS in front")
    sys.stderr.flush()
    config = uvicorn.Config(web, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock])


def _script_command() -> tuple[str, list[str]]:
    """The absolute command that starts ``lodestore`` on this machine."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name in ("lodestore", "lodestore.exe"):
        found = shutil.which(str(argv0)) or (str(argv0) if argv0.exists() else None)
        if found:
            return str(Path(found).resolve()), []
    beside = Path(sys.executable).parent / "lodestore"
    if beside.exists():
        return str(beside), []
    found = shutil.which("lodestore")
    if found:
        return str(Path(found).resolve()), []
    return str(Path(sys.executable).resolve()), ["-m", "server.cli"]


@main.command("claude-config")
@click.option("--tenant", default=None, help="Mint a token for agent --agent of this tenant "
              "(created if missing); without it LODESTORE_TOKEN is used.")
@click.option("--agent", default=None, help="Agent name for --tenant.")
@click.option("--role", default="agent", show_default=True, help="Role of a new agent.")
@click.option("--name", "entry", default="lodestore", show_default=True,
              help="Name of the server entry in Claude Desktop's mcpServers.")
@click.pass_context
def claude_config(ctx: click.Context, tenant: str | None, agent: str | None, role: str,
                  entry: str) -> None:
    """Print the Claude Desktop config entry (JSON) that runs this store over stdio."""
    if (tenant is None) != (agent is None):
        raise click.UsageError("--tenant and --agent go together")
    home = home_of(ctx).expanduser().resolve()
    app = open_app(home, transport="cli", create=True)
    ctx.call_on_close(app.close)
    if tenant is not None and agent is not None:
        token, _ = _dev_token(app, tenant, agent, role)
    else:
        token = os.environ.get("LODESTORE_TOKEN", "").strip()
        if not token:
            _fail("no token: pass --tenant T --agent A to mint one for that agent, or set "
                  "LODESTORE_TOKEN")
        try:
            app.principals.authenticate(token)
        except Unauthorized as exc:
            _fail(f"LODESTORE_TOKEN is not valid for the store at {home} ({exc})")
    command, pre = _script_command()
    cfg = {"mcpServers": {entry: {
        "command": command,
        "args": [*pre, "serve", "--transport", "stdio"],
        "env": {"LODESTORE_TOKEN": token, "LODESTORE_HOME": str(home)},
    }}}
    click.echo(json.dumps(cfg, indent=2))
    if sys.platform == "darwin":
        where = "~/Library/Application Support/Claude/claude_desktop_config.json"
    elif sys.platform == "win32":
        where = r"%APPDATA%\Claude\claude_desktop_config.json"
    else:
        where = "~/.config/Claude/claude_desktop_config.json"
    click.echo(f"merge this into {where} (the token is a secret: keep the file private), "
               "then restart Claude Desktop", err=True)

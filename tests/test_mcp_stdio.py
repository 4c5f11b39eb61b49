"""MCP over stdio with real components: ``lodestore serve --transport stdio`` in a
subprocess on a fresh store, driven by the SDK's ``mcp.Client``.

The server runs with the real tools (whatever ``tools.registry.TOOLS`` holds) plus the demo
tools of ``tests/mcp_support.py``; every read-only real tool is called with sample
arguments made from its input schema.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mcp_support as ms  # noqa: E402

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("mcp-stdio") / "home"
    tokens = ms.make_agents(home, [("acme", "bob", "agent"), ("acme", "gone", "agent"),
                                   ("globex", "alice", "agent")])
    return {"home": home, "tokens": tokens}


def _params(home: Path, token: str | None, *extra: str, demo: bool = True
            ) -> StdioServerParameters:
    argv = ms.lodestore_argv(demo=demo)
    return StdioServerParameters(command=argv[0],
                                 args=[*argv[1:], "serve", "--transport", "stdio", *extra],
                                 env=ms.env_for(home, token), cwd=str(ms.ROOT))


def _text(res: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in res.content)


MUST_WORK = {"read_file", "read_multiple_files", "list_directory", "get_file_info",
             "find_files", "search", "query_table", "storage_status"}
CSV = "/docs/data.csv"
CSV_TEXT = "city,n\nOslo,3\nLima,4\n"


async def real_tools_flow(c: Any, names: set[str]) -> None:
    """The file tools of the registry, in a workflow, where they exist."""
    async def ok(name: str, args: dict[str, Any]) -> dict[str, Any] | None:
        if name not in names:
            return None
        res = await c.call_tool(name, args)
        assert not res.is_error, (name, _text(res))
        return res.structured_content

    await ok("write_file", {"path": CSV, "content": CSV_TEXT})
    await ok("write_file", {"path": "/docs/notes.md", "content": "quarterly budget draft\n"})
    r = await ok("read_file", {"path": "/docs/notes.md"})
    assert r is None or r["content"] == "quarterly budget draft\n"
    r = await ok("read_file", {"path": "/docs/notes.md", "offset": 10, "length": 6})
    assert r is None or r["content"] == "budget"
    r = await ok("get_file_info", {"path": "/docs/notes.md"})
    assert r is None or r["size"] == 23
    r = await ok("list_directory", {"path": "/docs"})
    assert r is None or {"notes.md", "data.csv"} <= {e["name"] for e in r["entries"]}
    r = await ok("find_files", {"pattern": "*.md"})
    assert r is None or "/docs/notes.md" in str(r)
    r = await ok("search", {"query": "budget"})
    assert r is None or "/docs/notes.md" in str(r)
    r = await ok("query_table", {"sql": "SELECT sum(n) AS total FROM t", "tables": {"t": CSV}})
    assert r is None or "7" in str(r)
    await ok("edit_file", {"path": "/docs/notes.md",
                           "edits": [{"old_text": "draft", "new_text": "final"}]})
    await ok("create_directory", {"path": "/archive"})
    await ok("move_file", {"source": "/docs/notes.md", "destination": "/archive/notes.md"})
    r = await ok("read_multiple_files", {"paths": ["/archive/notes.md"]})
    assert r is None or "quarterly budget final" in str(r)
    await ok("delete_file", {"path": "/archive/notes.md"})
    if "read_file" in names:
        res = await c.call_tool("read_file", {"path": "/archive/notes.md"})
        assert res.is_error and _text(res).startswith("not_found"), _text(res)
    await ok("storage_status", {})


async def memory_tools_flow(c: Any, other: Any | None = None) -> None:
    """The context-memory tools over a real client; ``other`` is another tenant's client."""
    async def ok(client: Any, name: str, args: dict[str, Any]) -> dict[str, Any]:
        res = await client.call_tool(name, args)
        assert not res.is_error, (name, _text(res))
        return res.structured_content

    r = await ok(c, "session_append", {"content": "we chose the heron design"})
    sid = r["session"]
    assert r["created"] and sid.startswith("ses_")
    await ok(c, "session_append", {"content": "ok, heron it is", "role": "assistant",
                                   "session": sid})
    ctx = await ok(c, "session_context", {"session": sid, "max_tokens": 100})
    assert [t["content"] for t in ctx["turns"]] == ["we chose the heron design",
                                                   "ok, heron it is"]
    assert sid in {s["session"] for s in (await ok(c, "list_sessions", {}))["sessions"]}
    m = await ok(c, "remember", {"content": "the design review is on thursday",
                                 "tags": ["design"], "key": "review"})
    hits = await ok(c, "recall", {"query": "when is the design review"})
    assert hits["memories"][0]["id"] == m["memory"]["id"]
    if other is not None:  # another tenant sees none of it
        res = await other.call_tool("session_context", {"session": sid, "max_tokens": 100})
        assert res.is_error and _text(res).startswith("not_found"), _text(res)
        assert (await ok(other, "recall", {"query": "design review"}))["memories"] == []
        assert (await ok(other, "list_sessions", {}))["sessions"] == []
    res = await c.call_tool("session_context", {"session": "ses_nope", "max_tokens": 10})
    assert res.is_error and "minted" in _text(res)
    await ok(c, "forget", {"key": "review"})
    assert (await ok(c, "recall", {"query": "design review"}))["memories"] == []


def sample_args(tool: Any, file_path: str, dir_path: str) -> dict[str, Any]:
    """Valid-looking arguments for a tool, from its input schema and parameter names."""
    schema = tool.input_schema or {}
    props = schema.get("properties") or {}
    out: dict[str, Any] = {}
    dir_tool = any(w in tool.name for w in ("directory", "list", "find", "search", "status"))
    by_name = {
        "path": dir_path if dir_tool else file_path, "paths": [file_path],
        "pattern": "*.md", "query": "hello", "content": "hello", "text": "hello",
        "sql": "SELECT count(*) AS n FROM t", "tables": {"t": CSV},
        "key": "k1", "value": "v1", "session": "s1", "session_id": "s1",
        "root": dir_path, "name": "k1", "table": CSV,
    }
    for name in schema.get("required") or []:
        prop = props.get(name, {})
        if name in by_name:
            out[name] = by_name[name]
            continue
        kind = prop.get("type")
        out[name] = {"integer": 1, "number": 1, "boolean": False, "array": [],
                     "object": {}}.get(kind, "x")
    return out


def test_stdio_session_end_to_end(store: dict[str, Any]) -> None:
    home, token = store["home"], store["tokens"]["acme/bob"]
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    async def run() -> None:
        async with Client(_params(home, token)) as c:
            listed = {t.name: t for t in (await c.list_tools()).tools}
            from tools.registry import TOOLS
            for spec in [*TOOLS, *ms.DEMO_SPECS]:
                assert spec.name in listed, spec.name
            who = listed["demo_whoami"]
            assert "ctx" not in who.input_schema["properties"]
            assert who.input_schema["properties"]["echo"]["description"] == "Text to send back."
            assert who.output_schema and "tenant" in who.output_schema["properties"]
            assert who.annotations.read_only_hint is True and who.title == "Who am I"
            w = listed["demo_write"].annotations
            assert (w.read_only_hint, w.destructive_hint, w.idempotent_hint) == (False, True, True)

            # identity comes from the token, never from arguments
            res = await c.call_tool("demo_whoami", {"echo": "hi", "tenant": "globex"})
            assert not res.is_error, _text(res)
            assert res.structured_content == {"tenant": "acme", "agent": "bob", "role": "agent",
                                              "echo": "hi"}
            assert json.loads(_text(res)) == res.structured_content

            res = await c.call_tool("demo_write", {"path": "/docs/hello.md",
                                                   "content": "hello world\n"})
            assert not res.is_error, _text(res)
            assert res.structured_content["version"] == 1
            res = await c.call_tool("demo_read", {"path": "/docs/hello.md"})
            assert res.structured_content["content"] == "hello world\n"

            # errors: actionable, isError, never a stack trace or a secret
            res = await c.call_tool("demo_read", {"path": "/docs/nope.md"})
            assert res.is_error and _text(res).startswith("not_found:"), _text(res)
            res = await c.call_tool("demo_fail", {"kind": "tool"})
            assert res.is_error and _text(res).startswith("demo_refused: the demo refuses")
            res = await c.call_tool("demo_fail", {"kind": "crash"})
            assert res.is_error and _text(res).startswith("internal_error:")
            assert "secret-value" not in _text(res) and "Traceback" not in _text(res)
            res = await c.call_tool("demo_read", {"path": 7, "offset": "many"})
            assert res.is_error and _text(res).startswith("invalid_arguments:"), _text(res)
            res = await c.call_tool("no_such_tool", {})
            assert res.is_error and "unknown_tool" in _text(res)

            # progress reaches the client through the SDK's reporter
            res = await c.call_tool("demo_progress", {"steps": 3}, progress_callback=on_progress)
            assert not res.is_error
            await asyncio.sleep(0.05)
            assert [p[0] for p in progress] == [1, 2, 3] and progress[0][1] == 3

            # files as resources
            tpl = (await c.list_resource_templates()).resource_templates
            assert [t.uri_template for t in tpl] == ["lodestore://files/{path}"]
            rr = await c.read_resource("lodestore://files/docs/hello.md")
            assert rr.contents[0].text == "hello world\n"
            assert rr.contents[0].mime_type == "text/markdown"
            with pytest.raises(Exception, match="not_found|no such|does not exist"):
                await c.read_resource("lodestore://files/docs/missing.md")
            await c.call_tool("demo_write", {"path": "/top.txt", "content": "t"})
            top = (await c.list_resources()).resources
            assert [str(r.uri) for r in top] == ["lodestore://files/top.txt"]

            await real_tools_flow(c, set(listed))
            await memory_tools_flow(c)
            # every read-only tool of the registry answers (no crash) with sample arguments
            for spec in TOOLS:
                if not spec.read_only:
                    continue
                args = sample_args(listed[spec.name], "/docs/hello.md", "/docs")
                res = await c.call_tool(spec.name, args)
                assert "internal_error" not in _text(res)[:40], (spec.name, args, _text(res))
                assert "Traceback" not in _text(res)
                if spec.name in MUST_WORK:
                    assert not res.is_error, (spec.name, args, _text(res))
                if not res.is_error and listed[spec.name].output_schema:
                    assert res.structured_content is not None, spec.name

    asyncio.run(run())


def _serve_fails(home: Path, token: str | None) -> subprocess.CompletedProcess[str]:
    argv = ms.lodestore_argv()
    return subprocess.run([*argv, "serve", "--transport", "stdio"], env=ms.env_for(home, token),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                          cwd=str(ms.ROOT))


def test_stdio_refuses_missing_unknown_and_revoked_tokens(store: dict[str, Any]) -> None:
    home = store["home"]
    from server.wiring import open_app

    app = open_app(home)
    try:
        app.principals.revoke("acme", "gone")
    finally:
        app.close()
    cases = {"missing": None, "unknown": "lds_" + "x" * 43, "malformed": "hunter2",
             "revoked": store["tokens"]["acme/gone"]}
    for what, token in cases.items():
        res = _serve_fails(home, token)
        assert res.returncode != 0, what
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: LODESTORE_TOKEN"), (what, lines)
        assert "Traceback" not in res.stderr and res.stdout == ""


def test_stdio_dev_shortcut_and_revocation_mid_session(store: dict[str, Any]) -> None:
    home = store["home"]

    async def run() -> None:
        # --tenant/--agent creates the tenant and runs as that agent (no token needed)
        async with Client(_params(home, None, "--tenant", "initech", "--agent", "milton")) as c:
            res = await c.call_tool("demo_whoami", {})
            assert res.structured_content["tenant"] == "initech"
            assert res.structured_content["agent"] == "milton"
            # the shortcut re-minted milton's token: revoke it; calls fail within 2 s
            from server.wiring import open_app

            app = open_app(home)
            try:
                app.principals.revoke("initech", "milton")
            finally:
                app.close()
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                res = await c.call_tool("demo_whoami", {})
                if res.is_error:
                    break
                await asyncio.sleep(0.25)
            assert res.is_error and _text(res).startswith("unauthorized:"), _text(res)

    asyncio.run(run())


def test_claude_config(store: dict[str, Any]) -> None:
    home = store["home"]
    argv = ms.lodestore_argv()
    res = subprocess.run([*argv, "claude-config", "--tenant", "acme", "--agent", "desktop"],
                         env=ms.env_for(home), capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL, cwd=str(ms.ROOT))
    assert res.returncode == 0, res.stderr
    cfg = json.loads(res.stdout)
    entry = cfg["mcpServers"]["lodestore"]
    assert Path(entry["command"]).is_absolute() and Path(entry["command"]).exists()
    assert entry["args"][-3:] == ["serve", "--transport", "stdio"]
    assert entry["env"]["LODESTORE_HOME"] == str(home.resolve())
    token = entry["env"]["LODESTORE_TOKEN"]
    from server.wiring import open_app

    app = open_app(home)
    try:
        p = app.principals.authenticate(token)
    finally:
        app.close()
    assert (p.tenant, p.agent) == ("acme", "desktop")
    bad = subprocess.run([*argv, "claude-config"], env=ms.env_for(home), capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=str(ms.ROOT))
    assert bad.returncode != 0 and bad.stderr.startswith("error: no token")
    if not ms.cli_serve_registered():
        return  # the console script gets `serve` once server/cli.py registers cli_serve

    async def run() -> None:  # the printed entry really starts a working server
        params = StdioServerParameters(command=entry["command"], args=entry["args"],
                                       env={**ms.env_for(home), **entry["env"]})
        async with Client(params) as c:
            assert (await c.list_tools()).tools is not None

    asyncio.run(run())


def test_large_read_offers_a_resource_link(store: dict[str, Any]) -> None:
    home, token = store["home"], store["tokens"]["acme/bob"]
    body = "".join(f"line {i:05d} of a long report\n" for i in range(600))  # ~17 KiB

    async def run() -> None:
        async with Client(_params(home, token, "--max-reply-bytes", "4096")) as c:
            res = await c.call_tool("write_file", {"path": "/big/report.txt", "content": body})
            assert not res.is_error, _text(res)
            res = await c.call_tool("read_file", {"path": "/big/report.txt"})
            sc = res.structured_content
            assert sc["capped"] and sc["next_offset"] == 4096
            assert sc["resource_uri"] == "lodestore://files/big/report.txt"
            links = [x for x in res.content if getattr(x, "type", "") == "resource_link"]
            assert len(links) == 1 and str(links[0].uri) == sc["resource_uri"]
            assert links[0].size == len(body) and links[0].mime_type == "text/plain"
            rr = await c.read_resource(str(links[0].uri))
            assert rr.contents[0].text == body
            # a file that fits in one reply has no link
            res = await c.call_tool("read_file", {"path": "/big/report.txt", "offset": 0,
                                                  "length": 100})
            assert res.structured_content["resource_uri"] == sc["resource_uri"]
            await c.call_tool("write_file", {"path": "/big/small.txt", "content": "tiny"})
            res = await c.call_tool("read_file", {"path": "/big/small.txt"})
            assert res.structured_content["resource_uri"] is None
            assert [x.type for x in res.content] == ["text"]

    asyncio.run(run())

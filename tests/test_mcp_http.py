"""MCP over HTTP with real components: ``lodestore serve --transport http --port 0`` in a
subprocess (uvicorn on 127.0.0.1), driven by the SDK's ``mcp.Client`` over streamable HTTP
and legacy SSE with bearer tokens, plus raw HTTP for the 401/403/Origin/Host rules,
``/healthz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mcp_support as ms  # noqa: E402
from test_mcp_stdio import _text, memory_tools_flow, sample_args  # noqa: E402

pytestmark = pytest.mark.timeout(180)

POLICY = """
paths:
  - prefix: /
    read: [agent, admin]
    write: [agent, admin]
"""
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-06-18", "capabilities": {},
    "clientInfo": {"name": "raw", "version": "0"}}}
MCP_HEADERS = {"Accept": "application/json, text/event-stream",
               "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("mcp-http") / "home"
    tokens = ms.make_agents(home, [
        ("acme", "bob", "agent"), ("acme", "carol", "agent"), ("acme", "visitor", "guest"),
        ("acme", "gone", "agent"), ("globex", "alice", "agent")])
    from server.wiring import open_app

    app = open_app(home)
    try:
        app.principals.set_policy("acme", POLICY)
        app.principals.revoke("acme", "gone")
    finally:
        app.close()
    with ms.HttpServer(home) as srv:
        yield {"srv": srv, "base": srv.base, "tokens": tokens, "home": home}


def _post(base: str, token: str | None = None, **headers: str) -> httpx2.Response:
    h = dict(MCP_HEADERS)
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    h.update(headers)
    return httpx2.post(base + "/mcp", json=INIT, headers=h, timeout=10)


def test_http_auth_rules(server: dict[str, Any]) -> None:
    base, tokens = server["base"], server["tokens"]
    assert base.startswith("http://127.0.0.1:")
    # 401 with WWW-Authenticate and protected-resource metadata: missing, unknown, revoked
    for token in (None, "lds_" + "y" * 43, "not-a-token", tokens["acme/gone"]):
        r = _post(base, token)
        assert r.status_code == 401, (token, r.status_code, r.text)
        www = r.headers["www-authenticate"]
        assert www.startswith("Bearer ") and 'error="invalid_token"' in www
        assert f'resource_metadata="{base}/.well-known/oauth-protected-resource"' in www
    r = httpx2.post(base + "/mcp", json=INIT, timeout=10,
                    headers={**MCP_HEADERS, "Authorization": f"Basic {tokens['acme/bob']}"})
    assert r.status_code == 401
    prm = httpx2.get(base + "/.well-known/oauth-protected-resource", timeout=10).json()
    assert prm["resource"].rstrip("/") == base and prm["bearer_methods_supported"] == ["header"]
    # 403: a valid token whose role has no access anywhere under the tenant's policy
    r = _post(base, tokens["acme/visitor"])
    assert r.status_code == 403 and "insufficient_scope" in r.headers["www-authenticate"]
    # a valid token: the MCP layer answers
    r = _post(base, tokens["acme/bob"])
    assert r.status_code == 200, r.text
    # Origin: foreign refused even with a valid token; loopback origins and none allowed
    r = _post(base, tokens["acme/bob"], Origin="https://evil.example")
    assert r.status_code == 403 and r.json()["error"] == "forbidden_origin"
    r = _post(base, None, Origin="https://evil.example")
    assert r.status_code == 403
    assert _post(base, tokens["acme/bob"], Origin="http://localhost:3000").status_code == 200
    # a DNS-rebinding Host is refused on a loopback bind
    assert _post(base, tokens["acme/bob"], Host="rebind.example:80").status_code == 421
    # the SSE endpoints are guarded the same way
    assert httpx2.get(base + "/sse", timeout=10).status_code == 401
    r = httpx2.get(base + "/sse", timeout=10, headers={"Origin": "https://evil.example",
                                                      "Authorization": "Bearer x"})
    assert r.status_code == 403
    assert httpx2.post(base + "/messages/?session_id=00", json={}, timeout=10).status_code == 401


def test_http_tools_isolation_sse_health_metrics(server: dict[str, Any]) -> None:
    base, tokens = server["base"], server["tokens"]
    url = base + "/mcp"

    async def run() -> None:
        async with Client(ms.http_transport(url, tokens["acme/bob"])) as bob, \
                Client(ms.http_transport(url, tokens["globex/alice"])) as alice:
            res = await bob.call_tool("demo_whoami", {"echo": "x", "tenant": "globex"})
            assert res.structured_content["tenant"] == "acme", _text(res)
            assert res.structured_content["agent"] == "bob"
            res = await alice.call_tool("demo_whoami", {})
            assert res.structured_content["tenant"] == "globex"

            res = await bob.call_tool("demo_write", {"path": "/secret/plan.md",
                                                     "content": "hello merger plan\n"})
            assert not res.is_error, _text(res)
            res = await bob.call_tool("demo_read", {"path": "/secret/plan.md"})
            assert res.structured_content["content"] == "hello merger plan\n"
            rr = await bob.read_resource("lodestore://files/secret/plan.md")
            assert rr.contents[0].text == "hello merger plan\n"

            # tenant isolation over the wire: alice (globex) sees nothing of acme
            res = await alice.call_tool("demo_read", {"path": "/secret/plan.md"})
            assert res.is_error and _text(res).startswith("not_found"), _text(res)
            with pytest.raises(Exception, match="not_found|no such|does not exist"):
                await alice.read_resource("lodestore://files/secret/plan.md")
            res = await alice.call_tool("demo_list", {"path": "/"})
            assert "secret" not in res.structured_content["entries"]
            await alice.call_tool("demo_write", {"path": "/secret/plan.md", "content": "other"})
            res = await bob.call_tool("demo_read", {"path": "/secret/plan.md"})
            assert res.structured_content["content"] == "hello merger plan\n"

            listed = {t.name: t for t in (await bob.list_tools()).tools}
            from tools.registry import TOOLS
            for spec in TOOLS:  # the real tools, as they exist now
                assert spec.name in listed
                if spec.read_only:
                    args = sample_args(listed[spec.name], "/secret/plan.md", "/secret")
                    res = await bob.call_tool(spec.name, args)
                    assert "internal_error" not in _text(res)[:40], (spec.name, _text(res))
                    if "path" in args or "paths" in args:
                        other = await alice.call_tool(spec.name, args)
                        assert "merger" not in _text(other), spec.name
            await memory_tools_flow(bob, alice)
            # concurrent sessions of one agent
            async def burst(i: int) -> None:
                async with Client(ms.http_transport(url, tokens["acme/carol"])) as c:
                    for j in range(5):
                        r = await c.call_tool("demo_write", {"path": f"/c/{i}-{j}.txt",
                                                             "content": str(j)})
                        assert not r.is_error, _text(r)
            await asyncio.gather(*(burst(i) for i in range(4)))
            res = await bob.call_tool("demo_list", {"path": "/c"})
            assert len(res.structured_content["entries"]) == 20

        # legacy SSE with a real client
        async with Client(ms.sse_transport(base + "/sse", tokens["acme/bob"])) as c:
            res = await c.call_tool("demo_read", {"path": "/secret/plan.md"})
            assert res.structured_content["content"] == "hello merger plan\n"
            res = await c.call_tool("demo_whoami", {})
            assert (res.structured_content["tenant"], res.structured_content["agent"]) == (
                "acme", "bob")
            await memory_tools_flow(c)

    asyncio.run(run())

    h = httpx2.get(base + "/healthz", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["healthy_targets"] == h.json()["m"]
    m = httpx2.get(base + "/metrics", timeout=10)
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    assert 'lodestore_mcp_calls_total{tool="demo_write",outcome="ok"}' in text
    assert 'lodestore_mcp_calls_total{tool="demo_read",outcome="error"}' in text
    assert 'lodestore_mcp_call_seconds_bucket{tool="demo_read",le="+Inf"}' in text
    assert 'lodestore_http_refused_total{status="401",reason="missing_token"}' in text
    assert "lodestore_qos_admitted_total" in text
    for pii in ("acme", "globex", "bob", "alice", "secret", "merger"):
        assert pii not in text, pii


def test_http_dev_shortcut_prints_token(tmp_path: Path) -> None:
    home = tmp_path / "fresh"  # no store yet: serve creates it
    with ms.HttpServer(home, "--tenant", "dev", "--agent", "me") as srv:
        token = srv.token_line()
        assert token and token.startswith("lds_")
        assert any("Authorization: Bearer" in line for line in srv.stderr)

        async def run() -> None:
            async with Client(ms.http_transport(srv.base + "/mcp", token)) as c:
                res = await c.call_tool("demo_whoami", {})
                assert res.structured_content["tenant"] == "dev"

        asyncio.run(run())
        # the shipped example: write, search and read back over streamable HTTP
        import subprocess
        ex = subprocess.run([ms.PY, str(ms.ROOT / "examples" / "agent_http.py"),
                             srv.base + "/mcp"], env={**ms.env_for(home, token)},
                            capture_output=True, text=True, timeout=60)
        assert ex.returncode == 0, ex.stderr
        assert "resource: Standup: ship the quarterly budget report" in ex.stdout, ex.stdout
        assert "ERROR" not in ex.stdout, ex.stdout
    assert any(home.iterdir())

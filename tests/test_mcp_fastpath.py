"""The stdio ``tools/call`` fast path (server/transports.py) answers what the SDK's path
answers, byte for byte.

Every server here is a real ``lodestore serve --transport stdio`` subprocess, started once
with the fast path and once with ``LODESTORE_STDIO_FASTPATH=0`` (every message through the
SDK's server loop), and both are given the same calls:

- with the SDK's ``mcp.Client`` (through a relay that records the server's raw stdout),
  every tool and the error cases (unknown tool, wrong types, missing arguments, tool
  errors, denied writes, a crash), progress, concurrent calls and a cancelled call, on two
  stores built the same way: the raw JSON-RPC lines must be equal;
- with raw JSON-RPC lines, what ``mcp.Client`` never sends: requests without or with a
  wrong envelope, odd ids, ``requestState``, malformed JSON, a legacy (``initialize``)
  session, ``notifications/cancelled``, EOF with a call in flight.

Run as a script this module is ``lodestore`` with the demo tools of ``mcp_support`` plus
two probes: ``fp_sleep`` (a call to cancel) and ``fp_stats`` (how many calls the fast
path served, so a test knows which path answered); ``relay LOG -- ARGV`` runs ARGV and
copies its stdout to ours and to LOG.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mcp_support as ms  # noqa: E402

from tools.registry import ToolContext, ToolSpec  # noqa: E402

THIS = str(Path(__file__).resolve())
FASTPATH_ENV = "LODESTORE_STDIO_FASTPATH"
ENVELOPE = {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
            "io.modelcontextprotocol/clientCapabilities": {}}
POLICY = """
pii:
  entities:
    CREDIT_CARD: {action: deny}
paths:
  - prefix: /
  - prefix: /locked
    write: [admin]
"""

pytestmark = pytest.mark.timeout(240)


# -- the probes (server side, script mode) --------------------------------------------------

_STATS = {"fast_calls": 0, "sleeps": 0, "cancelled": 0, "finished": 0}


class Stats(BaseModel):
    fast_calls: int
    sleeps: int
    cancelled: int
    finished: int


async def fp_sleep(ctx: ToolContext, seconds: float, shielded: bool = False) -> Stats:
    """Sleep; ``shielded``: a call that runs to its end even when cancelled (as one
    blocked in a thread does), whose answer must then still not be sent."""
    _STATS["sleeps"] += 1
    try:
        with anyio.CancelScope(shield=shielded):
            await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        _STATS["cancelled"] += 1
        raise
    _STATS["finished"] += 1
    return Stats(**_STATS)


async def fp_stats(ctx: ToolContext) -> Stats:
    return Stats(**_STATS)


FP_SPECS = [ToolSpec("fp_sleep", fp_sleep, "Sleep (a call to cancel).", True, False, True),
            ToolSpec("fp_stats", fp_stats, "Calls served by the fast path.", True, False, True)]


def _serve(args: list[str]) -> None:
    import server.cli_serve  # noqa: F401  (registers serve)
    from server.cli import main
    from server.transports import ToolCallFastPath
    from tools import registry

    registry.TOOLS.extend([*ms.DEMO_SPECS, *FP_SPECS])
    run = ToolCallFastPath.run

    async def counted(self: ToolCallFastPath, call: Any, progress: Any) -> bytes:
        _STATS["fast_calls"] += 1
        return await run(self, call, progress)

    ToolCallFastPath.run = counted  # type: ignore[method-assign]
    main(args=args, prog_name="lodestore")


def _relay(log: str, argv: list[str]) -> None:
    """Run ARGV on our stdin; its stdout goes to ours and to LOG, unchanged."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    with open(log, "ab") as out:
        while chunk := os.read(proc.stdout.fileno(), 1 << 16):
            os.write(1, chunk)
            out.write(chunk)
            out.flush()
    sys.exit(proc.wait())


# -- helpers (test side) --------------------------------------------------------------------


def _env(home: Path, token: str, fast: bool) -> dict[str, str]:
    env = ms.env_for(home, token)
    env[FASTPATH_ENV] = "1" if fast else "0"
    return env


def _make_store(home: Path) -> str:
    if home.exists():
        shutil.rmtree(home)
    token = ms.make_agents(home, [("acme", "bob", "agent")])["acme/bob"]
    from server.wiring import open_app

    app = open_app(home)
    try:
        app.principals.set_policy("acme", POLICY)
    finally:
        app.close()
    return token


def _text(res: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in res.content)


_VOLATILE = [  # what two identically built stores legitimately differ in
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"(?<![\w.])1[5-9]\d{8}(\.\d+)?(?![\w.])"), "<epoch>"),
    (re.compile(r"\b(ses|mem)_[A-Za-z0-9_-]{6,}"), r"\1_<id>"),
    (re.compile(r"reference [0-9a-f]{12}"), "reference <ref>"),
    (re.compile(r'(\\?"elapsed_ms\\?":)\d+(\.\d+)?'), r"\1<ms>"),  # query_table's timing
]


def _normalize(line: str) -> str:
    for rx, repl in _VOLATILE:
        line = rx.sub(repl, line)
    return line


def _unordered(lines: list[str]) -> list[str]:
    return sorted(_normalize(x) for x in lines)


# -- mcp.Client: every tool, errors, progress, concurrency, cancel ------------------------

CSV = "/docs/data.csv"
BIG = "".join(f"line {i:05d} of a long report\n" for i in range(600))  # ~17 KiB
CALLS: list[tuple[str, dict[str, Any]]] = [
    ("write_file", {"path": "/docs/notes.md", "content": "quarterly budget draft\n"}),
    ("write_file", {"path": CSV, "content": "city,n\nOslo,3\nLima,4\n"}),
    ("write_file", {"path": "/docs/uni.txt",
                    "content": "h\u00e9llo \u2028 \"q\" \\ tab\t \U0001f600 NaN\n"}),
    ("write_file", {"path": "/big/report.txt", "content": BIG}),
    ("read_file", {"path": "/docs/notes.md"}),
    ("read_file", {"path": "/docs/notes.md", "offset": 10, "length": 6}),
    ("read_file", {"path": "/docs/uni.txt"}),
    ("read_file", {"path": "/docs/uni.txt", "encoding": "base64"}),
    ("read_file", {"path": "/big/report.txt"}),  # capped: a resource link as well
    ("read_multiple_files", {"paths": ["/docs/notes.md", "/docs/nope.md"]}),
    ("get_file_info", {"path": "/docs/notes.md"}),
    ("list_directory", {"path": "/docs"}),
    ("list_directory", {}),
    ("create_directory", {"path": "/archive"}),
    ("edit_file", {"path": "/docs/notes.md",
                   "edits": [{"old_text": "draft", "new_text": "final"}]}),
    ("edit_file", {"path": "/docs/notes.md",
                   "edits": [{"old_text": "absent", "new_text": "x"}]}),
    ("edit_file", {"path": "/docs/notes.md", "edits": "not a list"}),
    ("find_files", {"pattern": "*.md"}),
    ("search", {"query": "budget"}),
    ("query_table", {"sql": "SELECT sum(n) AS total FROM t", "tables": {"t": CSV}}),
    ("query_table", {"sql": "DROP TABLE t", "tables": {"t": CSV}}),
    ("move_file", {"source": "/docs/notes.md", "destination": "/archive/notes.md"}),
    ("read_multiple_files", {"paths": ["/archive/notes.md"]}),
    ("delete_file", {"path": "/archive/notes.md"}),
    ("read_file", {"path": "/archive/notes.md"}),  # not found
    ("remember", {"content": "the design review is on thursday", "tags": ["design"],
                  "key": "review"}),
    ("recall", {"query": "when is the design review"}),
    ("forget", {"key": "review"}),
    ("session_append", {"content": "we chose the heron design"}),
    ("list_sessions", {}),
    ("session_context", {"session": "ses_nope", "max_tokens": 10}),
    ("storage_status", {}),
    ("no_such_tool", {}),  # unknown tool
    ("read_file", {"path": 7, "offset": "many"}),  # wrong types
    ("read_file", {}),  # missing required
    ("write_file", {"path": "/docs/x.md"}),  # missing required
    ("list_directory", {"path": "/docs", "limit": -3}),  # out of range
    ("write_file", {"path": "/locked/a.txt", "content": "x"}),  # denied: path rule
    ("write_file", {"path": "/docs/card.txt",
                    "content": "my card is 4111 1111 1111 1111"}),  # denied: policy
    ("demo_fail", {"kind": "tool"}),
    ("demo_fail", {"kind": "crash"}),
    ("demo_fail", {"kind": "other"}),
    ("demo_whoami", {"echo": "NaN and Infinity", "tenant": "globex"}),
    ("demo_read", {"path": "/docs/uni.txt"}),
    ("demo_list", {"path": "/docs"}),
]


async def _client_session(home: Path, token: str, fast: bool, log: Path) -> dict[str, Any]:
    """All of CALLS, progress, concurrent calls and a cancelled call through ``mcp.Client``."""
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters

    serve = [ms.PY, THIS, "serve", "--transport", "stdio", "--max-reply-bytes", "4096"]
    params = StdioServerParameters(command=ms.PY, args=[THIS, "relay", str(log), "--", *serve],
                                   env=_env(home, token, fast), cwd=str(ms.ROOT))
    out: dict[str, Any] = {"results": [], "progress": []}

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        out["progress"].append((done, total, message))

    async with Client(params) as c:
        listed = {t.name for t in (await c.list_tools()).tools}
        from tools.registry import TOOLS
        assert {s.name for s in TOOLS} <= listed
        assert {name for name, _ in CALLS} >= {s.name for s in TOOLS}  # every tool is called
        for name, args in CALLS:
            res = await c.call_tool(name, args)
            out["results"].append(res.model_dump(mode="json", by_alias=True))
        res = await c.call_tool("demo_progress", {"steps": 3}, progress_callback=on_progress)
        out["results"].append(res.model_dump(mode="json", by_alias=True))
        # concurrent calls: each gets its own answer
        echoes = [f"e{i}" for i in range(12)]
        many = await asyncio.gather(*(c.call_tool("demo_whoami", {"echo": e}) for e in echoes))
        assert [r.structured_content["echo"] for r in many] == echoes
        # a call the caller gives up on once it runs: the client sends notifications/cancelled
        sleeper = asyncio.create_task(c.call_tool("fp_sleep", {"seconds": 60}))
        for _ in range(400):
            if (await c.call_tool("fp_stats", {})).structured_content["sleeps"]:
                break
            await asyncio.sleep(0.05)
        sleeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sleeper
        for _ in range(400):
            stats = (await c.call_tool("fp_stats", {})).structured_content
            if stats["cancelled"]:
                break
            await asyncio.sleep(0.05)
        out["stats"] = stats
    return out


@pytest.mark.skipif(sys.platform == "win32", reason="stdio pipes")
def test_client_sessions_match_the_sdk_path(tmp_path: Path) -> None:
    home = tmp_path / "home"  # the same path for both runs: nothing differs but time and ids
    runs = {}
    for fast in (False, True):
        token = _make_store(home)
        log = tmp_path / f"wire-{'fast' if fast else 'sdk'}.log"
        runs[fast] = asyncio.run(_client_session(home, token, fast, log))
        # split on newlines only: str.splitlines would also split at U+2028 in a string
        runs[fast]["wire"] = log.read_bytes().decode().split("\n")[:-1]
    sdk, fast = runs[False], runs[True]

    # which path answered
    assert sdk["stats"]["fast_calls"] == 0
    assert fast["stats"]["fast_calls"] >= len(CALLS) + 12
    for r in (sdk, fast):
        assert r["stats"]["sleeps"] == 1 and r["stats"]["cancelled"] == 1, r["stats"]
        assert r["stats"]["finished"] == 0
        assert [p[0] for p in r["progress"]] == [1, 2, 3] and r["progress"][0][1] == 3

    # the raw JSON-RPC lines: equal, but for the fp_stats answers (they count fast calls)
    def wire(r: dict[str, Any]) -> list[str]:
        return [x for x in r["wire"] if '"fast_calls"' not in x]

    w_sdk, w_fast = wire(sdk), wire(fast)
    assert len(w_sdk) == len(w_fast)
    for a, b in zip(w_sdk, w_fast, strict=True):
        assert _normalize(b) == _normalize(a)
    # one answer per request, and none for the cancelled call: the client numbers its
    # requests 1, 2, ...; exactly one number has no answer
    for r in (sdk, fast):
        ids = [m["id"] for m in map(json.loads, r["wire"]) if "id" in m]
        assert len(ids) == len(set(ids))
        assert len(set(range(1, max(ids) + 1)) - set(ids)) == 1

    # and what the client made of them: the same results
    assert len(sdk["results"]) == len(fast["results"]) == len(CALLS) + 1
    for (name, _), a, b in zip([*CALLS, ("demo_progress", {})], sdk["results"], fast["results"],
                               strict=True):
        assert _normalize(json.dumps(b, separators=(",", ":"))) == \
            _normalize(json.dumps(a, separators=(",", ":"))), name
    codes = {res["content"][0]["text"].split(":", 1)[0]
             for res in fast["results"] if res["isError"]}
    assert {"unknown_tool", "invalid_arguments", "not_found", "forbidden",
            "denied_by_policy", "demo_refused", "internal_error"} <= codes, codes
    links = [c for res in fast["results"] for c in res["content"]
             if c["type"] == "resource_link"]
    assert [c["uri"] for c in links] == ["lodestore://files/big/report.txt"]


# -- raw JSON-RPC lines ---------------------------------------------------------------------


class RawServer:
    """A stdio server driven with raw lines; stdout lines are collected as they come."""

    def __init__(self, home: Path, token: str, fast: bool) -> None:
        self.err = open(home.parent / f"stderr-{time.monotonic_ns()}.log", "w+b")  # noqa: SIM115
        self.proc = subprocess.Popen([ms.PY, THIS, "serve", "--transport", "stdio"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=_env(home, token, fast),
                                     cwd=str(ms.ROOT))
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def send(self, *msgs: Any) -> None:
        assert self.proc.stdin is not None
        for m in msgs:
            data = m if isinstance(m, bytes) else json.dumps(m, ensure_ascii=False).encode()
            self.proc.stdin.write(data.rstrip(b"\n") + b"\n")
        self.proc.stdin.flush()

    def collect(self, ids: set[Any], quiet: float = 0.4, timeout: float = 30) -> list[str]:
        """Lines until every id in ``ids`` is answered, then until ``quiet`` s pass."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        waiting = set(ids)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no answer for {waiting}; got {got}\n{self.stderr()}")
            try:
                line = self.lines.get(timeout=min(left, quiet) if not waiting else left)
            except queue.Empty:
                if not waiting:
                    break
                continue
            if not line:
                break
            text = line.decode().rstrip("\n")
            got.append(text)
            waiting.discard(json.loads(text).get("id"))
        self.seen += got
        return got

    def stats(self, rid: Any, legacy: bool = False) -> dict[str, int]:
        msg = _call(rid, "fp_stats", {})
        if legacy:
            del msg["params"]["_meta"]
        self.send(msg)
        line = next(x for x in self.collect({rid}) if f'"id":{json.dumps(rid)}' in x)
        return json.loads(line)["result"]["structuredContent"]

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")[-4000:]

    def close(self, timeout: float = 20) -> list[str]:
        """EOF on stdin; the lines written until the server exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        got = self.collect(set(), quiet=timeout)
        self.proc.wait(timeout)
        self.err.close()
        return got


def _call(rid: Any, name: str, arguments: Any, meta: dict[str, Any] | None = None,
          **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": "tools/call",
            "params": {"name": name, "arguments": arguments, "_meta": meta or ENVELOPE,
                       **params}}


RAW_OPENING = [_call(1, "demo_whoami", {"echo": "first"})]  # the first request: the SDK's
RAW_CASES: list[Any] = [
    _call(2, "demo_whoami", {"echo": "h\u00e9 \u2028 \"q\" \\ \U0001f600 \x01"}),
    _call("s-3", "demo_whoami", {}),
    _call("4", "demo_whoami", {}),  # an int-like string id stays a string on the wire
    _call(-5, "demo_whoami", None),  # arguments null: as {}
    {"jsonrpc": "2.0", "id": 6, "method": "tools/call",
     "params": {"name": "demo_whoami", "arguments": {}}},  # no envelope
    _call(7, "demo_whoami", {}, {**ENVELOPE, "io.modelcontextprotocol/protocolVersion":
                                 "2025-11-25"}),  # not a modern version
    _call(8, 42, {}),  # name not a string
    _call(9, "demo_whoami", "x"),  # arguments not an object
    _call(10.0, "demo_whoami", {}),  # a float id: the SDK reads a notification (no answer)
    _call(True, "demo_whoami", {}),  # a bool id: likewise
    _call(11, "demo_whoami", {}, requestState="forged"),
    {**_call(12, "demo_whoami", {"echo": "extra member"}), "x-extra": 1},
    b"{not json",
    {"jsonrpc": "2.0", "id": 13, "method": "tools/call"},  # no params
    _call(14, "nope", {}),  # unknown tool
    _call(15, "demo_progress", {"steps": 2}, {**ENVELOPE, "progressToken": "tok"}),
    _call(16, "demo_progress", {"steps": 2}, {**ENVELOPE, "progressToken": True}),
    _call(17, "demo_whoami", {"echo": "NaN"}),
    _call(18, "demo_fail", {"kind": "crash"}),
    {**_call(19, "demo_whoami", {}), "jsonrpc": "1.0"},
    _call(20, "demo_whoami", {}, {**ENVELOPE, "io.modelcontextprotocol/clientInfo": 5}),
    _call(21, "demo_whoami", {}, {**ENVELOPE, "io.modelcontextprotocol/clientCapabilities":
                                  {"sampling": "yes"}}),
    _call(22, "demo_read", {"path": "/missing.txt"}),
    _call(23, "demo_whoami", {}, {**ENVELOPE, "io.modelcontextprotocol/logLevel": "debug"}),
    {"jsonrpc": "2.0", "id": 24, "method": "tools/list", "params": {"_meta": ENVELOPE}},
    {"jsonrpc": "2.0", "id": 25, "method": "initialize",
     "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "x", "version": "1"}}},
    _call(12345678901234567890123, "demo_whoami", {}),  # a big int id
]
# answered: every id but 10.0 and True (notifications to the SDK) and 19 (invalid jsonrpc)
RAW_IDS = {m["id"] for m in RAW_CASES if isinstance(m, dict) and "id" in m
           and type(m["id"]) in (int, str) and m["id"] != 19}


def _raw_run(home: Path, token: str, fast: bool) -> dict[str, Any]:
    s = RawServer(home, token, fast)
    try:
        s.send(*RAW_OPENING)
        opening = s.collect({1})
        s.send(*RAW_CASES)  # pipelined, all at once
        answered = s.collect(RAW_IDS, quiet=1.0)
        stats = s.stats(99)
        return {"opening": opening, "answered": answered, "stats": stats,
                "rest": s.close()}
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


@pytest.fixture(scope="module")
def raw_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    home = tmp_path_factory.mktemp("fastpath-raw") / "home"
    return home, _make_store(home)


@pytest.mark.skipif(sys.platform == "win32", reason="stdio pipes")
def test_raw_requests_match_the_sdk_path(raw_store: tuple[Path, str]) -> None:
    home, token = raw_store
    sdk, fast = _raw_run(home, token, False), _raw_run(home, token, True)
    assert sdk["stats"]["fast_calls"] == 0
    assert fast["stats"]["fast_calls"] >= 10, fast["stats"]  # the well-formed calls
    assert fast["opening"] == sdk["opening"]
    assert _unordered(fast["answered"]) == _unordered(sdk["answered"])
    assert fast["rest"] == sdk["rest"] == []
    # spot checks on what both said
    by_id: dict[Any, list[dict[str, Any]]] = {}
    for line in fast["answered"]:
        msg = json.loads(line)
        by_id.setdefault(msg.get("id", msg.get("params", {}).get("progressToken")), []).append(
            msg)
    assert {k for k in by_id if type(k) is int} | {k for k in by_id if type(k) is str} == \
        RAW_IDS | {"tok"}  # no answer for the float and bool ids, nor for jsonrpc 1.0
    assert by_id["4"][0]["result"]["structuredContent"]["agent"] == "bob"
    assert by_id[-5][0]["result"]["isError"] is False
    assert by_id[6][0]["error"]["code"] == -32602  # no envelope
    assert by_id[7][0]["error"]["code"] == -32022  # unsupported version
    assert by_id[8][0]["error"]["code"] == -32602 and by_id[9][0]["error"]["code"] == -32602
    assert by_id[11][0]["error"]["message"] == "Invalid or expired requestState"
    assert by_id[14][0]["result"]["isError"] is True
    assert [m.get("method") for m in by_id["tok"]] == ["notifications/progress"] * 2
    assert [m["result"]["structuredContent"] for m in by_id[15]] == [{"entries": ["0", "1"]}]
    assert len([x for x in fast["answered"] if "notifications/progress" in x]) == 2  # not 16
    assert by_id[16][0]["result"]["isError"] is False
    assert by_id[17][0]["result"]["structuredContent"]["echo"] == "NaN"
    assert by_id[25][0]["error"]["code"] == -32022  # initialize on a modern connection
    assert by_id[12345678901234567890123][0]["result"]["isError"] is False
    lines = fast["answered"]
    progress_at = [i for i, x in enumerate(lines) if '"progressToken":"tok"' in x]
    answer_at = next(i for i, x in enumerate(lines) if x.startswith('{"jsonrpc":"2.0","id":15,'))
    assert progress_at and max(progress_at) < answer_at


def _cancel_run(home: Path, token: str, fast: bool) -> dict[str, Any]:
    s = RawServer(home, token, fast)
    try:
        s.send(_call(1, "fp_stats", {}))
        s.collect({1})
        s.send(_call(2, "fp_sleep", {"seconds": 60}), _call("c-3", "fp_sleep", {"seconds": 60}),
               _call(5, "fp_sleep", {"seconds": 1.0, "shielded": True}))
        for i in range(400):
            if s.stats(1000 + i)["sleeps"] == 3:
                break
            time.sleep(0.05)
        # a cancel by the stringified id ("2" correlates with 2, as in the SDK); one for an
        # id that is not in flight changes nothing; 5 runs on to its end, unanswered
        s.send({"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": "2", "reason": "test"}},
               {"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": 777}},
               {"jsonrpc": "2.0", "method": "notifications/cancelled",
                "params": {"requestId": 5}})
        for i in range(400):
            stats = s.stats(2000 + i)
            if stats["cancelled"] == 1 and stats["finished"] == 1:
                break
            time.sleep(0.05)
        s.send(_call(4, "demo_whoami", {"echo": "after"}))
        after = s.collect({4})
        time.sleep(0.3)
        stats = s.stats(3000)
        rest = s.close()  # c-3 still in flight: answered "Connection closed" at EOF
        return {"stats": stats, "after": [x for x in after if '"id":4,' in x],
                "rest": rest, "seen": s.seen}
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


@pytest.mark.skipif(sys.platform == "win32", reason="stdio pipes")
def test_cancel_and_eof_match_the_sdk_path(raw_store: tuple[Path, str]) -> None:
    home, token = raw_store
    sdk, fast = _cancel_run(home, token, False), _cancel_run(home, token, True)
    assert sdk["stats"]["fast_calls"] == 0 and fast["stats"]["fast_calls"] > 0
    for r in (sdk, fast):
        st = r["stats"]
        assert (st["sleeps"], st["cancelled"], st["finished"]) == (3, 1, 1), st
        assert not [x for x in r["seen"] if x.startswith(('{"jsonrpc":"2.0","id":2,',
                                                          '{"jsonrpc":"2.0","id":5,'))]
        assert r["rest"] == ['{"jsonrpc":"2.0","id":"c-3","error":{"code":-32000,'
                             '"message":"Connection closed"}}'], r["rest"]
    assert fast["after"] == sdk["after"]


def _legacy_run(home: Path, token: str, fast: bool) -> dict[str, Any]:
    """A 2025 (handshake) session: the SDK serves it; the fast path stays out."""
    s = RawServer(home, token, fast)
    try:
        s.send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                           "clientInfo": {"name": "legacy", "version": "1"}}})
        init = s.collect({1})
        s.send({"jsonrpc": "2.0", "method": "notifications/initialized"},
               {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "demo_whoami", "arguments": {"echo": "legacy"}}},
               _call(3, "demo_whoami", {}),  # an enveloped request on a legacy connection
               {"jsonrpc": "2.0", "id": 4, "method": "tools/call",
                "params": {"name": "demo_progress", "arguments": {"steps": 2},
                           "_meta": {"progressToken": 9}}})
        calls = s.collect({2, 3, 4})
        stats = s.stats(5, legacy=True)
        return {"init": init, "calls": calls, "stats": stats, "rest": s.close()}
    finally:
        if s.proc.poll() is None:
            s.proc.kill()


@pytest.mark.skipif(sys.platform == "win32", reason="stdio pipes")
def test_legacy_session_stays_on_the_sdk_path(raw_store: tuple[Path, str]) -> None:
    home, token = raw_store
    sdk, fast = _legacy_run(home, token, False), _legacy_run(home, token, True)
    assert sdk["stats"]["fast_calls"] == fast["stats"]["fast_calls"] == 0
    assert fast["init"] == sdk["init"]
    assert _unordered(fast["calls"]) == _unordered(sdk["calls"])
    answers = {json.loads(x).get("id"): json.loads(x) for x in fast["calls"]}
    assert answers[2]["result"]["structuredContent"]["echo"] == "legacy"
    assert answers[3]["error"]["code"] == -32600


# -- script mode ----------------------------------------------------------------------------

if __name__ == "__main__":
    if sys.argv[1:2] == ["relay"]:
        sep = sys.argv.index("--")
        _relay(sys.argv[2], sys.argv[sep + 1:])
    else:
        with contextlib.suppress(KeyboardInterrupt):
            _serve(sys.argv[1:])

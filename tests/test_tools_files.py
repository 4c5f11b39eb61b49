"""File tools (issue #4), called directly with a ToolContext on a real embedded store.

Each module opens one store in a temporary home through ``server.wiring.open_app`` (real
volume, gateway, classifier, audit, QoS) with two tenants, and attaches the search index
the way the server does. Tests work in their own directories so they can share it.
"""

from __future__ import annotations

import base64
import inspect
import os
import unicodedata

import anyio
import pytest
from pydantic import BaseModel

import tools
from governance.search import SearchIndex
from server.wiring import open_app
from storage import StoreConfig, Volume
from tools import files as F
from tools import status as ST
from tools.registry import TOOLS, ToolContext, ToolError

EMAIL = "alice.walker@example.com"
SSN = "536-22-4817"
CARD = "4111 1111 1111 1111"

POLICY = """
pii:
  entities:
    EMAIL_ADDRESS: {action: tag, threshold: 0.4}
    PHONE_NUMBER: {action: tag, threshold: 0.4}
    US_SSN: {action: redact}
    CREDIT_CARD: {action: deny}
clearance:
  boss: ["*"]
  support: [EMAIL_ADDRESS]
paths:
  - {prefix: /, read: ["*"], write: ["*"]}
  - {prefix: /secret, read: [boss], write: [boss]}
  - {prefix: /ro, read: ["*"], write: [boss]}
  - {prefix: /inbox, read: [boss], write: ["*"]}
"""

TOOL_NAMES = {"read_file", "read_multiple_files", "write_file", "edit_file", "list_directory",
              "get_file_info", "move_file", "delete_file", "create_directory", "find_files",
              "search", "query_table", "storage_status"}


class Env:
    def __init__(self, home):
        self.home = home
        Volume.init(home, StoreConfig.embedded(home, chunk_size=65536, inline_threshold=1024,
                                               durability="none")).close()
        self.app = open_app(home)
        pr = self.app.principals
        self.who = {}
        for tenant in ("acme", "beta"):
            pr.add_tenant(tenant)
            pr.set_policy(tenant, POLICY)
            for role in ("agent", "support", "boss"):
                tok = pr.add_agent(tenant, f"{role}-bot", role=role)
                self.who[(tenant, role)] = self.app.gateway.authenticate(tok)
        self.index = SearchIndex.attach(self.app.gateway, home, sync_bytes=32 << 10,
                                        other_door_delay_s=0.2)

    def ctx(self, role="agent", tenant="acme", **limits) -> ToolContext:
        return ToolContext(self.app.gateway, self.who[(tenant, role)], limits=dict(limits))

    def close(self):
        self.index.close()
        self.app.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("tools-files") / "home")
    yield e
    e.close()


def run(coro_fn, *args, **kwargs):
    return anyio.run(lambda: coro_fn(*args, **kwargs))


def err(coro_fn, *args, **kwargs) -> ToolError:
    with pytest.raises(ToolError) as ei:
        run(coro_fn, *args, **kwargs)
    return ei.value


def exists(env, path, tenant="acme") -> bool:
    try:
        run(F.get_file_info, env.ctx("boss", tenant), path)
        return True
    except ToolError as e:
        assert e.code == "not_found", e.message
        return False


# --------------------------------------------------------------------------- registry


def test_every_tool_is_registered_with_a_description_schema_and_output_model():
    assert tools is not None
    by_name = {t.name: t for t in TOOLS}
    assert set(by_name) >= TOOL_NAMES, TOOL_NAMES - set(by_name)
    assert len([t for t in TOOLS if t.name in TOOL_NAMES]) == len(TOOL_NAMES), "registered twice"
    for name in TOOL_NAMES:
        spec = by_name[name]
        assert len(spec.description) > 120, name
        assert not (spec.read_only and spec.destructive), name
        sig = inspect.signature(spec.fn)
        params = list(sig.parameters.values())
        assert params[0].name == "ctx"
        ret = sig.return_annotation
        assert isinstance(ret, type) and issubclass(ret, BaseModel), name
    for name in ("read_file", "read_multiple_files", "list_directory", "get_file_info",
                 "find_files", "search", "query_table", "storage_status"):
        assert by_name[name].read_only and by_name[name].idempotent
    for name in ("write_file", "edit_file", "move_file", "delete_file"):
        assert not by_name[name].read_only and by_name[name].destructive
    try:
        from mcp.server.mcpserver.utilities.func_metadata import func_metadata
    except ImportError:  # pragma: no cover - the SDK moved it
        return
    for name in TOOL_NAMES:
        meta = func_metadata(by_name[name].fn, skip_names=["ctx"])
        schema = meta.arg_model.model_json_schema()
        for pname, prop in schema.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{pname} has no description"
        assert meta.output_schema is not None, name


# --------------------------------------------------------------------------- read & write


def test_write_then_read_reports_what_governance_did(env):
    text = f"plan: call {EMAIL} about ssn {SSN} tomorrow\n"
    w = run(F.write_file, env.ctx("agent"), "/rw/plan.txt", text)
    assert w.labels == ["EMAIL_ADDRESS", "US_SSN"] and w.redacted == {"US_SSN": 1}
    assert w.version == 1 and w.scanned == "text" and w.index_state == "indexed"
    assert w.bytes_received == len(text.encode())
    agent = run(F.read_file, env.ctx("agent"), "/rw/plan.txt")
    assert agent.encoding == "text" and agent.eof and agent.next_offset is None
    assert EMAIL not in agent.content and "*" * len(EMAIL) in agent.content
    assert SSN not in agent.content and "<US_SSN>" in agent.content
    assert agent.masked == ["EMAIL_ADDRESS"] and agent.labels == ["EMAIL_ADDRESS", "US_SSN"]
    assert agent.redacted == {"US_SSN": 1}
    boss = run(F.read_file, env.ctx("boss"), "/rw/plan.txt")
    assert EMAIL in boss.content and boss.masked == [] and SSN not in boss.content
    support = run(F.read_file, env.ctx("support"), "/rw/plan.txt")
    assert EMAIL in support.content and support.masked == []


def test_denied_content_names_entity_types_and_stores_nothing(env):
    e = err(F.write_file, env.ctx("agent"), "/rw/card.txt", f"card {CARD} for {EMAIL}")
    assert e.code == "denied_by_policy" and "CREDIT_CARD" in e.message
    assert CARD not in e.message and EMAIL not in e.message
    assert not exists(env, "/rw/card.txt")


def test_base64_round_trip_of_every_byte_value(env):
    blob = bytes(range(256)) * 4 + b"\xff\xfe\x00tail"
    w = run(F.write_file, env.ctx("agent"), "/b64/blob.bin",
            base64.b64encode(blob).decode(), encoding="base64")
    assert w.size == len(blob) and w.bytes_received == len(blob)
    # (the digit run 0x30..0x39 in the blob reads as a phone number: masked for 'agent')
    r = run(F.read_file, env.ctx("boss"), "/b64/blob.bin")
    assert r.encoding == "base64" and base64.b64decode(r.content) == blob
    r2 = run(F.read_file, env.ctx("agent"), "/b64/blob.bin", encoding="base64", offset=10,
             length=20)
    assert base64.b64decode(r2.content) == blob[10:30] and r2.next_offset == 30
    e = err(F.read_file, env.ctx("agent"), "/b64/blob.bin", encoding="text")
    assert e.code == "invalid_argument" and "base64" in e.message
    # valid UTF-8 that is mostly control bytes comes as base64 (exact and shorter than JSON
    # escapes); asked for as text it is text
    run(F.write_file, env.ctx("agent"), "/b64/zeros.bin", "\x00\x01" * 100)
    z = run(F.read_file, env.ctx("agent"), "/b64/zeros.bin")
    assert z.encoding == "base64" and base64.b64decode(z.content) == b"\x00\x01" * 100
    assert run(F.read_file, env.ctx("agent"), "/b64/zeros.bin", encoding="text").content == (
        "\x00\x01" * 100)
    # text asked for as base64 comes back as base64 too
    run(F.write_file, env.ctx("agent"), "/b64/t.txt", "héllo wörld")
    r3 = run(F.read_file, env.ctx("agent"), "/b64/t.txt", encoding="base64")
    assert base64.b64decode(r3.content).decode() == "héllo wörld"


def test_reads_page_under_the_reply_cap_and_never_split_a_character(env):
    cap = 4096
    text = "".join(f"line {i:05d} naïve café — ünïcödé ✓\n" for i in range(600))
    run(F.write_file, env.ctx("agent"), "/page/big.txt", text)
    ctx = env.ctx("agent", max_reply_bytes=cap)
    got, offset, calls = [], 0, 0
    while offset is not None:
        r = run(F.read_file, ctx, "/page/big.txt", offset=offset)
        assert r.encoding == "text" and r.offset == offset
        assert len(r.content.encode()) <= cap and r.length <= cap
        got.append(r.content)
        assert r.capped == (r.next_offset is not None)
        offset = r.next_offset
        calls += 1
    assert "".join(got) == text and calls >= len(text.encode()) // cap
    # base64 pages stay under the cap once encoded
    r = run(F.read_file, ctx, "/page/big.txt", encoding="base64")
    assert len(r.content) <= cap and r.next_offset == r.length
    # an explicit window inside the file
    r = run(F.read_file, env.ctx("agent"), "/page/big.txt", offset=11, length=5)
    assert r.content == text.encode()[11:16].decode() and r.next_offset == 16 and not r.eof
    # a read that starts inside a multi-byte character starts at the next character
    inside = text.encode().index("é".encode()) + 1
    r = run(F.read_file, env.ctx("agent"), "/page/big.txt", offset=inside, length=8)
    assert r.offset == inside + 1 and r.content.startswith(" — ")
    # past the end: empty, at end of file
    r = run(F.read_file, env.ctx("agent"), "/page/big.txt", offset=10**9)
    assert r.content == "" and r.eof and r.next_offset is None


def test_read_multiple_files_reports_per_file_and_shares_one_cap(env):
    run(F.write_file, env.ctx("agent"), "/multi/a.txt", "alpha " * 100)
    run(F.write_file, env.ctx("agent"), "/multi/b.txt", "bravo " * 1000)
    run(F.write_file, env.ctx("boss"), "/secret/multi.txt", "classified")
    seen = []

    async def progress(done, total, message):
        seen.append((done, total, message))

    ctx = env.ctx("agent", max_reply_bytes=2000)
    ctx.progress = progress
    res = run(F.read_multiple_files, ctx, ["/multi/a.txt", "/multi/missing.txt",
                                           "/secret/multi.txt", "/multi/b.txt",
                                           "/multi/a.txt"])
    a, missing, secret, b, again = res.files
    assert a.ok and a.content == "alpha " * 100 and a.eof
    assert not missing.ok and missing.error.code == "not_found"
    assert not secret.ok and secret.error.code == "forbidden" and "classified" not in str(res)
    assert b.ok and not b.eof and b.next_offset == b.length and b.length == 2000 - 600
    assert not again.ok and again.error.code == "reply_cap_reached"
    assert sum(len(f.content or "") for f in res.files) <= 2000
    assert not res.complete and res.total_bytes == 600 + b.length
    assert seen and seen[-1][0] == seen[-1][1] == 5
    e = err(F.read_multiple_files, env.ctx("agent"), [])
    assert e.code == "invalid_argument"


def test_write_modes_and_expected_version(env):
    ctx = env.ctx("agent")
    w1 = run(F.write_file, ctx, "/modes/f.txt", "one\n", mode="create")
    e = err(F.write_file, ctx, "/modes/f.txt", "again\n", mode="create")
    assert e.code == "already_exists"
    w2 = run(F.write_file, ctx, "/modes/f.txt", "two\n", mode="append")
    assert w2.version == w1.version + 1 and w2.size == 8
    e = err(F.write_file, ctx, "/modes/f.txt", "lost\n", expected_version=w1.version)
    assert e.code == "version_mismatch" and f"version {w2.version}" in e.message
    w3 = run(F.write_file, ctx, "/modes/f.txt", "three\n", expected_version=w2.version)
    assert w3.version == w2.version + 1
    assert run(F.read_file, ctx, "/modes/f.txt").content == "three\n"
    e = err(F.write_file, ctx, "/modes/new.txt", "x", expected_version=3)
    assert e.code == "version_mismatch"
    run(F.write_file, ctx, "/modes/new.txt", "x", expected_version=0)
    e = err(F.write_file, ctx, "/modes/new.txt", "y", expected_version=0)
    assert e.code == "version_mismatch"


def test_oversize_payloads_are_refused_and_nothing_is_stored(env):
    small = env.ctx("agent", max_write_bytes=1000)
    e = err(F.write_file, small, "/big/a.txt", "x" * 1001)
    assert e.code == "too_large" and "append" in e.message
    e = err(F.write_file, small, "/big/b.bin", base64.b64encode(b"\0" * 1001).decode(),
            encoding="base64")
    assert e.code == "too_large"
    e = err(F.write_file, small, "/big/c.txt", "é" * 501)  # 1002 bytes in 501 characters
    assert e.code == "too_large"
    e = err(F.write_file, env.ctx("agent"), "/big/d.txt", "y" * ((16 << 20) + 1))
    assert e.code == "too_large" and "16 MiB" in e.message
    for p in ("/big/a.txt", "/big/b.bin", "/big/c.txt", "/big/d.txt"):
        assert not exists(env, p)
    run(F.write_file, small, "/big/ok.txt", "x" * 1000)


@pytest.mark.parametrize("kwargs", [
    {"path": 123, "content": "x"},
    {"path": "/types/a.txt", "content": b"raw bytes"},
    {"path": "/types/a.txt", "content": 42},
    {"path": "/types/a.txt", "content": None},
    {"path": "/types/a.txt", "content": "x", "mode": "truncate"},
    {"path": "/types/a.txt", "content": "x", "encoding": "hex"},
    {"path": "/types/a.txt", "content": "x", "expected_version": -1},
    {"path": "/types/a.txt", "content": "x", "expected_version": "1"},
    {"path": "/types/a.txt", "content": "not base64!", "encoding": "base64"},
    {"path": "/types/a.txt", "content": "x", "colour": "red"},
    {"path": ["/types/a.txt"], "content": "x"},
    {"content": "x"},
])
def test_wrong_types_are_rejected_and_nothing_is_stored(env, kwargs):
    e = err(F.write_file, env.ctx("agent"), **kwargs)
    assert e.code == "invalid_argument", e.message
    assert not exists(env, "/types/a.txt")


def test_bad_paths_and_roles_map_to_clear_errors(env):
    ctx = env.ctx("agent")
    for bad in ("/a/../etc/passwd", "a\\b", "/x\x00y", "", "/dup//slash"):
        e = err(F.read_file, ctx, bad) if bad else err(F.read_file, ctx, bad)
        assert e.code in ("invalid_path", "invalid_argument"), (bad, e.code)
    e = err(F.read_file, ctx, "/a/../etc/passwd")
    assert e.code == "invalid_path" and ".." in e.message
    run(F.write_file, env.ctx("boss"), "/ro/fixed.txt", "read me")
    assert run(F.read_file, ctx, "/ro/fixed.txt").content == "read me"
    e = err(F.write_file, ctx, "/ro/fixed.txt", "overwritten")
    assert e.code == "forbidden" and "agent" in e.message
    e = err(F.read_file, ctx, "/secret/plans.txt")
    assert e.code == "forbidden"
    e = err(F.read_file, ctx, "/nope/none.txt")
    assert e.code == "not_found"
    run(F.create_directory, ctx, "/dir-not-file")
    e = err(F.read_file, ctx, "/dir-not-file")
    assert e.code == "is_a_directory"


# --------------------------------------------------------------------------- edit_file


def test_edit_file_dry_run_shows_a_diff_and_writes_nothing(env):
    ctx = env.ctx("agent")
    w = run(F.write_file, ctx, "/edit/a.md", "# Title\nfirst line\nsecond line\n")
    d = run(F.edit_file, ctx, "/edit/a.md",
            [{"old_text": "first line", "new_text": "1st line"}], dry_run=True)
    assert d.dry_run and d.changed and d.replacements == 1 and d.version == w.version
    assert "-first line\n+1st line\n" in d.diff and d.diff.startswith("--- a/edit/a.md")
    assert run(F.read_file, ctx, "/edit/a.md").content == "# Title\nfirst line\nsecond line\n"
    r = run(F.edit_file, ctx, "/edit/a.md",
            [{"old_text": "first line", "new_text": "1st line"},
             {"old_text": "line", "new_text": "row", "replace_all": True}])
    assert not r.dry_run and r.version == w.version + 1 and r.replacements == 3
    assert run(F.read_file, ctx, "/edit/a.md").content == "# Title\n1st row\nsecond row\n"
    # no trailing newline is shown as such, not glued to the next line
    run(F.write_file, ctx, "/edit/b.md", "no newline")
    d = run(F.edit_file, ctx, "/edit/b.md", [{"old_text": "no", "new_text": "still no"}],
            dry_run=True)
    assert "-no newline\n\\ No newline at end of file\n+still no newline\n" in d.diff


def test_edit_file_errors_are_actionable(env):
    ctx = env.ctx("agent")
    w = run(F.write_file, ctx, "/edit/c.txt", "apple banana apple cherry\n")
    e = err(F.edit_file, ctx, "/edit/c.txt", [{"old_text": "kiwi", "new_text": "x"}])
    assert e.code == "invalid_argument" and "not found" in e.message
    e = err(F.edit_file, ctx, "/edit/c.txt", [{"old_text": "apple", "new_text": "x"}])
    assert e.code == "invalid_argument" and "2 times" in e.message and "replace_all" in e.message
    e = err(F.edit_file, ctx, "/edit/c.txt", [{"old_text": "banana", "new_text": "x"}],
            expected_version=w.version + 5)
    assert e.code == "version_mismatch"
    e = err(F.edit_file, ctx, "/edit/c.txt", [{"old_text": "", "new_text": "x"}])
    assert e.code == "invalid_argument"
    e = err(F.edit_file, ctx, "/edit/c.txt", [{"old": "banana", "new_text": "x"}])
    assert e.code == "invalid_argument"
    # a failed edit list writes nothing, even when earlier edits matched
    e = err(F.edit_file, ctx, "/edit/c.txt", [{"old_text": "banana", "new_text": "x"},
                                              {"old_text": "kiwi", "new_text": "y"}])
    assert run(F.read_file, ctx, "/edit/c.txt").version == w.version
    # masked PII would be overwritten with '*': refused for the uncleared role
    run(F.write_file, env.ctx("boss"), "/edit/pii.txt", f"contact {EMAIL} today\n")
    e = err(F.edit_file, ctx, "/edit/pii.txt", [{"old_text": "today", "new_text": "now"}])
    assert e.code == "forbidden" and "EMAIL_ADDRESS" in e.message and EMAIL not in e.message
    ok = run(F.edit_file, env.ctx("boss"), "/edit/pii.txt",
             [{"old_text": "today", "new_text": "now"}])
    assert ok.labels == ["EMAIL_ADDRESS"]
    assert run(F.read_file, env.ctx("boss"), "/edit/pii.txt").content == f"contact {EMAIL} now\n"
    run(F.write_file, ctx, "/edit/bin.dat", base64.b64encode(b"\xff\xfe\x00").decode(),
        encoding="base64")
    e = err(F.edit_file, ctx, "/edit/bin.dat", [{"old_text": "a", "new_text": "b"}])
    assert e.code == "invalid_argument" and "UTF-8" in e.message


class _Racing:
    """A gateway whose read is followed by someone else's write: a concurrent change."""

    def __init__(self, gw, intruder):
        self._gw, self._intruder = gw, intruder

    def __getattr__(self, name):
        return getattr(self._gw, name)

    async def aread(self, p, path, offset=0, length=None):
        r = await self._gw.aread(p, path, offset, length)
        await self._gw.awrite(self._intruder, path, b"rewritten by someone else\n")
        return r


def test_edit_file_loses_no_concurrent_change(env):
    ctx = env.ctx("agent")
    run(F.write_file, ctx, "/edit/race.txt", "original text\n")
    racing = ToolContext(_Racing(env.app.gateway, env.who[("acme", "support")]),
                         env.who[("acme", "agent")])
    e = err(F.edit_file, racing, "/edit/race.txt",
            [{"old_text": "original", "new_text": "edited"}])
    assert e.code == "version_mismatch" and "nothing was written" in e.message
    assert run(F.read_file, ctx, "/edit/race.txt").content == "rewritten by someone else\n"


# --------------------------------------------------------------------------- namespace


def test_list_directory_pages_with_a_cursor(env):
    ctx = env.ctx("agent")
    names = [f"f{i:02d}.txt" for i in range(25)]
    for n in names:
        run(F.write_file, ctx, f"/list/{n}", n)
    run(F.create_directory, ctx, "/list/sub")
    seen, cursor, pages = [], None, 0
    while True:
        page = run(F.list_directory, ctx, "/list", cursor=cursor, limit=10)
        assert len(page.entries) <= 10
        seen += page.entries
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3 and [e.name for e in seen] == names + ["sub"]
    f0 = seen[0]
    assert (f0.kind, f0.size, f0.version) == ("file", 7, 1)
    assert f0.modified and f0.modified.endswith("Z")
    # lean entries: the path is the listed path + name; no labels key when there are none
    assert set(f0.model_dump(mode="json")) == {"name", "kind", "size", "version", "modified"}
    run(F.write_file, ctx, "/list/zz-pii.txt", f"contact {EMAIL}\n")
    last = run(F.list_directory, ctx, "/list", cursor=None, limit=1000).entries[-1]
    assert last.name == "zz-pii.txt" and last.model_dump(mode="json")["labels"] == [
        "EMAIL_ADDRESS"]
    assert seen[-1].kind == "directory"
    e = err(F.list_directory, ctx, "/list", cursor="!!not-a-cursor!!")
    assert e.code == "invalid_argument" and "cursor" in e.message
    e = err(F.list_directory, ctx, "/list", limit=5000)
    assert e.code == "invalid_argument"
    e = err(F.list_directory, ctx, "/list/f00.txt")
    assert e.code == "not_a_directory"
    # entries the role may not read are left out
    run(F.write_file, env.ctx("boss"), "/secret/hidden.txt", "x")
    root = run(F.list_directory, ctx, "/", limit=1000)
    assert "secret" not in [x.name for x in root.entries]


def test_get_file_info_reports_storage_labels_and_index_state(env):
    ctx = env.ctx("agent")
    run(F.write_file, ctx, "/info/small.txt", f"mail {EMAIL}")
    i = run(F.get_file_info, ctx, "/info/small.txt")
    assert (i.kind, i.version, i.labels, i.redundancy.inline, i.redundancy.chunks) == (
        "file", 1, ["EMAIL_ADDRESS"], True, 0)
    assert i.created and i.modified and i.index_state == "indexed" and i.scanned == "text"
    assert i.policy_version == 1
    big = os.urandom(150_000)
    run(F.write_file, ctx, "/info/big.bin", base64.b64encode(big).decode(), encoding="base64")
    b = run(F.get_file_info, ctx, "/info/big.bin")
    assert b.size == 150_000 and not b.redundancy.inline and b.redundancy.chunks == 3
    assert b.index_state == "skipped"
    d = run(F.get_file_info, ctx, "/info")
    assert d.kind == "directory" and d.index_state is None


def test_move_delete_and_create_directory(env):
    ctx = env.ctx("agent")
    c = run(F.create_directory, ctx, "/mv/a/b/c")
    assert c.path == "/mv/a/b/c"
    assert run(F.create_directory, ctx, "/mv/a/b/c").path == "/mv/a/b/c"  # idempotent
    run(F.write_file, ctx, "/mv/one.txt", "one")
    run(F.write_file, ctx, "/mv/two.txt", "two")
    m = run(F.move_file, ctx, "/mv/one.txt", "/mv/a/uno.txt")
    assert (m.source, m.destination, m.kind) == ("/mv/one.txt", "/mv/a/uno.txt", "file")
    assert not exists(env, "/mv/one.txt")
    e = err(F.move_file, ctx, "/mv/two.txt", "/mv/a/uno.txt")
    assert e.code == "already_exists" and "overwrite" in e.message
    run(F.move_file, ctx, "/mv/two.txt", "/mv/a/uno.txt", overwrite=True)
    assert run(F.read_file, ctx, "/mv/a/uno.txt").content == "two"
    e = err(F.move_file, ctx, "/mv/missing.txt", "/mv/x.txt")
    assert e.code == "not_found"
    e = err(F.move_file, ctx, "/mv/a/uno.txt", "/ro/uno.txt")
    assert e.code == "forbidden"
    e = err(F.create_directory, ctx, "/mv/a/uno.txt/sub")
    assert e.code in ("not_a_directory", "already_exists")
    e = err(F.delete_file, ctx, "/mv/a")
    assert e.code == "directory_not_empty" and "recursive" in e.message
    w = run(F.get_file_info, ctx, "/mv/a/uno.txt")
    e = err(F.delete_file, ctx, "/mv/a/uno.txt", expected_version=w.version + 1)
    assert e.code == "version_mismatch"
    assert run(F.delete_file, ctx, "/mv/a", recursive=True).deleted
    assert not exists(env, "/mv/a/uno.txt") and not exists(env, "/mv/a")
    e = err(F.delete_file, ctx, "/mv/a")
    assert e.code == "not_found"
    e = err(F.delete_file, ctx, "/")
    assert e.code == "invalid_path"


def test_find_files_by_name_and_path_glob(env):
    ctx = env.ctx("agent")
    for p in ("/find/a/readme.md", "/find/b/readme.md", "/find/b/notes.txt",
              "/find/c/deep/readme.md"):
        run(F.write_file, ctx, p, "x")
    run(F.write_file, env.ctx("boss"), "/secret/readme.md", "hidden")
    seen = []

    async def progress(done, total, message):
        seen.append(message)

    ctx.progress = progress
    r = run(F.find_files, ctx, "readme.md", root="/find")
    assert sorted(m.path for m in r.matches) == [
        "/find/a/readme.md", "/find/b/readme.md", "/find/c/deep/readme.md"]
    assert not r.truncated and seen
    r = run(F.find_files, ctx, "/find/*/readme.md")
    assert {m.path for m in r.matches} >= {"/find/a/readme.md", "/find/b/readme.md"}
    r = run(F.find_files, ctx, "*.md", root="/find", limit=2)
    assert len(r.matches) == 2 and r.truncated
    r = run(F.find_files, ctx, "readme.md")
    assert "/secret/readme.md" not in [m.path for m in r.matches]
    e = err(F.find_files, ctx, "")
    assert e.code == "invalid_argument"


# --------------------------------------------------------------------------- tenants


SPELLINGS = ["/shared/plan.md", "shared/plan.md", "/shared/plan.md/", "/shared//plan.md",
             "/../acme/shared/plan.md", "/acme/shared/plan.md", "/shared/./plan.md",
             "//shared/plan.md", "/shared/plan.md\x00", "/shared/café.md",
             unicodedata.normalize("NFD", "/shared/café.md"), "/SHARED/plan.md"]


def test_tenants_cannot_touch_each_others_files_whatever_the_spelling(env):
    acme = env.ctx("boss", "acme")
    run(F.write_file, acme, "/shared/plan.md", "acme secret plan: zeppelin\n")
    run(F.write_file, acme, "/shared/café.md", "acme zeppelin menu\n")
    before = run(F.get_file_info, acme, "/shared/plan.md")
    for role in ("agent", "boss"):
        beta = env.ctx(role, "beta")
        for path in SPELLINGS:
            for fn, extra in ((F.read_file, {}), (F.get_file_info, {}),
                              (F.list_directory, {}), (F.delete_file, {"recursive": True}),
                              (F.move_file, {"destination": "/stolen.md"}),
                              (F.edit_file,
                               {"edits": [{"old_text": "zeppelin", "new_text": "x"}]})):
                arg = "source" if fn is F.move_file else "path"
                with pytest.raises(ToolError) as ei:
                    run(fn, beta, **{arg: path}, **extra)
                assert ei.value.code in ("not_found", "invalid_path", "not_a_directory"), (
                    path, ei.value.code)
                assert "zeppelin" not in ei.value.message
        names = [e.name for e in run(F.list_directory, beta, "/", limit=1000).entries]
        assert "shared" not in names
        assert run(F.find_files, beta, "*plan*").matches == []
        assert run(F.find_files, beta, "/shared/*").matches == []
        r = run(F.read_multiple_files, beta, ["/shared/plan.md"])
        assert r.files[0].error.code == "not_found"
    # beta writing "the same path" creates beta's own file; acme's is untouched
    beta = env.ctx("agent", "beta")
    run(F.write_file, beta, "/shared/plan.md", "beta's own\n")
    run(F.move_file, beta, "/shared/plan.md", "/shared/moved.md")
    run(F.write_file, beta, "/shared/plan.md", "beta again\n", mode="append")
    run(F.delete_file, beta, "/shared", recursive=True)
    after = run(F.get_file_info, acme, "/shared/plan.md")
    assert after.version == before.version
    assert run(F.read_file, acme, "/shared/plan.md").content == "acme secret plan: zeppelin\n"
    assert run(ST.storage_status, env.ctx("agent", "beta")).tenant == "beta"


# --------------------------------------------------------------------------- QoS, status


def test_rate_limits_and_quotas_become_actionable_errors(tmp_path):
    env = Env(tmp_path / "home")
    try:
        pr = env.app.principals
        pr.set_policy("beta", POLICY + "qos: {ops_per_second: 1, burst: 1, max_wait_ms: 0}\n")
        pr.set_policy("acme", POLICY + "quotas: {bytes: 100, files: 3}\n")
        env.app.principals._policies.clear()  # noqa: SLF001 - skip the 2 s policy cache
        beta = env.ctx("agent", "beta")
        with pytest.raises(ToolError) as ei:
            for _ in range(5):
                run(F.list_directory, beta, "/")
        assert ei.value.code == "rate_limited"
        assert "retry after" in ei.value.message and " ms" in ei.value.message
        acme = env.ctx("agent", "acme")
        run(F.write_file, acme, "/q/a.txt", "x" * 60)
        e = err(F.write_file, acme, "/q/b.txt", "y" * 60)
        assert e.code == "quota_exceeded" and "quota" in e.message
        st = run(ST.storage_status, acme)
        assert (st.bytes, st.files, st.quota_bytes, st.quota_files) == (60, 1, 100, 3)
        assert st.bytes_free == 40 and st.files_free == 2 and st.policy_version == 2
        assert st.search is not None and st.search.indexed == 1
        assert st.max_write_bytes == 16 << 20 and st.role == "agent"
    finally:
        env.close()

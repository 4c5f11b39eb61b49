"""Per-call latency work on the MCP path keeps its guarantees: the audit log's lazy fsync
never stalls an append, a write's follow-up runs after its event is durable and outside
its QoS slot, and directory listings are lean on the wire."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import anyio
import pytest

from governance import audit as audit_mod
from governance.audit import AuditEvent, AuditLog
from storage.errors import VersionMismatch


def _ev(path: str, op: str = "read_file") -> AuditEvent:
    return AuditEvent(tenant="acme", agent="a", operation=op, path=path)


def test_lazy_fsync_runs_outside_the_writers_lock(tmp_path, monkeypatch):
    """An allowed read's event is appended on the event loop: it must not wait behind the
    flusher's fsync, and events written during that fsync are fsynced by another one."""
    real = audit_mod._datasync
    in_sync = threading.Event()

    def slow(fd: int) -> None:
        if threading.current_thread().name == "audit-lazy-sync":
            in_sync.set()
            time.sleep(0.4)
        real(fd)

    monkeypatch.setattr(audit_mod, "_datasync", slow)
    log = AuditLog(tmp_path / "audit", fsync=True)
    try:
        log.append(_ev("/one.md"), durable=False)
        assert in_sync.wait(5), "the lazy flusher did not run"
        t0 = time.monotonic()
        log.append(_ev("/two.md"), durable=False)  # while the flusher sits in fsync
        assert time.monotonic() - t0 < 0.2
        deadline = time.monotonic() + 5
        while log._dirty_since is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log._dirty_since is None, "the event written during the fsync was not synced"
    finally:
        log.close()
    rep = log.verify()
    assert rep.ok and rep.events == 2


@pytest.fixture
def app(tmp_path: Path):
    from server.wiring import open_app
    from storage import StoreConfig, Volume

    home = tmp_path / "home"
    Volume.init(home, StoreConfig.embedded(home)).close()
    a = open_app(home)
    a.principals.add_tenant("acme")
    yield a
    a.close()


def test_a_writes_follow_up_runs_after_its_event_and_outside_its_qos_slot(app):
    p = app.gateway.authenticate(app.principals.add_agent("acme", "bot"))
    gw, audit = app.gateway, app.audit
    seen: list[tuple[int, int, int | None]] = []

    def then(res) -> None:
        # the event is appended (and, for a write, fsynced) before the follow-up runs
        seen.append((res.info.version, gw._qos.stats()["in_use"], audit._dirty_since))

    async def flow() -> None:
        res = await gw.awrite(p, "/a.md", b"hello", then=then)
        assert seen == [(res.info.version, 0, None)]
        with pytest.raises(VersionMismatch):  # a refused write has no follow-up
            await gw.awrite(p, "/a.md", b"again", expected_version=99, then=then)
        assert len(seen) == 1

    anyio.run(flow)
    _cols, rows = audit.query("SELECT operation, path, decision FROM audit ORDER BY seq")
    assert [tuple(r) for r in rows][-2:] == [("write_file", "/a.md", "allow"),
                                             ("write_file", "/a.md", "error")]


def test_write_file_and_edit_file_index_in_the_writes_own_thread(app, monkeypatch):
    """One hop to a worker thread per write, the index state still reported."""
    from governance.search import SearchIndex
    from tools import files as F
    from tools.registry import ToolContext

    idx = SearchIndex.attach(app.gateway, app.vol.home)
    hops = []
    real = anyio.to_thread.run_sync

    async def counting(fn, *args, **kw):
        hops.append(fn)
        return await real(fn, *args, **kw)

    try:
        p = app.gateway.authenticate(app.principals.add_agent("acme", "bot"))
        ctx = ToolContext(app.gateway, p, None, {})
        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        w = anyio.run(F.write_file, ctx, "/n.md", "some words to index")
        assert w.index_state == "indexed" and len(hops) == 1
        hops.clear()
        e = anyio.run(F.edit_file, ctx, "/n.md", [{"old_text": "some", "new_text": "more"}])
        assert e.changed and e.index_state == "indexed"
        assert len(hops) == 1  # the read runs on the loop (inline file), the write + index
    finally:
        idx.close()


def test_list_directory_entries_are_lean_on_the_wire():
    """No per-entry path (the listed path + name) and no empty labels: every field costs
    the client a validation step per entry."""
    from server.mcp_app import compact_schema
    from tools import files as F

    page = F.ListDirectoryResult.model_validate({"path": "/d", "next_cursor": None, "entries": [
        {"name": "a.txt", "kind": "file", "size": 1, "version": 1, "modified": None},
        {"name": "b.txt", "kind": "file", "size": 2, "version": 3, "modified": None,
         "labels": ["EMAIL_ADDRESS"]}]})
    wire = page.model_dump(mode="json")
    assert wire["entries"][0] == {"name": "a.txt", "kind": "file", "size": 1, "version": 1,
                                  "modified": None}
    assert wire["entries"][1]["labels"] == ["EMAIL_ADDRESS"]
    schema = compact_schema(F.ListDirectoryResult.model_json_schema(mode="serialization"))
    item = schema["properties"]["entries"]["items"]
    assert "path" not in item["properties"] and "labels" not in item["required"]
    assert item["properties"]["kind"] == {"enum": ["file", "directory"]}

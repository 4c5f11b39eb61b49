"""The search index on PostgreSQL (issue #4): where the store's metadata runs on PostgreSQL,
the index lives in that database (``search_docs`` / ``search_chunks``, tsvector + GIN,
ranked by ``ts_rank_cd``) and is shared by every process over the store.

Real store (metadata and control on a fresh PostgreSQL database per test), real gateway
(``open_app``), the index attached the way the server attaches it, and the real ``search``
and file tools. The SQLite FTS5 path is held by ``test_tools_search.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import psycopg
import pytest

from governance import search_pg
from governance.search import SearchIndex, build_match
from governance.search_pg import PgSearchStore, chunks, conninfo, lexemes, tsqueries
from server.wiring import open_app
from storage import StoreConfig, Volume
from tools import files as F
from tools import search as S
from tools.registry import ToolContext, ToolError

pytestmark = pytest.mark.postgres

EMAIL = "alice.walker@example.com"
PHONE = "415-867-5309"
SSN = "536-22-4817"

POLICY = """
pii:
  entities:
    EMAIL_ADDRESS: {action: tag, threshold: 0.4}
    PHONE_NUMBER: {action: tag, threshold: 0.4}
    US_SSN: {action: redact}
clearance:
  boss: ["*"]
  support: [EMAIL_ADDRESS]
paths:
  - {prefix: /, read: ["*"], write: ["*"]}
  - {prefix: /secret, read: [boss], write: [boss]}
"""


class Env:
    def __init__(self, home: Path, url: str, *, init: bool = True, **index_kw):
        self.home, self.url = home, url
        if init:
            cfg = StoreConfig.embedded(home, chunk_size=65536, inline_threshold=1024,
                                       durability="none")
            cfg.engines = [url]
            cfg.shard_map = [0] * cfg.virtual_shards
            cfg.control = url
            Volume.init(home, cfg).close()
        self.app = open_app(home)
        pr = self.app.principals
        self.who = {}
        for tenant in ("acme", "beta"):
            if init:
                pr.add_tenant(tenant)
                pr.set_policy(tenant, POLICY)
            for role in ("agent", "support", "boss"):
                tok = pr.add_agent(tenant, f"{role}-bot-{time.monotonic_ns()}", role=role)
                self.who[(tenant, role)] = self.app.gateway.authenticate(tok)
        kw = {"sync_bytes": 16 << 10, "other_door_delay_s": 0.1, "poll_s": 0.2}
        kw.update(index_kw)
        self.index = SearchIndex.attach(self.app.gateway, home, **kw)

    def ctx(self, role="agent", tenant="acme") -> ToolContext:
        return ToolContext(self.app.gateway, self.who[(tenant, role)])

    def sql(self, query: str, *args):
        with psycopg.connect(conninfo(self.url), autocommit=True) as c:
            return c.execute(query, args).fetchall()

    def close(self):
        self.index.close()
        self.app.close()


@pytest.fixture
def env(tmp_path, pg_url):
    e = Env(tmp_path / "home", pg_url)
    yield e
    e.close()


def run(fn, *args, **kwargs):
    return anyio.run(lambda: fn(*args, **kwargs))


def paths_of(res) -> list[str]:
    return [h.path for h in res.results]


def find(env, query, role="agent", tenant="acme", **kw):
    return run(S.search, env.ctx(role, tenant), query, **kw)


# --------------------------------------------------------------------------- the engine


def test_the_index_lives_in_postgres_not_under_the_home(env):
    assert isinstance(env.index.store, PgSearchStore) and env.index.path is None
    w = run(F.write_file, env.ctx(), "/a.md", "lighthouse keeper\n")
    assert w.index_state == "indexed"
    assert not (env.home / "search").exists()
    tables = {r[0] for r in env.sql("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
    assert {"search_docs", "search_chunks"} <= tables
    idx = {r[0] for r in env.sql("SELECT indexdef FROM pg_indexes WHERE tablename = "
                                 "'search_chunks'")}
    assert any("gin (tsv)" in d for d in idx)
    assert env.sql("SELECT tenant, path, state FROM search_docs") == [("acme", "/a.md",
                                                                       "indexed")]


# --------------------------------------------------------------------------- ranking, syntax


def test_ranking_and_query_syntax(env):
    a = env.ctx("agent")
    run(F.write_file, a, "/rank/many.md", "otter " * 5 + "river bank\n")
    run(F.write_file, a, "/rank/once.md", "a single otter among many other words " * 3)
    run(F.write_file, a, "/rank/none.md", "nothing relevant here at all\n")
    r = find(env, "otter", path_prefix="/rank")
    assert paths_of(r) == ["/rank/many.md", "/rank/once.md"]
    assert r.results[0].score > r.results[1].score > 0
    assert "«otter»" in r.results[0].snippet and r.results[0].version == 1
    assert not r.results[0].stale
    # all (default) / any / phrase / prefix / case
    assert paths_of(find(env, "otter river", path_prefix="/rank")) == ["/rank/many.md"]
    assert paths_of(find(env, "otter nothing", path_prefix="/rank")) == []
    assert set(paths_of(find(env, "river single", match="any", path_prefix="/rank"))) == {
        "/rank/many.md", "/rank/once.md"}
    assert paths_of(find(env, '"river bank"', path_prefix="/rank")) == ["/rank/many.md"]
    assert paths_of(find(env, '"bank river"', path_prefix="/rank")) == []
    assert paths_of(find(env, '"single otter among"', path_prefix="/rank")) == [
        "/rank/once.md"]
    assert set(paths_of(find(env, "ott*", path_prefix="/rank"))) == {"/rank/many.md",
                                                                    "/rank/once.md"}
    assert paths_of(find(env, "ott", path_prefix="/rank")) == []  # whole words only
    assert paths_of(find(env, "river ba*", path_prefix="/rank")) == ["/rank/many.md"]
    assert paths_of(find(env, "OTTER", path_prefix="/rank/once.md")) == ["/rank/once.md"]
    # the user's text is never tsquery syntax: no error, no injection
    for q in ("otter OR nothing", 'otter"', "otter:*", "otter & !river", "otter | nothing",
              "'otter'", "o'tter", "\\otter", "otter <-> river", "(otter", "tenant:beta"):
        run(S.search, a, q)
    assert paths_of(find(env, "otter & !river", path_prefix="/rank")) == ["/rank/many.md"]
    lim = find(env, "otter", limit=1, path_prefix="/rank")
    assert len(lim.results) == 1 and lim.more


def test_words_are_cut_as_the_sqlite_index_cuts_them(env):
    a = env.ctx("agent")
    run(F.write_file, a, "/w/mixed.md",
        "Café naïve déjà-vu; snake_case_name v2.0 see example.org or 2024-05-01 CamelCase\n")
    for q in ("cafe", "CAFÉ", "naive", "naïve", "deja", "vu", "snake", "case", "name", "v2",
              "0", "example", "org", "2024", "05", "camelcase", '"example org"',
              "snake_case_name", "déj*"):
        assert paths_of(find(env, q, path_prefix="/w")) == ["/w/mixed.md"], q
    assert find(env, "camel", path_prefix="/w").results == []
    assert lexemes("Ünïcödé_wörds x-y") == ["unicode", "words", "x", "y"]
    m = build_match('alpha "beta gamma" delt* snake_case', "any")
    assert tsqueries(m) == ["'alpha'", "'beta' <-> 'gamma'", "'delt':*", "'snake' <-> 'case'"]


def test_filters_by_prefix_labels_and_time(env):
    a = env.ctx("agent")
    run(F.write_file, a, "/filt/x/pii.md", f"walrus report for {EMAIL}\n")
    run(F.write_file, a, "/filt/y/plain.md", "walrus report without people\n")
    run(F.write_file, a, "/filt/xy.md", "walrus next door\n")
    assert set(paths_of(find(env, "walrus"))) == {"/filt/x/pii.md", "/filt/y/plain.md",
                                                  "/filt/xy.md"}
    assert paths_of(find(env, "walrus", path_prefix="/filt/x")) == ["/filt/x/pii.md"]
    assert paths_of(find(env, "walrus", path_prefix="/filt/x/")) == ["/filt/x/pii.md"]
    assert paths_of(find(env, "walrus", labels=["EMAIL_ADDRESS"])) == ["/filt/x/pii.md"]
    assert paths_of(find(env, "walrus", labels=["US_PASSPORT", "EMAIL_ADDRESS"])) == [
        "/filt/x/pii.md"]
    assert paths_of(find(env, "walrus", labels=["US_PASSPORT"])) == []
    assert find(env, "walrus", labels=["EMAIL_ADDRESS"]).results[0].labels == ["EMAIL_ADDRESS"]
    assert len(find(env, "walrus", modified_after="2000-01-01").results) == 3
    assert find(env, "walrus", modified_before="2000-01-01T00:00:00Z").results == []
    assert find(env, "walrus", modified_after=str(time.time() + 3600)).results == []
    with pytest.raises(ToolError) as ei:
        find(env, "!!! ---")
    assert ei.value.code == "invalid_argument"


# --------------------------------------------------------------------------- PII, roles, tenants


def test_pii_is_never_searchable_nor_stored(env):
    boss = env.ctx("boss")
    text = (f"Customer pelican escalation. Email {EMAIL}, phone {PHONE}, ssn {SSN}. "
            "The pelican account is overdue.\n")
    w = run(F.write_file, boss, "/pii/case.md", text)
    assert w.redacted == {"US_SSN": 1} and w.index_state == "indexed"
    for role in ("agent", "support", "boss"):
        for q in (EMAIL, "alice", "walker", "example.com", '"alice walker"', "alic*", "415",
                  "867", "5309", "536", "4817"):
            assert find(env, q, role=role).results == [], (role, q)
    agent = find(env, "pelican", role="agent")
    assert paths_of(agent) == ["/pii/case.md"]
    snip = agent.results[0].snippet
    assert EMAIL not in snip and PHONE not in snip and "*" * len(EMAIL) in snip
    assert EMAIL in find(env, "pelican", role="support").results[0].snippet
    # the database holds no PII value: not in the text, not in a lexeme
    env.index.wait_idle()
    for v in (EMAIL, PHONE, SSN, "alice", "walker", "5309", "4817"):
        assert env.sql("SELECT count(*) FROM search_chunks WHERE strpos(lower(body), %s) > 0 "
                       "OR strpos(tsv::text, %s) > 0", v, v) == [(0,)], v


def test_hits_on_paths_the_role_may_not_read_are_dropped(env):
    run(F.write_file, env.ctx("boss"), "/secret/zebra.md", "zebra crossing plans\n")
    run(F.write_file, env.ctx("agent"), "/open/zebra.md", "zebra at the zoo\n")
    assert paths_of(find(env, "zebra", role="agent")) == ["/open/zebra.md"]
    assert set(paths_of(find(env, "zebra", role="boss"))) == {"/secret/zebra.md",
                                                              "/open/zebra.md"}
    assert paths_of(find(env, "crossing", role="agent")) == []


def test_no_tenant_sees_another_tenants_hits(env):
    run(F.write_file, env.ctx("agent", "acme"), "/t/notes.md", "acme flamingo strategy\n")
    run(F.write_file, env.ctx("agent", "beta"), "/t/notes.md", "beta narwhal roadmap\n")
    run(F.write_file, env.ctx("agent", "beta"), "/t/only-beta.md", "narwhal again\n")
    for role in ("agent", "boss"):
        assert find(env, "flamingo", role=role, tenant="beta").results == []
        assert find(env, "narwhal", role=role, tenant="acme").results == []
        for h in find(env, "acme flamingo strategy notes", role=role, tenant="beta",
                      match="any").results:
            assert "flamingo" not in h.snippet and "acme" not in h.snippet
    assert set(paths_of(find(env, "narwhal", tenant="beta"))) == {"/t/notes.md",
                                                                 "/t/only-beta.md"}
    assert paths_of(find(env, "flamingo", tenant="acme")) == ["/t/notes.md"]
    # the store itself filters by tenant (not only the tool)
    m = build_match("flamingo")
    assert env.index.query("beta", m) == [] and len(env.index.query("acme", m)) == 1
    assert env.index.stats("beta") == {"indexed": 2, "pending": 0, "skipped": 0}


# --------------------------------------------------------------------------- upkeep


def test_overwrite_move_and_delete_update_the_index(env):
    """The same upkeep as on SQLite (tests/test_tools_search.py), then: no rows left."""
    from test_tools_search import test_overwrite_move_and_delete_update_the_index as same

    same(env)
    assert env.sql("SELECT count(*) FROM search_chunks") == [(0,)]


def test_binary_files_are_skipped(env):
    import base64

    w = run(F.write_file, env.ctx("agent"), "/pic.png",
            base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8 + b"penguin").decode(),
            encoding="base64")
    assert w.index_state == "skipped"
    assert find(env, "penguin").results == []


def test_large_text_in_pieces_in_the_background(tmp_path, pg_url, monkeypatch):
    env = Env(tmp_path / "home", pg_url, start_worker=False)
    try:
        _large_text(env, monkeypatch)
    finally:
        env.close()


def _large_text(env, monkeypatch):
    monkeypatch.setattr(search_pg, "CHUNK_WORDS", 100)
    a = env.ctx("agent")
    body = "".join(f"filler line {i} about nothing much\n" for i in range(2000))
    w = run(F.write_file, a, "/bg/big.md", body + "the word mongoose appears near the "
                                               "end with the tail words\n")
    assert w.size > 16 << 10 and w.index_state == "pending"
    assert run(S.search, a, "mongoose").pending == 1
    env.index.start()
    assert env.index.wait_idle(30)
    assert run(F.get_file_info, a, "/bg/big.md").index_state == "indexed"
    n = env.sql("SELECT count(*) FROM search_chunks")[0][0]
    assert n > 100  # 12000 words in pieces of 100 (overlapping)
    r = run(S.search, a, "mongoose")
    assert paths_of(r) == ["/bg/big.md"] and r.pending == 0
    assert "«mongoose»" in r.results[0].snippet
    assert r.results[0].snippet_offset > len(body) - 1024
    # every part in some piece ('all' across pieces), phrases across a piece boundary
    assert paths_of(run(S.search, a, "mongoose 7")) == ["/bg/big.md"]
    assert paths_of(run(S.search, a, '"nothing much filler line 1999 about"')) == [
        "/bg/big.md"]
    starts = [r[0] for r in env.sql("SELECT start_byte FROM search_chunks ORDER BY seq")]
    assert starts == sorted(starts) and starts[0] == 0
    assert all(body.encode()[s:s + 1].isalnum() for s in starts[1:])


def test_chunks_overlap_and_map_to_bytes(monkeypatch):
    monkeypatch.setattr(search_pg, "CHUNK_WORDS", 40)
    text = "ünï " + " ".join(f"w{i}" for i in range(100))  # 101 words
    pieces = list(chunks(text))
    # a piece every 40 - 32 (overlap) = 8 new words after the first, and the rest
    assert [p[0] for p in pieces] == list(range(9))
    for _seq, start, body, _tsv in pieces:
        assert text.encode()[start:start + len(body.encode())] == body.encode()
    assert pieces[0][2].startswith("ünï") and pieces[0][2].split()[-1] == "w38"
    assert pieces[1][2].split()[0] == "w7" and pieces[-1][2].split()[-1] == "w99"
    assert "'uni':1" in pieces[0][3] and "'w7':1" in pieces[1][3]
    assert list(chunks("")) == [] and list(chunks("!!!")) == []


# --------------------------------------------------------------------------- restarts, replicas


def test_the_index_survives_reopening_the_store(tmp_path, pg_url):
    home = tmp_path / "home"
    env = Env(home, pg_url)
    try:
        run(F.write_file, env.ctx(), "/keep/a.md", "persistent albatross\n")
        env.index.close()
        env.app.close()
        env = Env(home, pg_url, init=False)
        r = find(env, "albatross")
        assert paths_of(r) == ["/keep/a.md"] and not r.results[0].stale
        assert env.index.state("acme", "/keep/a.md").state == "indexed"
    finally:
        env.close()


def _other_replica_write(env, path: str, data: bytes, *, owner: str | None = None,
                         lease_s: float = 300.0):
    """A write another replica made and recorded (as pending, leased to ``owner`` when
    given), atomically, so this process's worker cannot take the row first."""
    gw = env.app.gateway
    gw.hooks.remove(env.index.on_change)
    try:
        info = gw.write(env.who[("acme", "boss")], path, data).info
    finally:
        gw.hooks.append(env.index.on_change)
    env.sql("INSERT INTO search_docs (tenant, path, version, size, mtime, state, role, "
            "lease_owner, lease_until) VALUES ('acme', %s, %s, %s, %s, 'pending', 'boss', %s, "
            "clock_timestamp() + make_interval(secs => %s)) RETURNING id",
            info.path, info.version, info.size, info.mtime, owner, lease_s)
    return info, env.index.store.row("acme", info.path)["id"]


def test_replicas_share_the_index(env):
    gw = env.app.gateway
    boss = env.who[("acme", "boss")]
    # another replica (its own SearchIndex and connections) records a write and goes
    # away; this one's worker finds the pending row and indexes it
    gw.hooks.remove(env.index.on_change)
    try:
        info = gw.write(boss, "/rep/puffin.md", b"puffin from elsewhere\n").info
    finally:
        gw.hooks.append(env.index.on_change)
    other = SearchIndex(gw, store=PgSearchStore(env.url), start_worker=False)
    other.on_change(boss, "write", info.path, info)
    other.close()
    deadline = time.monotonic() + 10
    while env.index.state("acme", "/rep/puffin.md").state != "indexed":
        assert time.monotonic() < deadline, "the worker never picked up the pending row"
        time.sleep(0.05)
    assert paths_of(find(env, "puffin")) == ["/rep/puffin.md"]
    # both replicas see the other's writes through the shared tables
    other = SearchIndex(gw, store=PgSearchStore(env.url), start_worker=False)
    try:
        run(F.write_file, env.ctx(), "/rep/gannet.md", "gannet colony\n")
        hits = other.query("acme", build_match("gannet"))
        assert [h.path for h in hits] == ["/rep/gannet.md"]
        assert other.locate(hits[0].id, [("colony", False)]) == len("gannet ")
    finally:
        other.close()


def test_a_row_leased_by_another_replica_is_left_to_it(env):
    other = PgSearchStore(env.url)
    try:
        info, doc = _other_replica_write(env, "/rep/tern.md", b"arctic tern\n",
                                         owner=other.owner)
        assert ("acme", "/rep/tern.md") not in env.index.store.pending()
        assert not env.index.store.claim(doc)
        env.index._index("acme", "/rep/tern.md", None)  # what the worker would do
        assert env.index.state("acme", "/rep/tern.md").state == "pending"
        # the other replica indexes the newest version; a slower process that read an
        # older one does not replace it
        other.store(doc, "acme", "arctic tern", info.version, None, [], info.size, info.mtime)
        env.index.store.store(doc, "acme", "stale older text", info.version - 1, None, [],
                              1, 1.0)
        assert paths_of(find(env, "tern")) == ["/rep/tern.md"]
        assert find(env, "stale").results == []
        row = env.index.store.row("acme", "/rep/tern.md")
        assert row["state"] == "indexed" and row["lease_owner"] is None
    finally:
        other.close()


def test_a_lease_left_by_a_dead_replica_runs_out(env):
    info, doc = _other_replica_write(env, "/rep/kittiwake.md", b"kittiwake\n",
                                     owner="dead-host:1:deadbeef", lease_s=0.3)
    assert not env.index.store.claim(doc)
    deadline = time.monotonic() + 10
    while env.index.state("acme", info.path).state != "indexed":
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.05)
    assert paths_of(find(env, "kittiwake")) == ["/rep/kittiwake.md"]


def test_two_replicas_indexing_the_same_writes_at_once(env, caplog):
    """Two indexes over one store, both fed every write and both flushing, from several
    threads at once: upserts, leases and row locks leave one consistent index."""
    from concurrent.futures import ThreadPoolExecutor

    gw = env.app.gateway
    other = SearchIndex(gw, store=PgSearchStore(env.url), sync_bytes=16 << 10,
                        other_door_delay_s=0.05, poll_s=0.2)
    gw.hooks.append(other.on_change)
    boss = env.who[("acme", "boss")]

    def work(i: int) -> None:
        for v in range(3):  # overwrite: versions race the indexers
            path = f"/race/f{i}.md"
            gw.write(boss, path, f"shearwater {i} version{v} common words\n".encode())
            (env.index if (i + v) % 2 else other).flush("acme", path)
        if i % 5 == 0:
            gw.move(boss, f"/race/f{i}.md", f"/race/moved-{i}.md")
        if i % 7 == 0:
            gw.delete(boss, f"/race/f{i}.md" if i % 5 else f"/race/moved-{i}.md")

    try:
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(work, range(24)))
        assert other.wait_idle(30) and env.index.wait_idle(30)
        deadline = time.monotonic() + 10
        while env.index.stats("acme")["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        gw.hooks.remove(other.on_change)
        other.close()
    expect = {(f"/race/moved-{i}.md" if i % 5 == 0 else f"/race/f{i}.md")
              for i in range(24) if i % 7}
    got = paths_of(find(env, "shearwater", limit=50))
    assert len(got) == len(set(got)) and set(got) == expect
    assert set(paths_of(find(env, "version2", limit=50))) == expect
    assert find(env, "version0", limit=50).results == []
    assert env.sql("SELECT count(*) FROM search_docs")[0][0] == len(expect)
    assert env.sql("SELECT count(DISTINCT doc_id) FROM search_chunks")[0][0] == len(expect)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]

"""The search tool and its index (issue #4): BM25 hits with snippets, governed.

Real store and gateway (``open_app``), the index attached the way the server attaches it.
The security properties: the index never holds a PII value (so no search finds one),
snippets and highlights show only what the caller's role may read, hits on paths the role
may not read are dropped, and no tenant ever sees another tenant's paths.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import anyio
import pytest

from governance.search import SearchIndex, build_match, mask_all
from server.wiring import open_app
from storage import StoreConfig, Volume
from tools import files as F
from tools import search as S
from tools.registry import ToolContext, ToolError

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
  - {prefix: /inbox, read: [boss], write: ["*"]}
"""


class Env:
    def __init__(self, home: Path, **index_kw):
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
        kw = {"sync_bytes": 16 << 10, "other_door_delay_s": 0.1, "poll_s": 0.2}
        kw.update(index_kw)
        self.index = SearchIndex.attach(self.app.gateway, home, **kw)

    def ctx(self, role="agent", tenant="acme", **limits) -> ToolContext:
        return ToolContext(self.app.gateway, self.who[(tenant, role)], limits=dict(limits))

    def close(self):
        self.index.close()
        self.app.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = Env(tmp_path_factory.mktemp("tools-search") / "home")
    yield e
    e.close()


def run(fn, *args, **kwargs):
    return anyio.run(lambda: fn(*args, **kwargs))


def paths_of(res) -> list[str]:
    return [h.path for h in res.results]


def find(env, query, role="agent", tenant="acme", **kw):
    return run(S.search, env.ctx(role, tenant), query, **kw)


# --------------------------------------------------------------------------- ranking


def test_bm25_ranking_snippets_and_query_syntax(env):
    a = env.ctx("agent")
    run(F.write_file, a, "/rank/many.md", "otter " * 5 + "river bank\n")
    run(F.write_file, a, "/rank/once.md", "a single otter among many other words " * 3)
    run(F.write_file, a, "/rank/none.md", "nothing relevant here at all\n")
    r = find(env, "otter", path_prefix="/rank")
    assert paths_of(r) == ["/rank/many.md", "/rank/once.md"]
    assert r.results[0].score >= r.results[1].score
    assert "«otter»" in r.results[0].snippet and r.results[0].version == 1
    assert not r.results[0].stale and r.results[0].modified.endswith("Z")
    assert paths_of(find(env, "otter river", path_prefix="/rank")) == ["/rank/many.md"]
    assert set(paths_of(find(env, "river single", match="any", path_prefix="/rank"))) == {
        "/rank/many.md", "/rank/once.md"}
    assert paths_of(find(env, '"river bank"', path_prefix="/rank")) == ["/rank/many.md"]
    assert paths_of(find(env, '"bank river"', path_prefix="/rank")) == []
    assert set(paths_of(find(env, "ott*", path_prefix="/rank"))) == {"/rank/many.md",
                                                                    "/rank/once.md"}
    assert paths_of(find(env, "OTTER", path_prefix="/rank/once.md")) == ["/rank/once.md"]
    # FTS5 syntax in the query is neutralised, not an error or an injection
    for q in ('otter OR nothing', 'otter"', "body:otter", "NEAR(otter river)", "otter AND -x",
              "tenant:beta"):
        run(S.search, env.ctx("agent"), q)
    lim = find(env, "otter", limit=1, path_prefix="/rank")
    assert len(lim.results) == 1 and lim.more


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
    assert paths_of(find(env, "walrus", labels=["US_PASSPORT"])) == []
    assert find(env, "walrus", labels=["EMAIL_ADDRESS"]).results[0].labels == ["EMAIL_ADDRESS"]
    assert len(find(env, "walrus", modified_after="2000-01-01").results) == 3
    assert find(env, "walrus", modified_before="2000-01-01T00:00:00Z").results == []
    assert find(env, "walrus", modified_after=str(time.time() + 3600)).results == []
    for kw in ({"modified_after": "yesterday"}, {"labels": ["email"]}, {"path_prefix": "/a/../b"},
               {"limit": 0}, {"limit": 51}, {"match": "some"}):
        with pytest.raises(ToolError) as ei:
            find(env, "walrus", **kw)
        assert ei.value.code in ("invalid_argument", "invalid_path"), kw
    with pytest.raises(ToolError) as ei:
        find(env, "!!! ---")
    assert ei.value.code == "invalid_argument"


# --------------------------------------------------------------------------- PII


def test_pii_is_never_searchable_nor_shown_to_an_uncleared_role(env):
    boss = env.ctx("boss")
    text = (f"Customer pelican escalation. Email {EMAIL}, phone {PHONE}, ssn {SSN}. "
            "The pelican account is overdue.\n")
    w = run(F.write_file, boss, "/pii/case.md", text)
    assert w.redacted == {"US_SSN": 1}
    # the values themselves find nothing, for any role (the index holds them masked)
    for role in ("agent", "support", "boss"):
        for q in (EMAIL, "alice", "walker", "example.com", '"alice walker"', "alic*", "415",
                  "867", "5309", "536", "4817"):
            assert find(env, q, role=role).results == [], (role, q)
    # a hit on other words shows the value only to roles cleared for it
    agent = find(env, "pelican", role="agent")
    assert paths_of(agent) == ["/pii/case.md"]
    snip = agent.results[0].snippet
    assert EMAIL not in snip and "alice" not in snip.lower() and PHONE not in snip
    assert "*" * len(EMAIL) in snip and set(agent.results[0].masked) == {"EMAIL_ADDRESS",
                                                                         "PHONE_NUMBER"}
    assert SSN not in snip and "<US_SSN>" in snip
    support = find(env, "pelican", role="support").results[0]
    assert EMAIL in support.snippet and PHONE not in support.snippet
    assert support.masked == ["PHONE_NUMBER"]
    assert EMAIL in find(env, "pelican", role="boss").results[0].snippet
    # highlights only ever wrap words the caller may see
    for h in agent.results + [support]:
        for part in h.snippet.split("«")[1:]:
            assert part.split("»")[0].lower() == "pelican"
    # the index database (and its WAL) holds no PII value at all
    env.index.wait_idle()
    blob = b"".join(p.read_bytes() for p in (env.home / "search").iterdir() if p.is_file())
    for v in (EMAIL, PHONE, SSN, "alice.walker"):
        assert v.encode() not in blob, v


def test_mask_all_masks_every_span_whatever_the_role():
    data = b"0123456789abcdef"
    spans = [[2, 4, "EMAIL_ADDRESS"], [8, 12, "PHONE_NUMBER"]]
    assert mask_all(data, 0, spans) == b"01**4567****cdef"
    assert mask_all(data[6:], 6, spans) == b"67****cdef"
    assert mask_all(data, 0, []) is data
    m = build_match('alpha "beta gamma" delt* x:y', "all")
    assert m.expr == '"alpha" AND "beta gamma" AND "delt"* AND "x y"'
    assert ("delt", True) in m.terms
    with pytest.raises(ValueError):
        build_match('" " ***')


# --------------------------------------------------------------------------- roles, tenants


def test_hits_on_paths_the_role_may_not_read_are_dropped(env):
    run(F.write_file, env.ctx("boss"), "/secret/zebra.md", "zebra crossing plans\n")
    run(F.write_file, env.ctx("agent"), "/open/zebra.md", "zebra at the zoo\n")
    assert paths_of(find(env, "zebra", role="agent")) == ["/open/zebra.md"]
    assert set(paths_of(find(env, "zebra", role="boss"))) == {"/secret/zebra.md",
                                                              "/open/zebra.md"}
    assert paths_of(find(env, "crossing", role="agent")) == []
    # written by a role that may not read it back (a drop box): still searchable by readers
    w = run(F.write_file, env.ctx("agent"), "/inbox/tip.md", "anonymous quokka tip\n")
    assert w.index_state == "indexed"
    assert paths_of(find(env, "quokka", role="boss")) == ["/inbox/tip.md"]
    assert paths_of(find(env, "quokka", role="agent")) == []


def test_no_tenant_sees_another_tenants_paths_or_words(env):
    run(F.write_file, env.ctx("agent", "acme"), "/t/notes.md", "acme flamingo strategy\n")
    run(F.write_file, env.ctx("agent", "beta"), "/t/notes.md", "beta narwhal roadmap\n")
    run(F.write_file, env.ctx("agent", "beta"), "/t/only-beta.md", "narwhal again\n")
    for role in ("agent", "boss"):
        assert find(env, "flamingo", role=role, tenant="beta").results == []
        assert find(env, "narwhal", role=role, tenant="acme").results == []
        assert find(env, "strategy OR roadmap", role=role, tenant="beta",
                    match="any").results[0].snippet.startswith("beta")
        for h in find(env, "acme flamingo strategy notes t", role=role, tenant="beta",
                      match="any").results:
            assert h.path != "/t/notes.md" or "flamingo" not in h.snippet
            assert "acme" not in h.snippet
    assert set(paths_of(find(env, "narwhal", tenant="beta"))) == {"/t/notes.md",
                                                                 "/t/only-beta.md"}
    assert paths_of(find(env, "flamingo", tenant="acme")) == ["/t/notes.md"]


# --------------------------------------------------------------------------- index upkeep


def test_overwrite_move_and_delete_update_the_index(env):
    a = env.ctx("agent")
    run(F.write_file, a, "/upkeep/a.md", "original heron text\n")
    assert paths_of(find(env, "heron")) == ["/upkeep/a.md"]
    run(F.write_file, a, "/upkeep/a.md", "replaced by ibis\n")
    assert find(env, "heron").results == [] and paths_of(find(env, "ibis")) == ["/upkeep/a.md"]
    run(F.edit_file, a, "/upkeep/a.md", [{"old_text": "ibis", "new_text": "stork"}])
    assert find(env, "ibis").results == [] and paths_of(find(env, "stork")) == ["/upkeep/a.md"]
    run(F.move_file, a, "/upkeep/a.md", "/upkeep/b.md")
    assert paths_of(find(env, "stork")) == ["/upkeep/b.md"]
    run(F.create_directory, a, "/upkeep/dir")
    run(F.write_file, a, "/upkeep/dir/c.md", "crane in a directory\n")
    run(F.move_file, a, "/upkeep/dir", "/upkeep/moved")
    assert paths_of(find(env, "crane")) == ["/upkeep/moved/c.md"]
    assert run(F.get_file_info, a, "/upkeep/moved/c.md").index_state == "indexed"
    run(F.write_file, a, "/upkeep/over.md", "egret will be replaced\n")
    run(F.move_file, a, "/upkeep/b.md", "/upkeep/over.md", overwrite=True)
    assert find(env, "egret").results == [] and paths_of(find(env, "stork")) == [
        "/upkeep/over.md"]
    run(F.delete_file, a, "/upkeep/over.md")
    assert find(env, "stork").results == []
    run(F.delete_file, a, "/upkeep", recursive=True)
    assert find(env, "crane").results == []
    assert env.index.state("acme", "/upkeep/moved/c.md").state == "not_indexed"


def test_writes_through_other_doors_and_binary_files(env):
    boss = env.who[("acme", "boss")]
    env.app.gateway.write(boss, "/door/cli.md", b"penguin written by the cli\n")
    # a small write hands its stored content to the hook: indexed in the writer's call
    assert env.index.state("acme", "/door/cli.md").state == "indexed"
    assert env.index.wait_idle(10)
    assert paths_of(find(env, "penguin")) == ["/door/cli.md"]
    # another process (the CLI) with its own index object records the write as pending and
    # exits; this process's worker finds the row and indexes it
    gw = env.app.gateway
    gw.hooks.remove(env.index.on_change)
    try:
        info = gw.write(boss, "/door/other-process.md", b"puffin from elsewhere\n").info
    finally:
        gw.hooks.append(env.index.on_change)
    other = SearchIndex(gw, env.home / "search" / "index.db", start_worker=False)
    other.on_change(boss, "write", info.path, info)
    other.close()
    assert env.index.state("acme", "/door/other-process.md").state == "pending"
    deadline = time.monotonic() + 10
    while env.index.state("acme", "/door/other-process.md").state != "indexed":
        assert time.monotonic() < deadline, "the worker never picked up the pending row"
        time.sleep(0.05)
    assert paths_of(find(env, "puffin")) == ["/door/other-process.md"]
    w = run(F.write_file, env.ctx("agent"), "/door/pic.png",
            base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8 + b"penguin").decode(),
            encoding="base64")
    assert w.index_state == "skipped"
    info = run(F.get_file_info, env.ctx("agent"), "/door/pic.png")
    assert info.index_state == "skipped" and "binary" in info.index_detail
    assert paths_of(find(env, "penguin")) == ["/door/cli.md"]


def test_large_text_is_indexed_in_the_background_with_visible_state(tmp_path):
    env = Env(tmp_path / "home", sync_bytes=8 << 10, start_worker=False)
    try:
        a = env.ctx("agent")
        body = "".join(f"filler line {i} about nothing much\n" for i in range(2000))
        w = run(F.write_file, a, "/bg/big.md", body + "the word mongoose appears at the end\n")
        assert w.size > 8 << 10 and w.index_state == "pending"
        info = run(F.get_file_info, a, "/bg/big.md")
        assert info.index_state == "pending"
        r = run(S.search, a, "mongoose")
        assert r.results == [] and r.pending == 1
        small = run(F.write_file, a, "/bg/small.md", "mongoose cub\n")
        assert small.index_state == "indexed"
        env.index.start()
        assert env.index.wait_idle(20)
        assert run(F.get_file_info, a, "/bg/big.md").index_state == "indexed"
        r = run(S.search, a, "mongoose")
        assert set(paths_of(r)) == {"/bg/big.md", "/bg/small.md"} and r.pending == 0
        big = next(h for h in r.results if h.path == "/bg/big.md")
        assert "«mongoose»" in big.snippet and big.snippet_offset > len(body) - 1024
        env.index.close()
        # state survives a restart: a fresh index over the same home knows the files
        env.index = SearchIndex.attach(env.app.gateway, env.home)
        assert paths_of(run(S.search, a, "mongoose cub")) == ["/bg/small.md"]
    finally:
        env.close()


def test_search_without_an_index_says_it_is_off(tmp_path):
    home = tmp_path / "home"
    Volume.init(home, StoreConfig.embedded(home, durability="none")).close()
    app = open_app(home)
    try:
        app.principals.add_tenant("solo")
        p = app.gateway.authenticate(app.principals.add_agent("solo", "a", role="agent"))
        with pytest.raises(ToolError) as ei:
            run(S.search, ToolContext(app.gateway, p), "anything")
        assert ei.value.code == "unavailable" and "find_files" in ei.value.message
        w = run(F.write_file, ToolContext(app.gateway, p), "/x.md", "no index here")
        assert w.index_state is None
    finally:
        app.close()


def test_each_search_is_one_audit_event_without_the_query(env):
    a = env.ctx("agent")
    run(F.write_file, a, "/aud/one.md", "platypus notes\n")
    find(env, "platypus uniquequeryword", match="any", path_prefix="/aud")
    cols, rows = a.gateway._audit.query(
        "SELECT operation, path, decision FROM audit WHERE operation = 'search' "
        "ORDER BY seq DESC LIMIT 1")
    assert rows == [("search", "/aud", "allow")]
    cols, rows = a.gateway._audit.query(
        "SELECT count(*) FROM audit WHERE path LIKE '%uniquequeryword%'")
    assert rows[0][0] == 0


def test_search_counts_against_the_tenants_rate_and_can_run_at_max_concurrency_1(tmp_path):
    """A search is one operation of the tenant's QoS rate (a flood is refused with
    rate_limited), and never deadlocks on its own reads when only one call may run."""
    e = Env(tmp_path / "home")
    try:
        pr = e.app.principals
        pr.set_policy("acme", POLICY + "\nqos: {ops_per_second: 1, burst: 4, "
                                        "max_concurrency: 1, max_wait_ms: 0}\n")
        a = e.ctx("agent")
        run(F.write_file, a, "/q/one.md", "narwhal facts\n")
        time.sleep(1.2)  # refill
        assert paths_of(find(e, "narwhal")) == ["/q/one.md"]  # snippet read nested inside
        codes = []
        for _ in range(8):  # no hits: no snippet reads, only the search itself costs
            try:
                find(e, "zzzunknownword")
            except ToolError as exc:
                codes.append(exc.code)
        assert "rate_limited" in codes
    finally:
        e.close()

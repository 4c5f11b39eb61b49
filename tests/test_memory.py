"""Sessions and memories (issue #5) through the MCP tool functions on a real store.

Real volume, gateway, presidio classifier, audit log and QoS (``server.wiring.open_app``);
the KV tier is the embedded SQLite file or a real Redis (both, where marked).
"""

from __future__ import annotations

import time

import anyio
import pytest

from governance.tokens import count_tokens
from server.wiring import open_app
from storage import StoreConfig, Volume
from tools import memory as M
from tools.registry import ToolContext, ToolError

SSN = "536-22-4817"
EMAIL = "alice.walker@example.com"
CARD = "4111 1111 1111 1111"

POLICY = """
pii:
  entities:
    EMAIL_ADDRESS: {action: tag, threshold: 0.4}
    US_SSN: {action: redact}
    CREDIT_CARD: {action: deny}
clearance:
  boss: ["*"]
  agent: []
memory:
  share_sessions: false
  shared_memories: true
"""
SHARING = """
memory:
  share_sessions: true
  shared_memories: false
"""
RETAIN = """
memory:
  retention_days: 0.000012
"""  # about one second


class Env:
    def __init__(self, home, kv: str = ""):
        Volume.init(home, StoreConfig.embedded(home, durability="none", kv=kv)).close()
        self.app = open_app(home)
        pr = self.app.principals
        self.who = {}
        for tenant, pol in (("acme", POLICY), ("beta", POLICY), ("share", SHARING),
                            ("brief", RETAIN)):
            pr.add_tenant(tenant)
            pr.set_policy(tenant, pol)
            for name, role in (("a1", "agent"), ("a2", "agent"), ("chief", "boss")):
                self.who[(tenant, name)] = self.app.gateway.authenticate(
                    pr.add_agent(tenant, name, role=role))

    def ctx(self, tenant="acme", agent="a1") -> ToolContext:
        return ToolContext(self.app.gateway, self.who[(tenant, agent)])

    def close(self):
        kv = self.app.vol.kv
        for t in ("acme", "beta", "share", "brief"):
            kv.drop_namespace(t)
        self.app.close()


@pytest.fixture(params=["sqlite", "redis"])
def env(request, tmp_path):
    kv = "" if request.param == "sqlite" else request.getfixturevalue("redis_kv_url")
    e = Env(tmp_path / "home", kv)
    yield e
    e.close()


@pytest.fixture
def lite(tmp_path):
    e = Env(tmp_path / "home")
    yield e
    e.close()


def run(fn, *args, **kwargs):
    return anyio.run(lambda: fn(*args, **kwargs))


def err(fn, *args, **kwargs) -> ToolError:
    with pytest.raises(ToolError) as ei:
        run(fn, *args, **kwargs)
    return ei.value


# -- sessions ---------------------------------------------------------------------------


def test_append_creates_then_continues(env):
    c = env.ctx()
    r = run(M.session_append, c, content="hello there")
    assert r.created and r.seq == 1 and r.session.startswith("ses_")
    r2 = run(M.session_append, c, content="general kenobi", role="assistant", session=r.session)
    assert not r2.created and r2.session == r.session and r2.seq == 2
    ctx = run(M.session_context, c, session=r.session, max_tokens=1000)
    assert [(t.role, t.content) for t in ctx.turns] == [("user", "hello there"),
                                                       ("assistant", "general kenobi")]
    assert ctx.omitted == 0 and ctx.marker is None
    assert ctx.tokens == sum(t.tokens for t in ctx.turns)
    listed = run(M.list_sessions, c).sessions
    assert [(s.session, s.turns, s.owner) for s in listed] == [(r.session, 2, "a1")]


def test_budget_respected_exactly(env):
    c = env.ctx()
    sid = None
    texts = [f"turn {i}: " + " ".join(f"w{i}x{j}" for j in range(i % 7 + 3)) for i in range(30)]
    for t in texts:
        sid = run(M.session_append, c, content=t, session=sid).session
    for budget in (1, 5, 12, 20, 37, 64, 100, 151, 400, 10_000):
        r = run(M.session_context, c, session=sid, max_tokens=budget)
        got = [t.content for t in r.turns]
        used = sum(count_tokens(x) for x in got)
        if r.marker:
            used += count_tokens(r.marker)
        assert used == r.tokens <= budget, (budget, r)
        n = len(r.turns)
        if n and not r.turns[0].truncated:
            assert got == texts[len(texts) - n:]  # the most recent turns, oldest first
            assert r.omitted == len(texts) - n
            if r.omitted:
                # the next older turn would not have fit alongside the marker
                older = count_tokens(texts[len(texts) - n - 1])
                assert r.tokens + older > budget
                assert r.marker == f"[{r.omitted} earlier turn{'s' if r.omitted > 1 else ''} " \
                                   "omitted]"
        if budget >= 10_000:
            assert n == 30 and r.omitted == 0 and r.marker is None


def test_a_turn_longer_than_the_budget_keeps_its_end(lite):
    c = lite.ctx()
    sid = run(M.session_append, c, content="old turn").session
    long = " ".join(f"word{i}" for i in range(500)) + " THE-END"
    run(M.session_append, c, content=long, session=sid)
    r = run(M.session_context, c, session=sid, max_tokens=50)
    assert len(r.turns) == 1 and r.turns[0].truncated
    assert r.turns[0].content.endswith("THE-END") and long.endswith(r.turns[0].content)
    assert r.tokens <= 50 and r.omitted == 1 and r.marker


def test_sessions_private_to_their_agent(env):
    sid = run(M.session_append, env.ctx(agent="a1"), content="mine").session
    for other in (env.ctx(agent="a2"), env.ctx(tenant="beta", agent="a1")):
        e = err(M.session_context, other, session=sid, max_tokens=100)
        assert e.code == "not_found"
        e = err(M.session_append, other, content="intrusion", session=sid)
        assert e.code == "not_found"
        assert run(M.list_sessions, other).sessions == []
    r = run(M.session_context, env.ctx(agent="a1"), session=sid, max_tokens=100)
    assert [t.content for t in r.turns] == ["mine"]


def test_policy_can_share_sessions(env):
    sid = run(M.session_append, env.ctx("share", "a1"), content="team notes").session
    run(M.session_append, env.ctx("share", "a2"), content="added by a2", session=sid)
    r = run(M.session_context, env.ctx("share", "a2"), session=sid, max_tokens=100)
    assert [t.content for t in r.turns] == ["team notes", "added by a2"]
    listed = run(M.list_sessions, env.ctx("share", "a2")).sessions
    assert [(s.session, s.owner) for s in listed] == [(sid, "a1")]


def test_pii_policy_on_session_content(env):
    c, boss = env.ctx(), env.ctx(agent="chief")
    r = run(M.session_append, c, content=f"my ssn is {SSN}, mail {EMAIL}")
    assert r.redacted == {"US_SSN": 1} and set(r.labels) == {"US_SSN", "EMAIL_ADDRESS"}
    ctx = run(M.session_context, c, session=r.session, max_tokens=100)
    assert SSN not in ctx.turns[0].content and "<US_SSN>" in ctx.turns[0].content
    assert EMAIL not in ctx.turns[0].content and ctx.turns[0].masked == ["EMAIL_ADDRESS"]
    # the boss is cleared for e-mail but not for the redacted SSN (it was never stored)
    share_sid = run(M.session_append, boss, content=f"boss note {EMAIL}").session
    b = run(M.session_context, boss, session=share_sid, max_tokens=100)
    assert EMAIL in b.turns[0].content and b.turns[0].masked == []
    # deny: refused naming the type, not the value; nothing stored, no session created
    e = err(M.session_append, c, content=f"card {CARD}")
    assert e.code == "denied_by_policy" and "CREDIT_CARD" in e.message and CARD not in e.message
    e = err(M.session_append, c, content=f"card {CARD}", session=r.session)
    assert e.code == "denied_by_policy"
    assert run(M.session_context, c, session=r.session, max_tokens=100).turns[-1].seq == 1
    assert len(run(M.list_sessions, c).sessions) == 1


def test_retention_expires_turns_and_sessions(lite):
    c = lite.ctx("brief")
    sid = run(M.session_append, c, content="fleeting").session
    mem = run(M.remember, c, content="fleeting memory about zebras").memory
    assert run(M.session_context, c, session=sid, max_tokens=50).turns
    time.sleep(1.4)
    assert err(M.session_context, c, session=sid, max_tokens=50).code == "not_found"
    assert run(M.list_sessions, c).sessions == []
    assert run(M.recall, c, query="zebras").memories == []
    assert err(M.forget, c, id=mem.id).code == "not_found"


@pytest.mark.parametrize("kwargs, code, words", [
    ({"session": "nope", "content": "x"}, "invalid_argument", "minted"),
    ({"session": "ses_" + "a" * 26, "content": "x"}, "not_found", "omit the session"),
    ({"content": ""}, "invalid_argument", "content"),
    ({"content": "x" * 300_000}, "invalid_argument", "content"),
    ({"content": "x", "role": "wizard"}, "invalid_argument", "role"),
    ({"content": 5}, "invalid_argument", "content"),
])
def test_session_append_bad_input(lite, kwargs, code, words):
    c = lite.ctx()
    e = err(M.session_append, c, **kwargs)
    assert e.code == code and words in e.message, e.message
    assert run(M.list_sessions, c).sessions == []


def test_session_context_bad_input(lite):
    c = lite.ctx()
    sid = run(M.session_append, c, content="x").session
    for kwargs in ({"session": sid, "max_tokens": 0}, {"session": sid, "max_tokens": "9"},
                   {"session": "ses_bad", "max_tokens": 10}):
        assert err(M.session_context, c, **kwargs).code == "invalid_argument"


def test_audit_records_ops_without_content(lite):
    c = lite.ctx()
    sid = run(M.session_append, c, content=f"secret plan, ssn {SSN}, mail {EMAIL}").session
    run(M.session_context, c, session=sid, max_tokens=100)
    run(M.remember, c, content=f"remember {EMAIL} likes tea", key="tea")
    run(M.recall, c, query=f"what does {EMAIL} like")
    err(M.session_append, c, content=f"card {CARD}")
    cols, rows = lite.app.audit.query(
        "SELECT operation, path, decision, labels, error FROM audit "
        "WHERE operation IN ('session_append','session_context','remember','recall') "
        "ORDER BY seq")
    ops = [(r[0], r[2]) for r in rows]
    assert ops == [("session_append", "redact"), ("session_context", "masked"),
                   ("remember", "tag"), ("recall", "masked"), ("session_append", "deny")]
    assert rows[0][1] == f"session:{sid}" and rows[2][1].startswith("memory:mem_")
    lite.app.audit.close()
    blob = b"".join(p.read_bytes() for p in (lite.app.vol.home / "audit").rglob("*")
                    if p.is_file())
    for needle in (SSN, EMAIL, CARD, "secret plan", "likes tea"):
        assert needle.encode() not in blob


# -- memories ---------------------------------------------------------------------------


def test_remember_recall_forget(env):
    c = env.ctx()
    facts = ["The staging database password rotates every Monday",
             "Deploys to production need two approvals from the platform team",
             "The office coffee machine is descaled on Fridays",
             "Customer Globex renews their contract in March"]
    ids = [run(M.remember, c, content=f, tags=["ops"] if i < 2 else ["misc"]).memory.id
           for i, f in enumerate(facts)]
    hits = run(M.recall, c, query="when is the database password rotated").memories
    assert hits[0].id == ids[0] and hits[0].score > 0
    hits = run(M.recall, c, query="approvals production deploy", tags=["ops"]).memories
    assert hits[0].id == ids[1] and all("ops" in h.tags for h in hits)
    assert run(M.recall, c, query="coffee", tags=["ops"]).memories == []
    tagged = run(M.recall, c, tags=["misc"]).memories
    assert {h.id for h in tagged} == set(ids[2:])
    assert run(M.forget, c, id=ids[2]).forgotten.id == ids[2]
    assert run(M.recall, c, query="coffee machine").memories == []
    assert err(M.forget, c, id=ids[2]).code == "not_found"


def test_key_upserts(env):
    c = env.ctx()
    a = run(M.remember, c, content="favourite colour is blue", key="colour")
    b = run(M.remember, c, content="favourite colour is green", key="colour")
    assert not a.updated and b.updated and a.memory.id == b.memory.id
    hits = run(M.recall, c, query="favourite colour").memories
    assert [h.content for h in hits] == ["favourite colour is green"]
    assert run(M.forget, c, key="colour").forgotten.id == a.memory.id
    assert run(M.recall, c, query="favourite colour").memories == []


def test_memories_private_shared_and_isolated(env):
    a1, a2 = env.ctx(agent="a1"), env.ctx(agent="a2")
    mine = run(M.remember, a1, content="a1 private note about walruses").memory
    shared = run(M.remember, a1, content="team shared note about walruses",
                 shared=True).memory
    assert shared.shared and not mine.shared
    assert {h.id for h in run(M.recall, a1, query="walruses").memories} == {mine.id, shared.id}
    assert [h.id for h in run(M.recall, a2, query="walruses").memories] == [shared.id]
    assert err(M.forget, a2, id=mine.id).code == "not_found"
    other = env.ctx(tenant="beta")
    assert run(M.recall, other, query="walruses").memories == []
    assert err(M.forget, other, id=shared.id).code == "not_found"
    # a tenant whose policy forbids shared memories
    e = err(M.remember, env.ctx("share"), content="x", shared=True)
    assert e.code == "forbidden" and "shared_memories" in e.message


def test_recency_boost_orders_equal_matches(lite):
    c = lite.ctx()
    old = run(M.remember, c, content="the launch codename is Falcon").memory
    time.sleep(0.05)
    new = run(M.remember, c, content="the launch codename is Heron").memory
    hits = run(M.recall, c, query="launch codename").memories
    assert [h.id for h in hits] == [new.id, old.id]
    assert hits[0].score >= hits[1].score


def test_memory_pii_policy(lite):
    c, boss = lite.ctx(), lite.ctx(agent="chief")
    r = run(M.remember, c, content=f"{EMAIL} prefers email, ssn {SSN}", shared=True)
    assert r.redacted == {"US_SSN": 1} and "EMAIL_ADDRESS" in r.labels
    agent_view = run(M.recall, c, query="prefers email").memories[0]
    assert EMAIL not in agent_view.content and agent_view.masked == ["EMAIL_ADDRESS"]
    boss_view = run(M.recall, boss, query="prefers email").memories[0]
    assert EMAIL in boss_view.content and SSN not in boss_view.content
    e = err(M.remember, c, content=f"card {CARD}")
    assert e.code == "denied_by_policy" and CARD not in e.message
    assert run(M.recall, c, query="card").memories == []


@pytest.mark.parametrize("kwargs, words", [
    ({"content": ""}, "content"),
    ({"content": "x" * 70_000}, "content"),
    ({"content": "x", "tags": ["bad tag!"]}, "tag"),
    ({"content": "x", "tags": [f"t{i}" for i in range(17)]}, "tags"),
    ({"content": "x", "key": ""}, "key"),
])
def test_remember_bad_input(lite, kwargs, words):
    c = lite.ctx()
    e = err(M.remember, c, **kwargs)
    assert e.code == "invalid_argument" and words in e.message
    assert run(M.recall, c, query="x").memories == []


def test_recall_and_forget_bad_input(lite):
    c = lite.ctx()
    assert err(M.recall, c).code == "invalid_argument"  # neither query nor tags
    assert err(M.recall, c, query="x" * 3000).code == "invalid_argument"
    assert err(M.forget, c).code == "invalid_argument"
    assert err(M.forget, c, id="mem_x", key="k").code == "invalid_argument"
    assert err(M.forget, c, id="not-an-id").code == "invalid_argument"


def test_reserved_folder_is_not_reachable_by_file_tools(lite):
    from tools import files as F

    c = lite.ctx()
    for call in (lambda: F.write_file(c, path="/.lodestore/kv/x", content="x"),
                 lambda: F.read_file(c, path="/.lodestore/kv/x"),
                 lambda: F.list_directory(c, path="/.lodestore"),
                 lambda: F.move_file(c, source="/a", destination="/.lodestore/a")):
        with pytest.raises(ToolError) as ei:
            anyio.run(call)
        assert ei.value.code == "invalid_path" and "reserved" in ei.value.message


def test_memory_door_holds_no_kv_store(lite):
    from storage.kv import KVStore

    door = lite.app.gateway.memory
    level = [door]
    for _depth in range(3):  # public attributes, three levels deep
        nxt = []
        for obj in level:
            for n in dir(obj):
                if n.startswith("_"):
                    continue
                x = getattr(obj, n, None)
                assert not isinstance(x, KVStore), f"{type(obj).__name__}.{n} is the KV tier"
                if not callable(x) and not isinstance(x, str | int | float | bytes):
                    nxt.append(x)
        level = nxt

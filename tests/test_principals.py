"""Tenants, agents, tokens and versioned policies in the control database."""

from __future__ import annotations

import pytest

from governance.errors import PolicyError, Unauthorized
from governance.principals import Principals, hash_token
from storage import AlreadyExists, NotFound, StoreConfig, UnknownTenant, Volume


@pytest.fixture(params=["sqlite", "postgres"])
def principals(request, tmp_path):
    cfg = StoreConfig.embedded(tmp_path, durability="none")
    if request.param == "postgres":
        cfg.control = request.getfixturevalue("pg_url")
    vol = Volume.init(tmp_path, cfg)
    p = Principals(vol.tenant_directory())
    p.add_tenant("acme")
    yield p
    p.close()
    vol.close()


def test_token_shown_once_and_stored_hashed(principals):
    token = principals.add_agent("acme", "bot", role="writer")
    assert token.startswith("lds_") and len(token) > 40
    me = principals.authenticate(token)
    assert (me.tenant, me.agent, me.role) == ("acme", "bot", "writer")
    # the database holds the hash, never the token
    from sqlalchemy import text
    with principals.engine.connect() as c:
        rows = [tuple(r) for r in c.execute(text("SELECT * FROM gov_agents"))]
    flat = " ".join(str(v) for r in rows for v in r)
    assert token not in flat
    assert hash_token(token) in flat
    [rec] = principals.list_agents("acme")
    assert rec.token_hint == token[:10] and rec.revoked is None


def test_wrong_missing_revoked_tokens_refused(principals):
    token = principals.add_agent("acme", "bot")
    for bad in (None, "", "nope", "lds_" + "x" * 43, token[:-1] + ("A" if token[-1] != "A" else "B")):
        with pytest.raises(Unauthorized):
            principals.authenticate(bad)
    principals.revoke("acme", "bot")
    with pytest.raises(Unauthorized, match="revoked"):
        principals.authenticate(token)
    with pytest.raises(NotFound):
        principals.revoke("acme", "bot")
    # reissue gives a working token again
    t2 = principals.reissue("acme", "bot")
    assert principals.authenticate(t2).agent == "bot"
    with pytest.raises(Unauthorized):
        principals.authenticate(token)


def test_agents_need_a_tenant_and_unique_names(principals):
    with pytest.raises(UnknownTenant):
        principals.add_agent("nobody", "bot")
    principals.add_agent("acme", "bot")
    with pytest.raises(AlreadyExists):
        principals.add_agent("acme", "bot")
    with pytest.raises(AlreadyExists):
        principals.add_tenant("acme")


def test_policy_versions_history_rollback(principals):
    assert principals.policy("acme").version == 0  # permissive default
    v1 = principals.set_policy("acme", "qos: {ops_per_second: 10}")
    v2 = principals.set_policy("acme", "qos: {ops_per_second: 20}")
    assert (v1.version, v2.version) == (1, 2)
    assert principals.policy("acme").policy.qos.ops_per_second == 20
    v3 = principals.rollback_policy("acme", 1)
    assert v3.version == 3 and "rollback" in v3.note
    assert principals.policy("acme").policy.qos.ops_per_second == 10
    assert [h.version for h in principals.policy_history("acme")] == [1, 2, 3]


@pytest.mark.parametrize("doc, field", [
    ("qos: {ops_per_second: -5}", "qos.ops_per_second"),
    ("qos: {priority: urgent}", "qos.priority"),
    ("pii: {entities: {EMAIL_ADDRESS: {action: shred}}}", "pii.entities.EMAIL_ADDRESS.action"),
    ("pii: {entities: {EMAIL_ADDRESS: {threshold: 3}}}", "pii.entities.EMAIL_ADDRESS.threshold"),
    ("paths: [{prefix: relative}]", "paths.0.prefix"),
    ("quotas: {bytes: lots}", "quotas.bytes"),
    ("colour: blue", "colour"),
    ("memory: {retention_days: 0}", "memory.retention_days"),
])
def test_bad_policy_rejected_with_field_named(principals, doc, field):
    with pytest.raises(PolicyError, match=f"`{field}`"):
        principals.set_policy("acme", doc)
    assert principals.policy_history("acme") == []


def test_examples_policies_are_valid(principals):
    from pathlib import Path

    files = sorted(Path(__file__).parent.parent.joinpath("examples", "policies").glob("*.yaml"))
    assert len(files) >= 3
    for f in files:
        principals.set_policy("acme", f.read_text(), source=f.name)

"""query_table (issue #4): read-only SQL over store files, through the gateway, sandboxed.

Files are loaded through the gateway with the caller's role (masked columns arrive
masked), into a sealed in-memory DuckDB. Anything that reaches past the named tables -
host files, URLs, extensions, settings, writes - is refused with a clear error.
"""

from __future__ import annotations

import base64
import io
import json

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from server.wiring import open_app
from storage import StoreConfig, Volume
from tools import files as F
from tools import query as Q
from tools.registry import ToolContext, ToolError

POLICY = """
pii:
  entities:
    EMAIL_ADDRESS: {action: tag, threshold: 0.4}
    US_SSN: {action: redact}
clearance:
  boss: ["*"]
paths:
  - {prefix: /, read: ["*"], write: ["*"]}
  - {prefix: /secret, read: [boss], write: [boss]}
"""

SALES = ("region,rep,email,amount\n"
         "north,ann,ann.north@example.com,120\n"
         "south,bob,bob.south@example.org,80\n"
         "north,cid,cid.north@example.net,30\n")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("tools-query") / "home"
    Volume.init(home, StoreConfig.embedded(home, chunk_size=65536, inline_threshold=1024,
                                           durability="none")).close()
    app = open_app(home)
    who = {}
    for tenant in ("acme", "beta"):
        app.principals.add_tenant(tenant)
        app.principals.set_policy(tenant, POLICY)
        for role in ("agent", "boss"):
            who[(tenant, role)] = app.gateway.authenticate(
                app.principals.add_agent(tenant, f"{role}-bot", role=role))

    class E:
        def ctx(self, role="agent", tenant="acme", **limits):
            return ToolContext(app.gateway, who[(tenant, role)], limits=dict(limits))

    e = E()
    boss = e.ctx("boss")
    anyio.run(lambda: F.write_file(boss, "/data/sales.csv", SALES))
    yield e
    app.close()


def run(fn, *args, **kwargs):
    return anyio.run(lambda: fn(*args, **kwargs))


def q(env, sql, tables=None, role="agent", tenant="acme", **kw):
    return run(Q.query_table, env.ctx(role, tenant), sql,
               tables if tables is not None else {"sales": "/data/sales.csv"}, **kw)


def refused(env, sql, tables=None, **kw) -> ToolError:
    with pytest.raises(ToolError) as ei:
        q(env, sql, tables, **kw)
    return ei.value


def test_sql_over_csv_json_ndjson_tsv_and_parquet(env):
    r = q(env, "SELECT region, sum(amount) AS total FROM sales GROUP BY region ORDER BY region")
    assert [c.name for c in r.columns] == ["region", "total"]
    assert r.rows == [["north", 150], ["south", 80]] and not r.truncated and r.row_count == 2
    assert r.tables[0].rows == 3 and r.tables[0].format == "csv" and r.tables[0].version == 1
    boss = env.ctx("boss")
    rows = [{"id": i, "name": f"item{i}", "price": i * 1.5} for i in range(5)]
    run(F.write_file, boss, "/data/items.json", json.dumps(rows))
    run(F.write_file, boss, "/data/items.ndjson", "\n".join(json.dumps(x) for x in rows))
    run(F.write_file, boss, "/data/items.tsv", "id\tname\n1\tone\n2\ttwo\n")
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": [1, 2, 3], "qty": [10, 20, 30]}), buf)
    run(F.write_file, boss, "/data/stock.parquet", base64.b64encode(buf.getvalue()).decode(),
        encoding="base64")
    r = q(env, "SELECT count(*), max(a.price) FROM a, b WHERE a.id = b.id",
          {"a": "/data/items.json", "b": "/data/items.ndjson"})
    assert r.rows == [[5, 6.0]]
    r = q(env, "SELECT i.name, s.qty FROM i JOIN s USING (id) ORDER BY s.qty",
          {"i": "/data/items.tsv", "s": "/data/stock.parquet"})
    assert r.rows == [["one", 10], ["two", 20]]
    assert {t.format for t in r.tables} == {"tsv", "parquet"}
    r = q(env, "WITH t AS (SELECT * FROM sales) SELECT rep FROM t WHERE amount > 50 "
               "ORDER BY rep")
    assert r.rows == [["ann"], ["bob"]]
    r = q(env, "SELECT DATE '2024-05-01' AS d, 1.5::DECIMAL(4,2) AS x, NULL AS n")
    assert r.rows == [["2024-05-01", "1.50", None]]


def test_masked_columns_come_masked_for_an_uncleared_role(env):
    agent = q(env, "SELECT rep, email FROM sales ORDER BY rep")
    assert agent.tables[0].masked == ["EMAIL_ADDRESS"] and agent.masked == ["EMAIL_ADDRESS"]
    assert agent.tables[0].labels == ["EMAIL_ADDRESS"]
    for _rep, email in agent.rows:
        assert set(email) == {"*"}, email
    assert "example" not in json.dumps(agent.rows)
    # no SQL gets the values back: they never reached DuckDB
    r = q(env, "SELECT string_agg(email, ',') FROM sales WHERE email LIKE '%@%'")
    assert r.rows == [[None]]
    boss = q(env, "SELECT email FROM sales ORDER BY rep", role="boss")
    assert boss.rows[0] == ["ann.north@example.com"] and boss.masked == []


@pytest.mark.parametrize("sql,code", [
    ("SELECT * FROM read_csv('/etc/passwd')", "forbidden"),
    ("SELECT * FROM read_text('/etc/hostname')", "forbidden"),
    ("SELECT * FROM glob('/etc/*')", "forbidden"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "forbidden"),
    ("SELECT * FROM '/etc/passwd'", "invalid_argument"),
    ("COPY sales TO '/tmp/lodestore-leak.csv'", "forbidden"),
    ("ATTACH '/tmp/lodestore-x.db' AS x", "forbidden"),
    ("INSTALL httpfs", "forbidden"),
    ("LOAD httpfs", "forbidden"),
    ("SET enable_external_access = true", "forbidden"),
    ("PRAGMA version", "forbidden"),
    ("CREATE TABLE t AS SELECT 1", "forbidden"),
    ("DROP VIEW sales", "forbidden"),
    ("SELECT 1; SELECT 2", "invalid_argument"),
    ("SELECT * FROM sales; COPY sales TO '/tmp/x.csv'", "invalid_argument"),
    ("SELEC oops", "invalid_argument"),
    ("SELECT * FROM nosuchtable", "invalid_argument"),
])
def test_the_sandbox_refuses_everything_but_one_select(env, sql, code):
    e = refused(env, sql)
    assert e.code == code, e.message
    assert "Traceback" not in e.message


def test_limits_on_rows_time_and_arguments(env):
    r = q(env, "SELECT * FROM range(50000) t(i)", limit=10)
    assert r.row_count == 10 and r.truncated and r.rows[0] == [0]
    r = q(env, "SELECT * FROM range(20000) t(i)")
    assert r.row_count == 1000 and r.truncated
    r = q(env, "SELECT repeat('x', 1000) FROM range(5000)", limit=5000)
    assert r.truncated and r.row_count < 1100  # the 1 MiB reply cap
    e = refused(env, "SELECT count(*) FROM range(100000000000) a", timeout_s=0.3)
    assert e.code == "timeout" and "timeout_s" in e.message
    for kw in ({"limit": 0}, {"limit": 10_001}, {"timeout_s": 0}, {"timeout_s": 600},
               {"limit": "10"}):
        assert refused(env, "SELECT 1", **kw).code == "invalid_argument", kw
    for tables in ({"select": "/data/sales.csv"}, {"bad name": "/data/sales.csv"},
                   {"1x": "/data/sales.csv"}, {}, {"t": 5}):
        assert refused(env, "SELECT 1", tables).code == "invalid_argument", tables
    run(F.write_file, env.ctx("agent"), "/data/readme.txt", "not a table")
    e = refused(env, "SELECT * FROM t", {"t": "/data/readme.txt"})
    assert e.code == "invalid_argument" and ".csv" in e.message
    run(F.write_file, env.ctx("agent"), "/data/broken.json", "{not json")
    e = refused(env, "SELECT * FROM t", {"t": "/data/broken.json"})
    assert e.code == "invalid_argument" and "JSON" in e.message
    small = env.ctx("agent", max_table_bytes=10)
    with pytest.raises(ToolError) as ei:
        run(Q.query_table, small, "SELECT * FROM t", {"t": "/data/sales.csv"})
    assert ei.value.code == "too_large"


def test_tables_are_read_with_the_callers_rights_and_tenant(env):
    run(F.write_file, env.ctx("boss"), "/secret/pay.csv", "who,amount\nceo,1000000\n")
    e = refused(env, "SELECT * FROM p", {"p": "/secret/pay.csv"})
    assert e.code == "forbidden"
    assert q(env, "SELECT amount FROM p", {"p": "/secret/pay.csv"}, role="boss").rows == [
        [1000000]]
    for spelling in ("/data/sales.csv", "data/sales.csv", "/../acme/data/sales.csv",
                     "/acme/data/sales.csv"):
        e = refused(env, "SELECT * FROM s", {"s": spelling}, tenant="beta")
        assert e.code in ("not_found", "invalid_path"), spelling
        assert "example" not in e.message


def test_progress_is_reported_while_loading_and_querying(env):
    seen = []

    async def progress(done, total, message):
        seen.append((done, total, message))

    ctx = env.ctx("agent")
    ctx.progress = progress
    run(Q.query_table, ctx, "SELECT count(*) FROM a, b", {"a": "/data/sales.csv",
                                                           "b": "/data/sales.csv"})
    assert len(seen) >= 4 and seen[-1][0] == seen[-1][1]
    assert any("loading" in (m or "") for _d, _t, m in seen)


def test_each_query_is_one_audit_event_without_the_sql(env):
    ctx = env.ctx()
    gw = ctx.gateway
    marker = "zz_secret_literal_42"
    q(env, f"SELECT count(*) FROM sales WHERE rep <> '{marker}'")
    refused(env, "COPY sales TO '/tmp/x.csv'")
    cols, rows = gw._audit.query(
        "SELECT operation, path, decision, error FROM audit WHERE operation = 'query_table' "
        "ORDER BY seq DESC LIMIT 2")
    assert [(r[0], r[1], r[3]) for r in rows][::-1] == [
        ("query_table", "/data/sales.csv", None), ("query_table", "/data/sales.csv", rows[0][3])]
    assert rows[0][3] is not None  # the refused one is recorded as an error
    cols, rows = gw._audit.query(f"SELECT count(*) FROM audit WHERE path LIKE '%{marker}%' "
                                 f"OR error LIKE '%{marker}%'")
    assert rows[0][0] == 0

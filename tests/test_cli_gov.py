"""The governance CLI (issue #3): tenants, agents and tokens, policies, governed put/get,
audit. Runs ``server.cli.main`` in-process with click's CliRunner on a store in tmp_path."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from governance.errors import Unauthorized
from server.cli import main
from server.wiring import open_app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "policies"
CARD = "4111 1111 1111 1111"
IBAN = "DE89370400440532013000"
EMAIL = "jane.roe@example.org"
SSN = "536-22-4817"
PHONE = "415-867-5309"


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True, input: str | None = None):
        res = self.runner.invoke(main, ["--home", str(self.home), *args], input=input)
        if res.exception is not None and not isinstance(res.exception, SystemExit):
            raise res.exception
        if ok:
            assert res.exit_code == 0, (args, res.stdout, res.stderr)
        return res

    def fails(self, *args: str):
        res = self(*args, ok=False)
        assert res.exit_code != 0, (args, res.stdout)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (
            f"expected ONE 'error:' line on stderr, got {res.stderr!r}")
        return res, lines[0]

    def audit_count(self, where: str = "") -> int:
        res = self("audit", "query", f"SELECT count(*) AS n FROM audit {where}", "--json")
        return json.loads(res.stdout)[0]["n"]


@pytest.fixture
def cli(tmp_path):
    c = Cli(tmp_path / "home")
    cfg = tmp_path / "store.yaml"
    cfg.write_text("durability: none\nchunk_size: 65536\ninline_threshold: 1024\n")
    c("init", "--config", str(cfg))
    c("tenant", "add", "acme")
    return c


def test_tenant_add_and_list(cli):
    cli("tenant", "add", "beta")
    assert json.loads(cli("tenant", "list", "--json").stdout) == ["acme", "beta"]
    _, line = cli.fails("tenant", "add", "acme")
    assert "already exists" in line
    _, line = cli.fails("tenant", "add", "Bad Name!")
    assert "tenant" in line


def test_agent_add_prints_the_token_alone_on_the_last_line(cli):
    res = cli("agent", "add", "acme", "bot", "--role", "analyst")
    lines = res.stdout.splitlines()
    token = lines[-1]
    assert re.fullmatch(r"lds_[A-Za-z0-9_-]{40,}", token), lines
    assert res.stdout.endswith(token + "\n")
    assert token not in "\n".join(lines[:-1]) and res.stderr == ""
    app = open_app(cli.home)
    try:
        who = app.principals.authenticate(token)
        assert (who.tenant, who.agent, who.role) == ("acme", "bot", "analyst")
    finally:
        app.close()
    # agent list shows only a hint of the token
    for args in (("agent", "list", "acme"), ("agent", "list"), ("agent", "list", "--json")):
        out = cli(*args).stdout
        assert token not in out and token[:10] in out and "bot" in out
        assert token[:14] not in out
    rows = json.loads(cli("agent", "list", "acme", "--json").stdout)
    assert [(r["name"], r["role"], r["revoked"]) for r in rows] == [("bot", "analyst", None)]
    assert "token_hash" not in rows[0]
    # duplicate, unknown tenant, bad names: one error line each
    assert "already exists" in cli.fails("agent", "add", "acme", "bot")[1]
    assert "ghost" in cli.fails("agent", "add", "ghost", "bot")[1]
    assert "agent name" in cli.fails("agent", "add", "acme", "Bad Name")[1]
    # revoke: the token stops working
    cli("agent", "revoke", "acme", "bot")
    rows = json.loads(cli("agent", "list", "acme", "--json").stdout)
    assert rows[0]["revoked"] is not None
    app = open_app(cli.home)
    try:
        with pytest.raises(Unauthorized):
            app.principals.authenticate(token)
    finally:
        app.close()
    assert "no active agent" in cli.fails("agent", "revoke", "acme", "bot")[1]


@pytest.mark.parametrize("doc, field", [
    ("pii:\n  entities:\n    EMAIL_ADDRESS: {action: explode}\n",
     "pii.entities.EMAIL_ADDRESS.action"),
    ("quotas: {bytez: 5}\n", "quotas.bytez"),
    ("qos: {ops_per_second: -1}\n", "qos.ops_per_second"),
    ("clearance:\n  Admin: ['*']\n", "clearance"),
    ("paths:\n  - {prefix: relative, read: ['*']}\n", "paths.0.prefix"),
    ("pii:\n  entities: [unclosed\n", "line 2"),  # a YAML syntax error names the place
])
def test_policy_set_with_a_bad_file_names_the_field(cli, tmp_path, doc, field):
    bad = tmp_path / "bad.yaml"
    bad.write_text(doc)
    res, line = cli.fails("policy", "set", "acme", str(bad))
    assert res.exit_code == 1
    assert field in line and "bad.yaml" in line
    assert res.stdout == ""
    assert "# no policy set" in cli("policy", "show", "acme").stdout  # nothing stored


def test_policy_show_history_rollback(cli):
    assert "# no policy set: the permissive default applies" in cli("policy", "show", "acme").stdout
    assert "version 1" in cli("policy", "set", "acme", str(EXAMPLES / "finance.yaml")).stdout
    assert "version 2" in cli("policy", "set", "acme", str(EXAMPLES / "healthcare.yaml"),
                              "--note", "switch to hc").stdout
    shown = cli("policy", "show", "acme").stdout
    assert shown.startswith("# version 2, set ")
    assert shown.split("\n", 1)[1] == (EXAMPLES / "healthcare.yaml").read_text()
    old = cli("policy", "show", "acme", "--version", "1").stdout
    assert old.split("\n", 1)[1] == (EXAMPLES / "finance.yaml").read_text()
    out = cli("policy", "rollback", "acme", "1").stdout
    assert "version 3" in out and "version 1" in out
    shown = cli("policy", "show", "acme").stdout
    assert shown.startswith("# version 3") and "finance tenant" in shown
    hist = cli("policy", "history", "acme").stdout
    rows = [ln for ln in hist.splitlines() if re.match(r"^\W*\d+\s", ln)]
    assert len(rows) == 3
    assert "switch to hc" in hist and "rollback to v1" in hist
    assert "no policy version 9" in cli.fails("policy", "rollback", "acme", "9")[1]
    assert "no policy version 7" in cli.fails("policy", "show", "acme", "--version", "7")[1]
    assert "ghost" in cli.fails("policy", "history", "ghost")[1]


def test_policy_test_reports_and_stores_nothing(cli):
    cli("policy", "set", "acme", str(EXAMPLES / "finance.yaml"))
    status0 = json.loads(cli("status", "--json").stdout)
    ls0 = cli("ls", "/", "--tenant", "acme").stdout
    writes0 = cli.audit_count("WHERE operation = 'write_file'")
    text = f"card {CARD} mail {EMAIL}"
    res = cli("policy", "test", "acme", "--text", text)
    out = res.stdout
    assert "CREDIT_CARD" in out and "EMAIL_ADDRESS" in out
    assert re.search(r"CREDIT_CARD\W+5\W+24\W+1\.00\W+deny", out), out
    assert re.search(r"EMAIL_ADDRESS\W+\d+\W+\d+\W+\d\.\d\d\W+tag", out), out
    assert "decision: deny" in out and "CREDIT_CARD" in out.split("decision:")[1]
    assert CARD not in out
    rep = json.loads(cli("policy", "test", "acme", "--text", text, "--json").stdout)
    assert rep["decision"] == "deny" and rep["labels"] == ["CREDIT_CARD"]
    assert {f["entity_type"]: f["score"] for f in rep["findings"]} == {
        "CREDIT_CARD": 1.0, "EMAIL_ADDRESS": 1.0}
    rep = json.loads(cli("policy", "test", "acme", "--text", f"iban {IBAN} mail {EMAIL}",
                         "--json").stdout)
    assert rep["decision"] == "redact" and rep["redacted"] == {"IBAN_CODE": 1}
    rep = json.loads(cli("policy", "test", "acme", "--text", "nothing here", "--json").stdout)
    assert rep["decision"] == "allow" and rep["findings"] == []
    # nothing was stored, nothing was written
    status1 = json.loads(cli("status", "--json").stdout)
    assert (status1["files"], status1["bytes"]) == (status0["files"], status0["bytes"]) == (0, 0)
    assert cli("ls", "/", "--tenant", "acme").stdout == ls0
    assert cli.audit_count("WHERE operation = 'write_file'") == writes0 == 0


def test_put_get_under_finance(cli, tmp_path):
    cli("policy", "set", "acme", str(EXAMPLES / "finance.yaml"))
    card = tmp_path / "card.txt"
    card.write_text(f"please charge {CARD} today\n")
    res, line = cli.fails("put", str(card), "/reports/card.txt", "--tenant", "acme",
                          "--role", "analyst")
    assert "denied by policy" in line and "CREDIT_CARD" in line
    assert CARD not in res.stderr and "1111" not in res.stderr
    assert cli.fails("ls", "/reports/card.txt", "--tenant", "acme")[1].startswith("error: ")
    assert json.loads(cli("status", "--json").stdout)["files"] == 0
    # IBAN redacted on the way in, email tagged and masked for all but compliance
    doc = tmp_path / "pay.txt"
    doc.write_text(f"wire to {IBAN}, confirm with {EMAIL}\n")
    out = cli("put", str(doc), "/reports/pay.txt", "--tenant", "acme",
              "--role", "analyst").stdout
    assert "labels EMAIL_ADDRESS,IBAN_CODE" in out and "redacted IBAN_CODEx1" in out
    stored = f"wire to <IBAN_CODE>, confirm with {EMAIL}\n"
    got = tmp_path / "got.txt"
    cli("get", "/reports/pay.txt", str(got), "--tenant", "acme", "--role", "compliance")
    assert got.read_text() == stored
    res = cli("get", "/reports/pay.txt", "-", "--tenant", "acme", "--role", "analyst")
    assert res.stdout == f"wire to <IBAN_CODE>, confirm with {'*' * len(EMAIL)}\n"
    # path rules apply to the CLI too: analysts may not write the ledger
    res, line = cli.fails("put", str(doc), "/ledger/x.txt", "--tenant", "acme",
                          "--role", "analyst")
    assert "may not write" in line
    # the IBAN never reached the disk
    for f in cli.home.rglob("*"):
        if f.is_file():
            assert IBAN.encode() not in f.read_bytes(), f


def test_put_get_under_healthcare(cli, tmp_path):
    cli("policy", "set", "acme", str(EXAMPLES / "healthcare.yaml"))
    doc = tmp_path / "visit.txt"
    doc.write_text(f"patient ssn {SSN}, email {EMAIL}, phone {PHONE}\n")
    out = cli("put", str(doc), "/records/visit.txt", "--tenant", "acme",
              "--role", "clinician").stdout
    assert "redacted US_SSN" in out
    stored = f"patient ssn <US_SSN>, email {EMAIL}, phone {PHONE}\n"
    seen = {}
    for role in ("admin", "clinician", "auditor"):
        target = tmp_path / f"{role}.txt"
        cli("get", "/records/visit.txt", str(target), "--tenant", "acme", "--role", role)
        seen[role] = target.read_text()
    assert seen["admin"] == seen["clinician"] == stored
    assert seen["auditor"] == (f"patient ssn <US_SSN>, email {'*' * len(EMAIL)}, "
                               f"phone {'*' * len(PHONE)}\n")
    # an agent may not read /records at all; auditors may not write
    assert "may not read" in cli.fails("get", "/records/visit.txt", "-", "--tenant", "acme",
                                       "--role", "agent")[1]
    assert "may not write" in cli.fails("put", str(doc), "/notes.txt", "--tenant", "acme",
                                        "--role", "auditor")[1]
    ls = cli("ls", "/records", "--tenant", "acme", "--role", "auditor").stdout
    assert "visit.txt" in ls
    for f in cli.home.rglob("*"):
        if f.is_file():
            assert SSN.encode() not in f.read_bytes(), f


def test_audit_query_and_verify(cli, tmp_path):
    cli("policy", "set", "acme", str(EXAMPLES / "finance.yaml"))
    doc = tmp_path / "a.txt"
    doc.write_text(f"mail {EMAIL}\n")
    cli("put", str(doc), "/a.txt", "--tenant", "acme")
    cli("get", "/a.txt", "-", "--tenant", "acme", "--role", "analyst")
    (tmp_path / "c.txt").write_text(f"card {CARD}\n")
    cli.fails("put", str(tmp_path / "c.txt"), "/c.txt", "--tenant", "acme")
    cli("ls", "/", "--tenant", "acme")
    res = cli("audit", "query", "SELECT count(*) FROM audit")
    assert re.search(r"\b5\b", res.stdout) and "1 row(s)" in res.stdout
    rows = json.loads(cli("audit", "query",
                          "SELECT operation, path, decision, labels, agent FROM audit "
                          "ORDER BY seq", "--json").stdout)
    assert [(r["operation"], r["path"]) for r in rows] == [
        ("write_file", "/a.txt"), ("read_file", "/a.txt"), ("write_file", "/c.txt"),
        ("get_file_info", "/"), ("list_directory", "/")]
    decisions = [r["decision"] for r in rows]
    assert decisions[0] == "tag" and decisions[2:] == ["deny", "allow", "allow"]
    assert rows[2]["labels"] == ["CREDIT_CARD"] and rows[0]["agent"] == "cli"
    dump = json.dumps(rows)
    assert EMAIL not in dump and CARD not in dump
    res = cli("audit", "verify")
    assert "audit log intact: 5 events" in res.stdout
    # refused SQL: one error line
    assert "only SELECT" in cli.fails("audit", "query", "DELETE FROM audit")[1]
    # tampering is detected: exit 1 and one error line
    seg = sorted((cli.home / "audit").glob("seg-*.jsonl"))[-1]
    seg.write_text(seg.read_text().replace('"decision":"deny"', '"decision":"allow"'))
    res, line = cli.fails("audit", "verify")
    assert "tampered" in line and res.exit_code == 1
    # the analyst's `get` was served with the email masked: the event must say so
    # (as it does for the same read through Gateway.read)
    assert decisions[1] == "masked", rows[1]

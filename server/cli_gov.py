"""Governance commands: agents and tokens, policies, audit. Registered on ``lodestore``."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import click
from rich.table import Table

from .cli import main, open_app, out


def _when(ts: float | None) -> str:
    return "-" if ts is None else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# -- agents -----------------------------------------------------------------------------


@main.group()
def agent() -> None:
    """Create, list and revoke agents (each has a role and an API token)."""


@agent.command("add")
@click.argument("tenant")
@click.argument("name")
@click.option("--role", default="agent", show_default=True,
              help="Role the tenant's policy uses for path rules and clearance.")
@click.pass_context
def agent_add(ctx: click.Context, tenant: str, name: str, role: str) -> None:
    """Create agent NAME in TENANT and print its token (shown once, on the last line)."""
    token = open_app(ctx).principals.add_agent(tenant, name, role)
    click.echo(f"agent {name} created in tenant {tenant} with role {role}.")
    click.echo("Its token is shown only now; store it safely (LODESTORE_TOKEN for stdio, "
               "Authorization: Bearer for HTTP):")
    click.echo(token)


@agent.command("list")
@click.argument("tenant", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def agent_list(ctx: click.Context, tenant: str | None, as_json: bool) -> None:
    """List agents (of one tenant, or all). Tokens are never shown, only their first chars."""
    rows = open_app(ctx).principals.list_agents(tenant)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in rows], indent=1))
        return
    t = Table("tenant", "agent", "role", "token", "created", "revoked")
    for r in rows:
        t.add_row(r.tenant, r.name, r.role, r.token_hint + "…", _when(r.created),
                  _when(r.revoked) if r.revoked else "")
    out.print(t)


@agent.command("revoke")
@click.argument("tenant")
@click.argument("name")
@click.pass_context
def agent_revoke(ctx: click.Context, tenant: str, name: str) -> None:
    """Revoke an agent's token (takes effect everywhere within 2 seconds)."""
    open_app(ctx).principals.revoke(tenant, name)
    out.print(f"agent {name} of tenant {tenant} revoked")


# -- policies ---------------------------------------------------------------------------


@main.group()
def policy() -> None:
    """Set, show and test a tenant's policy (versioned YAML; see examples/policies/)."""


@policy.command("set")
@click.argument("tenant")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, allow_dash=True))
@click.option("--note", default=None, help="Why this change (kept in the history).")
@click.pass_context
def policy_set(ctx: click.Context, tenant: str, file: str, note: str | None) -> None:
    """Validate FILE and make it TENANT's policy (a new version)."""
    text = sys.stdin.read() if file == "-" else Path(file).read_text()
    pv = open_app(ctx).principals.set_policy(tenant, text, author="cli", note=note,
                                             source=Path(file).name)
    out.print(f"policy of {tenant} is now version {pv.version}")


@policy.command("show")
@click.argument("tenant")
@click.option("--version", "version", type=int, default=None, help="An older version.")
@click.pass_context
def policy_show(ctx: click.Context, tenant: str, version: int | None) -> None:
    """Print the policy document (the permissive default if none was set)."""
    pr = open_app(ctx).principals
    pr.require_tenant(tenant)
    pv = pr.policy_version(tenant, version)
    if pv is None:
        if version is not None:
            raise click.ClickException(f"tenant {tenant} has no policy version {version}")
        import yaml

        from governance.policy import DEFAULT_POLICY

        click.echo("# no policy set: the permissive default applies")
        click.echo(yaml.safe_dump(DEFAULT_POLICY.model_dump(), sort_keys=False), nl=False)
        return
    click.echo(f"# version {pv.version}, set {_when(pv.created)} by {pv.author}")
    click.echo(pv.document, nl=not pv.document.endswith("\n"))


@policy.command("history")
@click.argument("tenant")
@click.pass_context
def policy_history(ctx: click.Context, tenant: str) -> None:
    """List the policy versions of TENANT."""
    t = Table("version", "set", "by", "note")
    for pv in open_app(ctx).principals.policy_history(tenant):
        t.add_row(str(pv.version), _when(pv.created), pv.author, pv.note or "")
    out.print(t)


@policy.command("rollback")
@click.argument("tenant")
@click.argument("version", type=int)
@click.pass_context
def policy_rollback(ctx: click.Context, tenant: str, version: int) -> None:
    """Make an earlier version current again (recorded as a new version)."""
    pv = open_app(ctx).principals.rollback_policy(tenant, version)
    out.print(f"policy of {tenant} is now version {pv.version} (a copy of version {version})")


@policy.command("test")
@click.argument("tenant")
@click.option("--text", default=None, help="Text to classify (or use --file / stdin).")
@click.option("--file", "file", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def policy_test(ctx: click.Context, tenant: str, text: str | None, file: str | None,
                as_json: bool) -> None:
    """Dry run: the entities found, their scores and the decision. Stores nothing."""
    if text is None:
        text = Path(file).read_text(errors="replace") if file else sys.stdin.read()
    gw = open_app(ctx).gateway
    report = gw.dry_run(tenant, text)
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    t = Table("entity", "start", "end", "score", "action")
    for f in report["findings"]:
        t.add_row(f["entity_type"], str(f["start"]), str(f["end"]), f"{f['score']:.2f}",
                  f["action"] or "ignored (not in policy)")
    out.print(t)
    out.print(f"decision: [bold]{report['decision']}[/]" +
              (f" ({report['reason']})" if report.get("reason") else ""))


# -- audit ------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Query and verify the audit log (one hash-chained event per governed call)."""


@audit.command("query")
@click.argument("sql")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def audit_query(ctx: click.Context, sql: str, limit: int, as_json: bool) -> None:
    """Run read-only SQL (DuckDB) over the events; the table is `audit`.

    Example: lodestore audit query "SELECT operation, count(*) FROM audit GROUP BY 1"
    """
    cols, rows = open_app(ctx).audit.query(sql, limit=limit)
    if as_json:
        click.echo(json.dumps([dict(zip(cols, r, strict=True)) for r in rows], default=str,
                              indent=1))
        return
    t = Table(*cols)
    for r in rows:
        t.add_row(*("" if v is None else str(v) for v in r))
    out.print(t)
    out.print(f"{len(rows)} row(s)")


@audit.command("verify")
@click.pass_context
def audit_verify(ctx: click.Context) -> None:
    """Recompute the hash chain; exit 1 if any event was edited, deleted or reordered."""
    rep = open_app(ctx).audit.verify()
    if rep.ok:
        out.print(f"audit log intact: {rep.events} events, head {(rep.last_hash or '')[:16]}")
        return
    click.echo(f"error: audit log tampered: {rep.problem} (at seq {rep.at_seq})", err=True)
    sys.exit(1)

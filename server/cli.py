"""The ``lodestore`` command line.

Errors are one clear line on stderr and a non-zero exit; long work shows a progress bar
on stderr (never on stdout, which stays parseable).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from storage import StorageError, StoreConfig, Volume, default_home
from storage.config import CONFIG_NAME

from .wiring import App, admin
from .wiring import open_app as _open_app

err = Console(stderr=True)
out = Console(highlight=False, soft_wrap=True)


class CLIGroup(click.Group):
    """Turns every expected failure into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StorageError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            click.echo(f"error: {exc.format_message()}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            click.echo(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)


def home_of(ctx: click.Context) -> Path:
    return Path(ctx.obj["home"]) if ctx.obj.get("home") else default_home()


def open_app(ctx: click.Context) -> App:
    """Open the store with its governance, creating the embedded default on first use."""
    app = ctx.obj.get("app")
    if app is None:
        app = _open_app(home_of(ctx), transport="cli")
        ctx.obj["app"] = app
        ctx.call_on_close(app.close)
    return app


def open_volume(ctx: click.Context) -> Volume:
    return open_app(ctx).vol


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    f = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if f < 1024 or unit == "TiB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1024
    return str(n)


def _progress(transfer: bool = False) -> Progress:
    cols: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn(), TransferSpeedColumn()] if transfer else [MofNCompleteColumn()]
    cols.append(TimeRemainingColumn())
    return Progress(*cols, console=err, transient=True, disable=not err.is_terminal)


@click.group(cls=CLIGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="LODESTORE_HOME", type=click.Path(file_okay=False),
              help="Store directory (default: $LODESTORE_HOME or the user data dir).")
@click.version_option(package_name="lodestore")
@click.pass_context
def main(ctx: click.Context, home: str | None) -> None:
    """Lodestore: governed storage for AI agents."""
    ctx.ensure_object(dict)
    ctx.obj["home"] = home


# -- store ----------------------------------------------------------------------------


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML with settings to use instead of the embedded defaults "
                   "(k, m, chunk_size, targets, engines, durability, ...).")
@click.pass_context
def init(ctx: click.Context, config_file: str | None) -> None:
    """Create a store (an existing store is left as it is)."""
    import yaml

    home = home_of(ctx)
    existed = (home / CONFIG_NAME).exists()
    cfg = None
    if config_file and not existed:
        try:
            overrides = yaml.safe_load(Path(config_file).read_text()) or {}
        except yaml.YAMLError as exc:
            raise click.ClickException(f"{config_file} is not valid YAML: {exc}") from exc
        if not isinstance(overrides, dict):
            raise click.ClickException(f"{config_file} must hold a mapping of settings")
        cfg = _config_from(home, overrides, config_file)
    elif config_file and existed:
        raise click.ClickException(
            f"a store already exists at {home}; its settings live in {home / CONFIG_NAME}")
    vol = Volume.init(home, cfg)
    ctx.call_on_close(vol.close)
    c = vol.cfg
    word = "exists" if existed else "created"
    out.print(f"store {word} at {home}")
    out.print(f"  erasure   k={c.k} m={c.m} (survives {c.m - c.k} lost targets), "
              f"chunks {_bytes(c.chunk_size)}, durability {c.durability}")
    out.print(f"  metadata  {len(c.engines)} engine(s), {c.virtual_shards} virtual shards")
    out.print(f"  targets   {', '.join(t.id for t in c.targets)}")


def _config_from(home: Path, overrides: dict[str, Any], source: str) -> StoreConfig:
    from storage.config import TargetSpec

    base = StoreConfig.embedded(home, m=overrides.get("m", 6))
    known = set(StoreConfig.__dataclass_fields__) - {"home"}
    unknown = set(overrides) - known
    if unknown:
        raise click.ClickException(
            f"{source}: unknown settings {sorted(unknown)}; allowed: {sorted(known)}")
    for key, value in overrides.items():
        if key == "targets":
            value = [TargetSpec(**t) if isinstance(t, dict) else TargetSpec(f"t{i}", str(t))
                     for i, t in enumerate(value)]
        setattr(base, key, value)
    if "engines" in overrides and "shard_map" not in overrides:
        base.shard_map = [v % len(base.engines) for v in range(base.virtual_shards)]
    base.validate()
    return base


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Targets, metadata engines, usage and redundancy."""
    from storage.maintenance import status as get_status

    st = get_status(open_volume(ctx))
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    out.print(f"[bold]Lodestore[/] at {st['home']}  k={st['erasure']['k']} m={st['erasure']['m']}")
    t = Table("target", "url", "health", "free", "capacity")
    for tg in st["targets"]:
        health = "[green]ok[/]" if tg["healthy"] else f"[red]DOWN[/] {tg['detail']}"
        t.add_row(tg["id"], tg["url"], health, _bytes(tg["free_bytes"]), _bytes(tg["capacity_bytes"]))
    out.print(t)
    m = st["metadata"]
    out.print(f"metadata: {len(m['engines'])} engine(s), {m['virtual_shards']} virtual shards")
    out.print(f"tenants {st['tenants']}  files {st['files']}  directories {st['directories']}  "
              f"bytes {_bytes(st['bytes'])}  stored {_bytes(st['stored_bytes'])}")
    deg = st["degraded_chunks"]
    out.print(f"degraded chunks: {deg}" + ("  (run `lodestore repair`)" if deg else ""))


# -- tenants --------------------------------------------------------------------------


@main.group()
def tenant() -> None:
    """Create and list tenants."""


@tenant.command("add")
@click.argument("name")
@click.pass_context
def tenant_add(ctx: click.Context, name: str) -> None:
    """Create tenant NAME (lowercase letters, digits, '-' and '_')."""
    open_app(ctx).principals.add_tenant(name)
    out.print(f"tenant {name} created (policy: permissive default; set one with "
              f"`lodestore policy set {name} FILE`)")


@tenant.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def tenant_list(ctx: click.Context, as_json: bool) -> None:
    """List tenants."""
    names = open_volume(ctx).list_tenants()
    if as_json:
        click.echo(json.dumps(names))
    else:
        for n in names:
            click.echo(n)


# -- files ----------------------------------------------------------------------------

tenant_opt = click.option("--tenant", "-t", required=True, envvar="LODESTORE_TENANT",
                          help="Tenant whose namespace to use.")
role_opt = click.option("--role", default="admin", show_default=True,
                        help="Role to act as: the tenant's policy decides what it may do and see.")


class _Counting:
    def __init__(self, f: Any, advance: Any) -> None:
        self.f, self.advance = f, advance

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.advance(len(b))
        return b


@main.command()
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@click.argument("path")
@tenant_opt
@role_opt
@click.option("--expect-version", type=int, default=None,
              help="Only write if the file is at this version (0: only if it does not exist).")
@click.option("--append", is_flag=True, help="Append instead of replacing.")
@click.pass_context
def put(ctx: click.Context, local: str, path: str, tenant: str, role: str,
        expect_version: int | None, append: bool) -> None:
    """Store LOCAL (a file, or - for stdin) at PATH, classified and governed like any write."""
    gw = open_app(ctx).gateway
    who = admin(tenant, role)
    if append:
        data = sys.stdin.buffer.read() if local == "-" else Path(local).read_bytes()
        res = gw.write(who, path, data, mode="append", expected_version=expect_version)
    elif local == "-":
        res = gw.write(who, path, sys.stdin.buffer, expected_version=expect_version)
    else:
        size = os.path.getsize(local)
        with open(local, "rb") as f, _progress(transfer=True) as bar:
            task = bar.add_task(f"put {Path(local).name}", total=size)
            src = _Counting(f, lambda n: bar.advance(task, n))
            res = gw.write(who, path, src, expected_version=expect_version, size_hint=size)
    info = res.info
    extra = ""
    if res.labels:
        extra += f"  labels {','.join(res.labels)}"
    if res.redacted:
        extra += "  redacted " + ",".join(f"{k}x{v}" for k, v in sorted(res.redacted.items()))
    out.print(f"{info.path}  {_bytes(info.size)}  version {info.version}{extra}")


@main.command()
@click.argument("path")
@click.argument("local", type=click.Path(dir_okay=False, allow_dash=True))
@tenant_opt
@role_opt
@click.pass_context
def get(ctx: click.Context, path: str, local: str, tenant: str, role: str) -> None:
    """Copy PATH to LOCAL (or - for stdout); labels the role may not see come masked."""
    info, pieces = open_app(ctx).gateway.open_stream(admin(tenant, role), path)
    if local == "-":
        for piece in pieces:
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
        return
    tmp = f"{local}.lodestore-part"
    try:
        with open(tmp, "wb") as f, _progress(transfer=True) as bar:
            task = bar.add_task(f"get {Path(path).name}", total=info.size)
            for piece in pieces:
                f.write(piece)
                bar.advance(task, len(piece))
        os.replace(tmp, local)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    err.print(f"{local}  {_bytes(info.size)}  version {info.version}")


@main.command()
@click.argument("path", default="/")
@tenant_opt
@role_opt
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ls(ctx: click.Context, path: str, tenant: str, role: str, as_json: bool) -> None:
    """List a directory (or show one file)."""
    gw = open_app(ctx).gateway
    who = admin(tenant, role)
    info = gw.stat(who, path)
    items = [info]
    if info.is_dir:
        items, cursor = gw.list_dir(who, path)
        while cursor:
            more, cursor = gw.list_dir(who, path, cursor)
            items += more
    if as_json:
        click.echo(json.dumps([i.__dict__ for i in items], indent=1))
        return
    import datetime as dt

    for i in items:
        when = dt.datetime.fromtimestamp(i.mtime).strftime("%Y-%m-%d %H:%M")
        name = i.name + ("/" if i.is_dir else "")
        size = "-" if i.is_dir else _bytes(i.size)
        click.echo(f"{size:>10}  v{i.version:<4} {when}  {name}")


@main.command()
@click.argument("path")
@tenant_opt
@role_opt
@click.option("-r", "--recursive", is_flag=True, help="Remove a directory and everything in it.")
@click.pass_context
def rm(ctx: click.Context, path: str, tenant: str, role: str, recursive: bool) -> None:
    """Remove a file or directory."""
    open_app(ctx).gateway.delete(admin(tenant, role), path, recursive=recursive)


# -- maintenance ----------------------------------------------------------------------


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--quick", is_flag=True, help="Check placement and target health only, "
              "without reading fragments.")
@click.pass_context
def scrub(ctx: click.Context, as_json: bool, quick: bool) -> None:
    """Verify every fragment's checksums and every reference. Exit 1 if not clean."""
    from storage.maintenance import count_chunks
    from storage.maintenance import scrub as do_scrub

    vol = open_volume(ctx)
    with _progress() as bar:
        task = bar.add_task("scrub", total=count_chunks(vol))
        rep = do_scrub(vol, lambda n: bar.advance(task, n), deep=not quick)
    d = rep.as_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        for p in rep.problems[:50]:
            err.print(f"  {p}")
        out.print(
            f"scrub: {d['chunks']} chunks, {d['fragments_checked']} fragments checked; "
            f"{d['degraded_chunks']} degraded, {d['lost_chunks']} lost, "
            f"{d['dangling_references']} dangling, {d['orphan_fragments']} orphan fragments "
            f"(collected by `lodestore gc`)")
        out.print("clean" if rep.clean else "NOT clean: run `lodestore repair`")
    if not rep.clean:
        sys.exit(1)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def repair(ctx: click.Context, as_json: bool) -> None:
    """Rebuild missing or corrupt shares from k survivors onto healthy targets."""
    from storage.maintenance import count_chunks
    from storage.maintenance import repair as do_repair

    vol = open_volume(ctx)
    with _progress() as bar:
        task = bar.add_task("repair", total=count_chunks(vol))
        rep = do_repair(vol, lambda n: bar.advance(task, n))
    if as_json:
        click.echo(json.dumps(rep.as_dict(), indent=2))
    else:
        for p in rep.problems[:50]:
            err.print(f"  {p}")
        if rep.targets_recreated:
            out.print(f"recreated target folders: {', '.join(rep.targets_recreated)}")
        out.print(f"repair: {rep.chunks_repaired} chunks repaired, {rep.shares_rebuilt} shares "
                  f"rebuilt, {rep.still_degraded} still degraded, {rep.lost} lost")
    if rep.lost or rep.still_degraded:
        sys.exit(1)


@main.command()
@click.option("--grace", type=float, default=None,
              help="Seconds an unreferenced chunk is kept (default: the store's gc_grace_seconds).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def gc(ctx: click.Context, grace: float | None, as_json: bool) -> None:
    """Settle interrupted moves, empty the trash, delete unreferenced chunks."""
    from storage.maintenance import gc as do_gc

    rep = do_gc(open_volume(ctx), grace).as_dict()
    if as_json:
        click.echo(json.dumps(rep, indent=2))
    else:
        out.print("gc: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rep.items()))


# registers agent, policy, audit, serve and claude-config
from . import cli_gov, cli_serve  # noqa: E402,F401
from .bench import bench  # noqa: E402

main.add_command(bench)

if __name__ == "__main__":  # pragma: no cover
    # `python -m server.cli`: run the imported module's group, which has every command
    from server.cli import main as registered

    registered()

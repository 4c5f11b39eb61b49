"""Wiring: config → volume → principals → audit → QoS → gateway, for every entry point
(the CLI, the MCP server, workers). One place decides where things live in the home."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from governance.audit import AuditLog
from governance.gateway import Gateway
from governance.principals import Principal, Principals
from governance.qos import Scheduler
from storage import Volume, default_home


@dataclass
class App:
    vol: Volume
    principals: Principals
    audit: AuditLog
    gateway: Gateway

    def close(self) -> None:
        self.gateway.close()
        self.principals.close()
        self.vol.close()


def open_app(home: Path | str | None = None, *, transport: str = "cli", create: bool = True,
             scheduler: Scheduler | None = None) -> App:
    home = Path(home) if home is not None else default_home()
    vol = Volume.open(home, create=create)
    principals = Principals(vol.tenant_directory())
    audit = AuditLog(Path(vol.home) / "audit", fsync=vol.cfg.durability == "fsync")
    gateway = Gateway(vol, principals, audit, scheduler, transport=transport)
    return App(vol, principals, audit, gateway)


def admin(tenant: str, role: str = "admin", name: str = "cli") -> Principal:
    """The principal of an operator at the CLI: governed like any agent, audited as 'cli'."""
    return Principal(tenant, name, role)

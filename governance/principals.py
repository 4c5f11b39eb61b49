"""Tenants, agents, roles, tokens and policy versions: the control plane.

Tokens come from ``secrets`` and are shown once; only their SHA-256 is stored (a token
has 256 bits of entropy, so a fast hash is safe). Records live in the store's control
database (SQLite by default, any SQLAlchemy URL such as PostgreSQL).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from storage.errors import AlreadyExists, InvalidArgument, NotFound, UnknownTenant
from storage.meta.engines import make_engine
from storage.volume import TenantDirectory

from .errors import Unauthorized
from .policy import DEFAULT_POLICY, Compiled, Policy, parse_policy

TOKEN_PREFIX = "lds_"
AGENT_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ROLE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CACHE_SECONDS = 2.0  # how soon another process's revocation or policy change is seen

gov = MetaData()
agents_t = Table(
    "gov_agents", gov,
    Column("tenant", String(63), primary_key=True),
    Column("name", String(63), primary_key=True),
    Column("role", String(32), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("token_hint", String(16), nullable=False),
    Column("created", Float, nullable=False),
    Column("revoked", Float, nullable=True),
)
policies_t = Table(
    "gov_policies", gov,
    Column("tenant", String(63), primary_key=True),
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("document", Text, nullable=False),
    Column("created", Float, nullable=False),
    Column("author", String(128), nullable=False),
    Column("note", String(200), nullable=True),
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: resolved from a token on every request."""

    tenant: str
    agent: str
    role: str


@dataclass(frozen=True)
class AgentRecord:
    tenant: str
    name: str
    role: str
    token_hint: str
    created: float
    revoked: float | None


@dataclass(frozen=True)
class PolicyVersion:
    tenant: str
    version: int
    document: str
    created: float
    author: str
    note: str | None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Principals:
    def __init__(self, tenants: TenantDirectory) -> None:
        self.tenants = tenants
        self.engine = make_engine(tenants.control_url, tenants.durability)
        for attempt in range(100):
            try:
                gov.create_all(self.engine)
                break
            except Exception as exc:  # noqa: BLE001 - another process creating the schema
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
        self._tokens: dict[str, tuple[Principal | None, float]] = {}
        self._policies: dict[str, tuple[Compiled, float]] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        self.engine.dispose()

    # -- tenants ------------------------------------------------------------------------

    def add_tenant(self, tenant: str) -> None:
        if not self.tenants.create(tenant):
            raise AlreadyExists(f"tenant {tenant} already exists")

    def require_tenant(self, tenant: str) -> None:
        if tenant not in self.tenants.names():
            raise UnknownTenant(tenant)

    # -- agents -------------------------------------------------------------------------

    def add_agent(self, tenant: str, name: str, role: str = "agent") -> str:
        """Create an agent and return its token (the only time it is visible)."""
        self.require_tenant(tenant)
        if not AGENT_RE.match(name):
            raise InvalidArgument(
                f"agent name {name!r} must be 1-63 lower-case letters, digits, '.', '-', '_'")
        if not ROLE_RE.match(role):
            raise InvalidArgument(f"role {role!r} must be lower-case letters, digits, '-', '_'")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self.engine.begin() as c:
                c.execute(insert(agents_t).values(
                    tenant=tenant, name=name, role=role, token_hash=hash_token(token),
                    token_hint=token[:10], created=time.time(), revoked=None))
        except IntegrityError:
            raise AlreadyExists(
                f"agent {name} already exists in tenant {tenant}; revoke it first to re-issue"
            ) from None
        return token

    def reissue(self, tenant: str, name: str, role: str = "agent") -> str:
        """Mint a fresh token for an agent (used by ``serve --tenant --agent``)."""
        self.require_tenant(tenant)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.engine.begin() as c:
            res = c.execute(update(agents_t).where(
                agents_t.c.tenant == tenant, agents_t.c.name == name).values(
                token_hash=hash_token(token), token_hint=token[:10], revoked=None))
            if res.rowcount == 0:
                c.execute(insert(agents_t).values(
                    tenant=tenant, name=name, role=role, token_hash=hash_token(token),
                    token_hint=token[:10], created=time.time(), revoked=None))
        with self._lock:
            self._tokens.clear()
        return token

    def list_agents(self, tenant: str | None = None) -> list[AgentRecord]:
        q = select(agents_t).order_by(agents_t.c.tenant, agents_t.c.name)
        if tenant is not None:
            self.require_tenant(tenant)
            q = q.where(agents_t.c.tenant == tenant)
        with self.engine.connect() as c:
            return [AgentRecord(r.tenant, r.name, r.role, r.token_hint, r.created, r.revoked)
                    for r in c.execute(q)]

    def revoke(self, tenant: str, name: str) -> None:
        with self.engine.begin() as c:
            res = c.execute(update(agents_t).where(
                agents_t.c.tenant == tenant, agents_t.c.name == name,
                agents_t.c.revoked.is_(None)).values(revoked=time.time()))
        if res.rowcount == 0:
            self.require_tenant(tenant)
            raise NotFound(f"no active agent {name} in tenant {tenant}")
        with self._lock:
            self._tokens.clear()

    def authenticate(self, token: str | None) -> Principal:
        """The principal a token stands for; Unauthorized if missing, unknown or revoked."""
        if not token:
            raise Unauthorized("no token: pass an agent token (LODESTORE_TOKEN for stdio, "
                               "Authorization: Bearer for HTTP)")
        if not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise Unauthorized("malformed token: Lodestore tokens start with 'lds_'")
        h = hash_token(token)
        now = time.monotonic()
        hit = self._tokens.get(h)
        if hit is not None and hit[1] > now:
            if hit[0] is None:
                raise Unauthorized("unknown or revoked token")
            return hit[0]
        with self.engine.connect() as c:
            r = c.execute(select(agents_t).where(agents_t.c.token_hash == h)).first()
        p = None if r is None or r.revoked is not None else Principal(r.tenant, r.name, r.role)
        with self._lock:
            if len(self._tokens) > 10_000:
                self._tokens.clear()
            self._tokens[h] = (p, now + CACHE_SECONDS)
        if p is None:
            raise Unauthorized("unknown or revoked token")
        return p

    # -- policies -----------------------------------------------------------------------

    def set_policy(self, tenant: str, text: str, author: str = "cli", note: str | None = None,
                   source: str = "policy") -> PolicyVersion:
        self.require_tenant(tenant)
        parse_policy(text, source)  # validate before storing anything
        for _ in range(5):
            with self.engine.connect() as c:
                cur = c.execute(select(policies_t.c.version).where(
                    policies_t.c.tenant == tenant).order_by(policies_t.c.version.desc())
                ).scalar() or 0
            pv = PolicyVersion(tenant, cur + 1, text, time.time(), author, note)
            try:
                with self.engine.begin() as c:
                    c.execute(insert(policies_t).values(
                        tenant=tenant, version=pv.version, document=text, created=pv.created,
                        author=author, note=note))
            except IntegrityError:
                continue  # someone else set a version at the same moment
            with self._lock:
                self._policies.pop(tenant, None)
            return pv
        raise AlreadyExists("policy changed concurrently; retry")

    def policy_history(self, tenant: str) -> list[PolicyVersion]:
        self.require_tenant(tenant)
        with self.engine.connect() as c:
            rows = c.execute(select(policies_t).where(policies_t.c.tenant == tenant)
                             .order_by(policies_t.c.version)).all()
        return [PolicyVersion(r.tenant, r.version, r.document, r.created, r.author, r.note)
                for r in rows]

    def policy_version(self, tenant: str, version: int | None = None) -> PolicyVersion | None:
        q = select(policies_t).where(policies_t.c.tenant == tenant)
        q = (q.where(policies_t.c.version == version) if version is not None
             else q.order_by(policies_t.c.version.desc()).limit(1))
        with self.engine.connect() as c:
            r = c.execute(q).first()
        return None if r is None else PolicyVersion(
            r.tenant, r.version, r.document, r.created, r.author, r.note)

    def rollback_policy(self, tenant: str, version: int, author: str = "cli") -> PolicyVersion:
        old = self.policy_version(tenant, version)
        if old is None:
            self.require_tenant(tenant)
            raise NotFound(f"tenant {tenant} has no policy version {version}; "
                           f"see `lodestore policy history {tenant}`")
        return self.set_policy(tenant, old.document, author, note=f"rollback to v{version}")

    def policy(self, tenant: str) -> Compiled:
        """The tenant's current compiled policy (the permissive default if none is set)."""
        now = time.monotonic()
        hit = self._policies.get(tenant)
        if hit is not None and hit[1] > now:
            return hit[0]
        pv = self.policy_version(tenant)
        compiled = (Compiled.build(parse_policy(pv.document), pv.version) if pv
                    else Compiled.build(DEFAULT_POLICY, 0))
        with self._lock:
            self._policies[tenant] = (compiled, now + CACHE_SECONDS)
        return compiled

    def policy_model(self, tenant: str) -> Policy:
        return self.policy(tenant).policy


__all__ = ["Principal", "Principals", "AgentRecord", "PolicyVersion", "hash_token"]

"""Tenant policies: one YAML document per tenant, validated, versioned, compiled.

A policy says which PII entities to look for and what to do on write (tag, redact,
deny), which roles see which labels unmasked, which roles may read or write which path
prefixes, the tenant's QoS and quotas, and memory retention. Decisions run on a compiled
form (longest-prefix rules, frozen sets) so a check costs microseconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.config import one_line

from .errors import PolicyError

ROLE_RE = re.compile(r"^(\*|[a-z][a-z0-9_-]{0,31})$")
ENTITY_RE = re.compile(r"^[A-Z][A-Z0-9_]{1,63}$")
Action = Literal["tag", "redact", "deny"]
Priority = Literal["interactive", "batch", "background"]

DEFAULT_ENTITIES = (
    "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "US_SSN", "IBAN_CODE", "IP_ADDRESS",
    "US_BANK_NUMBER", "US_PASSPORT", "US_DRIVER_LICENSE", "US_ITIN", "CRYPTO", "UK_NHS",
    "MEDICAL_LICENSE",
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EntityRule(_Model):
    action: Action = "tag"
    threshold: float = Field(0.5, ge=0.0, le=1.0)


def _default_entities() -> dict[str, EntityRule]:
    return {e: EntityRule() for e in DEFAULT_ENTITIES}


class PiiPolicy(_Model):
    enabled: bool = True
    entities: dict[str, EntityRule] = Field(default_factory=_default_entities)
    ner_model: str | None = None  # an installed spaCy model name enables NER entities

    @field_validator("entities")
    @classmethod
    def _names(cls, v: dict[str, EntityRule]) -> dict[str, EntityRule]:
        for name in v:
            if not ENTITY_RE.match(name):
                raise ValueError(f"entity {name!r} must be an upper-case presidio entity name "
                                 "such as EMAIL_ADDRESS")
        return v


class PathRule(_Model):
    prefix: str
    read: list[str] = Field(default_factory=lambda: ["*"])
    write: list[str] = Field(default_factory=lambda: ["*"])

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not v.startswith("/") or "\x00" in v or "/../" in f"{v}/" or "/./" in f"{v}/":
            raise ValueError("prefix must be an absolute path like /finance")
        return v.rstrip("/") or "/"

    @field_validator("read", "write")
    @classmethod
    def _roles(cls, v: list[str]) -> list[str]:
        return _check_roles(v)


def _check_roles(v: list[str]) -> list[str]:
    for r in v:
        if not ROLE_RE.match(r):
            raise ValueError(f"role {r!r} must be '*' or lower-case letters, digits, '-', '_'")
    return v


class QosSpec(_Model):
    ops_per_second: float | None = Field(None, gt=0)
    bytes_per_second: float | None = Field(None, gt=0)
    burst: float | None = Field(None, gt=0)
    priority: Priority = "interactive"
    max_concurrency: int | None = Field(None, ge=1)
    weight: float = Field(1.0, gt=0)
    max_wait_ms: int = Field(2000, ge=0, le=60_000)


class Quotas(_Model):
    bytes: int | None = Field(None, ge=0)
    files: int | None = Field(None, ge=0)


class MemoryPolicy(_Model):
    retention_days: float | None = Field(None, gt=0)
    share_sessions: bool = False
    shared_memories: bool = True  # agents may write tenant-shared memories


class Policy(_Model):
    """The whole document. Every field has a permissive default (a dev tenant)."""

    description: str = ""
    pii: PiiPolicy = Field(default_factory=PiiPolicy)
    clearance: dict[str, list[str]] = Field(default_factory=lambda: {"*": ["*"]})
    paths: list[PathRule] = Field(default_factory=lambda: [PathRule(prefix="/")])
    qos: QosSpec = Field(default_factory=QosSpec)
    quotas: Quotas = Field(default_factory=Quotas)
    memory: MemoryPolicy = Field(default_factory=MemoryPolicy)

    @field_validator("clearance")
    @classmethod
    def _clearance(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        _check_roles(list(v))
        for role, labels in v.items():
            for label in labels:
                if label != "*" and not ENTITY_RE.match(label):
                    raise ValueError(f"clearance of role {role!r}: {label!r} is not '*' or an "
                                     "entity name such as EMAIL_ADDRESS")
        return v


def _allowed_fields(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc``'s parent, for 'unknown field' messages."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int) or cur is None:
            continue
        field = getattr(cur, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        cur = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
    return sorted(getattr(cur, "model_fields", {}))


def parse_policy(text: str, source: str = "policy") -> Policy:
    """Parse and validate a YAML policy; errors name the field and what is allowed."""
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source} is not valid YAML: {one_line(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PolicyError(f"{source} must be a mapping of settings, got {type(data).__name__}")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        msgs = []
        for err in exc.errors()[:5]:
            loc = tuple(err["loc"])
            where = ".".join(str(p) for p in loc) or "(document)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                allowed = _allowed_fields(Policy, loc)
                msg = "unknown field" + (f"; allowed here: {', '.join(allowed)}" if allowed else "")
            elif err["type"] == "literal_error":
                msg = f"{msg} (got {err.get('input')!r})"
            msgs.append(f"field `{where}`: {msg}")
        raise PolicyError(f"{source} is invalid: " + "; ".join(msgs)) from None


@dataclass(frozen=True)
class Compiled:
    """A policy in the shape decisions need."""

    policy: Policy
    version: int
    rules: tuple[tuple[str, frozenset[str], frozenset[str]], ...]  # longest prefix first
    clear: dict[str, frozenset[str]]
    actions: dict[str, str]
    thresholds: dict[str, float]

    @classmethod
    def build(cls, policy: Policy, version: int = 0) -> Compiled:
        rules = sorted(((r.prefix, frozenset(r.read), frozenset(r.write)) for r in policy.paths),
                       key=lambda r: len(r[0]), reverse=True)
        return cls(
            policy=policy,
            version=version,
            rules=tuple(rules),
            clear={role: frozenset(labels) for role, labels in policy.clearance.items()},
            actions={e: r.action for e, r in policy.pii.entities.items()},
            thresholds={e: r.threshold for e, r in policy.pii.entities.items()},
        )

    def _rule(self, path: str) -> tuple[str, frozenset[str], frozenset[str]] | None:
        for rule in self.rules:
            p = rule[0]
            if p == "/" or path == p or path.startswith(p + "/"):
                return rule
        return None

    def can_read(self, role: str, path: str) -> bool:
        rule = self._rule(path)
        return rule is not None and ("*" in rule[1] or role in rule[1])

    def can_write(self, role: str, path: str) -> bool:
        rule = self._rule(path)
        return rule is not None and ("*" in rule[2] or role in rule[2])

    def can_list(self, role: str, path: str) -> bool:
        """A directory is listable if the role may read it or anything below it."""
        if self.can_read(role, path):
            return True
        base = path.rstrip("/") + "/"
        return any(p.startswith(base) and ("*" in r or role in r) for p, r, _w in self.rules)

    def cleared_labels(self, role: str) -> frozenset[str]:
        own = self.clear.get(role, frozenset())
        return own | self.clear.get("*", frozenset())

    def is_cleared(self, role: str, label: str) -> bool:
        labels = self.cleared_labels(role)
        return "*" in labels or label in labels

    def action_for(self, entity: str) -> str | None:
        return self.actions.get(entity)


DEFAULT_POLICY = Policy()

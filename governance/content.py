"""What policy does to content: redaction and tagging on write, masking on read.

Classifier findings arrive as character offsets in text; everything stored is in byte
offsets of the UTF-8 content actually kept, so a ranged read can be masked without
decoding the whole file. Masks keep the byte length (``*`` per byte), so offsets stay
valid for paging. Only entity *types* ever leave this module in labels and messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import DeniedByPolicy
from .policy import Compiled

MASK = ord("*")


class FindingLike(Protocol):
    entity_type: str
    start: int
    end: int
    score: float


@dataclass
class WriteDecision:
    """The outcome of policy on one piece of text about to be stored."""

    content: bytes
    spans: list[tuple[int, int, str]] = field(default_factory=list)  # byte offsets, tagged
    labels: list[str] = field(default_factory=list)  # entity types present (tag or redact)
    redacted: dict[str, int] = field(default_factory=dict)  # entity type -> count

    def attrs(self, policy_version: int, scanned: str) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "spans": [list(s) for s in self.spans],
            "redacted": self.redacted,
            "policy_version": policy_version,
            "scanned": scanned,
        }


def _merge_overlaps(found: list[tuple[int, int, str, str]]) -> list[tuple[int, int, str, str]]:
    """Resolve overlapping findings: the stricter action wins, then the longer span."""
    rank = {"deny": 3, "redact": 2, "tag": 1}
    found.sort(key=lambda f: (f[0], -(f[1] - f[0])))
    out: list[tuple[int, int, str, str]] = []
    for f in found:
        if out and f[0] < out[-1][1]:
            prev = out[-1]
            keep = f if rank[f[3]] > rank[prev[3]] else prev
            out[-1] = (prev[0], max(prev[1], f[1]), keep[2], keep[3])
        else:
            out.append(f)
    return out


def decide(path: str, text: str, findings: Iterable[FindingLike], policy: Compiled,
           encoding: str = "utf-8") -> WriteDecision:
    """Apply the tenant's per-entity actions. Raises DeniedByPolicy naming entity types.

    ``encoding`` is how ``text`` was decoded; content is re-encoded the same way, so
    unredacted content is stored byte for byte as it came.
    """
    acted: list[tuple[int, int, str, str]] = []
    for f in findings:
        action = policy.action_for(f.entity_type)
        if action is None or f.score < policy.thresholds.get(f.entity_type, 0.5):
            continue
        acted.append((f.start, f.end, f.entity_type, action))
    denied = [f[2] for f in acted if f[3] == "deny"]
    if denied:
        raise DeniedByPolicy(path, denied)
    if not acted:
        return WriteDecision(text.encode(encoding))
    acted = _merge_overlaps(acted)
    parts: list[bytes] = []
    spans: list[tuple[int, int, str]] = []
    redacted: dict[str, int] = {}
    labels: set[str] = set()
    pos_char = 0
    pos_byte = 0
    for start, end, entity, action in acted:
        before = text[pos_char:start].encode(encoding)
        parts.append(before)
        pos_byte += len(before)
        labels.add(entity)
        if action == "redact":
            piece = f"<{entity}>".encode()
            redacted[entity] = redacted.get(entity, 0) + 1
        else:
            piece = text[start:end].encode(encoding)
            spans.append((pos_byte, pos_byte + len(piece), entity))
        parts.append(piece)
        pos_byte += len(piece)
        pos_char = end
    parts.append(text[pos_char:].encode(encoding))
    return WriteDecision(b"".join(parts), spans, sorted(labels), redacted)


def shift_attrs(old: dict[str, Any] | None, new: dict[str, Any], offset: int) -> dict[str, Any]:
    """Attributes of ``old`` content followed by ``new`` content appended at ``offset``."""
    if not old:
        old = {"labels": [], "spans": [], "redacted": {}}
    redacted = dict(old.get("redacted") or {})
    for k, v in (new.get("redacted") or {}).items():
        redacted[k] = redacted.get(k, 0) + v
    return {
        "labels": sorted(set(old.get("labels") or []) | set(new.get("labels") or [])),
        "spans": list(old.get("spans") or []) + [[s + offset, e + offset, t]
                                                   for s, e, t in new.get("spans") or []],
        "redacted": redacted,
        "policy_version": new.get("policy_version"),
        "scanned": new.get("scanned") if old.get("scanned") in (None, new.get("scanned"))
        else "mixed",
    }


def mask(data: bytes, offset: int, spans: Sequence[Sequence[Any]], role: str,
         policy: Compiled) -> tuple[bytes, list[str]]:
    """Mask the parts of ``data`` (read at ``offset``) whose labels ``role`` may not see.

    Returns the bytes to hand out and the entity types that were masked.
    """
    if not spans:
        return data, []
    cleared = policy.cleared_labels(role)
    if "*" in cleared:
        return data, []
    end = offset + len(data)
    out: bytearray | None = None
    masked: set[str] = set()
    for s, e, label in spans:
        if e <= offset or s >= end or label in cleared:
            continue
        if out is None:
            out = bytearray(data)
        a, b = max(s, offset) - offset, min(e, end) - offset
        out[a:b] = bytes([MASK]) * (b - a)
        masked.add(label)
    return (bytes(out) if out is not None else data), sorted(masked)


def visible_text(text_bytes: bytes, spans: Sequence[Sequence[Any]], role: str,
                 policy: Compiled) -> bytes:
    """The whole content as ``role`` may see it (for search indexes and snippets)."""
    return mask(text_bytes, 0, spans, role, policy)[0]

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


def decide(path: str, text: str, findings: Iterable[FindingLike], policy: Compiled,
           encoding: str = "utf-8", source: bytes | None = None) -> WriteDecision:
    """Apply the tenant's per-entity actions. Raises DeniedByPolicy naming entity types.

    ``encoding`` is how ``text`` was decoded; content is re-encoded the same way, so
    unredacted content is stored byte for byte as it came. With ``source`` (binary
    content scanned through a one-byte-per-character view), redactions overwrite the
    original bytes with ``*`` in place so the file keeps its length and structure.

    Every finding keeps its own label: a value found as two entity types is masked for
    a reader cleared for only one of them. Overlapping redactions merge into one marker
    naming all their types, and a tagged span touching a redaction is redacted too.
    """
    acted: list[tuple[int, int, str, str, float]] = []
    for f in findings:
        action = policy.action_for(f.entity_type)
        if action is None or f.score < policy.thresholds.get(f.entity_type, 0.5):
            continue
        acted.append((f.start, f.end, f.entity_type, action, f.score))
    denied = [f[2] for f in acted if f[3] == "deny"]
    if denied:
        raise DeniedByPolicy(path, denied)
    if not acted:
        return WriteDecision(source if source is not None else text.encode(encoding))
    # redaction regions: overlapping redactions merge; the marker names the type found
    # with the highest score; a tagged span touching a region is swallowed by it
    regions: list[list] = []  # [start, end, redacted types, best (score, type)]
    for s, e, t, _a, sc in sorted(x for x in acted if x[3] == "redact"):
        if regions and s < regions[-1][1]:
            r = regions[-1]
            r[1] = max(r[1], e)
            r[2].add(t)
            r[3] = max(r[3], (sc, t))
        else:
            regions.append([s, e, {t}, (sc, t)])
    pending = [(s, e, t) for s, e, t, a, _sc in acted if a == "tag"]
    changed = True
    while changed:  # a region grown by one tag may reach the next
        changed = False
        keep = []
        for s, e, t in pending:
            hit = next((r for r in regions if s < r[1] and e > r[0]), None)
            if hit is None:
                keep.append((s, e, t))
            else:
                hit[0], hit[1] = min(hit[0], s), max(hit[1], e)
                changed = True
        pending = keep
    tags = pending
    regions.sort()
    labels = {x[2] for x in acted}
    redacted: dict[str, int] = {}
    for _s, _e, types, _best in regions:
        for t in types:
            redacted[t] = redacted.get(t, 0) + 1
    # build the output and a map from text positions to output byte offsets
    out: list[bytes] = []
    segs: list[tuple[int, int, int]] = []  # plain text [start, end) -> output byte start
    pos, nbytes = 0, 0
    for s, e, _types, best in regions:
        plain = text[pos:s].encode(encoding) if source is None else source[pos:s]
        segs.append((pos, s, nbytes))
        out.append(plain)
        nbytes += len(plain)
        marker = f"<{best[1]}>".encode(encoding) if source is None else b"*" * (e - s)
        out.append(marker)
        nbytes += len(marker)
        pos = e
    segs.append((pos, len(text), nbytes))
    out.append(text[pos:].encode(encoding) if source is None else source[pos:])

    # text position -> output byte offset, one pass over the sorted boundaries
    where: dict[int, int] = {}
    wanted = sorted({p for s, e, _t in tags for p in (s, e)})
    k = 0
    for a, b, ob in segs:
        prev, off = a, ob
        while k < len(wanted) and wanted[k] <= b:
            p = wanted[k]
            if p >= a:
                off += (p - prev) if source is not None else len(text[prev:p].encode(encoding))
                prev = p
                where[p] = off
            k += 1
    spans = sorted((where[s], where[e], t) for s, e, t in tags)
    return WriteDecision(b"".join(out), spans, sorted(labels), redacted)


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

"""Background work over a volume: scrub, repair, garbage collection and status.

All of it is safe to run while the volume serves traffic: scrub only reads, repair writes
new shares before switching the registry, and collection deletes only what has been
unreferenced for longer than the grace period.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import paths
from .chunks import parse_fragment_key
from .errors import DataLost, StorageError
from .meta import ROOT_INO, ChunkRecord, Entry
from .meta.store import unpack_pending
from .volume import Volume, unpack_refs

Progress = Callable[[int], None]


@dataclass
class ScrubReport:
    chunks: int = 0
    fragments_checked: int = 0
    healthy_chunks: int = 0
    degraded: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    lost: list[tuple[str, str]] = field(default_factory=list)
    dangling: list[tuple[str, str, str]] = field(default_factory=list)  # tenant, entry, chunk
    unsettled_moves: int = 0
    orphan_fragments: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.degraded or self.lost or self.dangling)

    def as_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "chunks": self.chunks,
            "fragments_checked": self.fragments_checked,
            "healthy_chunks": self.healthy_chunks,
            "degraded_chunks": len(self.degraded),
            "lost_chunks": len(self.lost),
            "dangling_references": len(self.dangling),
            "unsettled_moves": self.unsettled_moves,
            "orphan_fragments": self.orphan_fragments,
            "problems": self.problems[:100],
        }


@dataclass
class RepairReport:
    chunks_repaired: int = 0
    shares_rebuilt: int = 0
    still_degraded: int = 0
    lost: int = 0
    targets_recreated: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"problems": self.problems[:100]}


@dataclass
class GcReport:
    moves_settled: int = 0
    trash_entries_removed: int = 0
    orphan_entries_removed: int = 0
    chunks_deleted: int = 0
    orphan_fragments_deleted: int = 0
    temp_files_deleted: int = 0
    kv_packs_deleted: int = 0  # token-warehouse packs no index entry points to

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def count_chunks(vol: Volume) -> int:
    return vol.meta.count_chunks()


def _live_refs(vol: Volume) -> Iterator[tuple[str, str, str]]:
    """(tenant, entry name, chunk id) for every chunk referenced by any row, including
    the pending side of an unfinished move."""
    for e, _state, pending in vol.meta.iter_entries():
        for cid, _n in unpack_refs(e.chunks):
            yield e.tenant, e.name, cid.hex()
        if pending:
            p = unpack_pending(pending)
            for cid, _n in unpack_refs(p.chunks):
                yield p.tenant, p.name, cid.hex()


def scrub(vol: Volume, progress: Progress | None = None, deep: bool = True) -> ScrubReport:
    """Verify every fragment's checksums (``deep``) and every reference.

    Degraded: some share missing or corrupt but at least k intact. Lost: fewer than k.
    Dangling: an entry references a chunk with no registry record.
    """
    rep = ScrubReport()
    healthy = {t.id: t.health().healthy for t in vol.targets}
    known: set[tuple[str, str]] = set()
    pool = vol.chunks.io

    def check(rec: ChunkRecord) -> tuple[ChunkRecord, list[int], list[str]]:
        bad, why = [], []
        for i in range(rec.m):
            tid = rec.placement[i] if i < len(rec.placement) else ""
            if deep:
                err = vol.chunks.check_share(rec, i)
            else:
                err = None if tid and healthy.get(tid) else f"target {tid or '-'} unavailable"
            if err is not None:
                bad.append(i)
                why.append(f"share {i}: {err}")
        return rec, bad, why

    def handle(rec: ChunkRecord, bad: list[int], why: list[str]) -> None:
        rep.chunks += 1
        rep.fragments_checked += rec.m
        if not bad:
            rep.healthy_chunks += 1
        elif rec.m - len(bad) >= rec.k:
            rep.degraded[(rec.tenant, rec.cid)] = bad
            rep.problems.append(f"degraded chunk {rec.tenant}/{rec.cid[:16]}: {'; '.join(why)}")
        else:
            rep.lost.append((rec.tenant, rec.cid))
            rep.problems.append(f"LOST chunk {rec.tenant}/{rec.cid[:16]}: {'; '.join(why)}")
        if progress:
            progress(1)

    window: list = []
    for rec in vol.meta.iter_chunks():
        known.add((rec.tenant, rec.cid))
        window.append(pool.submit(check, rec))
        if len(window) >= 64:
            handle(*window.pop(0).result())
    for fut in window:
        handle(*fut.result())

    for tenant, name, cid in _live_refs(vol):
        if (tenant, cid) not in known:
            rep.dangling.append((tenant, name, cid))
            rep.problems.append(f"entry {name!r} of {tenant} references missing chunk {cid[:16]}")
    for _e, state, _p in vol.meta.iter_entries():
        if state:
            rep.unsettled_moves += 1
    for t in vol.targets:
        if not healthy.get(t.id):
            continue
        try:
            for obj in t.list():
                parsed = parse_fragment_key(obj.key)
                if parsed and (parsed[0], parsed[1]) not in known:
                    rep.orphan_fragments += 1
        except StorageError as exc:
            rep.problems.append(f"cannot list target {t.id}: {exc}")
    return rep


def repair(vol: Volume, progress: Progress | None = None) -> RepairReport:
    """Recreate missing target folders, then rebuild every missing or corrupt share."""
    rep = RepairReport()
    for t in vol.targets:
        h = t.health()
        if not h.healthy:
            try:
                t.ensure()
                if t.health().healthy:
                    rep.targets_recreated.append(t.id)
            except StorageError as exc:
                rep.problems.append(f"target {t.id} stays unavailable: {exc}")
    healthy = {t.id: t.health().healthy for t in vol.targets}
    for rec in vol.meta.iter_chunks():
        bad = [i for i in range(rec.m) if vol.chunks.check_share(rec, i) is not None]
        if bad:
            try:
                _new, still = vol.chunks.repair(rec, bad, lambda tid: healthy.get(tid, False))
            except DataLost as exc:
                rep.lost += 1
                rep.problems.append(str(exc))
            else:
                rep.chunks_repaired += 1
                rep.shares_rebuilt += len(bad) - len(still)
                if still:
                    rep.still_degraded += 1
                    rep.problems.append(
                        f"chunk {rec.tenant}/{rec.cid[:16]}: no healthy target left for "
                        f"shares {still}; add targets (`lodestore target add`) and repair again"
                    )
        if progress:
            progress(1)
    return rep


def _remove_orphan_entries(vol: Volume) -> int:
    """Entries created in a directory that another process deleted at the same moment
    (its directory cache was stale) hang under an inode no directory has: remove them."""
    dirs: set[tuple[str, int]] = set()
    parents: list[Entry] = []
    for e, _state, _p in vol.meta.iter_entries():
        if e.is_dir:
            dirs.add((e.tenant, e.ino))
        if e.parent != ROOT_INO:
            parents.append(e)
    removed = 0
    for e in parents:
        if (e.tenant, e.parent) in dirs:
            continue
        try:
            vol.meta.remove(e, to_trash=e.is_dir)
            removed += 1
        except StorageError:
            continue
    if removed:
        vol.empty_trash()
    return removed


def _sweep_warehouse(vol: Volume, grace: float) -> int:
    """Token-warehouse packs a crash left without index entries (before their chunks are
    judged: a deleted pack's chunks become collectable in the same run)."""
    from .warehouse import TokenWarehouse

    tenants = [t for t in vol.list_tenants() if vol.exists(t, "/" + paths.RESERVED_ROOT)]
    if not tenants:
        return 0
    wh = TokenWarehouse(vol, hot_bytes=0)
    try:
        return sum(wh.sweep_packs(t, grace) for t in tenants)
    finally:
        wh.close()


def gc(vol: Volume, grace: float | None = None) -> GcReport:
    """Settle interrupted moves, empty the trash, and delete chunks, orphan fragments and
    temp files unreferenced for longer than ``grace`` seconds."""
    grace = vol.cfg.gc_grace_seconds if grace is None else grace
    rep = GcReport()
    rep.moves_settled = vol.meta.settle_all()
    rep.trash_entries_removed = vol.empty_trash()
    rep.orphan_entries_removed = _remove_orphan_entries(vol)
    rep.kv_packs_deleted = _sweep_warehouse(vol, grace)
    cutoff = time.time() - grace
    live = {(t, c) for t, _n, c in _live_refs(vol)}
    registered: set[tuple[str, str]] = set()
    for rec in vol.meta.iter_chunks():
        key = (rec.tenant, rec.cid)
        if key in live or rec.touched >= cutoff:
            registered.add(key)
            continue
        if vol.meta.chunk_delete_if_idle(rec.tenant, rec.cid, cutoff):
            vol.chunks.delete_fragments(rec)
            rep.chunks_deleted += 1
        else:
            registered.add(key)
    for t in vol.targets:
        if not t.health().healthy:
            continue
        for obj in t.list():
            parsed = parse_fragment_key(obj.key)
            if parsed is None or obj.mtime >= cutoff:
                continue
            key = (parsed[0], parsed[1])
            # re-check the registry: a writer may have registered the chunk since we listed
            if key not in registered and key not in live and vol.meta.chunk_get(*key) is None:
                t.delete(obj.key)
                rep.orphan_fragments_deleted += 1
        temp_files = getattr(t, "temp_files", None)
        if temp_files is not None:
            for path in list(temp_files(grace)):
                try:
                    os.unlink(path)
                    rep.temp_files_deleted += 1
                except OSError:
                    pass
    return rep


def status(vol: Volume) -> dict[str, Any]:
    """The store at a glance; cheap enough to call often (no fragment reads)."""
    targets = []
    healthy: dict[str, bool] = {}
    for t, spec in zip(vol.targets, vol.cfg.targets, strict=True):
        h = t.health()
        healthy[t.id] = h.healthy
        targets.append({
            "id": t.id, "url": _redact_url(spec.url), "healthy": h.healthy, "detail": h.detail,
            "capacity_bytes": h.capacity_bytes, "free_bytes": h.free_bytes,
        })
    files = dirs = total = 0
    engines = []
    for idx, (url, t) in enumerate(zip(vol.meta.urls, vol.meta.totals(), strict=True)):
        files += t["files"]
        dirs += t["directories"]
        total += t["bytes"]
        engines.append({
            "url": _redact_url(url),
            "virtual_shards": sum(1 for e in vol.meta.shard_map if e == idx),
            "files": t["files"],
        })
    degraded = 0
    n_chunks = 0
    stored = 0
    for rec in vol.meta.iter_chunks():
        n_chunks += 1
        stored += rec.share_len * rec.m
        if any(not p or not healthy.get(p, False) for p in rec.placement):
            degraded += 1
    return {
        "home": str(vol.home),
        "targets": targets,
        "metadata": {"engines": engines, "virtual_shards": vol.meta.vshards},
        "erasure": {"k": vol.cfg.k, "m": vol.cfg.m, "chunk_size": vol.cfg.chunk_size},
        "tenants": len(vol.list_tenants()),
        "files": files,
        "directories": dirs,
        "bytes": total,
        "chunks": n_chunks,
        "stored_bytes": stored,
        "degraded_chunks": degraded,
    }


def _redact_url(url: str) -> str:
    """Hide passwords and secret query values in URLs shown to people."""
    import re

    url = re.sub(r"://([^:/@]+):[^@/]+@", r"://\1:***@", url)
    return re.sub(r"((?:secret|password|token)[^=&]*=)[^&]+", r"\1***", url, flags=re.I)

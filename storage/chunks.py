"""The chunk layer: content-addressed, erasure-coded chunks on many targets.

A chunk id is ``blake3(chunk, key=tenant key)``: identical chunks are stored once per
tenant, and never shared across tenants (their keys differ). Share i of a chunk is placed
on the i-th target of the rendezvous ranking of the chunk id, skipping targets that are
down; the registry records where each share went, so repair can move a share elsewhere.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import blake3
import xxhash

from . import erasure, fragment
from .errors import CorruptFragment, DataLost, NotFound, StorageError, TargetUnavailable
from .meta import ChunkRecord, MetaStore
from .targets import Target

DOWN_SECONDS = 5.0  # how long a failing target is skipped by writers


def fragment_key(tenant: str, cid: str, index: int) -> str:
    return f"{tenant}/{cid[:2]}/{cid}.{index}"


def parse_fragment_key(key: str) -> tuple[str, str, int] | None:
    try:
        tenant, _a, name = key.split("/")
        cid, idx = name.rsplit(".", 1)
        return tenant, cid, int(idx)
    except ValueError:
        return None



class _LRU:
    """At most ``size`` entries and, with ``weigh``, at most ``max_weight`` in all."""

    def __init__(self, size: int, max_weight: int = 0,
                 weigh: Callable[[Any], int] | None = None) -> None:
        self.size = size
        self.max_weight, self.weigh, self.weight = max_weight, weigh, 0
        self.d: OrderedDict = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key):  # type: ignore[no-untyped-def]
        with self.lock:
            v = self.d.get(key)
            if v is not None:
                self.d.move_to_end(key)
            return v

    def put(self, key, value) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            old = self.d.pop(key, None)
            if self.weigh is not None:
                self.weight += self.weigh(value) - (self.weigh(old) if old is not None else 0)
            self.d[key] = value
            while len(self.d) > self.size or (self.weigh is not None and len(self.d) > 1
                                              and self.weight > self.max_weight):
                _, gone = self.d.popitem(last=False)
                if self.weigh is not None:
                    self.weight -= self.weigh(gone)

    def pop(self, key) -> None:  # type: ignore[no-untyped-def]
        with self.lock:
            gone = self.d.pop(key, None)
            if gone is not None and self.weigh is not None:
                self.weight -= self.weigh(gone)


# column fetches started ahead: (lo, hi) of the share columns and share index -> future
Prefetch = tuple[int, int, dict[int, Future]]


class WriteBatch:
    """Work a multi-chunk write finishes once, before it commits its entry: registry
    updates (one transaction per engine) and deferred folder fsyncs (one per folder)."""

    def __init__(self) -> None:
        self.records: list[ChunkRecord | tuple[str, str]] = []
        self.syncs: dict[str, set[str]] = {}


class ChunkStore:
    def __init__(
        self, meta: MetaStore, targets: list[Target], k: int, m: int, block_size: int,
        io_threads: int = 16,
    ) -> None:
        self.meta = meta
        self.targets = {t.id: t for t in targets}
        self.order = [t.id for t in targets]
        self.k, self.m, self.block_size = k, m, block_size
        self.layout = fragment.FORMAT_VERSION  # of new fragments (older ones stay readable)
        self.min_shares = min(m, k + 1)
        self.io = ThreadPoolExecutor(io_threads, thread_name_prefix="lodestore-io")
        self._records = _LRU(65536)
        # checksum tables of layout-3 fragments (~2 KiB per MiB of share); fragments are
        # content-addressed and immutable, so a cached table never goes stale. Bounded in
        # bytes too: a 32 MiB warehouse pack's shares have 16 KiB tables, a 256 MiB chunk's
        # 130 KiB, and 8,192 of those would be 1 GiB.
        self._tables = _LRU(8192, 32 << 20, lambda t: len(t.blocks) + len(t.segments))
        self._down: dict[str, float] = {}
        # Encoding runs at most one chunk per core at a time. Why: a multi-chunk write
        # starts many chunks at once; encoding them all together makes every one finish
        # late and leaves the disks idle meanwhile, while one per core hands the first
        # chunks to the disks after one encode and keeps writes and encodes overlapped.
        self._cpu = threading.Semaphore(max(1, os.cpu_count() or 1))

    def close(self) -> None:
        self.io.shutdown(wait=True)
        for t in self.targets.values():
            t.close()

    # -- identity and placement --------------------------------------------------------

    def chunk_id(self, tenant: str, data: bytes | memoryview) -> str:
        key = self.meta.tenant_key(tenant)
        return blake3.blake3(data, key=key, max_threads=1).hexdigest()

    def rank(self, cid: str) -> list[str]:
        """Rendezvous order of all targets for ``cid``: stable as targets come and go."""
        return sorted(self.order, key=lambda t: xxhash.xxh64_intdigest(f"{t}\x00{cid}".encode()),
                      reverse=True)

    def mark_down(self, tid: str) -> None:
        self._down[tid] = time.monotonic() + DOWN_SECONDS

    def is_down(self, tid: str) -> bool:
        until = self._down.get(tid)
        return until is not None and until > time.monotonic()

    def record(self, tenant: str, cid: str, refresh: bool = False) -> ChunkRecord:
        key = (tenant, cid)
        rec = None if refresh else self._records.get(key)
        if rec is None:
            rec = self.meta.chunk_get(tenant, cid)
            if rec is None:
                raise DataLost(f"chunk {cid[:16]}… of tenant {tenant} is not in the registry")
            self._records.put(key, rec)
        return rec

    # -- writes ------------------------------------------------------------------------

    def store(self, tenant: str, data: bytes | memoryview,
              batch: WriteBatch | None = None) -> tuple[bytes, int]:
        """Store one chunk (deduplicated within the tenant); returns (raw id, length).

        With ``batch``, the registry update (a new record, or a touch of a known chunk)
        and the folder fsyncs are left for the caller to finish with ``finish(batch)``
        before it commits the entry that uses the chunks.
        """
        cid = self.chunk_id(tenant, data)
        known = self.meta.chunk_get(tenant, cid)
        if known is not None and known.length == len(data) and all(known.placement):
            if batch is not None:
                batch.records.append((tenant, cid))
            else:
                self.meta.chunk_touch(tenant, cid)
            return bytes.fromhex(cid), len(data)
        with self._cpu:
            shares = erasure.encode(data, self.k, self.m)
            slen = len(shares[0])
            frags = [
                fragment.encode_parts(
                    fragment.FragmentHeader(self.k, self.m, i, self.block_size, len(data),
                                            slen, bytes.fromhex(cid), self.layout),
                    shares[i],
                )
                for i in range(self.m)
            ]
            del shares
        placement = self._place(tenant, cid, frags, batch)
        now = time.time()
        rec = ChunkRecord(tenant, cid, len(data), self.k, self.m, slen, self.block_size,
                          tuple(placement), now, now, self.layout)
        if batch is not None:
            batch.records.append(rec)
        else:
            self.meta.chunk_put(rec)
        self._records.put((tenant, cid), rec)
        return bytes.fromhex(cid), len(data)

    def finish(self, batch: WriteBatch) -> None:
        """Make a batch's fragments durable, then register its chunks."""
        futs = [self.io.submit(self.targets[tid].sync, folders)
                for tid, folders in batch.syncs.items() if folders]
        for f in futs:
            f.result()
        self.meta.chunk_put_many(batch.records)

    def _place(self, tenant: str, cid: str, frags: list[list],
               batch: WriteBatch | None = None) -> list[str]:
        ranked = [t for t in self.rank(cid) if not self.is_down(t)]
        ranked += [t for t in self.rank(cid) if t not in ranked]  # down ones as last resort
        placement = [""] * self.m
        spare = ranked[self.m :]
        errors: list[str] = []

        def put(i: int, tid: str) -> tuple[int, str, Exception | None]:
            try:
                pending = batch.syncs.setdefault(tid, set()) if batch is not None else None
                self.targets[tid].put(fragment_key(tenant, cid, i), frags[i], pending)
                return i, tid, None
            except StorageError as exc:
                return i, tid, exc

        pending = [self.io.submit(put, i, ranked[i]) for i in range(min(self.m, len(ranked)))]
        started = list(pending)
        try:
            while pending:
                nxt: list[Future] = []
                for fut in pending:
                    i, tid, exc = fut.result()
                    if exc is None:
                        placement[i] = tid
                        continue
                    self.mark_down(tid)
                    errors.append(f"{tid}: {exc}")
                    if spare:
                        nxt.append(self.io.submit(put, i, spare.pop(0)))
                        started.append(nxt[-1])
                pending = nxt
        except BaseException:
            wait(started)  # no write may still be reading the caller's data once we return
            raise
        stored = sum(1 for p in placement if p)
        if stored < self.min_shares:
            raise TargetUnavailable(
                f"could write only {stored} of {self.m} shares (need {self.min_shares}); "
                f"targets failing: {'; '.join(errors[:3])}. Check `lodestore status`."
            )
        return placement

    # -- reads -------------------------------------------------------------------------

    def _fetch_range(self, rec: ChunkRecord, i: int, start: int, end: int) -> bytes:
        return b"".join(self._fetch_parts(rec, i, start, end))

    def _fetch_col(self, rec: ChunkRecord, i: int, start: int, end: int
                   ) -> bytes | memoryview:
        """``_fetch_range`` for decoding: a view, not a copy, when the range is one piece."""
        parts = self._fetch_parts(rec, i, start, end)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _fetch_parts(self, rec: ChunkRecord, i: int, start: int, end: int
                     ) -> list[memoryview]:
        """Share i's bytes [start, end), verified, as views (a caller assembling many
        shares then copies the data once)."""
        target, key = self._share_target(rec, i)
        cid = bytes.fromhex(rec.cid)

        def fetch(off: int, n: int) -> bytes:
            return target.get_range(key, off, n)

        if rec.layout == 2:
            return fragment.read_range2(fetch, cid, i, rec.block_size, rec.share_len,
                                        start, end)
        tkey = (rec.tenant, rec.cid, i, rec.block_size)
        view = fragment.read_range3(fetch, cid, i, rec.block_size, rec.share_len, start, end,
                                    self._tables.get(tkey),
                                    lambda t: self._tables.put(tkey, t))
        return [view] if len(view) else []

    def read(self, tenant: str, cid: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a chunk, decoding from parity only when needed.

        Healthy: only the data shares holding the range are read. Degraded: the shares
        already read are kept, targets known to be down are skipped without I/O, and
        just the missing columns are fetched from parity shares, all in parallel.
        """
        rec = self.record(tenant, cid)
        end = min(end, rec.length)
        if start >= end:
            return b""
        s = rec.share_len
        i0, i1 = start // s, (end - 1) // s
        pieces = [(i, max(start, i * s) - i * s, min(end, (i + 1) * s) - i * s)
                  for i in range(i0, i1 + 1)]
        pre: Prefetch | None = None
        if len(pieces) == 1 and not self._skip(rec, i0):
            i, a, b = pieces[0]
            try:
                return self._fetch_range(rec, i, a, b)
            except (NotFound, CorruptFragment, TargetUnavailable) as exc:
                self._note_failure(rec, i, exc)
                got: dict[int, list[memoryview]] = {}
        else:
            pre = self._prefetch_parity(rec, pieces)
            got = self._gather(rec, [(i, a, b) for i, a, b in pieces])
        if len(got) == len(pieces):
            return b"".join([p for i, _a, _b in pieces for p in got[i]])
        fresh = self.record(tenant, cid, refresh=True)  # a repair may have moved shares
        if fresh.placement != rec.placement:
            for f in (pre[2] if pre else {}).values():
                f.cancel()
            return self.read(tenant, cid, start, end)
        have = {i: b"".join(parts) for i, parts in got.items()}
        have.update(self._degraded(rec, pieces, have, pre))
        return b"".join(have[i] for i, _a, _b in pieces)

    def read_small(self, tenant: str, cid: str, start: int, end: int) -> bytes | None:
        """A small read (a few blocks of one share) when everything it needs is cached:
        the chunk's record and the share's checksum tables. One ``pread`` and one hash per
        block, and none of the general path's bookkeeping (a 4 KiB random read spends
        most of its time in Python). None: take ``read`` (not cached, a share down, a
        check failed: the general path then reads around it)."""
        rec = self._records.d.get((tenant, cid))  # lock-free peeks: a miss costs nothing
        if rec is None or rec.layout != 3:
            return None
        end = min(end, rec.length)
        if start >= end:
            return b""
        s, bs = rec.share_len, rec.block_size
        i = start // s
        if (end - 1) // s != i:
            return None
        tables = self._tables.d.get((tenant, cid, i, bs))
        tid = rec.placement[i] if i < len(rec.placement) else ""
        if tables is None or not tid or (self._down and self.is_down(tid)):
            return None
        a, b = start - i * s, end - i * s
        first, last = a // bs, (b - 1) // bs
        lo, hi = first * bs, min((last + 1) * bs, s)
        try:
            data = self.targets[tid].get_range(fragment_key(tenant, cid, i),
                                               tables.data_off + lo, hi - lo)
        except StorageError:
            return None
        if len(data) != hi - lo:
            return None
        if first == last:  # the common case, inline: one hash against the table
            base = fragment.seed_base(bytes.fromhex(cid[:16]), i)
            if xxhash.xxh3_64_digest(data, base ^ first) != tables.blocks[first * 8:
                                                                         first * 8 + 8]:
                return None
        else:
            try:
                fragment.verify3(data, first, tables, bytes.fromhex(cid), i, bs, s)
            except CorruptFragment:
                return None
        return data if (lo, hi) == (a, b) else data[a - lo:b - lo]

    def read_into(self, tenant: str, cid: str, start: int, end: int, out: memoryview,
                  parallel: bool = True) -> None:
        """``read`` into ``out`` (``min(end, length) - start`` bytes). Healthy layout-3
        shares are read straight into their place in ``out`` (in parallel unless told
        not to); shares that are down or fail their checks are rebuilt from parity into
        theirs, as ``read`` does. Layout 2 goes through ``read`` and is copied in."""
        rec = self.record(tenant, cid)
        end = min(end, rec.length)
        if start >= end:
            return
        if len(out) != end - start:
            raise ValueError("out must hold exactly the bytes of the range")
        if rec.layout != 3:
            out[:] = self.read(tenant, cid, start, end)
            return
        s, bs = rec.share_len, rec.block_size
        pieces = [(i, max(start, i * s) - i * s, min(end, (i + 1) * s) - i * s)
                  for i in range(start // s, (end - 1) // s + 1)]

        def dest(i: int, a: int, b: int) -> memoryview:
            return out[i * s + a - start:i * s + b - start]

        def one(i: int, a: int, b: int) -> None:
            if fragment.aligned3(a, b, bs, s):
                self._fetch_into(rec, i, a, b, dest(i, a, b))
            else:
                dest(i, a, b)[:] = self._fetch_range(rec, i, a, b)

        down = {i for i, _a, _b in pieces if self._skip(rec, i)}
        pre = self._prefetch_parity(rec, pieces) if down else None
        healthy = [p for p in pieces if p[0] not in down]
        failed: set[int] = set()
        if len(healthy) == 1 or not parallel:
            for i, a, b in healthy:
                try:
                    one(i, a, b)
                except (NotFound, CorruptFragment, TargetUnavailable) as exc:
                    self._note_failure(rec, i, exc)
                    failed.add(i)
        else:
            futs = [(i, self.io.submit(one, i, a, b)) for i, a, b in healthy]
            for i, fut in futs:
                try:
                    fut.result()
                except (NotFound, CorruptFragment, TargetUnavailable) as exc:
                    self._note_failure(rec, i, exc)
                    failed.add(i)
        if not down and not failed:
            return
        # rebuild the missing pieces from parity, straight into their places
        have = {i: dest(i, a, b) for i, a, b in healthy if i not in failed}
        try:
            rebuilt = self._degraded(rec, pieces, have, pre)  # type: ignore[arg-type]
        except DataLost:
            fresh = self.record(tenant, cid, refresh=True)  # a repair may have moved shares
            if fresh.placement == rec.placement:
                raise
            out[:] = self.read(tenant, cid, start, end)
            return
        for i, a, b in pieces:
            if i in rebuilt:
                dest(i, a, b)[:] = rebuilt[i]

    def _share_target(self, rec: ChunkRecord, i: int) -> tuple[Target, str]:
        """The target holding share ``i`` of ``rec`` and the share's fragment key."""
        target = self.targets.get(rec.placement[i] if i < len(rec.placement) else "")
        if target is None:
            raise NotFound(f"share {i} has no live copy")
        return target, fragment_key(rec.tenant, rec.cid, i)

    def _fetch_into(self, rec: ChunkRecord, i: int, start: int, end: int,
                    out: memoryview) -> None:
        target, key = self._share_target(rec, i)
        tkey = (rec.tenant, rec.cid, i, rec.block_size)
        fragment.read_range3_into(
            lambda off, n: target.get_range(key, off, n),
            lambda off, views: target.get_range_into(key, off, views),
            bytes.fromhex(rec.cid), i, rec.block_size, rec.share_len, start, end, out,
            self._tables.get(tkey), lambda t: self._tables.put(tkey, t))

    def _prefetch_parity(self, rec: ChunkRecord, pieces: list[tuple[int, int, int]]
                         ) -> Prefetch | None:
        """When data shares of the read sit on targets known to be down, start fetching
        as many parity columns in the same round as the healthy data shares, instead of
        a second round after them (a degraded read then costs one I/O latency, not two)."""
        down = [(i, a, b) for i, a, b in pieces if self._skip(rec, i)]
        if not down:
            return None
        lo, hi = min(a for _i, a, _b in down), max(b for _i, _a, b in down)
        # the healthy data shares of this read that cover [lo, hi) are columns already
        covered = sum(1 for i, a, b in pieces if not self._skip(rec, i) and a <= lo and b >= hi)
        want = rec.k - covered
        spare = [i for i in range(rec.k, rec.m) if not self._skip(rec, i)]
        spare += [i for i in range(rec.k) if i not in {p[0] for p in pieces}
                  and not self._skip(rec, i)]
        return lo, hi, {i: self.io.submit(self._fetch_col, rec, i, lo, hi)
                        for i in spare[:max(0, want)]}

    def _skip(self, rec: ChunkRecord, i: int) -> bool:
        tid = rec.placement[i] if i < len(rec.placement) else ""
        return not tid or self.is_down(tid)

    def _note_failure(self, rec: ChunkRecord, i: int, exc: Exception) -> None:
        if isinstance(exc, TargetUnavailable) and i < len(rec.placement):
            self.mark_down(rec.placement[i])

    def _gather(self, rec: ChunkRecord, want: list[tuple[int, int, int]]
                ) -> dict[int, list[memoryview]]:
        """Fetch share ranges in parallel; returns those that were read intact."""
        futs = {i: self.io.submit(self._fetch_parts, rec, i, a, b)
                for i, a, b in want if not self._skip(rec, i)}
        got: dict[int, list[memoryview]] = {}
        for i, fut in futs.items():
            try:
                got[i] = fut.result()
            except (NotFound, CorruptFragment, TargetUnavailable) as exc:
                self._note_failure(rec, i, exc)
        return got

    def _degraded(self, rec: ChunkRecord, pieces: list[tuple[int, int, int]],
                  have: dict[int, bytes], pre: Prefetch | None = None
                  ) -> dict[int, bytes]:
        """Rebuild the pieces missing from ``have`` from any k shares' column ranges
        (``pre``: column fetches already started by ``_prefetch_parity``)."""
        missing = [(i, a, b) for i, a, b in pieces if i not in have]
        lo = min(a for _i, a, _b in missing)
        hi = max(b for _i, _a, b in missing)
        cols: dict[int, bytes] = {}
        for i, a, b in pieces:  # data shares already read that cover [lo, hi)
            if i in have and a <= lo and b >= hi:
                cols[i] = have[i][lo - a : hi - a]
        failed = {i for i, _a, _b in missing}
        errors: list[str] = []
        for i, fut in (pre[2] if pre else {}).items():
            if (pre[0], pre[1]) != (lo, hi) or len(cols) >= rec.k or i in cols:
                fut.cancel()
                continue
            try:
                cols[i] = fut.result()
            except (NotFound, CorruptFragment, TargetUnavailable) as exc:
                self._note_failure(rec, i, exc)
                failed.add(i)
                errors.append(f"share {i}: {exc}")
        candidates = [i for i in range(rec.m) if i not in cols and i not in failed]
        # data shares first (no decode work for them), then parity; down targets last
        candidates.sort(key=lambda i: (self._skip(rec, i), i >= rec.k, i))
        while len(cols) < rec.k:
            need = rec.k - len(cols)
            batch, candidates = candidates[:need], candidates[need:]
            if not batch:
                raise DataLost(
                    f"chunk {rec.cid[:16]}… of tenant {rec.tenant}: only {len(cols)} of the "
                    f"{rec.k} shares needed are readable ({'; '.join(errors[:3])}); "
                    "restore the missing targets and run `lodestore repair`"
                )
            futs = {i: self.io.submit(self._fetch_col, rec, i, lo, hi) for i in batch}
            for i, fut in futs.items():
                try:
                    cols[i] = fut.result()
                except (NotFound, CorruptFragment, TargetUnavailable) as exc:
                    self._note_failure(rec, i, exc)
                    errors.append(f"share {i}: {exc}")
        decoded = erasure.decode_columns(cols, rec.k, rec.m)
        return {i: decoded[i][a - lo : b - lo] for i, a, b in missing}

    def read_all(self, tenant: str, cid: str) -> bytes:
        rec = self.record(tenant, cid)
        return self.read(tenant, cid, 0, rec.length)

    # -- verification and repair -------------------------------------------------------

    def check_share(self, rec: ChunkRecord, i: int) -> str | None:
        """None if share i is intact where the registry says, else why not."""
        tid = rec.placement[i] if i < len(rec.placement) else ""
        target = self.targets.get(tid)
        if target is None:
            return "no copy recorded" if not tid else f"target {tid} is not configured"
        try:
            raw = target.get(fragment_key(rec.tenant, rec.cid, i))
            fragment.decode_whole(raw, bytes.fromhex(rec.cid), i)
        except NotFound:
            return f"missing on {tid}"
        except CorruptFragment as exc:
            return f"corrupt on {tid}: {exc}"
        except TargetUnavailable as exc:
            return f"unreadable on {tid}: {exc}"
        return None

    def repair(self, rec: ChunkRecord, bad: list[int],
               healthy: Callable[[str], bool]) -> tuple[ChunkRecord, list[int]]:
        """Rebuild the shares in ``bad`` from k good ones onto healthy targets that hold
        no other share of this chunk. Returns the new record and shares still missing."""
        good = [i for i in range(rec.m) if i not in bad]
        if len(good) < rec.k:
            raise DataLost(f"chunk {rec.cid[:16]}…: only {len(good)} intact shares, need {rec.k}")
        pieces: dict[int, bytes] = {}
        for i in good:
            try:
                pieces[i] = self._fetch_range(rec, i, 0, rec.share_len)
            except (NotFound, CorruptFragment, TargetUnavailable):
                continue
            if len(pieces) == rec.k:
                break
        if len(pieces) < rec.k:
            raise DataLost(f"chunk {rec.cid[:16]}…: fewer than {rec.k} shares readable")
        data_shares = erasure.decode_columns(pieces, rec.k, rec.m)
        chunk = b"".join(data_shares)[: rec.length]
        shares = erasure.encode(chunk, rec.k, rec.m)
        placement = list(rec.placement) + [""] * (rec.m - len(rec.placement))
        used = {placement[i] for i in range(rec.m) if i not in bad and placement[i]}
        candidates = [t for t in self.rank(rec.cid) if t not in used and healthy(t)]
        # prefer putting a share back where it was, if that target is healthy again
        still: list[int] = []
        for i in bad:
            home = placement[i]
            choice = home if home and home not in used and healthy(home) else None
            if choice is None:
                choice = next((t for t in candidates if t not in used), None)
            if choice is None:
                still.append(i)
                placement[i] = ""
                continue
            frag = fragment.encode_parts(  # in the layout of the chunk's other shares
                fragment.FragmentHeader(rec.k, rec.m, i, rec.block_size, rec.length,
                                        rec.share_len, bytes.fromhex(rec.cid), rec.layout),
                shares[i],
            )
            key = fragment_key(rec.tenant, rec.cid, i)
            try:
                if choice == home:  # object stores keep an existing key: clear it first
                    self.targets[choice].delete(key)
                self.targets[choice].put(key, frag)
            except StorageError:
                still.append(i)
                placement[i] = ""
                continue
            if home and home != choice and home in self.targets:
                with contextlib.suppress(StorageError):
                    self.targets[home].delete(fragment_key(rec.tenant, rec.cid, i))
            placement[i] = choice
            used.add(choice)
        new = ChunkRecord(rec.tenant, rec.cid, rec.length, rec.k, rec.m, rec.share_len,
                          rec.block_size, tuple(placement), rec.created, rec.touched,
                          rec.layout)
        self.meta.chunk_set_placement(rec.tenant, rec.cid, new.placement)
        self._records.put((rec.tenant, rec.cid), new)
        return new, still

    def delete_fragments(self, rec: ChunkRecord) -> None:
        for i, tid in enumerate(rec.placement):
            t = self.targets.get(tid)
            if t is not None:
                with contextlib.suppress(StorageError):
                    t.delete(fragment_key(rec.tenant, rec.cid, i))
        self._records.pop((rec.tenant, rec.cid))

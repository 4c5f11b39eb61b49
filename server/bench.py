"""``lodestore bench``: measure a throwaway store against what the same disk and CPUs give
plain Python, in the spirit of ``juicefs bench``.

Every figure is paired with a baseline measured in the same run on the same disk:

- big-file write (a stream through ``Volume.write``, never whole-file in memory) against
  ``min(raw sequential write x k/m, the erasure coder's encode rate on all cores)`` (ISA-L
  computing zfec's code where it loads, else zfec: see ``storage/isal.py``); the raw write
  follows the store's durability policy (fsync after every chunk-size piece);
- big-file read (``FileReader.iter``) against a raw sequential read of the same bytes;
- degraded read with m-k targets gone against the healthy read;
- 4 KiB random reads (IOPS, p50/p99) against ``os.pread`` at the same concurrency;
- small files (create, stat, read) against open/write/close, ``os.stat``, open/read;
- erasure encode rate, informational.

Page caches are dropped before each read phase where ``/proc/sys/vm/drop_caches`` is
writable (root); otherwise both sides are read warm and the report says so.

The work lives in :func:`run_bench` and :func:`render` so that
``benchmarks/bench_storage.py`` can reuse them at full size.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from storage.fsutil import fsync_dir, write_all

MiB = 1024 * 1024
KiB = 1024
TENANT = "bench"
DROP_CACHES = "/proc/sys/vm/drop_caches"

# --quick: a CI-sized run of a few seconds
QUICK = {"big_mib": 32, "small": 300, "random": 1000, "encode_seconds": 0.3, "read_rounds": 1}


# -- settings and results --------------------------------------------------------------


@dataclass
class Settings:
    dir: str | None = None
    big_mib: int = 256
    read_rounds: int = 3  # big-file read: alternating raw/store rounds, best of each
    small: int = 2000
    random: int = 5000
    threads: int = 4
    durability: str = "fsync"
    drop_caches: bool | None = None  # None: when writable
    keep: bool = False
    encode_seconds: float = 1.0
    small_dirs: int = 8
    seed: int = 1


@dataclass
class Row:
    metric: str
    lodestore: float | None
    baseline: float | None
    unit: str
    # ("ratio_min", x): lodestore/baseline >= x; ("ratio_max", x): <= x;
    # ("abs_min", x): lodestore >= x; None: informational
    target: tuple[str, float] | None = None
    component: bool = False  # a part of the row above (shown indented)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if self.lodestore is None or not self.baseline:
            return None
        return self.lodestore / self.baseline

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.lodestore is None:
            return None
        kind, x = self.target
        if kind == "abs_min":
            return self.lodestore >= x
        r = self.ratio
        if r is None:
            return None
        return r >= x if kind == "ratio_min" else r <= x

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["passed"] = self.passed
        d["target"] = None if self.target is None else {"kind": self.target[0],
                                                         "value": self.target[1]}
        return d


@dataclass
class Result:
    machine: dict[str, Any]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "config": self.config,
                "rows": [r.as_dict() for r in self.rows], "notes": self.notes,
                "extra": self.extra}

    @property
    def all_passed(self) -> bool:
        return all(r.passed is not False for r in self.rows)


# -- helpers -----------------------------------------------------------------------------


class Source:
    """A file-like stream of ``size`` incompressible bytes, generated as it is read.

    Every 64 KiB (4 KiB for tiny chunk sizes) carries a stamp of the seed and the offset,
    so no two chunks of one stream are equal (the store deduplicates chunks) and two
    sources with the same seed give the same bytes (the raw baseline file holds exactly
    what the store holds, so reads can be checked against it)."""

    _BASE_LEN = 8 * MiB
    _base_cache: dict[int, bytes] = {}

    def __init__(self, size: int, seed: int = 1, stamp_every: int = 64 * KiB,
                 on_read: Callable[[int], None] | None = None) -> None:
        self.size, self.seed, self.pos = size, seed, 0
        self.stamp = stamp_every
        self.on_read = on_read
        base = self._base_cache.get(seed)
        if base is None:
            base = self._base_cache[seed] = random.Random(seed).randbytes(self._BASE_LEN)
        self.base = base

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        n = min(n, self.size - self.pos)
        if n <= 0:
            return b""
        out = bytearray(n)
        start, filled, blen = self.pos, 0, self._BASE_LEN
        while filled < n:
            at = (start + filled) % blen
            take = min(n - filled, blen - at)
            out[filled : filled + take] = self.base[at : at + take]
            filled += take
        end = start + n
        first = -(-(start - 15) // self.stamp) * self.stamp
        for off in range(max(0, first), end, self.stamp):
            if off >= start and off + 16 <= end:
                struct.pack_into("<QQ", out, off - start, self.seed, off)
            else:  # a stamp cut by the read boundary: write the part inside
                stamp = struct.pack("<QQ", self.seed, off)
                lo, hi = max(off, start), min(off + 16, end)
                out[lo - start : hi - start] = stamp[lo - off : hi - off]
        self.pos += n
        if self.on_read is not None:
            self.on_read(n)
        return bytes(out)

    def __iter__(self) -> Iterator[bytes]:
        return iter(lambda: self.read(MiB), b"")


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def can_drop_caches() -> bool:
    """True if this process may drop the page cache (root, /proc/sys writable)."""
    if not os.access(DROP_CACHES, os.W_OK):
        return False
    try:
        drop_caches()
    except OSError:  # e.g. a user namespace: root, yet not allowed
        return False
    return True


def drop_caches() -> None:
    os.sync()
    with open(DROP_CACHES, "w") as f:
        f.write("3\n")


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * KiB
    except OSError:
        pass
    return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path: str) -> str:
    """Type and device of the mount holding ``path`` (Linux), e.g. 'ext4 on /dev/vda'."""
    best, found = "", "?"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                mnt = mnt.replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, found = mnt, f"{fstype} on {dev}"
    except OSError:
        pass
    return found


def machine_info(path: str) -> dict[str, Any]:
    import zfec

    usage = shutil.disk_usage(path)
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _meminfo("MemTotal"),
        "ram_available_bytes": _meminfo("MemAvailable"),
        "dir": path,
        "filesystem": _filesystem(path),
        "disk_free_bytes": usage.free,
        "disk_total_bytes": usage.total,
        "loadavg_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "zfec": getattr(zfec, "__version__", "?"),
        "erasure_coder": coder_name(),
        "kernel": platform.release(),
    }


def default_bench_dir(home: str | None = None) -> str:
    """Next to the store's home (same disk) when that folder exists, else the temp dir."""
    from storage import default_home

    try:
        parent = (Path(home) if home else default_home()).resolve().parent
    except Exception:  # noqa: BLE001 - any trouble finding a home: fall back
        parent = None
    if parent is not None and parent.is_dir() and os.access(parent, os.W_OK):
        return str(parent)
    return tempfile.gettempdir()




def _timed_threads(n_threads: int, work: Callable[[int], None]) -> float:
    """Run ``work(i)`` in n threads released together; wall seconds until all finish."""
    barrier = threading.Barrier(n_threads + 1)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            work(i)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n_threads)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return elapsed


# -- phases ------------------------------------------------------------------------------


class _Phases:
    """Progress on stderr for long phases (hidden when stderr is not a terminal)."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
            console=console, transient=True,
            disable=not (enabled and console.is_terminal),
        )

    def __enter__(self) -> _Phases:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def task(self, name: str, total: float, unit: str = "") -> Iterator[Callable[[float], None]]:
        tid = self.progress.add_task(name, total=total, unit=unit)
        try:
            yield lambda n: self.progress.advance(tid, n)
        finally:
            self.progress.remove_task(tid)

    def scaled(self, name: str, total_bytes: int) -> contextlib.AbstractContextManager:
        """A byte-counting task shown in MiB."""
        return self._scaled(name, total_bytes)

    @contextlib.contextmanager
    def _scaled(self, name: str, total_bytes: int) -> Iterator[Callable[[int], None]]:
        with self.task(name, max(1, total_bytes // MiB), "MiB") as adv:
            yield lambda n: adv(n / MiB)


def raw_write(path: str, size: int, piece: int, fsync: bool, seed: int,
              advance: Callable[[int], None]) -> float:
    """Plain sequential write of the same stream; fsync after every piece if asked."""
    src = Source(size, seed, on_read=advance)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while True:
            buf = src.read(piece)
            if not buf:
                break
            write_all(fd, buf)
            if fsync:
                os.fsync(fd)
    finally:
        os.close(fd)
    if fsync:
        fsync_dir(os.path.dirname(path))
    return time.perf_counter() - t0


def raw_read(path: str, piece: int, advance: Callable[[int], None]) -> tuple[float, int, int]:
    import xxhash

    h = xxhash.xxh3_64()
    n = 0
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while True:
            buf = f.read(piece)
            if not buf:
                break
            h.update(buf)
            n += len(buf)
            advance(len(buf))
    return time.perf_counter() - t0, n, h.intdigest()


def store_read(vol: Any, path: str, advance: Callable[[int], None]) -> tuple[float, int, int]:
    import xxhash

    h = xxhash.xxh3_64()
    n = 0
    t0 = time.perf_counter()
    reader = vol.open_file(TENANT, path)
    for piece in reader.iter():
        h.update(piece)
        n += len(piece)
        advance(len(piece))
    return time.perf_counter() - t0, n, h.intdigest()


def coder_name() -> str:
    """The erasure coder the store uses here: ``isal`` (zfec's code on ISA-L) or ``zfec``."""
    from storage import isal

    return "isal" if isal.kernel() is not None else "zfec"


def encode_rates(chunk_size: int, k: int, m: int, threads: int, seconds: float,
                 ) -> dict[str, float]:
    """MiB/s of chunk input on ``threads`` threads (best of 3 rounds): bare zfec, the bare
    coder the store uses (``coder``: ISA-L where it loads, else zfec again), the store's
    ``erasure.encode`` (split + copies), and the store's whole per-chunk CPU work
    (blake3 id + erasure.encode + fragment framing with checksums)."""
    import blake3
    import zfec

    from storage import erasure, fragment, isal

    chunk = Source(chunk_size, seed=7).read(chunk_size)
    shares = tuple(erasure.split(chunk, k))
    parity = tuple(range(k, m))
    key = bytes(32)
    block = 4 * KiB  # the store's default checksum block

    def pure() -> Callable[[], None]:
        enc = zfec.Encoder(k, m)
        return lambda: enc.encode(shares, parity)

    def coder() -> Callable[[], None]:
        kern = isal.kernel()
        if kern is None:
            return pure()
        rows = isal.zfec_parity_rows(k, m)
        return lambda: kern.dot(k, rows, list(shares), len(shares[0]))

    def store_encode() -> Callable[[], None]:
        return lambda: erasure.encode(chunk, k, m)

    def pipeline() -> Callable[[], None]:
        def run() -> None:
            cid = blake3.blake3(chunk, key=key, max_threads=1).digest()
            out = erasure.encode(chunk, k, m)
            slen = len(out[0])
            for i, s in enumerate(out):
                fragment.encode_parts(
                    fragment.FragmentHeader(k, m, i, block, len(chunk), slen, cid), s)
        return run

    # Best of three interleaved rounds: on a shared machine one round can lose its cores.
    rates: dict[str, float] = {}
    rounds = 3
    for _ in range(rounds):
        for name, make in (("zfec", pure), ("coder", coder), ("erasure.encode", store_encode),
                           ("chunk pipeline", pipeline)):
            counts = [0] * threads

            def work(i: int, make: Callable[[], Callable[[], None]] = make,
                     counts: list[int] = counts) -> None:
                fn = make()
                deadline = time.perf_counter() + seconds / rounds
                c = 0
                while time.perf_counter() < deadline:
                    fn()
                    c += 1
                counts[i] = c

            elapsed = _timed_threads(threads, work)
            rate = sum(counts) * chunk_size / MiB / elapsed
            rates[name] = max(rates.get(name, 0.0), rate)
    return rates


def random_reads(read_at: Callable[[int], bytes], offsets: list[list[int]],
                 advance: Callable[[int], None]) -> tuple[float, list[float]]:
    """Each thread reads its offsets; returns (IOPS, sorted latencies in µs)."""
    lat: list[list[int]] = [[] for _ in offsets]

    def work(i: int) -> None:
        out = lat[i]
        clock = time.perf_counter_ns
        for j, off in enumerate(offsets[i]):
            t0 = clock()
            b = read_at(off)
            out.append(clock() - t0)
            if len(b) != 4096:
                raise RuntimeError(f"short read at {off}: {len(b)} bytes")
            if j % 256 == 255:
                advance(256)

    elapsed = _timed_threads(len(offsets), work)
    total = sum(len(o) for o in offsets)
    return total / elapsed, sorted(x / 1000 for lst in lat for x in lst)


def _timed_ops(paths: list[Any], op: Callable[[Any], Any], advance: Callable[[int], None],
               ) -> tuple[float, list[float]]:
    """Run ``op`` on each item serially; (ops/s, sorted latencies in µs)."""
    lat: list[int] = []
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for j, p in enumerate(paths):
        a = clock()
        op(p)
        lat.append(clock() - a)
        if j % 100 == 99:
            advance(100)
    elapsed = time.perf_counter() - t0
    return len(paths) / elapsed, sorted(x / 1000 for x in lat)


def small_payload(i: int, size: int = 4096) -> bytes:
    base = Source._base_cache.get(3) or Source(1, 3).base
    return struct.pack("<Q", i) + base[(i * 64) % MiB : (i * 64) % MiB + size - 8]


# -- the bench ---------------------------------------------------------------------------


def run_bench(s: Settings, err: Console | None = None, progress: bool = True) -> Result:
    """Build a throwaway store under ``s.dir``, measure, clean up; return the figures."""
    err = err or Console(stderr=True)
    parent = s.dir or default_bench_dir()
    os.makedirs(parent, exist_ok=True)
    big = s.big_mib * MiB
    # raw file + fragments (m/k of the data, plus headers and checksums) + small files
    need = int(big * (1 + 1.05 * 6 / 4)) + s.small * 12 * KiB + 64 * MiB
    free = shutil.disk_usage(parent).free
    if free < need:
        raise click.ClickException(
            f"{parent} has {free / MiB:,.0f} MiB free; this run needs about {need / MiB:,.0f} MiB "
            "(use a smaller --big-mib or another --dir)")
    drop = can_drop_caches() if s.drop_caches is None else s.drop_caches
    if drop and not can_drop_caches():
        raise click.ClickException(f"cannot drop page caches: {DROP_CACHES} is not writable")
    work = tempfile.mkdtemp(prefix="lodestore-bench-", dir=parent)
    try:
        return _run(s, err, progress, work, drop)
    finally:
        if not s.keep:
            shutil.rmtree(work, ignore_errors=True)


def _run(s: Settings, err: Console, progress: bool, work: str, drop: bool) -> Result:
    from storage import StoreConfig, Volume

    store_dir = os.path.join(work, "store")
    raw_dir = os.path.join(work, "raw")
    os.makedirs(raw_dir)
    fsync = s.durability == "fsync"
    cfg = StoreConfig.embedded(Path(store_dir), durability=s.durability)
    vol = Volume.init(store_dir, cfg)
    vol.create_tenant(TENANT)
    k, m, chunk = cfg.k, cfg.m, cfg.chunk_size
    res = Result(
        machine=machine_info(work),
        config={
            "k": k, "m": m, "chunk_size": chunk, "durability": s.durability,
            "write_concurrency": cfg.write_concurrency, "readahead": cfg.readahead,
            "io_threads": cfg.io_threads, "checksum_block": cfg.checksum_block,
            "inline_threshold": cfg.inline_threshold, "big_bytes": s.big_mib * MiB,
            "small_files": s.small, "random_reads": s.random, "threads": s.threads,
            "page_cache": "dropped before each read phase" if drop else "warm (not dropped)",
            "work_dir": work,
        },
    )
    moved: list[tuple[str, str]] = []
    big = s.big_mib * MiB
    raw_big = os.path.join(raw_dir, "big.bin")
    store_big = "/big/big.bin"
    cold = drop_caches if drop else (lambda: None)
    try:
        with _Phases(err, progress) as ph:
            # ---- big-file write ----
            os.sync()
            with ph.scaled("raw write", big) as adv:
                t_raw_w = raw_write(raw_big, big, chunk, fsync, s.seed, adv)
            os.sync()
            n_threads = os.cpu_count() or 1
            with ph.task("erasure encode rates", 3, "") as adv:
                rates = encode_rates(chunk, k, m, n_threads, s.encode_seconds)
                adv(3)
            os.sync()
            with ph.scaled("lodestore write", big) as adv:
                t0 = time.perf_counter()
                info = vol.write(TENANT, store_big, Source(big, s.seed, on_read=adv))
                t_store_w = time.perf_counter() - t0
            if info.size != big:
                raise RuntimeError(f"store wrote {info.size} bytes, expected {big}")
            os.sync()
            raw_w = big / MiB / t_raw_w
            store_w = big / MiB / t_store_w
            raw_share = raw_w * k / m
            baseline_w = min(raw_share, rates["coder"])
            res.rows.append(Row("big-file write MiB/s", store_w, baseline_w, "MiB/s",
                                ("ratio_min", 0.8),
                                note=f"baseline = min(raw x k/m, {coder_name()} encode)"))
            res.rows.append(Row(f"raw write x {k}/{m}", None, raw_share, "MiB/s", component=True,
                                note=f"raw {raw_w:.1f} MiB/s"
                                     + (", fsync per chunk" if fsync else ", no fsync")))
            res.rows.append(Row(f"{coder_name()} encode ({n_threads} thr)", None, rates["coder"],
                                "MiB/s", component=True))
            res.rows.append(Row(f"bare zfec encode ({n_threads} thr)", None, rates["zfec"],
                                "MiB/s", component=True))
            res.extra["raw_write_mib_s"] = raw_w

            # ---- big-file read, healthy ----
            # Alternating rounds, best of each side: on a VM the first reads after a cache
            # drop can run at a fraction of the disk's speed (the host backs freed guest
            # memory again), whichever side happens to come first.
            raw_times: list[float] = []
            store_times: list[float] = []
            for r in range(s.read_rounds):
                cold()
                with ph.scaled(f"raw read ({r + 1}/{s.read_rounds})", big) as adv:
                    t_raw_r, n_raw, h_raw = raw_read(raw_big, chunk, adv)
                cold()
                with ph.scaled(f"lodestore read ({r + 1}/{s.read_rounds})", big) as adv:
                    t_store_r, n_store, h_store = store_read(vol, store_big, adv)
                if (n_store, h_store) != (n_raw, h_raw):
                    raise RuntimeError("lodestore read returned different bytes than were "
                                       "written")
                raw_times.append(t_raw_r)
                store_times.append(t_store_r)
            healthy_r = big / MiB / min(store_times)
            rounds = ", ".join(f"{big / MiB / a:,.0f}/{big / MiB / b:,.0f}"
                               for a, b in zip(store_times, raw_times, strict=True))
            res.rows.append(Row("big-file read MiB/s", healthy_r, big / MiB / min(raw_times),
                                "MiB/s", ("ratio_min", 0.8),
                                note=f"best of {s.read_rounds} alternating rounds "
                                     f"(store/raw: {rounds})"))

            # ---- degraded read: m-k targets gone ----
            lost = [t for t in cfg.targets[: m - k]]
            for t in lost:
                root = _target_root(t.url)
                os.rename(root, root + ".bench-away")
                moved.append((root + ".bench-away", root))
            cold()
            vol2 = Volume(StoreConfig.load(Path(store_dir)))  # fresh record and fd caches
            try:
                with ph.scaled(f"degraded read (-{len(lost)})", big) as adv:
                    t_deg, n_deg, h_deg = store_read(vol2, store_big, adv)
            finally:
                vol2.close()
                _restore(moved)
            if (n_deg, h_deg) != (n_raw, h_raw):
                raise RuntimeError("degraded read returned different bytes than were written")
            res.rows.append(Row("degraded read MiB/s", big / MiB / t_deg, healthy_r, "MiB/s",
                                ("ratio_min", 0.5),
                                note=f"targets {','.join(t.id for t in lost)} gone; "
                                     "baseline = healthy read"))

            # ---- 4 KiB random reads ----
            rng = random.Random(s.seed)
            pages = big // 4096
            offsets = [[rng.randrange(pages) * 4096
                        for _ in range(s.random // s.threads + (t < s.random % s.threads))]
                       for t in range(s.threads)]
            offsets = [o for o in offsets if o]
            n_rand = sum(len(o) for o in offsets)
            reader = vol.open_file(TENANT, store_big)
            fd = os.open(raw_big, os.O_RDONLY)
            try:
                for off in offsets[0][:8]:  # the store returns the bytes the raw file holds
                    if reader.read(off, 4096) != os.pread(fd, 4096, off):
                        raise RuntimeError(f"random read at {off} differs from the raw file")
                cold()
                with ph.task(f"raw 4K random ({s.threads} thr)", n_rand, "reads") as adv:
                    raw_iops, raw_lat = random_reads(lambda off: os.pread(fd, 4096, off),
                                                     offsets, adv)
                cold()
                with ph.task(f"lodestore 4K random ({s.threads} thr)", n_rand,
                             "reads") as adv:
                    st_iops, st_lat = random_reads(lambda off: reader.read(off, 4096),
                                                   offsets, adv)
            finally:
                os.close(fd)
            res.rows.append(Row(f"4K random read IOPS ({s.threads} thr)", st_iops, raw_iops,
                                "IOPS", ("ratio_min", 0.7)))
            res.rows.append(Row("4K random read p50 µs", percentile(st_lat, 0.5),
                                percentile(raw_lat, 0.5), "µs"))
            res.rows.append(Row("4K random read p99 µs", percentile(st_lat, 0.99),
                                percentile(raw_lat, 0.99), "µs", ("ratio_max", 2.0)))

            # ---- small files ----
            n = s.small
            ndirs = max(1, min(s.small_dirs, n))
            small_dir = os.path.join(raw_dir, "small")
            for d in range(ndirs):
                os.makedirs(os.path.join(small_dir, f"d{d:02d}"))
                vol.mkdir(TENANT, f"/small/d{d:02d}", parents=True, exist_ok=True)
            names = [f"d{i % ndirs:02d}/f{i:07d}" for i in range(n)]
            shuffled = names[:]
            random.Random(s.seed + 1).shuffle(shuffled)
            payloads = {nm: small_payload(i) for i, nm in enumerate(names)}

            def plain_create(nm: str) -> None:
                fd = os.open(os.path.join(small_dir, nm), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o644)
                try:
                    write_all(fd, payloads[nm])
                    if fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)

            def plain_read(nm: str) -> None:
                with open(os.path.join(small_dir, nm), "rb") as f:
                    if len(f.read()) != 4096:
                        raise RuntimeError(f"short plain read of {nm}")

            def store_read_small(nm: str) -> None:
                if len(vol.read(TENANT, "/small/" + nm)) != 4096:
                    raise RuntimeError(f"short store read of {nm}")

            os.sync()
            with ph.task("plain create", n, "files") as adv:
                p_create, p_create_lat = _timed_ops(names, plain_create, adv)
            os.sync()
            with ph.task("lodestore create", n, "files") as adv:
                s_create, s_create_lat = _timed_ops(
                    names, lambda nm: vol.write(TENANT, "/small/" + nm, payloads[nm]), adv)
            os.sync()
            with ph.task("plain stat", n, "files") as adv:
                p_stat, p_stat_lat = _timed_ops(
                    shuffled, lambda nm: os.stat(os.path.join(small_dir, nm)), adv)
            with ph.task("lodestore stat", n, "files") as adv:
                s_stat, s_stat_lat = _timed_ops(
                    shuffled, lambda nm: vol.stat(TENANT, "/small/" + nm), adv)
            with ph.task("plain read", n, "files") as adv:
                p_read, p_read_lat = _timed_ops(shuffled, plain_read, adv)
            with ph.task("lodestore read", n, "files") as adv:
                s_read, s_read_lat = _timed_ops(shuffled, store_read_small, adv)
            res.rows.append(Row("small create/s (4 KiB)", s_create, p_create, "/s",
                                ("abs_min", 5000),
                                note="plain: open/write" + ("/fsync" if fsync else "") + "/close"))
            res.rows.append(Row("small stat/s", s_stat, p_stat, "/s", ("abs_min", 20000)))
            res.rows.append(Row("small stat p99 µs", percentile(s_stat_lat, 0.99),
                                percentile(p_stat_lat, 0.99), "µs"))
            res.rows.append(Row("small read/s", s_read, p_read, "/s", ("abs_min", 5000)))
            res.extra["small_latency_us"] = {
                name: {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}
                for name, lat in (("lodestore_create", s_create_lat),
                                  ("plain_create", p_create_lat),
                                  ("lodestore_stat", s_stat_lat), ("plain_stat", p_stat_lat),
                                  ("lodestore_read", s_read_lat), ("plain_read", p_read_lat))
            }

            # ---- erasure encode, informational ----
            res.rows.append(Row(f"erasure.encode MiB/s ({n_threads} thr)",
                                rates["erasure.encode"], rates["coder"], "MiB/s",
                                note=f"store's encode (split + copies) vs bare {coder_name()}"))
            res.rows.append(Row(f"chunk CPU pipeline MiB/s ({n_threads} thr)",
                                rates["chunk pipeline"], rates["coder"], "MiB/s",
                                note="blake3 id + encode + fragment checksums"))
            res.extra["encode_mib_s"] = rates
    finally:
        _restore(moved)
        vol.close()
        res.machine["loadavg_end"] = list(os.getloadavg())
        if s.keep:
            res.notes.append(f"kept the throwaway store and baseline files in {work}")
    if not drop:
        why = "--no-drop-caches" if s.drop_caches is False else f"{DROP_CACHES} not writable"
        res.notes.append(f"page cache not dropped ({why}): reads on both sides are warm")
    return res


def _target_root(url: str) -> str:
    from storage.targets.local import path_from_url

    return path_from_url(url)


def _restore(moved: list[tuple[str, str]]) -> None:
    while moved:
        src, dst = moved.pop()
        if os.path.exists(src) and not os.path.exists(dst):
            os.rename(src, dst)


# -- output ------------------------------------------------------------------------------


def _num(v: float | None, unit: str) -> str:
    if v is None:
        return ""
    if v != v:  # NaN
        return "-"
    if unit in ("/s", "IOPS"):
        return f"{v:,.0f}"
    if unit == "µs":
        return f"{v:,.1f}" if v < 100 else f"{v:,.0f}"
    return f"{v:,.1f}" if v < 1000 else f"{v:,.0f}"


def _target_text(r: Row) -> str:
    if r.target is None:
        return "[dim]info[/]" if not r.component else ""
    kind, x = r.target
    text = {"ratio_min": f"≥ {x:g}×", "ratio_max": f"≤ {x:g}×",
            "abs_min": f"≥ {x:,.0f}{r.unit}"}[kind]
    ok = r.passed
    mark = "" if ok is None else (" [green]✓[/]" if ok else " [red]✗[/]")
    return text + mark


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    return f"{n / (1 << 30):.1f} GiB"


def render(res: Result, out: Console, title: str = "lodestore bench") -> None:
    mc, cf = res.machine, res.config
    la = mc.get("loadavg_start", [0, 0, 0])
    le = mc.get("loadavg_end", la)
    out.print(f"[bold]machine[/]  {mc['cpu']}, {mc['cores']} cores, RAM {_size(mc['ram_bytes'])}"
              f" ({_size(mc['ram_available_bytes'])} available), Python {mc['python']}")
    out.print(f"[bold]disk[/]     {mc['dir']}  {mc['filesystem']}, "
              f"{_size(mc['disk_free_bytes'])} free of {_size(mc['disk_total_bytes'])}")
    out.print(f"[bold]load[/]     {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} at start, "
              f"{le[0]:.2f} {le[1]:.2f} {le[2]:.2f} at end")
    out.print(f"[bold]store[/]    k={cf['k']} m={cf['m']}, chunks {cf['chunk_size'] // MiB} MiB, "
              f"durability {cf['durability']}, write_concurrency {cf['write_concurrency']}, "
              f"readahead {cf['readahead']}, io_threads {cf['io_threads']}; "
              f"big file {cf['big_bytes'] // MiB} MiB, {cf['small_files']:,} small files, "
              f"{cf['random_reads']:,} random reads; page cache {cf['page_cache']}")
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    t.add_column("lodestore", justify="right")
    t.add_column("baseline", justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("target")
    footnotes: list[str] = []
    for r in res.rows:
        name = f"  └ {r.metric}" if r.component else r.metric
        if r.note:
            footnotes.append(r.note)
            name += f" [dim]\\[{len(footnotes)}][/]"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}×"
        t.add_row(name, _num(r.lodestore, r.unit), _num(r.baseline, r.unit), ratio,
                  _target_text(r))
    out.print(t)
    for i, note in enumerate(footnotes, 1):
        out.print(f"[dim]\\[{i}] {note}[/]")
    for note in res.notes:
        out.print(f"[dim]note: {note}[/]")


def console(stderr: bool = False) -> Console:
    """A console that does not wrap the table at 80 columns when piped."""
    c = Console(highlight=False, stderr=stderr)
    if not c.is_terminal:
        c = Console(highlight=False, stderr=stderr, width=max(c.width, 110))
    return c


# -- the command -------------------------------------------------------------------------


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--dir", "dir_", type=click.Path(file_okay=False),
              help="Where to make the throwaway store and baseline files (default: next to "
                   "the store's home, so the same disk; else the temp dir).")
@click.option("--big-mib", type=click.IntRange(min=1), default=256, show_default=True,
              help="Big file size in MiB.")
@click.option("--small", type=click.IntRange(min=1), default=2000, show_default=True,
              help="Number of 4 KiB small files.")
@click.option("--random", "random_", type=click.IntRange(min=1), default=5000,
              show_default=True, help="Number of random 4 KiB reads.")
@click.option("--threads", type=click.IntRange(min=1), default=4, show_default=True,
              help="Concurrency of the random reads.")
@click.option("--durability", type=click.Choice(["fsync", "none"]), default="fsync",
              show_default=True, help="The store's durability; the raw baselines match it.")
@click.option("--drop-caches/--no-drop-caches", default=None,
              help="Drop the page cache before each read phase (default: when root).")
@click.option("--quick", is_flag=True,
              help="CI-sized run of a few seconds (32 MiB, 300 small files, 1000 reads); "
                   "options given explicitly still apply.")
@click.option("--keep", is_flag=True, help="Keep the throwaway store and files.")
@click.option("--check", is_flag=True, help="Exit 1 if any target is missed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
@click.pass_context
def bench(ctx: click.Context, dir_: str | None, big_mib: int, small: int, random_: int,
          threads: int, durability: str, drop_caches: bool | None, quick: bool, keep: bool,
          check: bool, as_json: bool) -> None:
    """Benchmark a throwaway store against plain file I/O on the same disk."""
    s = Settings(dir=dir_, big_mib=big_mib, small=small, random=random_, threads=threads,
                 durability=durability, drop_caches=drop_caches, keep=keep)
    if quick:
        given = {"big_mib": "big_mib", "small": "small", "random": "random_"}
        for attr, param in given.items():
            if ctx.get_parameter_source(param) is not click.core.ParameterSource.COMMANDLINE:
                setattr(s, attr, QUICK[attr])
        s.encode_seconds = QUICK["encode_seconds"]
        s.read_rounds = QUICK["read_rounds"]
    if s.dir is None:
        root = ctx.find_root().obj
        home = root.get("home") if isinstance(root, dict) else None
        s.dir = default_bench_dir(home)
    err = Console(stderr=True)
    res = run_bench(s, err)
    if as_json:
        click.echo(json.dumps(res.as_dict(), indent=2))
    else:
        render(res, console())
    if check and not res.all_passed:
        missed = ", ".join(r.metric for r in res.rows if r.passed is False)
        click.echo(f"error: targets missed: {missed}", err=True)
        ctx.exit(1)

#!/usr/bin/env python
"""Full-size storage benchmark: ``lodestore bench`` at full size, plus two measurements
that take too long for the CLI command.

1. The bench table (server/bench.py) with a 1 GiB big file and 20,000 small files.
2. Stat latency with a million files in the store: the files are written through
   ``Volume.write`` by a few threads across many directories (1,000 files each). The
   populating rate is measured first; if the requested count would not finish within
   ``--scale-budget`` seconds the largest count that does is used, and said so. Stat p50/p99
   is sampled at several counts along the way (the smallest is the same-run baseline), and
   ``os.stat`` over the same number of plain files in the same layout is the disk baseline.
3. Peak RSS while writing a 4 GiB file streamed from a generator, in a fresh child process
   (VmHWM from /proc/self/status), next to the bound that chunk size and write concurrency
   imply and the RSS of the idle process with the store open.

Run from the repository root::

    .venv/bin/python benchmarks/bench_storage.py            # everything (~15-20 min)
    .venv/bin/python benchmarks/bench_storage.py --skip-scale --skip-rss
    .venv/bin/python benchmarks/bench_storage.py --json results.json

The machine and its load average are printed with the results; figures from a busy
machine are not comparable with figures from an idle one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402

from server.bench import (  # noqa: E402
    TENANT,
    MiB,
    Settings,
    Source,
    _Phases,
    console,
    default_bench_dir,
    machine_info,
    percentile,
    render,
    run_bench,
    small_payload,
)

GiB = 1024 * MiB


# -- (a) stat with many files -----------------------------------------------------------


def _scale_path(i: int, per_dir: int) -> str:
    return f"/scale/d{i // per_dir:05d}/f{i:07d}"


def _stat_sample(stat, paths: list[str]) -> dict[str, float]:  # type: ignore[no-untyped-def]
    lat: list[int] = []
    clock = time.perf_counter_ns
    t0 = time.perf_counter()
    for p in paths:
        a = clock()
        stat(p)
        lat.append(clock() - a)
    elapsed = time.perf_counter() - t0
    us = sorted(x / 1000 for x in lat)
    return {"ops_s": len(paths) / elapsed, "p50_us": percentile(us, 0.5),
            "p99_us": percentile(us, 0.99), "samples": len(paths)}


def scale_stat(args: argparse.Namespace, work: str, out) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    from storage import StoreConfig, Volume

    store_dir = os.path.join(work, "scale-store")
    cfg = StoreConfig.embedded(Path(store_dir), durability=args.scale_durability)
    vol = Volume.init(store_dir, cfg)
    vol.create_tenant(TENANT)
    per_dir = args.files_per_dir
    want = args.scale_files
    writers = args.scale_writers
    size = args.scale_file_bytes
    payload_base = small_payload(0, size)
    rng = random.Random(5)
    checkpoints = sorted({c for c in (10_000, 100_000, 300_000) if c < want} | {want})
    samples: list[dict[str, Any]] = []
    written = 0
    created_dirs: set[int] = set()

    def populate(lo: int, hi: int) -> float:
        """Write files [lo, hi) with ``writers`` threads, each on its own directories."""
        for d in range(lo // per_dir, -(-hi // per_dir)):
            if d not in created_dirs:
                vol.mkdir(TENANT, f"/scale/d{d:05d}", parents=True, exist_ok=True)
                created_dirs.add(d)

        def work(tid: int) -> None:
            for i in range(lo, hi):
                if (i // per_dir) % writers == tid:
                    vol.write(TENANT, _scale_path(i, per_dir), i.to_bytes(8, "little")
                              + payload_base[8:])

        t0 = time.perf_counter()
        threads = [threading.Thread(target=work, args=(t,)) for t in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0

    def sample(count: int) -> None:
        idx = [rng.randrange(count) for _ in range(args.stat_samples)]
        st = _stat_sample(lambda p: vol.stat(TENANT, p), [_scale_path(i, per_dir) for i in idx])
        st["files"] = count
        samples.append(st)
        out.print(f"  stat at {count:>9,} files: {st['ops_s']:>9,.0f}/s  "
                  f"p50 {st['p50_us']:6.1f} µs  p99 {st['p99_us']:7.1f} µs")

    with _Phases(console(stderr=True)) as ph:
        # estimate the populating rate on the first checkpoint (at most 10,000 files)
        probe = min(want, checkpoints[0])
        with ph.task("populate (probe)", 1, "") as adv:
            t_probe = populate(0, probe)
            adv(1)
        written = probe
        rate = probe / t_probe
        elapsed = t_probe
        estimate = want / rate
        target = want
        if estimate > args.scale_budget:
            target = max(probe, int(rate * args.scale_budget) // per_dir * per_dir)
            checkpoints = sorted({c for c in checkpoints if c < target} | {target})
        out.print(f"populating at {rate:,.0f} files/s ({writers} writers, {size} B inline "
                  f"files, durability {args.scale_durability}): {want:,} files would take "
                  f"~{estimate / 60:.1f} min" + (
                      "" if target == want else
                      f" > budget {args.scale_budget / 60:.0f} min; using {target:,} files"))
        sample(written)
        with ph.task("populate", target, "files") as adv:
            adv(written)
            for cp in checkpoints:
                if cp <= written:
                    continue
                # in slices, so the bar moves
                step = max(per_dir, 20_000 // per_dir * per_dir)
                for lo in range(written, cp, step):
                    hi = min(cp, lo + step)
                    elapsed += populate(lo, hi)
                    adv(hi - lo)
                written = cp
                sample(written)
    vol.close()

    # the disk baseline: os.stat over as many plain (empty) files in the same layout
    plain: dict[str, Any] | None = None
    if not args.skip_plain:
        base = os.path.join(work, "scale-plain")
        t0 = time.perf_counter()
        with _Phases(console(stderr=True)) as ph, ph.task("plain files", written, "files") as adv:
            for d in range(-(-written // per_dir)):
                folder = os.path.join(base, f"d{d:05d}")
                os.makedirs(folder)
                for i in range(d * per_dir, min(written, (d + 1) * per_dir)):
                    os.close(os.open(os.path.join(folder, f"f{i:07d}"),
                                     os.O_WRONLY | os.O_CREAT, 0o644))
                adv(per_dir)
        t_plain = time.perf_counter() - t0
        idx = [rng.randrange(written) for _ in range(args.stat_samples)]
        plain = _stat_sample(os.stat, [os.path.join(base, _scale_path(i, per_dir)[7:])
                                       for i in idx])
        plain["files"] = written
        plain["create_s"] = t_plain
        shutil.rmtree(base, ignore_errors=True)
    return {"requested": want, "files": written, "populate_rate": written / elapsed,
            "populate_seconds": elapsed, "writers": writers, "file_bytes": size,
            "durability": args.scale_durability, "samples": samples, "plain": plain}


def render_scale(sc: dict[str, Any], out) -> None:  # type: ignore[no-untyped-def]
    t = Table(title=f"stat with many files ({sc['files']:,} of {sc['requested']:,} requested)",
              title_justify="left")
    for col in ("files", "stat/s", "p50 µs", "p99 µs", "p99 vs first", "baseline"):
        t.add_column(col, justify="right" if col != "baseline" else "left")
    first = sc["samples"][0]
    for n, s in enumerate(sc["samples"]):
        t.add_row(f"{s['files']:,}", f"{s['ops_s']:,.0f}", f"{s['p50_us']:.1f}",
                  f"{s['p99_us']:.1f}", f"{s['p99_us'] / first['p99_us']:.2f}×",
                  "lodestore, same-run baseline" if n == 0 else "lodestore")
    p = sc.get("plain")
    if p:
        t.add_row(f"{p['files']:,}", f"{p['ops_s']:,.0f}", f"{p['p50_us']:.1f}",
                  f"{p['p99_us']:.1f}", "", "os.stat on as many plain files")
    out.print(t)
    out.print(f"[dim]populated through Volume.write at {sc['populate_rate']:,.0f} files/s "
              f"({sc['populate_seconds']:.0f} s, {sc['writers']} writer threads, "
              f"{sc['file_bytes']} B inline files, durability {sc['durability']}); "
              "stat is single-threaded, warm caches[/]")
    if sc["files"] < sc["requested"]:
        out.print(f"[yellow]only {sc['files']:,} files: {sc['requested']:,} would not finish "
                  "within the time budget on this machine[/]")


# -- (b) RSS while streaming a big write ------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_child(args: argparse.Namespace) -> None:
    """In a fresh process: open a store, stream ``--rss-gib`` GiB from a generator."""
    from storage import StoreConfig, Volume

    store_dir = os.path.join(args.rss_child, "rss-store")
    cfg = StoreConfig.embedded(Path(store_dir), durability=args.durability)
    vol = Volume.init(store_dir, cfg)
    vol.create_tenant(TENANT)
    size = int(args.rss_gib * GiB)

    def gen():  # type: ignore[no-untyped-def]
        src = Source(size, seed=11)
        while piece := src.read(MiB):
            yield piece

    Source(1, seed=11)  # the generator's 8 MiB pattern belongs to the idle baseline
    vol.write(TENANT, "/warmup.bin", Source(2 * cfg.chunk_size, seed=12))  # pools, caches
    idle = _status("VmRSS")
    hwm_before = _status("VmHWM")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    peak_sampled = [idle]
    done = threading.Event()

    def sampler() -> None:
        while not done.wait(0.02):
            peak_sampled[0] = max(peak_sampled[0], _status("VmRSS"))

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    t0 = time.perf_counter()
    info = vol.write(TENANT, "/rss/big.bin", gen())
    elapsed = time.perf_counter() - t0
    done.set()
    th.join()
    hwm = _status("VmHWM")
    vol.close()
    json.dump({
        "bytes": info.size, "seconds": elapsed, "mib_s": info.size / MiB / elapsed,
        "idle_rss": idle, "peak_rss": hwm if reset else max(hwm, peak_sampled[0]),
        "peak_sampled": peak_sampled[0], "hwm_reset": reset, "hwm_before": hwm_before,
        "chunk_size": cfg.chunk_size, "write_concurrency": cfg.write_concurrency,
        "io_threads": cfg.io_threads, "k": cfg.k, "m": cfg.m, "durability": cfg.durability,
    }, sys.stdout)


def rss_run(args: argparse.Namespace, work: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--rss-child", work, "--rss-gib", str(args.rss_gib),
           "--durability", args.durability]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"RSS child failed:\n{done.stderr}")
    r = json.loads(done.stdout)
    c, wc, k, m = r["chunk_size"], r["write_concurrency"], r["k"], r["m"]
    # per chunk in flight: the chunk, k data shares (+1 copy for the padded last), m-k
    # parity shares and m framed fragments: about (1 + 1 + (m-k)/k + m/k) chunk sizes;
    # write_concurrency chunks in flight plus the one the chunker is cutting (~2 chunks)
    per_chunk = c * (2 + (m - k) / k + m / k)
    r["bound"] = int(wc * per_chunk + 2 * c)
    return r


def render_rss(r: dict[str, Any], out) -> None:  # type: ignore[no-untyped-def]
    t = Table(title="memory while writing a big file from a generator", title_justify="left")
    for col in ("metric", "value"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    delta = r["peak_rss"] - r["idle_rss"]
    t.add_row("file written", f"{r['bytes'] / GiB:.1f} GiB at {r['mib_s']:.1f} MiB/s")
    t.add_row("idle RSS, store open (baseline)", f"{r['idle_rss'] / MiB:.1f} MiB")
    t.add_row("peak RSS (VmHWM)", f"{r['peak_rss'] / MiB:.1f} MiB")
    t.add_row("peak - idle", f"{delta / MiB:.1f} MiB")
    t.add_row(f"bound: {r['write_concurrency']} in flight x {r['chunk_size'] // MiB} MiB chunks",
              f"≈ {r['bound'] / MiB:.0f} MiB " + ("[green]✓[/]" if delta <= r["bound"]
                                                 else "[red]✗ over[/]"))
    out.print(t)
    out.print(f"[dim]chunk_size {r['chunk_size'] // MiB} MiB, write_concurrency "
              f"{r['write_concurrency']}, io_threads {r['io_threads']}, k={r['k']} m={r['m']}, "
              f"durability {r['durability']}; high-water mark "
              f"{'reset via /proc/self/clear_refs' if r['hwm_reset'] else 'not resettable'}[/]")


# -- main --------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", help="work folder (default: next to the store's home)")
    ap.add_argument("--big-mib", type=int, default=1024)
    ap.add_argument("--small", type=int, default=20_000)
    ap.add_argument("--random", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--scale-files", type=int, default=1_000_000)
    ap.add_argument("--scale-budget", type=float, default=600.0,
                    help="seconds allowed for populating the many-files store")
    ap.add_argument("--scale-writers", type=int, default=4)
    ap.add_argument("--scale-file-bytes", type=int, default=1024,
                    help="size of each populated file (inline in its metadata row)")
    ap.add_argument("--scale-durability", choices=["fsync", "none"], default="none",
                    help="durability while populating (stat itself only reads)")
    ap.add_argument("--files-per-dir", type=int, default=1000)
    ap.add_argument("--stat-samples", type=int, default=20_000)
    ap.add_argument("--skip-plain", action="store_true", help="no os.stat baseline at scale")
    ap.add_argument("--rss-gib", type=float, default=4.0)
    ap.add_argument("--skip-main", action="store_true")
    ap.add_argument("--skip-scale", action="store_true")
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="also write all figures to this file")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args)
        return

    out = console()
    parent = args.dir or default_bench_dir()
    os.makedirs(parent, exist_ok=True)
    results: dict[str, Any] = {}
    if not args.skip_main:
        s = Settings(dir=parent, big_mib=args.big_mib, small=args.small, random=args.random,
                     threads=args.threads, durability=args.durability,
                     drop_caches=False if args.no_drop_caches else None, keep=args.keep)
        res = run_bench(s)
        render(res, out, title="lodestore bench (full size)")
        results["bench"] = res.as_dict()
    else:
        mc = machine_info(parent)
        la = " ".join(f"{x:.2f}" for x in mc["loadavg_start"])
        out.print(f"[bold]machine[/]  {mc['cpu']}, {mc['cores']} cores, "
                  f"RAM {mc['ram_bytes'] / GiB:.1f} GiB, {mc['filesystem']}, load {la}")
    work = tempfile.mkdtemp(prefix="lodestore-bench-extra-", dir=parent)
    try:
        if not args.skip_scale:
            out.print()
            t0 = time.time()
            sc = scale_stat(args, work, out)
            sc["wall_seconds"] = time.time() - t0
            render_scale(sc, out)
            results["scale_stat"] = sc
        if not args.skip_rss:
            out.print()
            r = rss_run(args, work)
            render_rss(r, out)
            results["rss"] = r
    finally:
        if args.keep:
            out.print(f"[dim]kept {work}[/]")
        else:
            shutil.rmtree(work, ignore_errors=True)
    out.print(f"[dim]load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}[/]")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

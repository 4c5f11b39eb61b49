#!/usr/bin/env python
"""Token-warehouse benchmark: KV block put and get throughput beside raw disk baselines
measured in the same run, on the same disk, with the same durability.

Blocks are shaped like SmolLM2-135M's KV cache: 30 layers x (K, V) x 3 KV heads x 64 head
dim x 2 bytes (bf16) = 23,040 bytes per token; a 256-token block is 5.6 MiB and a 16-token
block 360 KiB. Rows, for each block size:

- **put**: ``TokenWarehouse.put_blocks`` in calls of ``--batch`` blocks (hashing, erasure
  coding k=4 m=6, fragments fsynced with ``--durability fsync``, metadata commits).
  Baselines: *raw write* = the same bytes written as plain files, one per block, each
  fsynced (``--durability none``: not fsynced), one after another; the store writes m/k
  times the bytes (parity), so the target is put ≥ 0.8 x ``min(raw write x k/m, encode
  rate of the erasure coder in use)`` (ISA-L computing zfec's code, else zfec), the
  ceiling an erasure-coded store has on this disk and CPU (the same convention as
  ``lodestore bench``). The plain ratio to raw write is printed too.
- **get**: ``get_blocks`` in calls of ``--batch`` blocks after the hot tier is dropped, so
  every byte comes from the chunk store; the page cache is dropped first when this process
  may (root), else both sides read warm and the table says so. Baseline: the plain files
  read back one after another. Target get ≥ 0.8 x raw read. Every block read is checked.
- **lookup**: longest-prefix lookups of a fully cached prompt (hot tier cold), p50 — for
  information.

The raw side and the store side run interleaved, one batch each in turn (the order
alternating), each side timed on its own: on this VM the disk's speed drifts 2x within a
minute, so separate passes compare moments, not code. A side's figure is its best of
``--rounds`` (default 3) rounds, every round printed. Each round puts fresh blocks under
fresh token ids, so nothing deduplicates.

Run from the repository root (a few minutes; ``--quick`` for a few seconds)::

    .venv/bin/python benchmarks/bench_warehouse.py
    .venv/bin/python benchmarks/bench_warehouse.py --mib 512 --durability none --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.table import Table  # noqa: E402

from server.bench import (  # noqa: E402
    MiB,
    can_drop_caches,
    console,
    default_bench_dir,
    drop_caches,
    encode_rates,
    machine_info,
    percentile,
)
from storage import StoreConfig, Volume  # noqa: E402
from storage.fsutil import fsync_dir, write_all  # noqa: E402
from storage.warehouse import TokenWarehouse  # noqa: E402

TENANT = "bench"
MODEL = "HuggingFaceTB/SmolLM2-135M"
BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 2  # layers x (K,V) x kv heads x head dim x bf16


def make_blocks(n: int, size: int, seed: int) -> list[bytes]:
    """Distinct, incompressible blocks (no two share a chunk: no dedup flatters the store)."""
    out = []
    for i in range(n):
        head = hashlib.sha256(f"{seed}:{i}".encode()).digest()
        base = hashlib.shake_256(head).digest(min(size, 1 << 20))
        buf = bytearray((base * (size // len(base) + 1))[:size])
        # make every 64 KiB distinct so chunk ids differ even in repeated material
        for off in range(0, size, 65536):
            buf[off:off + 32] = hashlib.sha256(head + off.to_bytes(8, "little")).digest()
        out.append(bytes(buf))
    return out


def raw_write(folder: str, blocks: list[bytes], start: int, fsync: bool) -> float:
    """Write ``blocks`` as plain files ``b{start + i}``, each fsynced when ``fsync``."""
    t0 = time.perf_counter()
    for i, b in enumerate(blocks, start):
        fd = os.open(os.path.join(folder, f"b{i:06d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                     0o644)
        try:
            write_all(fd, b)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
    return time.perf_counter() - t0


def raw_read(folder: str, blocks: list[bytes], start: int) -> float:
    t0 = time.perf_counter()
    for i, b in enumerate(blocks, start):
        with open(os.path.join(folder, f"b{i:06d}"), "rb", buffering=0) as f:
            data = f.read()
        if len(data) != len(b):
            raise RuntimeError("raw read returned a short file")
    return time.perf_counter() - t0


def run_case(vol: Volume, work: str, block_tokens: int, total_mib: int, batch: int,
             fsync: bool, drop: bool, k: int, m: int, coder_rate: float, seed: int,
             lookups: int, rounds: int = 3) -> dict[str, Any]:
    """Put and get rates of one block size, raw and store interleaved batch by batch.

    On this kind of VM the disk's speed drifts 2x within a minute (raw write 160-440
    MiB/s between passes; the first reads after a cache drop at a fraction of the disk's
    speed), so two separate passes compare moments, not code. Each round therefore runs
    the raw side and the store side one batch each in turn (the order alternating batch
    by batch), timing each side on its own; both see the same disk. A side's figure is
    its best round; every round's figures are reported. Every round puts fresh blocks
    under fresh token ids (nothing deduplicates); reads start from a dropped page cache.
    """
    size = block_tokens * BYTES_PER_TOKEN
    n = max(batch, total_mib * MiB // size)
    total = n * size
    model = f"{MODEL}@{block_tokens}"
    wh = TokenWarehouse(vol, hot_bytes=0)  # no hot tier: every byte goes to and from disk
    raw_w_t: list[float] = []
    put_t: list[float] = []
    raw_r_t: list[float] = []
    get_t: list[float] = []
    try:
        wh.register_model(TENANT, model, block_tokens, block_bytes=size, dtype="bfloat16")
        blocks: list[bytes] = []
        hashes: list[bytes] = []
        token_ids: list[int] = []
        raw_dir = ""
        for r in range(rounds):
            blocks = make_blocks(n, size, seed * 1000 + r)
            token_ids = [(seed * 7919 + r * 104_729 + i * 31) % 49_152
                         for i in range(n * block_tokens)]
            if raw_dir:
                shutil.rmtree(raw_dir, ignore_errors=True)
            raw_dir = os.path.join(work, f"raw-{block_tokens}-{r}")
            os.makedirs(raw_dir)
            os.sync()
            t_raw = t_put = 0.0
            hashes = []
            for j, s in enumerate(range(0, n, batch)):
                part = blocks[s:s + batch]
                for side in ("raw", "store") if j % 2 == 0 else ("store", "raw"):
                    if side == "raw":
                        t_raw += raw_write(raw_dir, part, s, fsync)
                        continue
                    t0 = time.perf_counter()
                    hashes += wh.put_blocks(TENANT, model, token_ids, part, start_block=s)
                    t_put += time.perf_counter() - t0
            if fsync:  # the raw files' directory entries, once for the round
                t0 = time.perf_counter()
                fsync_dir(raw_dir)
                t_raw += time.perf_counter() - t0
            raw_w_t.append(t_raw)
            put_t.append(t_put)
        os.sync()
        for _r in range(rounds):  # the last round's blocks, read back
            wh.drop_hot()
            if drop:
                drop_caches()
            t_raw = t_get = 0.0
            got: list[bytes | None] = []
            for j, s in enumerate(range(0, n, batch)):
                for side in ("raw", "store") if j % 2 == 0 else ("store", "raw"):
                    if side == "raw":
                        t_raw += raw_read(raw_dir, blocks[s:s + batch], s)
                        continue
                    t0 = time.perf_counter()
                    got += wh.get_blocks(TENANT, model, hashes[s:s + batch])
                    t_get += time.perf_counter() - t0
            raw_r_t.append(t_raw)
            get_t.append(t_get)
            if got != blocks:
                raise RuntimeError("the warehouse returned different bytes than were put")
            del got
        lat = []
        for _ in range(lookups):
            t0 = time.perf_counter()
            if wh.lookup(TENANT, model, token_ids) != len(token_ids):
                raise RuntimeError("lookup missed cached blocks")
            lat.append((time.perf_counter() - t0) * 1000)
        lat.sort()
        shutil.rmtree(raw_dir, ignore_errors=True)
    finally:
        wh.close()

    def rate(t: float) -> float:
        return total / MiB / t

    raw_w = rate(min(raw_w_t))
    ceiling = min(raw_w * k / m, coder_rate)
    put = rate(min(put_t))
    get = rate(min(get_t))
    raw_r = rate(min(raw_r_t))
    return {"block_tokens": block_tokens, "block_bytes": size, "blocks": n,
            "total_mib": total / MiB, "rounds": rounds, "put_mib_s": put,
            "raw_write_mib_s": raw_w, "put_baseline_mib_s": ceiling,
            "put_ratio": put / ceiling, "put_ratio_raw": put / raw_w, "get_mib_s": get,
            "raw_read_mib_s": raw_r, "get_ratio": get / raw_r,
            "put_rounds_mib_s": [rate(t) for t in put_t],
            "raw_write_rounds_mib_s": [rate(t) for t in raw_w_t],
            "get_rounds_mib_s": [rate(t) for t in get_t],
            "raw_read_rounds_mib_s": [rate(t) for t in raw_r_t],
            "lookup_p50_ms": percentile(lat, 0.5), "lookup_blocks": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=None, help="work folder (default: next to the store home)")
    ap.add_argument("--mib", type=int, default=256, help="MiB per block size (default 256)")
    ap.add_argument("--tokens", default="256,16", help="block sizes in tokens (default 256,16)")
    ap.add_argument("--batch", type=int, default=16, help="blocks per put/get call")
    ap.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--no-drop-caches", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved raw/store rounds, best of each side (default 3)")
    ap.add_argument("--quick", action="store_true", help="32 MiB per block size, 1 round")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    ap.add_argument("--keep", action="store_true", help="keep the throwaway store")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.rounds = 32, 1
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    out = console()
    base = args.dir or default_bench_dir()
    work = tempfile.mkdtemp(prefix="lodestore-bench-kv-", dir=base)
    drop = not args.no_drop_caches and can_drop_caches()
    fsync = args.durability == "fsync"
    info = machine_info(work)
    cfg = StoreConfig.embedded(Path(work) / "store", durability=args.durability)
    vol = Volume.init(Path(work) / "store", cfg)
    vol.create_tenant(TENANT)
    results = []
    try:
        rates = encode_rates(cfg.chunk_size, cfg.k, cfg.m, os.cpu_count() or 1, 0.6)
        for i, bt in enumerate(int(x) for x in args.tokens.split(",")):
            out.print(f"[dim]block of {bt} tokens: {bt * BYTES_PER_TOKEN / MiB:.2f} MiB ...[/]")
            results.append(run_case(vol, work, bt, args.mib, args.batch, fsync, drop, cfg.k,
                                    cfg.m, rates["coder"], seed=i + 1, lookups=20,
                                    rounds=args.rounds))
    finally:
        vol.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    info["loadavg_end"] = list(os.getloadavg())
    coder = info["erasure_coder"]

    out.print(f"machine: {info['cpu']} x{info['cores']}, {info['filesystem']}, load "
              f"{info['loadavg_start'][0]:.2f} → {info['loadavg_end'][0]:.2f}; durability "
              f"{args.durability}; page cache "
              + ("dropped before each read" if drop else "NOT dropped (not root or refused): "
                 "reads are warm on both sides")
              + f"; {coder} encode {rates['coder']:.0f} MiB/s (bare zfec {rates['zfec']:.0f});"
              f" k={cfg.k} m={cfg.m}, "
              f"chunk {cfg.chunk_size // MiB} MiB; {args.batch} blocks per call")
    t = Table(title="token warehouse vs raw disk (same run, same disk)", title_justify="left")
    for col in ("block", "blocks", "MiB", "put MiB/s", "raw write", "baseline", "put ratio",
                "get MiB/s", "raw read", "get ratio", "lookup p50"):
        t.add_column(col, justify="right")
    ok = True
    for r in results:
        put_ok, get_ok = r["put_ratio"] >= 0.8, r["get_ratio"] >= 0.8
        ok &= put_ok and get_ok
        t.add_row(f"{r['block_tokens']} tok / {r['block_bytes'] / MiB:.2f} MiB",
                  str(r["blocks"]), f"{r['total_mib']:.0f}", f"{r['put_mib_s']:.1f}",
                  f"{r['raw_write_mib_s']:.1f}", f"{r['put_baseline_mib_s']:.1f}",
                  f"{'[green]' if put_ok else '[red]'}{r['put_ratio']:.2f}x[/] "
                  f"({r['put_ratio_raw']:.2f}x raw)",
                  f"{r['get_mib_s']:.1f}", f"{r['raw_read_mib_s']:.1f}",
                  f"{'[green]' if get_ok else '[red]'}{r['get_ratio']:.2f}x[/]",
                  f"{r['lookup_p50_ms']:.1f} ms / {r['lookup_blocks']} blk")
    out.print(t)
    out.print(f"baseline = min(raw write x k/m, {coder} encode): the store writes m/k times the "
              "bytes; targets: put ≥ 0.8x baseline, get ≥ 0.8x raw read")
    def rounds(r: dict[str, Any], key: str) -> str:
        return " / ".join(f"{v:.0f}" for v in r[key])

    for r in results:
        out.print(f"{r['block_tokens']} tok, best of {r['rounds']} interleaved rounds (MiB/s): "
                  f"raw write {rounds(r, 'raw_write_rounds_mib_s')}; put {rounds(r, 'put_rounds_mib_s')}"
                  f"; raw read {rounds(r, 'raw_read_rounds_mib_s')}; get {rounds(r, 'get_rounds_mib_s')}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "durability": args.durability,
                                               "page_cache_dropped": drop, "results": results},
                                              indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

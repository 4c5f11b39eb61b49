"""Audit log append throughput and latency, beside plain write(+fsync) of a same-size line.

    python benchmarks/bench_audit.py [--seconds 2] [--threads 1 8] [--dir /path/on/the/disk]

Each row runs for ``--seconds``: every thread appends events back to back and records the
latency of each call. Baselines in the same run: one ``os.write`` of a line of the same size
to an O_APPEND file, with and without ``fdatasync`` after each line, from the same number of
threads (no batching: that is what group commit saves).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from governance.audit import AuditEvent, AuditLog  # noqa: E402


def event(i: int) -> AuditEvent:
    return AuditEvent(
        tenant="acme", agent=f"agent-{i % 7}", operation="write_file",
        path=f"/projects/report-{i % 1000}.md", bytes=4096 + i % 100, decision="allow",
        labels=["EMAIL_ADDRESS", "PERSON"], latency_ms=3.25, transport="http",
    )


def run_threads(n_threads: int, seconds: float, op) -> tuple[int, list[float], float]:
    """Run ``op(i)`` back to back in n threads for ``seconds``:
    (count, latencies in s, elapsed s)."""
    lat: list[list[float]] = [[] for _ in range(n_threads)]
    stop = time.perf_counter() + seconds
    start = threading.Barrier(n_threads)

    def work(k: int) -> None:
        mine = lat[k]
        pc = time.perf_counter
        i = k
        start.wait()
        while True:
            t = pc()
            if t >= stop:
                break
            op(i)
            mine.append(pc() - t)
            i += n_threads

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [x for part in lat for x in part]
    return len(flat), flat, elapsed


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def audit_line_len(base: Path) -> int:
    d = Path(tempfile.mkdtemp(dir=base, prefix="audit-"))
    log = AuditLog(d, fsync=False)
    for i in range(100):
        log.append(event(i))
    log.close()
    size = sum(p.stat().st_size for p in d.glob("seg-*.jsonl"))
    shutil.rmtree(d)
    return size // 100


def bench_audit(log: AuditLog, n_threads: int, seconds: float):
    return run_threads(n_threads, seconds, lambda i: log.append(event(i)))


def bench_async(log: AuditLog, concurrency: int, seconds: float):
    lat: list[float] = []

    async def worker(k: int, stop: float) -> None:
        i = k
        while (t := time.perf_counter()) < stop:
            await log.append_async(event(i))
            lat.append(time.perf_counter() - t)
            i += concurrency

    async def main() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, t0 + seconds) for k in range(concurrency)))
        return time.perf_counter() - t0

    el = asyncio.run(main())
    return len(lat), lat, el


def bench_plain(base: Path, fsync: bool, n_threads: int, seconds: float, line_len: int):
    fd_path = Path(tempfile.mkstemp(dir=base, prefix="plain-")[1])
    fd = os.open(fd_path, os.O_WRONLY | os.O_APPEND)
    line = b"x" * (line_len - 1) + b"\n"

    def op(_i: int) -> None:
        os.write(fd, line)
        if fsync:
            os.fdatasync(fd)

    n, lat, el = run_threads(n_threads, seconds, op)
    os.close(fd)
    fd_path.unlink()
    return n, lat, el


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="per case, over all rounds")
    ap.add_argument("--rounds", type=int, default=4,
                    help="cases run interleaved in this many slices, so drift hits all alike")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--async-concurrency", type=int, default=64)
    ap.add_argument("--dir", type=Path, default=None, help="folder on the disk to measure")
    args = ap.parse_args()
    base = args.dir or Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    slice_s = args.seconds / args.rounds
    line_len = audit_line_len(base)
    work = Path(tempfile.mkdtemp(dir=base, prefix="bench-audit-"))
    logs: list[AuditLog] = []

    def new_log(fsync: bool) -> AuditLog:  # one log per case, kept across its slices
        logs.append(AuditLog(work / f"log{len(logs)}", fsync=fsync))
        return logs[-1]

    cases = []
    for fsync in (True, False):
        for nt in args.threads:
            plural = "s" * (nt > 1)
            lg = new_log(fsync)
            cases.append((f"AuditLog.append, {nt} thread{plural}", fsync,
                          lambda lg=lg, n=nt: bench_audit(lg, n, slice_s)))
            cases.append((f"  baseline write{'+fdatasync' if fsync else ''}, {nt} thread{plural}",
                          fsync, lambda f=fsync, n=nt: bench_plain(work, f, n, slice_s, line_len)))
        lg = new_log(fsync)
        cases.append((f"AuditLog.append_async, {args.async_concurrency} tasks", fsync,
                      lambda lg=lg: bench_async(lg, args.async_concurrency, slice_s)))
    totals = [[0, [], 0.0] for _ in cases]
    for _ in range(args.rounds):
        for k, (_, _, run) in enumerate(cases):
            n, lat, el = run()
            t = totals[k]
            t[0] += n
            t[1] += lat
            t[2] += el
    rolls = sum(len(list(lg.directory.glob("seg-*.parquet"))) for lg in logs)
    for lg in logs:
        lg.close()
    shutil.rmtree(work)

    print(f"audit log append: {args.seconds:g} s per case in {args.rounds} interleaved slices, "
          f"line {line_len} B, dir {base}, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, segment_events 10000 ({rolls} segments rolled during the run)")
    print(f"{'case':42} {'fsync':>5} {'events':>8} {'events/s':>10} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'max ms':>8}")
    for (label, fsync, _), (n, lat, el) in zip(cases, totals, strict=True):
        print(f"{label:42} {'on' if fsync else 'off':>5} {n:>8} {n / el:>10.0f} "
              f"{statistics.median(lat) * 1e3 if lat else float('nan'):>8.3f} "
              f"{pct(lat, 0.99) * 1e3:>8.3f} {max(lat, default=float('nan')) * 1e3:>8.3f}")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""QoS benchmark: noisy-neighbour isolation, fairness and admission overhead.

Operations are simulated as ``asyncio.sleep(service)`` (default 2 ms) through a
:class:`governance.qos.Scheduler` of capacity C, so what is measured is the scheduler and
the event loop, not a disk. Every figure has a baseline measured in the same run:

1. **Victim solo** - one tenant sends an open-loop stream at 50 % of its ops/s limit;
   latency p50/p99 measured from the call (admission wait + service) and from its planned
   arrival time (which adds any event-loop lag before the call starts). Solo and
   neighbour runs alternate ``--rounds`` times so that both see the same machine load.
2. **Victim beside a neighbour sending 10x its limit** - the same victim stream while a
   second tenant sends 10x its own ops/s limit (open loop). Reported: victim p99 and its
   ratio to solo (target <= 1.2), pooled and as the median of per-round ratios; the
   victim's admission-wait p99 (the scheduler's own share of its latency) and the
   process CPU of each case. Baseline: the same two streams through a bare
   ``asyncio.Semaphore(C)`` (no QoS), where the neighbour's excess fills the server.
3. **Capacity flood** (informative) - the neighbour has no rate limit and runs 4xC
   closed-loop workers; victim p99 with the fair queue vs the FIFO semaphore.
4. **Fairness** - N (default 8) equally weighted tenants, all saturating, tenant i with
   2(i+1) closed-loop workers (unequal greed); per-tenant throughput and Jain's index
   (target >= 0.95) vs the FIFO semaphore, where throughput follows the worker count.
5. **Overhead** - µs per uncontended admit/release: the scheduler (no limits; with
   ops+bytes buckets; sync ``admit_sync``) vs ``asyncio.Semaphore`` /
   ``threading.Semaphore``; with Redis buckets when Redis answers on 127.0.0.1:6379.

The start-up heap is frozen (``gc.freeze()``) before measuring, as a server should do
after start-up (``--no-gc-freeze`` to compare): otherwise a full cyclic-GC pass over it
stalls the event loop for tens of ms, which shows in every tenant's p99.

Run from the repository root::

    .venv/bin/python benchmarks/bench_qos.py               # ~1.5 min
    .venv/bin/python benchmarks/bench_qos.py --duration 4 --only isolation  # quicker
    .venv/bin/python benchmarks/bench_qos.py --json qos.json

The machine's core count and load average are printed with the results: p99s from a busy
machine are not comparable with p99s from an idle one.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from governance.qos import QosPolicy, RateLimited, Scheduler, make_buckets  # noqa: E402

console = Console(width=int(os.environ.get("COLUMNS", "150")))
Admit = Callable[[str], Any]  # tenant -> async context manager


def percentile(sorted_vals: list[float], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


def jain(xs: list[float]) -> float:
    s, s2 = sum(xs), sum(x * x for x in xs)
    return (s * s) / (len(xs) * s2) if s2 else float("nan")


def sem_admit(capacity: int) -> Admit:
    sem = asyncio.Semaphore(capacity)
    return lambda _tenant: sem


def sched_admit(sched: Scheduler) -> Admit:
    return lambda tenant: sched.admit(tenant)


async def open_loop(admit: Admit, tenant: str, rate: float, duration: float, service: float,
                    lat: dict[str, list[float]] | None, counts: dict[str, int]) -> None:
    """Send ``rate`` calls/s at planned times. Latency is recorded twice: from the planned
    arrival (``plan``: includes any event-loop lag before the call starts) and from the
    call itself (``call``: admission wait + service + lag while it runs)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = int(rate * duration)
    tasks: set[asyncio.Task[None]] = set()

    async def one(planned: float) -> None:
        start = loop.time()
        try:
            async with admit(tenant):
                admitted = loop.time()
                await asyncio.sleep(service)
        except RateLimited:
            counts["limited"] = counts.get("limited", 0) + 1
            return
        counts["ok"] = counts.get("ok", 0) + 1
        if lat is not None:
            end = loop.time()
            lat["plan"].append(end - planned)
            lat["call"].append(end - start)
            lat["admit"].append(admitted - start)

    for i in range(n):
        planned = t0 + i / rate
        delay = planned - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(planned))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def closed_loop(admit: Admit, tenant: str, workers: int, stop_at: float,
                      service: float, counter: list[int], warm_until: float) -> None:
    loop = asyncio.get_running_loop()

    async def worker() -> None:
        while loop.time() < stop_at:
            async with admit(tenant):
                await asyncio.sleep(service)
            if loop.time() >= warm_until:
                counter[0] += 1

    await asyncio.gather(*[worker() for _ in range(workers)])


def lat_stats(lat: dict[str, list[float]]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(lat["call"])}
    for kind, vals in lat.items():
        v = sorted(vals)
        out[f"{kind}_p50_ms"] = percentile(v, 0.50) * 1e3
        out[f"{kind}_p99_ms"] = percentile(v, 0.99) * 1e3
    return out


# ---------------------------------------------------------------------------- scenarios


async def victim_run(admit: Admit, args: argparse.Namespace, neighbour: str | None,
                     neighbour_rate: float, duration: float,
                     vlat: dict[str, list[float]], nc: dict[str, int]) -> None:
    service = args.service_ms / 1e3
    vc: dict[str, int] = {}
    jobs: list[Awaitable[None]] = [
        open_loop(admit, "victim", 0.5 * args.limit, duration, service, vlat, vc)
    ]
    if neighbour == "open":
        jobs.append(open_loop(admit, "noisy", neighbour_rate, duration, service, None, nc))
    elif neighbour == "closed":
        loop = asyncio.get_running_loop()
        cnt = [0]
        jobs.append(closed_loop(admit, "noisy", 4 * args.capacity,
                                loop.time() + duration, service, cnt, 0.0))
    await asyncio.gather(*jobs)
    if vc.get("limited"):
        raise SystemExit(f"the victim was rate limited {vc['limited']} times: bench bug")


def new_lat() -> dict[str, list[float]]:
    return {"plan": [], "call": [], "admit": []}


def make_sched(args: argparse.Namespace) -> Scheduler:
    s = Scheduler(args.capacity)
    s.configure("victim", QosPolicy(ops_per_second=args.limit))
    s.configure("noisy", QosPolicy(ops_per_second=args.limit))
    return s


def scenario_isolation(args: argparse.Namespace) -> dict[str, Any]:
    """Solo and with-neighbour runs alternate (``--rounds``) so that both see the same
    background load; samples are pooled per case."""
    rate10 = 10 * args.limit
    per = args.duration / args.rounds
    solo, noisy, base = new_lat(), new_lat(), new_lat()
    nc: dict[str, int] = {}
    round_ratios: list[float] = []
    cpu = {"solo": 0.0, "neighbour": 0.0}
    for _ in range(args.rounds):
        rs, rn = new_lat(), new_lat()
        c0 = time.process_time()
        asyncio.run(victim_run(sched_admit(make_sched(args)), args, None, 0, per, rs, {}))
        c1 = time.process_time()
        asyncio.run(victim_run(sched_admit(make_sched(args)), args, "open", rate10, per,
                               rn, nc))
        cpu["solo"] += c1 - c0
        cpu["neighbour"] += time.process_time() - c1
        round_ratios.append(lat_stats(rn)["call_p99_ms"] / lat_stats(rs)["call_p99_ms"])
        for k in solo:
            solo[k] += rs[k]
            noisy[k] += rn[k]
    bc: dict[str, int] = {}

    async def baseline() -> None:
        await victim_run(sem_admit(args.capacity), args, "open", rate10, per, base, bc)

    asyncio.run(baseline())
    s, w, b = lat_stats(solo), lat_stats(noisy), lat_stats(base)
    # what the neighbour's buckets may admit: a burst per round, then the rate for the
    # run and for the max_wait_ms (2 s) its last calls of each round may wait
    bound = args.rounds * args.limit * (1 + 2.0) + args.limit * args.duration
    return {"solo": s, "with_neighbour": w, "semaphore_with_neighbour": b,
            "ratio_call": w["call_p99_ms"] / s["call_p99_ms"],
            "ratio_plan": w["plan_p99_ms"] / s["plan_p99_ms"],
            "baseline_ratio_call": b["call_p99_ms"] / s["call_p99_ms"],
            "baseline_ratio_plan": b["plan_p99_ms"] / s["plan_p99_ms"],
            "neighbour_ok": nc.get("ok", 0), "neighbour_limited": nc.get("limited", 0),
            "neighbour_bound": int(bound), "baseline_neighbour_ok": bc.get("ok", 0),
            "baseline_duration_s": per,
            "round_ratios_call": round_ratios,
            "median_round_ratio_call": sorted(round_ratios)[len(round_ratios) // 2],
            "cpu_percent": {k: 100 * v / args.duration for k, v in cpu.items()}}


def scenario_flood(args: argparse.Namespace) -> dict[str, Any]:
    per = args.duration / args.rounds
    fq, base = new_lat(), new_lat()

    async def run(admit: Admit, lat: dict[str, list[float]]) -> None:
        await victim_run(admit, args, "closed", 0, per, lat, {})

    for _ in range(args.rounds):
        s = Scheduler(args.capacity)
        s.configure("victim", QosPolicy(ops_per_second=args.limit))
        asyncio.run(run(sched_admit(s), fq))
        asyncio.run(run(sem_admit(args.capacity), base))
    return {"fair_queue": lat_stats(fq), "semaphore": lat_stats(base)}


def scenario_fairness(args: argparse.Namespace) -> dict[str, Any]:
    service = args.service_ms / 1e3
    names = [f"t{i}" for i in range(args.tenants)]

    async def go(admit: Admit) -> list[float]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        warm, stop = now + 0.3, now + 0.3 + args.duration
        counters = {n: [0] for n in names}
        await asyncio.gather(*[
            closed_loop(admit, n, 2 * (i + 1), stop, service, counters[n], warm)
            for i, n in enumerate(names)
        ])
        return [counters[n][0] / args.duration for n in names]

    s = Scheduler(args.capacity)
    for n in names:
        s.configure(n, QosPolicy(weight=1.0))
    fq = asyncio.run(go(sched_admit(s)))

    async def base() -> list[float]:
        return await go(sem_admit(args.capacity))

    fifo = asyncio.run(base())
    return {"workers": [2 * (i + 1) for i in range(args.tenants)],
            "fair_queue_ops_s": fq, "semaphore_ops_s": fifo,
            "jain": jain(fq), "baseline_jain": jain(fifo),
            "capacity_ops_s": args.capacity / service}


def scenario_overhead(args: argparse.Namespace) -> dict[str, Any]:
    n = args.overhead_n

    async def timed(cm_for: Callable[[], Any]) -> float:
        for _ in range(1000):
            async with cm_for():
                pass
        t0 = time.perf_counter()
        for _ in range(n):
            async with cm_for():
                pass
        return (time.perf_counter() - t0) / n * 1e6

    async def all_async() -> dict[str, float]:
        sem = asyncio.Semaphore(args.capacity)
        plain = Scheduler(args.capacity)
        limited = Scheduler(args.capacity)
        limited.configure("t", QosPolicy(ops_per_second=1e9, bytes_per_second=1e12))
        return {
            "asyncio.Semaphore": await timed(lambda: sem),
            "Scheduler.admit (no limits)": await timed(lambda: plain.admit("t")),
            "Scheduler.admit (ops+bytes buckets)": await timed(
                lambda: limited.admit("t", cost_bytes=4096)),
        }

    out = asyncio.run(all_async())

    def timed_sync(cm_for: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with cm_for():
                pass
        return (time.perf_counter() - t0) / n * 1e6

    tsem = threading.Semaphore(args.capacity)
    sync_sched = Scheduler(args.capacity)
    sync_sched.configure("t", QosPolicy(ops_per_second=1e9))
    out["threading.Semaphore"] = timed_sync(lambda: tsem)
    out["Scheduler.admit_sync (ops bucket)"] = timed_sync(lambda: sync_sched.admit_sync("t"))

    try:
        import redis

        r = redis.Redis(socket_connect_timeout=0.5)
        r.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no Redis to measure
        out["Redis buckets"] = f"skipped: {exc}"
        return out
    prefix = f"lodestore:bench:{uuid.uuid4().hex[:8]}:"
    buckets = make_buckets(f"redis://127.0.0.1:6379/0?prefix={prefix}")
    rs = Scheduler(args.capacity, buckets=buckets)
    rs.configure("t", QosPolicy(ops_per_second=1e9))
    m = max(200, n // 20)

    async def redis_async() -> float:
        for _ in range(50):
            async with rs.admit("t"):
                pass
        t0 = time.perf_counter()
        for _ in range(m):
            async with rs.admit("t"):
                pass
        await buckets.aclose()
        return (time.perf_counter() - t0) / m * 1e6

    t0 = time.perf_counter()
    for _ in range(m):
        r.ping()
    out["redis PING round trip (baseline)"] = (time.perf_counter() - t0) / m * 1e6
    out["Scheduler.admit (Redis buckets)"] = asyncio.run(redis_async())
    keys = list(r.scan_iter(match=f"{prefix}*"))
    if keys:
        r.delete(*keys)
    buckets.close()
    r.close()
    return out


# ---------------------------------------------------------------------------- report


def render(res: dict[str, Any], args: argparse.Namespace) -> None:
    t = Table(title=f"QoS: capacity {args.capacity}, service {args.service_ms:g} ms, "
                    f"limit {args.limit:g} ops/s per tenant, {args.duration:g} s per run")
    for col in ("measurement", "value", "baseline (same run)", "target"):
        t.add_column(col)
    if "isolation" in res:
        iso = res["isolation"]
        s, w, b = iso["solo"], iso["with_neighbour"], iso["semaphore_with_neighbour"]
        for kind, label in (("call", "from call"), ("plan", "from planned arrival")):
            t.add_row(f"victim solo @50% of limit, p50 / p99 ({label})",
                      f"{s[kind + '_p50_ms']:.2f} / {s[kind + '_p99_ms']:.2f} ms (n={s['n']})",
                      "", "")
            t.add_row(f"victim + neighbour @10x its limit, p50 / p99 ({label})",
                      f"{w[kind + '_p50_ms']:.2f} / {w[kind + '_p99_ms']:.2f} ms",
                      f"{b[kind + '_p50_ms']:.2f} / {b[kind + '_p99_ms']:.2f} ms "
                      "(Semaphore, no QoS)", "")
            r = iso[f"ratio_{kind}"]
            t.add_row(f"victim p99 beside neighbour / solo ({label})", f"{r:.2f}x",
                      f"{iso[f'baseline_ratio_{kind}']:.2f}x",
                      f"<= 1.2x  {'PASS' if r <= 1.2 else 'MISS'}")
        rr = iso["median_round_ratio_call"]
        t.add_row("  median of per-round p99 ratios (from call)", f"{rr:.2f}x",
                  " ".join(f"{x:.2f}" for x in iso["round_ratios_call"]),
                  f"<= 1.2x  {'PASS' if rr <= 1.2 else 'MISS'}")
        t.add_row("victim admission wait p99: solo / beside neighbour",
                  f"{s['admit_p99_ms']:.3f} / {w['admit_p99_ms']:.3f} ms",
                  f"{b['admit_p99_ms']:.3f} ms (Semaphore)", "")
        t.add_row("process CPU: solo / beside neighbour",
                  f"{iso['cpu_percent']['solo']:.0f}% / {iso['cpu_percent']['neighbour']:.0f}%"
                  " of a core", "", "")
        t.add_row(f"neighbour calls ({10 * args.limit:g}/s offered) admitted / rate limited",
                  f"{iso['neighbour_ok']} / {iso['neighbour_limited']}",
                  f"{iso['baseline_neighbour_ok']} / 0 in {iso['baseline_duration_s']:g} s",
                  f"<= ~{iso['neighbour_bound']} admitted")
    if "flood" in res:
        f1, f2 = res["flood"]["fair_queue"], res["flood"]["semaphore"]
        t.add_row(f"victim p99 (from call) beside {4 * args.capacity} unlimited closed-loop "
                  "workers", f"{f1['call_p99_ms']:.2f} ms",
                  f"{f2['call_p99_ms']:.2f} ms (FIFO Semaphore)", "info")
    if "fairness" in res:
        fair = res["fairness"]
        okj = "PASS" if fair["jain"] >= 0.95 else "MISS"
        t.add_row(f"Jain's index, {args.tenants} equal-weight busy tenants",
                  f"{fair['jain']:.3f}", f"{fair['baseline_jain']:.3f} (FIFO Semaphore)",
                  f">= 0.95  {okj}")
        t.add_row("  ops/s per tenant (workers " + ",".join(map(str, fair["workers"])) + ")",
                  " ".join(f"{x:.0f}" for x in fair["fair_queue_ops_s"]),
                  " ".join(f"{x:.0f}" for x in fair["semaphore_ops_s"]),
                  f"capacity {fair['capacity_ops_s']:.0f}/s")
    if "overhead" in res:
        ov = res["overhead"]
        for name, v in ov.items():
            if name in ("asyncio.Semaphore", "threading.Semaphore") or "PING" in name:
                continue
            if isinstance(v, str):
                t.add_row(f"admit+release: {name}", v, "", "")
                continue
            if "Redis" in name:
                base = f"{ov['redis PING round trip (baseline)']:.1f} µs (one PING)"
            elif "sync" in name:
                base = f"{ov['threading.Semaphore']:.2f} µs (threading.Semaphore)"
            else:
                base = f"{ov['asyncio.Semaphore']:.2f} µs (asyncio.Semaphore)"
            t.add_row(f"admit+release: {name}", f"{v:.2f} µs", base, "")
    console.print(t)
    m = res["machine"]
    console.print(f"machine: {m['cores']} cores, Python {m['python']}, load average "
                  f"{m['loadavg_start'][0]:.2f} at start, {m['loadavg_end'][0]:.2f} at end; "
                  f"gc.freeze() after start-up: {'yes' if m['gc_freeze'] else 'no'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capacity", type=int, default=8)
    ap.add_argument("--service-ms", type=float, default=2.0)
    ap.add_argument("--limit", type=float, default=400.0, help="ops/s limit per tenant")
    ap.add_argument("--duration", type=float, default=10.0,
                    help="seconds per case (split over the rounds)")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating solo / neighbour runs, pooled")
    ap.add_argument("--tenants", type=int, default=8)
    ap.add_argument("--overhead-n", type=int, default=50_000)
    ap.add_argument("--only", nargs="*", choices=["isolation", "flood", "fairness", "overhead"],
                    help="run only these parts")
    ap.add_argument("--no-gc-freeze", action="store_true",
                    help="leave the start-up heap to the cyclic GC (see below)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if not args.no_gc_freeze:
        # As a server should after start-up: move the start-up heap out of the collector's
        # reach, or each full collection walks it (tens of ms with SQLAlchemy loaded, more
        # with the MCP SDK and presidio) and stalls the event loop for every tenant.
        gc.collect()
        gc.freeze()
    machine = {"cores": os.cpu_count(), "python": platform.python_version(),
               "loadavg_start": list(os.getloadavg()), "gc_freeze": not args.no_gc_freeze}
    res: dict[str, Any] = {"machine": machine}
    steps = [("isolation", "isolation (victim solo, beside a 10x neighbour, no-QoS baseline)",
              scenario_isolation),
             ("flood", "capacity flood", scenario_flood),
             ("fairness", "fairness", scenario_fairness),
             ("overhead", "admission overhead", scenario_overhead)]
    for key, label, fn in steps:
        if args.only and key not in args.only:
            continue
        with console.status(label):
            res[key] = fn(args)
    machine["loadavg_end"] = list(os.getloadavg())
    render(res, args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

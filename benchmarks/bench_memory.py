#!/usr/bin/env python
"""Context memory: session append / context latency and recall quality (issue #5).

Rows, each beside a baseline from the same run on the same disk:

1. **session_append p50/p99** - the governed call in-process (QoS admit, presidio pattern
   scan, policy, KV commit, audit append) on ~300-byte turns. Baseline: a bare
   ``KVStore.put`` of the same bytes on the same backend. Target: p99 <= 5 ms (embedded).
2. **session_context p50/p99** - the most recent turns of a 200-turn session that fit a
   2,000-token budget (about a quarter of them; the rest counted into the marker).
   Baseline: a bare ``KVStore.scan`` of the session's turns. Target: p99 <= 5 ms. Also on
   a 5,000-turn session (baseline: ``get_many`` of the 40 newest turns).
3. The same two rows over Redis (``--redis URL``; default the local one), reported only.
4. **recall hit@5** on a generated memory set (below). Target >= 0.9.

The generated memory set: ``--projects`` made-up project names (random pronounceable
words, so no name is a dictionary word), each with one memory per fact type (owner team,
database, deploy day, budget, region, on-call channel, launch month, language: 8 facts),
plus 20% noise memories that mention a project and an unrelated topic. Each query asks
about one (project, fact type) in different words from the memory's: it shares the project
name and one fact keyword (e.g. memory "Project Zorvak is owned by the payments team", query
"which team owns zorvak"), so the right memory competes with the 7 other facts of the same
project and with every other project's memory of the same fact type. A hit is the right
memory in the top 5. Queries are a random sample of 500 (project, fact) pairs.

Run from the repository root::

    .venv/bin/python benchmarks/bench_memory.py            # ~1 min
    .venv/bin/python benchmarks/bench_memory.py --quick
    .venv/bin/python benchmarks/bench_memory.py --durability none
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from server.wiring import open_app  # noqa: E402
from storage import StoreConfig, Volume  # noqa: E402

TARGET_P99_MS = 5.0
TARGET_HIT5 = 0.9

FACTS = [  # (memory template, query template)
    ("Project {p} is owned by the {v} team", "which team owns {p}"),
    ("The {p} service stores its data in a {v} database", "what database does {p} use"),
    ("{p} deploys to production every {v}", "on which day is {p} deployed"),
    ("The yearly budget of {p} is {v} dollars", "how big is the {p} budget"),
    ("{p} runs in the {v} cloud region", "in which region does {p} run"),
    ("The on-call channel for {p} is #{v}", "where is the {p} on-call"),
    ("{p} is scheduled to launch in {v}", "when will {p} launch"),
    ("{p} is written mostly in {v}", "what language is {p} written in"),
]
VALUES = [
    ["payments", "search", "platform", "growth", "identity", "billing", "mobile", "data"],
    ["PostgreSQL", "MySQL", "Cassandra", "DynamoDB", "SQLite", "MongoDB", "Redis"],
    ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
    ["120000", "450000", "80000", "1200000", "300000"],
    ["eu-west-1", "us-east-2", "ap-south-1", "eu-central-1"],
    ["ops-alerts", "pager-duty", "sre-room", "incident-bridge"],
    ["March", "June", "September", "December", "January"],
    ["Rust", "Go", "Python", "Kotlin", "TypeScript"],
]
NOISE = ["The {p} retro was moved to the big meeting room",
         "Remember to thank the {p} folks for the lunch",
         "{p} had a flaky test in the nightly build last week"]
SYL = ["ka", "zor", "vek", "lu", "mi", "tra", "quo", "ny", "bel", "dax", "ri", "sho", "pim",
       "gal", "ter", "wex", "ju", "fon", "ilo", "bri"]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def timed(fn, n: int) -> list[float]:  # noqa: ANN001
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def latency_rows(home: Path, kv_url: str, durability: str, n: int, label: str,
                 long_turns: int = 5000) -> list[tuple]:
    Volume.init(home, StoreConfig.embedded(home, durability=durability, kv=kv_url)).close()
    app = open_app(home)
    try:
        pr = app.principals
        pr.add_tenant("bench")
        pr.set_policy("bench", "pii:\n  entities:\n    EMAIL_ADDRESS: {action: tag}\n"
                               "    US_SSN: {action: redact}\n")
        p = app.gateway.authenticate(pr.add_agent("bench", "bot"))
        door = app.gateway.memory
        kv = app.vol.kv
        rng = random.Random(1)
        words = ["context", "agent", "memory", "storage", "policy", "vector", "prompt",
                 "budget", "deploy", "the", "a", "of", "to", "and", "is", "we", "will"]

        def turn() -> str:
            return " ".join(rng.choice(words) for _ in range(45))

        payload = turn().encode()
        i = [0]

        def raw_put() -> None:
            i[0] += 1
            kv.put("bench", f"raw/{i[0]:012d}", payload)

        sid = door.session_append(p, None, "user", turn()).session
        base_put = timed(raw_put, n)
        app_ = timed(lambda: door.session_append(p, sid, "assistant", turn()), n)
        # a 200-turn session for context reads
        sid2 = None
        for _ in range(200):
            sid2 = door.session_append(p, sid2, "user", turn()).session
        base_scan = timed(lambda: kv.scan("bench", f"ses/{sid2}/t/"), n)
        ctx = timed(lambda: door.session_context(p, sid2, 2000), n)
        r = door.session_context(p, sid2, 2000)
        note = f"{len(r.turns)} turns + marker, {r.tokens} tokens"
        # a long conversation: the older turns are counted into the marker, not read
        sid3 = None
        for _ in range(long_turns):
            sid3 = door.session_append(p, sid3, "user", turn()).session
        base_long = timed(lambda: kv.get_many("bench", [f"ses/{sid3}/t/{i:012d}" for i in
                                                      range(long_turns, long_turns - 40, -1)]),
                          max(50, n // 4))
        ctx_long = timed(lambda: door.session_context(p, sid3, 2000), max(50, n // 4))
        kv.drop_namespace("bench")
        return [(f"{label} session_append", app_, "KVStore.put", base_put, ""),
                (f"{label} session_context", ctx, "KVStore.scan 200 turns", base_scan, note),
                (f"{label} session_context, {long_turns} turns", ctx_long,
                 "KVStore.get_many 40 turns", base_long, "same budget")]
    finally:
        app.close()


def recall_quality(home: Path, projects: int, queries: int) -> tuple[float, int, float]:
    Volume.init(home, StoreConfig.embedded(home, durability="none")).close()
    app = open_app(home)
    try:
        pr = app.principals
        pr.add_tenant("bench")
        p = app.gateway.authenticate(pr.add_agent("bench", "bot"))
        door = app.gateway.memory
        rng = random.Random(7)
        names: set[str] = set()
        while len(names) < projects:
            names.add("".join(rng.choice(SYL) for _ in range(rng.randint(2, 3))).capitalize())
        want: dict[tuple[str, int], str] = {}
        items = []
        for name in sorted(names):
            for fi, (mem_t, _q) in enumerate(FACTS):
                items.append(((name, fi), mem_t.format(p=name, v=rng.choice(VALUES[fi]))))
            if rng.random() < 0.2 * len(NOISE):
                items.append((None, rng.choice(NOISE).format(p=name)))
        rng.shuffle(items)
        for key, text in items:
            m, _u, _r = door.remember(p, text)
            if key is not None:
                want[key] = m.mid
        sample = rng.sample(sorted(want), min(queries, len(want)))
        hits = 0
        lat = []
        for name, fi in sample:
            q = FACTS[fi][1].format(p=name.lower())
            t0 = time.perf_counter()
            got = door.recall(p, q, limit=5)
            lat.append((time.perf_counter() - t0) * 1000.0)
            hits += any(g.memory.mid == want[(name, fi)] for g in got)
        return hits / len(sample), len(items), statistics.median(lat)
    finally:
        app.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--redis", default="redis://127.0.0.1:6379/0?prefix=lodestore-bench:")
    ap.add_argument("--no-redis", action="store_true")
    ap.add_argument("--projects", type=int, default=250)
    ap.add_argument("--dir", default=None, help="where the throwaway stores go")
    a = ap.parse_args()
    n = 200 if a.quick else 1000
    root = Path(tempfile.mkdtemp(prefix="lodestore-bench-mem-", dir=a.dir))
    print(f"# context memory bench: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"durability {a.durability}, {n} calls per row, store in {root}")
    rows = latency_rows(root / "emb", "", a.durability, n, "embedded")
    if not a.no_redis:
        try:
            rows += latency_rows(root / "red", a.redis, a.durability, n, "redis")
        except Exception as exc:  # noqa: BLE001 - Redis is optional for this bench
            print(f"# redis rows skipped: {type(exc).__name__}: {exc}")
    print("\n| row | p50 ms | p99 ms | baseline | base p50 | base p99 | target | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name, xs, bname, base, note in rows:
        target = (f"p99 <= {TARGET_P99_MS} ms: "
                  f"{'met' if pct(xs, .99) <= TARGET_P99_MS else 'MISSED'}"
                  if name.startswith("embedded") else "reported")
        print(f"| {name} | {pct(xs, .5):.3f} | {pct(xs, .99):.3f} | {bname} | "
              f"{pct(base, .5):.3f} | {pct(base, .99):.3f} | {target} | {note} |")
    projects = 60 if a.quick else a.projects
    hit5, total, med = recall_quality(root / "rec", projects, 150 if a.quick else 500)
    print(f"| recall hit@5 | {hit5:.3f} | | {total} memories, {projects} projects | | | "
          f">= {TARGET_HIT5}: {'met' if hit5 >= TARGET_HIT5 else 'MISSED'} | "
          f"median recall {med:.2f} ms |")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

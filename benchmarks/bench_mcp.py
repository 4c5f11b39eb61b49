"""MCP server benchmark: Lodestore over stdio and streamable HTTP, side by side in the same
run with the reference MCP filesystem server (npm ``@modelcontextprotocol/server-filesystem``
over stdio), all driven by the same Python ``mcp.Client``.

    .venv/bin/python benchmarks/bench_mcp.py                 # full run (~3 minutes)
    .venv/bin/python benchmarks/bench_mcp.py --quick         # CI-sized (~1 minute)
    .venv/bin/python benchmarks/bench_mcp.py --duration 20 --agents 64 --json out.json

Rows:

- per call, p50/p99 (client-measured round trip): read_file 1 KiB, write_file 1 KiB,
  list_directory of 100 entries, get_file_info. The three servers take turns in rounds so
  load on the machine hits them alike. Target: Lodestore's p50 <= the reference's.
- 1,000 small files (1 KiB) written, then read back: files/s and p50 per server.
- one 50 MiB file read by paged read_file (1 MiB pages) over stdio and HTTP; target
  >= 50 MB/s. Baseline: the reference server reading the same bytes whole (read_text_file).
- 64 agents (own tokens) over streamable HTTP for --duration seconds, mixed tools:
  throughput, p50/p99 per tool, errors (target 0). Baseline: one agent, same mix.

The reference server needs node and npm; it is installed with ``npm install`` into a
temporary folder (or ``--ref-dir``). Without node the Lodestore rows still run.
The store is a throwaway under a temporary folder (``--dir``) with the store's default
durability (``--durability``): audit events and writes are fsynced, the reference server
does not fsync.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import string
import subprocess
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import mcp_support as ms  # noqa: E402
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

REF_PKG = "@modelcontextprotocol/server-filesystem"
KIB = b"abcdefghijklmnopqrstuvwxyz012345" * 32  # 1 KiB of text


def pct(v: list[float], p: float) -> float:
    if not v:
        return float("nan")
    s = sorted(v)
    return s[min(len(s) - 1, int(p / 100.0 * len(s)))]


def ms_(x: float) -> str:
    return f"{x * 1e3:.3f}"


def text(res: Any) -> str:
    return "\n".join(getattr(c, "text", "") for c in res.content)


# -- servers --------------------------------------------------------------------------------


def install_reference(where: Path) -> Path | None:
    entry = where / "node_modules" / REF_PKG / "dist" / "index.js"
    if entry.exists():
        return entry
    if not shutil.which("node") or not shutil.which("npm"):
        print("reference server skipped: node/npm not found", file=sys.stderr)
        return None
    where.mkdir(parents=True, exist_ok=True)
    print(f"installing {REF_PKG} into {where} ...", file=sys.stderr)
    r = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(where), REF_PKG], capture_output=True, text=True, timeout=600)
    if r.returncode != 0 or not entry.exists():
        print(f"reference server skipped: npm install failed: {r.stderr.strip()[:300]}",
              file=sys.stderr)
        return None
    return entry


class Side:
    """One server as the benchmark sees it: a client and how to name its files and tools."""

    def __init__(self, name: str, client: Client, root: str, ref: bool = False) -> None:
        self.name, self.client, self.root, self.ref = name, client, root.rstrip("/"), ref

    def p(self, path: str) -> str:
        return self.root + path

    def call(self, op: str, path: str, **kw: Any) -> tuple[str, dict[str, Any]]:
        if op == "read_file":
            return ("read_text_file" if self.ref else "read_file"), {"path": self.p(path), **kw}
        if op == "write_file":
            return "write_file", {"path": self.p(path), "content": kw["content"]}
        return op, {"path": self.p(path)}

    async def do(self, op: str, path: str, **kw: Any) -> Any:
        name, args = self.call(op, path, **kw)
        res = await self.client.call_tool(name, args)
        if res.is_error:
            raise RuntimeError(f"{self.name} {name} {args.get('path')}: {text(res)[:200]}")
        return res


def make_store(home: Path, durability: str, agents: int) -> dict[str, str]:
    from storage import StoreConfig, Volume

    cfg = StoreConfig.embedded(home, durability=durability)
    Volume.init(home, cfg).close()
    spec = [("bench", f"a{i}", "agent") for i in range(agents)] + [("big", "reader", "agent")]
    tokens = ms.make_agents(home, spec)
    from server.wiring import open_app

    app = open_app(home)
    try:  # the 50 MiB file is written without PII scanning (not what is measured)
        app.principals.set_policy("big", "pii: {enabled: false}\n")
    finally:
        app.close()
    return tokens


def write_big(home: Path, token: str, mib: int) -> bytes:
    from server.wiring import open_app

    rnd = random.Random(7)
    alphabet = (string.ascii_letters + string.digits + " \n").encode()
    piece = bytes(rnd.choice(alphabet) for _ in range(1 << 20))
    data = piece * mib
    app = open_app(home)
    try:
        p = app.gateway.authenticate(token)
        app.gateway.write(p, "/big.txt", iter([data[i:i + (4 << 20)]
                                               for i in range(0, len(data), 4 << 20)]),
                          size_hint=len(data))
    finally:
        app.close()
    return data


# -- measurements --------------------------------------------------------------------------


async def per_call(sides: list[Side], calls: int, rounds: int) -> dict[str, dict[str, Any]]:
    """p50/p99 per op per side, the sides taking turns in rounds."""
    for s in sides:
        await s.do("write_file", "/pc/one.txt", content=KIB.decode())
        for i in range(100):
            await s.do("write_file", f"/pc/dir/f{i:03d}.txt", content="x")
    ops = [("read_file", "/pc/one.txt", {}), ("write_file", "/pc/w.txt",
                                              {"content": KIB.decode()}),
           ("list_directory", "/pc/dir", {}), ("get_file_info", "/pc/one.txt", {})]
    lat: dict[tuple[str, str], list[float]] = {(s.name, o[0]): [] for s in sides for o in ops}
    per_round = max(1, calls // rounds)
    for s in sides:  # warm up
        for op, path, kw in ops:
            for _ in range(20):
                await s.do(op, path, **kw)
    for _ in range(rounds):
        for op, path, kw in ops:
            for s in sides:
                name, args = s.call(op, path, **kw)
                c = s.client
                v = lat[(s.name, op)]
                for _ in range(per_round):
                    t0 = time.perf_counter()
                    res = await c.call_tool(name, args)
                    v.append(time.perf_counter() - t0)
                if res.is_error:
                    raise RuntimeError(f"{s.name} {name}: {text(res)[:200]}")
    out: dict[str, dict[str, Any]] = {}
    for (side, op), v in lat.items():
        out.setdefault(op, {})[side] = {"p50_ms": pct(v, 50) * 1e3, "p99_ms": pct(v, 99) * 1e3,
                                        "n": len(v)}
    return out


async def small_files(sides: list[Side], n: int) -> dict[str, Any]:
    out = {}
    body = KIB.decode()
    for s in sides:
        w: list[float] = []
        r: list[float] = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            await s.do("write_file", f"/small/f{i:05d}.txt", content=body)
            w.append(time.perf_counter() - t)
        tw = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            res = await s.do("read_file", f"/small/f{i:05d}.txt")
            r.append(time.perf_counter() - t)
            if i == 0:
                got = res.structured_content.get("content") if res.structured_content else None
                assert (got or text(res)) == body, f"{s.name} read back differs"
        tr = time.perf_counter() - t0
        out[s.name] = {"write_per_s": n / tw, "read_per_s": n / tr,
                       "write_p50_ms": pct(w, 50) * 1e3, "read_p50_ms": pct(r, 50) * 1e3}
    return out


async def big_read(side: Side, size: int, data: bytes) -> dict[str, Any]:
    off = 0
    pages = 0
    h = bytearray()
    t0 = time.perf_counter()
    while True:
        res = await side.client.call_tool("read_file", {"path": "/big.txt", "offset": off})
        if res.is_error:
            raise RuntimeError(text(res)[:200])
        sc = res.structured_content
        piece = sc["content"].encode() if sc.get("encoding", "text") == "text" else b""
        h += piece
        pages += 1
        nxt = sc.get("next_offset")
        if nxt is None:
            break
        off = nxt
    dt = time.perf_counter() - t0
    assert bytes(h) == data, "paged read differs from what was written"
    return {"MB_per_s": size / dt / 1e6, "pages": pages, "seconds": dt}


async def ref_big_read(ref: Side, path: str, size: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = await ref.client.call_tool("read_text_file", {"path": path})
    dt = time.perf_counter() - t0
    assert not res.is_error, text(res)[:200]
    return {"MB_per_s": size / dt / 1e6, "pages": 1, "seconds": dt}


MIX = [("read_file", 40), ("write_file", 20), ("get_file_info", 15), ("list_directory", 15),
       ("search", 10)]


async def _agents(url: str, tokens: list[tuple[int, str]], start_at: float, duration: float,
                  tools: list[str]) -> dict[str, Any]:
    """One client process's agents: connect, seed, run the mix from ``start_at``."""
    mix = [(t, w) for t, w in MIX if t in tools]
    names = [t for t, _ in mix]
    weights = [w for _, w in mix]
    lat: dict[str, list[float]] = {t: [] for t in names}
    errors: dict[str, int] = {}
    retried = 0
    samples: list[str] = []

    async def call(c: Any, op: str, args: dict[str, Any]) -> tuple[bool, str]:
        """One call as a well-behaved agent makes it: on rate_limited, wait as told, retry."""
        nonlocal retried
        for _ in range(20):
            res = await c.call_tool(op, args)
            if not res.is_error:
                return True, ""
            msg = text(res)
            if not msg.startswith("rate_limited"):
                return False, msg
            retried += 1
            m = re.search(r"retry after (\d+) ms", msg)
            await asyncio.sleep((int(m.group(1)) if m else 100) / 1000.0)
        return False, msg

    def fail(op: str, why: str) -> None:
        errors[op] = errors.get(op, 0) + 1
        if len(samples) < 5:
            samples.append(f"{op}: {why}"[:160])

    async def agent(i: int, token: str) -> None:
        rnd = random.Random(i)
        try:
            async with Client(ms.http_transport(url, token)) as c:
                base = f"/agents/a{i}"
                ok, why = await call(c, "write_file", {"path": f"{base}/seed.txt",
                                                       "content": "seed"})
                if not ok:
                    fail("seed", why)
                await asyncio.sleep(max(0.0, start_at - time.time()))
                stop = start_at + duration
                n = 0
                while time.time() < stop:
                    op = rnd.choices(names, weights)[0]
                    if op in ("read_file", "get_file_info"):
                        args: dict[str, Any] = {"path": f"{base}/seed.txt"}
                    elif op == "write_file":
                        args = {"path": f"{base}/f{n % 20}.txt", "content": KIB.decode()}
                    elif op == "list_directory":
                        args = {"path": base}
                    else:
                        args = {"query": "abcdefghijklmnopqrstuvwxyz012345"}
                    t0 = time.perf_counter()
                    try:
                        ok, why = await call(c, op, args)
                    except Exception as exc:  # noqa: BLE001 - counted, reported
                        ok, why = False, f"{type(exc).__name__}: {exc}"
                    lat[op].append(time.perf_counter() - t0)
                    if not ok:
                        fail(op, why)
                    n += 1
        except Exception as exc:  # noqa: BLE001
            fail("session", f"{type(exc).__name__}: {exc}")

    await asyncio.gather(*(agent(i, t) for i, t in tokens))
    return {"lat": lat, "errors": errors, "samples": samples, "retried": retried}


def _agents_proc(url: str, tokens: list[tuple[int, str]], start_at: float, duration: float,
                 tools: list[str]) -> dict[str, Any]:
    return asyncio.run(_agents(url, tokens, start_at, duration, tools))


async def agents_run(url: str, tokens: list[str], duration: float, tools: set[str],
                     procs: int = 1) -> dict[str, Any]:
    """``len(tokens)`` agents, each with its own token and MCP session, spread over ``procs``
    client processes (one Python process cannot drive 64 sessions flat out)."""
    import concurrent.futures
    import multiprocessing

    procs = max(1, min(procs, len(tokens)))
    indexed = list(enumerate(tokens))
    slices = [indexed[k::procs] for k in range(procs)]
    start_at = time.time() + 3.0 + 0.08 * len(tokens)
    tool_list = sorted(tools)
    if procs == 1:
        parts = [await _agents(url, slices[0], start_at, duration, tool_list)]
    else:
        loop = asyncio.get_running_loop()
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            parts = await asyncio.gather(*(loop.run_in_executor(
                pool, _agents_proc, url, sl, start_at, duration, tool_list) for sl in slices))
    lat: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    samples: list[str] = []
    retried = 0
    for part in parts:
        for t, v in part["lat"].items():
            lat.setdefault(t, []).extend(v)
        for k, n in part["errors"].items():
            errors[k] = errors.get(k, 0) + n
        samples += part["samples"]
        retried += part["retried"]
    total = sum(len(v) for v in lat.values())
    return {"agents": len(tokens), "client_processes": procs, "seconds": duration,
            "calls": total, "calls_per_s": total / duration, "errors": errors,
            "rate_limited_retries": retried, "error_samples": samples[:5],
            "per_tool": {t: {"n": len(v), "p50_ms": pct(v, 50) * 1e3, "p99_ms": pct(v, 99) * 1e3}
                         for t, v in lat.items()}}


# -- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.dir or tempfile.mkdtemp(prefix="lodestore-bench-mcp-"))
    home = work / "store"
    refroot = work / "ref-root"
    for sub in ("pc/dir", "small"):  # the reference server does not create parents
        (refroot / sub).mkdir(parents=True, exist_ok=True)
    tokens = make_store(home, args.durability, args.agents)
    bench_tokens = [tokens[f"bench/a{i}"] for i in range(args.agents)]
    entry = None if args.no_reference else install_reference(
        Path(args.ref_dir) if args.ref_dir else work / "ref-npm")
    data = write_big(home, tokens["big/reader"], args.big_mib)
    (refroot / "big.txt").write_bytes(data)
    results: dict[str, Any] = {"durability": args.durability}
    argv = ms.lodestore_argv()
    env = ms.env_for(home, bench_tokens[0])
    async with AsyncExitStack() as stack:
        stdio = await stack.enter_async_context(Client(StdioServerParameters(
            command=argv[0], args=[*argv[1:], "serve", "--transport", "stdio"], env=env)))
        srv = ms.HttpServer(home, demo=False)
        stack.callback(srv.stop)
        url = srv.base + "/mcp"
        http = await stack.enter_async_context(Client(ms.http_transport(url, bench_tokens[1])))
        tools = {t.name for t in (await stdio.list_tools()).tools}
        sides = [Side("lodestore-stdio", stdio, ""), Side("lodestore-http", http, "/h")]
        if entry is not None:
            ref = await stack.enter_async_context(Client(StdioServerParameters(
                command="node", args=[str(entry), str(refroot)])))
            sides.append(Side("reference-stdio", ref, str(refroot), ref=True))
        want = set(args.only.split(",")) if args.only else {"calls", "small", "big", "agents"}
        if "calls" in want:
            print("per-call latency ...", file=sys.stderr)
            results["per_call"] = await per_call(sides, args.calls, args.rounds)
        if "small" in want:
            print(f"{args.small} small files ...", file=sys.stderr)
            results["small_files"] = await small_files(sides, args.small)
        if "big" in want:
            print(f"{args.big_mib} MiB paged read ...", file=sys.stderr)
            results["big_read"] = await big_reads(stack, argv, home, tokens, url, data, entry,
                                                  sides)
        if "agents" in want:
            print(f"{args.agents} agents over streamable HTTP for {args.duration:g} s ...",
                  file=sys.stderr)
            results["agents_baseline"] = await agents_run(url, bench_tokens[:1],
                                                          min(args.duration, 10.0), tools)
            results["agents"] = await agents_run(url, bench_tokens, args.duration, tools,
                                                 args.client_procs)
    if not args.keep and not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return results


async def big_reads(stack: AsyncExitStack, argv: list[str], home: Path, tokens: dict[str, str],
                    url: str, data: bytes, entry: Path | None, sides: list[Side]
                    ) -> dict[str, Any]:
    big = await stack.enter_async_context(Client(StdioServerParameters(
        command=argv[0], args=[*argv[1:], "serve", "--transport", "stdio"],
        env=ms.env_for(home, tokens["big/reader"]))))
    bigh = await stack.enter_async_context(Client(ms.http_transport(url, tokens["big/reader"])))
    size = len(data)
    out = {"lodestore-stdio": await big_read(Side("s", big, ""), size, data),
           "lodestore-http": await big_read(Side("h", bigh, ""), size, data)}
    if entry is not None:
        ref = sides[-1]
        out["reference-stdio (whole file)"] = await ref_big_read(ref, ref.p("/big.txt"), size)
    return out


def report(r: dict[str, Any]) -> str:
    out: list[str] = []
    pc = r.get("per_call") or {}
    sides = list(next(iter(pc.values()))) if pc else []
    out.append(f"per call, client round trip (ms), store durability {r['durability']}")
    out.append(f"{'op':16}" + "".join(f"{s:>28}" for s in sides) + "   target p50 <= ref")
    out.append(f"{'':16}" + "".join(f"{'p50':>14}{'p99':>14}" for _ in sides))
    for op, row in pc.items():
        line = f"{op:16}" + "".join(f"{row[s]['p50_ms']:>14.3f}{row[s]['p99_ms']:>14.3f}"
                                    for s in sides)
        if "reference-stdio" in row:
            ok = row["lodestore-stdio"]["p50_ms"] <= row["reference-stdio"]["p50_ms"]
            line += "   met" if ok else (
                f"   MISSED (x{row['lodestore-stdio']['p50_ms'] / row['reference-stdio']['p50_ms']:.1f})")
        out.append(line)
    out.append("")
    if "small_files" not in r:
        return report_rest(r, out)
    out.append("small files (1 KiB): written, then read back")
    out.append(f"{'server':20}{'writes/s':>12}{'reads/s':>12}{'write p50':>12}{'read p50':>12}")
    for s, v in r["small_files"].items():
        out.append(f"{s:20}{v['write_per_s']:>12.0f}{v['read_per_s']:>12.0f}"
                   f"{v['write_p50_ms']:>12.3f}{v['read_p50_ms']:>12.3f}")
    out.append("")
    return report_rest(r, out)


def report_rest(r: dict[str, Any], out: list[str]) -> str:
    if "big_read" in r:
        out.append("large file, paged read_file (1 MiB pages)   target >= 50 MB/s")
        for s, v in r["big_read"].items():
            out.append(f"{s:32}{v['MB_per_s']:>10.1f} MB/s  {v['pages']:>4} calls  "
                       f"{v['seconds']:.2f} s")
        out.append("")
    for key in ("agents_baseline", "agents"):
        if key not in r:
            continue
        a = r[key]
        errs = sum(a["errors"].values())
        out.append(f"{a['agents']} agent(s) over streamable HTTP ({a['client_processes']} "
                   f"client process(es)), {a['seconds']:g} s: {a['calls']} calls, "
                   f"{a['calls_per_s']:.0f} calls/s, errors {errs}"
                   + ("" if key == "agents_baseline" else " (target 0)")
                   + f", rate-limited and retried {a['rate_limited_retries']}")
        for t, v in a["per_tool"].items():
            out.append(f"    {t:16}{v['n']:>8}  p50 {v['p50_ms']:>8.2f} ms  "
                       f"p99 {v['p99_ms']:>8.2f} ms")
        for s in a["error_samples"]:
            out.append(f"    error: {s}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI-sized run")
    ap.add_argument("--calls", type=int, default=1000, help="calls per op per server")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--small", type=int, default=1000, help="small files written and read")
    ap.add_argument("--big-mib", type=int, default=50)
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--durability", choices=["fsync", "none"], default="fsync")
    ap.add_argument("--dir", default=None, help="work folder (kept)")
    ap.add_argument("--ref-dir", default=None, help="where the reference npm package lives")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--client-procs", type=int, default=4,
                    help="client processes the agents are spread over")
    ap.add_argument("--only", default=None,
                    help="comma-separated parts to run: calls,small,big,agents")
    args = ap.parse_args()
    if args.quick:
        args.calls, args.rounds, args.small = 200, 5, 200
        args.big_mib, args.duration = 16, min(args.duration, 10.0)
    r = asyncio.run(run(args))
    print(report(r))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

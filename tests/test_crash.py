"""Crash safety: a writer SIGKILLed at random points leaves a consistent store.

Round after round on the same store, ``crash_worker.py`` runs seeded-random writes
(inline and multi-chunk), appends, moves of files and directories (within and across
metadata engines), deletes, recursive deletes and mkdirs, and is killed with a real
``SIGKILL`` after a random short time. The test then replays the worker's fsync'ed
intent/ack log into a model of the namespace and checks, on a fresh ``Volume``:

- the namespace equals the model exactly: every acknowledged write reads back byte for
  byte, nothing else exists, and the one operation in flight is all-or-nothing (for a
  ``write(parents=True)``, the parent directories may exist without the file);
- listings agree with ``stat`` and page consistently; reads of ranges agree with reads
  of the whole file;
- ``scrub`` is clean (orphan fragments allowed: collection is later);
- after ``gc(grace=0)`` (with the pending-move timeout shortened in this process, since
  the killed mover never finishes its move) the namespace is unchanged, scrub is clean,
  no orphan fragments, temp files, unsettled moves, trash or unreachable entries remain,
  and every registered chunk is referenced.

The next round's worker starts from that verified state (it reads the namespace back and
the test compares its fingerprint with the model). Odd rounds use a namespace-heavy mix
(moves, deletes, mkdirs), so more kills land inside those cheap operations. With ``-s``
the test prints which kinds of operation were in flight at the kills and how they ended.

``LODESTORE_CRASH_ROUNDS`` (default 40) sets the number of kill points for soak runs;
``LODESTORE_CRASH_SEED`` replays a run's operation choices (kill timing is not
reproducible, it is real). A failing round keeps its logs under the test's tmp_path.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import storage.meta.store as meta_store
from storage import maintenance
from storage.config import StoreConfig
from storage.errors import DirectoryNotEmpty
from storage.meta import ROOT_INO
from storage.volume import Volume, unpack_refs

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs POSIX signals")

WORKER = Path(__file__).with_name("crash_worker.py")
_spec = importlib.util.spec_from_file_location("lodestore_crash_worker", WORKER)
assert _spec is not None and _spec.loader is not None
cw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cw)

ROUNDS = int(os.environ.get("LODESTORE_CRASH_ROUNDS", "40"))
SEED = int(os.environ.get("LODESTORE_CRASH_SEED", str(random.SystemRandom().getrandbits(32))))
TENANT = "crash"
CHUNK = 16 * 1024
INLINE = 2048
READY_TIMEOUT = 60.0
MIN_RUN, MAX_RUN = 0.02, 0.4  # seconds a worker runs before it is killed


# -- reading the store back ----------------------------------------------------------------


def snapshot(vol: Volume) -> cw.Model:
    """The whole namespace of the tenant, checking listings against stat and reads."""
    out: cw.Model = {}
    rng = random.Random(0)

    def walk(d: str) -> None:
        items = list(vol.iter_dir(TENANT, d))
        names = [i.name for i in items]
        assert names == sorted(names, key=lambda n: n.encode()), f"{d}: unordered listing {names}"
        assert len(set(names)) == len(names), f"{d}: duplicate names in listing {names}"
        paged, cursor = [], None
        while True:
            page, cursor = vol.list_dir(TENANT, d, cursor, limit=2)
            paged += [i.name for i in page]
            if cursor is None:
                break
        assert paged == names, f"{d}: paged listing {paged} != listing {names}"
        for info in items:
            st = vol.stat(TENANT, info.path)
            assert (st.kind, st.size, st.version, st.inline, st.chunks) == (
                info.kind, info.size, info.version, info.inline, info.chunks
            ), f"{info.path}: stat {st} disagrees with listing {info}"
            if info.is_dir:
                out[info.path] = None
                walk(info.path)
                continue
            data = vol.read(TENANT, info.path)
            assert len(data) == info.size, (
                f"{info.path}: read {len(data)} bytes, stat says {info.size}")
            if info.inline:
                assert info.size <= INLINE, f"{info.path}: {info.size} bytes stored inline"
            elif info.size:
                assert info.chunks >= math.ceil(info.size / CHUNK), f"{info.path}: {info}"
            if data:
                off = rng.randrange(len(data))
                n = rng.randrange(1, 2 * CHUNK)
                assert vol.read(TENANT, info.path, off, n) == data[off : off + n], (
                    f"{info.path}: ranged read [{off}, +{n}) differs from the whole read")
            out[info.path] = data

    walk("/")
    return out


def describe_diff(got: cw.Model, want: cw.Model) -> str:
    lines = []
    for p in sorted(set(got) | set(want)):
        g, w = got.get(p, "absent"), want.get(p, "absent")
        if g == w:
            continue

        def show(v: Any) -> str:
            if v is None:
                return "dir"
            if isinstance(v, bytes):
                return f"file[{len(v)}]"
            return str(v)

        extra = ""
        if isinstance(g, bytes) and isinstance(w, bytes):
            common = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b),
                          min(len(g), len(w)))
            extra = f" (first difference at byte {common})"
        lines.append(f"  {p}: store has {show(g)}, model has {show(w)}{extra}")
    return "\n".join(lines) or "  (identical)"


def read_log(path: Path) -> list[dict[str, Any]]:
    recs = []
    raw = path.read_bytes() if path.exists() else b""
    for line in raw.split(b"\n"):
        if not line:
            continue
        try:
            recs.append(json.loads(line))
        except ValueError:
            # only a torn last record can be undecodable; its op never started (an intent)
            # or finished without acknowledgement (an ack): both are handled as in flight
            assert raw.endswith(line), f"corrupt record in the middle of {path}: {line!r}"
    return recs


def replay(model: cw.Model, recs: list[dict[str, Any]]) -> tuple[cw.Model, dict | None, int]:
    """Apply acknowledged ops; returns the model, the op in flight (or None), acks."""
    inflight: dict | None = None
    acked = 0
    for r in recs:
        if r["ev"] == "op":
            assert inflight is None, f"op {r['i']} started before op {inflight} was acked"
            inflight = r["op"] | {"i": r["i"]}
        elif r["ev"] == "ack":
            assert inflight is not None and inflight["i"] == r["i"], f"stray ack {r}"
            model = cw.apply(model, inflight)
            inflight = None
            acked += 1
    return model, inflight, acked


# -- store-wide invariants -----------------------------------------------------------------


def check_after_gc(vol: Volume, ctx: str) -> None:
    rep = maintenance.scrub(vol)
    assert rep.clean and not rep.problems, f"{ctx}: scrub after gc: {rep.as_dict()}"
    assert rep.orphan_fragments == 0, f"{ctx}: orphan fragments after gc: {rep.as_dict()}"
    assert rep.unsettled_moves == 0, f"{ctx}: unsettled moves after gc: {rep.as_dict()}"
    assert rep.healthy_chunks == rep.chunks, f"{ctx}: {rep.as_dict()}"
    assert vol.meta.trash_items() == [], f"{ctx}: trash left after gc"
    # every entry hangs under the root or an existing directory
    rows = [e for e, _s, _p in vol.meta.iter_entries()]
    dir_inos = {ROOT_INO} | {e.ino for e in rows if e.is_dir}
    unreachable = [(e.parent, e.name) for e in rows if e.parent not in dir_inos]
    assert not unreachable, f"{ctx}: entries under no directory after gc: {unreachable}"
    # every registered chunk is referenced (gc with grace 0 keeps nothing else)
    live = {(e.tenant, c.hex()) for e in rows for c, _n in unpack_refs(e.chunks)}
    registered = {(r.tenant, r.cid) for r in vol.meta.iter_chunks()}
    assert registered == live, (
        f"{ctx}: unreferenced chunks {len(registered - live)}, "
        f"unregistered references {len(live - registered)}")
    for t in vol.targets:
        left = list(t.temp_files(0)) if hasattr(t, "temp_files") else []
        assert not left, f"{ctx}: temp files left after gc on {t.id}: {left[:3]}"
    for eng in vol.meta.engines:
        pending = _count(eng, "SELECT COUNT(*) FROM entries WHERE state != 0")
        n_intents = _count(eng, "SELECT COUNT(*) FROM intents")
        assert pending == 0, f"{ctx}: {pending} pending rows after gc"
        assert n_intents == 0, f"{ctx}: {n_intents} move intents left after gc"


def _count(eng: Any, sql: str) -> int:
    with eng.read() as cur:
        cur.execute(sql)
        return int(cur.fetchone()[0])


# -- the test ------------------------------------------------------------------------------


def _start_worker(home: Path, log: Path, err: Path, seed: int, focus: str) -> subprocess.Popen:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(err, "wb") as ferr:
        return subprocess.Popen(
            [sys.executable, str(WORKER), str(home), TENANT, str(log), str(seed), focus],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=ferr, env=env)


def _wait_ready(proc: subprocess.Popen, log: Path, err: Path, ctx: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        recs = read_log(log)
        if recs and recs[0]["ev"] == "ready":
            return recs[0]
        if proc.poll() is not None:
            pytest.fail(f"{ctx}: worker exited ({proc.returncode}) before it was ready:\n"
                        f"{err.read_text()[-3000:]}")
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    pytest.fail(f"{ctx}: worker not ready after {READY_TIMEOUT} s:\n{err.read_text()[-3000:]}")


@pytest.mark.slow
@pytest.mark.timeout(max(600, ROUNDS * 20))
def test_sigkill_at_random_points_keeps_store_consistent(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "store"
    cfg = StoreConfig.embedded(home, engines=4, chunk_size=CHUNK, inline_threshold=INLINE,
                               checksum_block=2048)
    with Volume.init(home, cfg) as vol:
        vol.create_tenant(TENANT)
        for d in ("/a", "/b", "/c", "/d"):
            vol.mkdir(TENANT, d)
    model: cw.Model = {"/a": None, "/b": None, "/c": None, "/d": None}
    rng = random.Random(SEED)
    kills: collections.Counter[str] = collections.Counter()
    outcomes: collections.Counter[str] = collections.Counter()
    acked_kinds: collections.Counter[str] = collections.Counter()
    total_acked = 0
    started = time.monotonic()
    phases: collections.Counter[str] = collections.Counter()

    for rnd in range(ROUNDS):
        ctx = f"seed {SEED} round {rnd}"
        log, err = tmp_path / f"round-{rnd}.log", tmp_path / f"round-{rnd}.err"
        t0 = time.monotonic()
        focus = "namespace" if rnd % 2 else "mixed"  # odd rounds: more kills in moves
        proc = _start_worker(home, log, err, rng.getrandbits(48), focus)
        ready = _wait_ready(proc, log, err, ctx)
        t1 = time.monotonic()
        phases["worker start"] += t1 - t0
        assert ready["digest"] == cw.digest(model), (
            f"{ctx}: the worker read back a different namespace than the verified one")
        time.sleep(rng.uniform(MIN_RUN, MAX_RUN))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # a real kill, wherever the worker is
        proc.wait()
        if proc.returncode != -signal.SIGKILL:
            recs = read_log(log)
            ops = {r["i"]: r["op"] for r in recs if r["ev"] == "op"}
            errors = [r for r in recs if r["ev"] == "error"]
            detail = (f"op {ops.get(errors[0]['i'])} failed: {errors[0]['error']}\n"
                      f"{errors[0]['tb']}" if errors else err.read_text()[-3000:])
            pytest.fail(f"{ctx}: worker died on its own (exit {proc.returncode}): {detail}")
        t2 = time.monotonic()
        phases["worker run"] += t2 - t1

        recs = read_log(log)
        model, inflight, acked = replay(model, recs[1:])
        total_acked += acked
        for r in recs:
            if r["ev"] == "op" and (inflight is None or r["i"] != inflight["i"]):
                acked_kinds[_label(r["op"])] += 1
        kills[_label(inflight) if inflight else "between ops"] += 1

        with Volume.open(home) as vol:
            got = snapshot(vol)
            states = cw.allowed_states(model, inflight)
            matching = [name for name, m in states if m == got]
            assert matching, (
                f"{ctx}: after a kill during {inflight}, the store matches no allowed state "
                f"({[n for n, _ in states]}); against 'before':\n"
                f"{describe_diff(got, states[0][1])}\nagainst '{states[-1][0]}':\n"
                f"{describe_diff(got, states[-1][1])}")
            outcome = matching[-1] if len(matching) == 1 else "before=after"
            model = dict(states[[n for n, _ in states].index(matching[-1])][1])
            if inflight is not None:
                outcomes[f"{_label(inflight)}: {outcome.split('-')[0]}"] += 1

            rep = maintenance.scrub(vol)
            assert rep.clean, f"{ctx}: scrub after the kill during {inflight}: {rep.as_dict()}"

            with monkeypatch.context() as mp:
                # the killed mover never finishes its move: let gc decide it now
                mp.setattr(meta_store, "PENDING_TIMEOUT", 0.0)
                maintenance.gc(vol, grace=0)
            after = snapshot(vol)
            assert after == model, (
                f"{ctx}: gc changed the namespace (in flight: {inflight}):\n"
                f"{describe_diff(after, model)}")
            check_after_gc(vol, f"{ctx} (in flight: {inflight})")
        phases["verify"] += time.monotonic() - t2

    elapsed = time.monotonic() - started
    summary = (
        f"crash test: seed {SEED}, {ROUNDS} kills in {elapsed:.1f} s "
        f"({', '.join(f'{k} {v:.1f} s' for k, v in phases.items())}), {total_acked} acked ops "
        f"{dict(sorted(acked_kinds.items()))}\n  kill points: {dict(sorted(kills.items()))}"
        f"\n  in-flight outcomes: {dict(sorted(outcomes.items()))}"
        f"\n  final namespace: {len(model)} entries")
    print(summary)
    in_op = ROUNDS - kills["between ops"]
    assert ROUNDS < 10 or in_op >= ROUNDS // 2, f"too few kills landed inside an op:\n{summary}"


def _label(op: dict[str, Any]) -> str:
    kind = op["kind"]
    if op["op"] == "move":
        kind += "/cross-engine" if op.get("cross") else "/same-engine"
        if op.get("replaces"):
            kind += "/replacing"
    elif op["op"] == "write":
        kind += f"/{op['mode']}" + ("/mkdir-parents" if op.get("mk") else "")
    elif op["op"] == "append":
        kind += "/small" if op["n"] <= INLINE else "/chunked"
    return kind


# -- focused regressions for what the crash loop found -------------------------------------


def _cross_engine_dirs(vol: Volume) -> tuple[str, str]:
    """Two new top-level directories whose children live on different metadata engines."""
    from storage import paths

    def engine(p: str) -> int:
        ino = vol._resolve_dir(TENANT, paths.split_path(p))[-1]
        return vol.meta.shard_map[vol.meta.vshard_of(TENANT, ino)]

    vol.mkdir(TENANT, "/dst")
    for i in range(100):
        vol.mkdir(TENANT, f"/src{i}")
        if engine(f"/src{i}") != engine("/dst"):
            return f"/src{i}", "/dst"
    pytest.fail("no two directories on different engines")


class _Killed(BaseException):
    """Stands in for SIGKILL: no except clause in the mover catches it."""


def _crash_move_after_step_1(vol: Volume, monkeypatch, src: str, dst: str) -> None:
    """A cross-engine move whose mover dies after step (1) (the hidden pending row in the
    destination) and before the commit point (2), as a SIGKILL there would leave it."""

    def killed(*_a: object, **_k: object) -> None:
        raise _Killed

    with monkeypatch.context() as mp:  # die inside the source engine's commit transaction
        mp.setattr(meta_store.MetaStore, "_delete_exact", killed)
        with pytest.raises(_Killed):
            vol.move(TENANT, src, dst)
    assert maintenance.scrub(vol).unsettled_moves == 1, "the simulated crash left no pending row"


def test_paging_does_not_stop_at_a_hidden_pending_move(tmp_path: Path, monkeypatch) -> None:
    """For PENDING_TIMEOUT after such a crash (or while a mover runs) the pending row is
    hidden. A page of ``list_dir`` that fetches that row must still report the cursor of
    the next page, not end the listing."""
    vol = Volume.init(tmp_path / "s", StoreConfig.embedded(tmp_path / "s", engines=4))
    vol.create_tenant(TENANT)
    src, dst = _cross_engine_dirs(vol)
    for n in ("x1", "x2", "x3"):
        vol.write(TENANT, f"{dst}/{n}", n.encode())
    vol.write(TENANT, f"{src}/a", b"moving")
    _crash_move_after_step_1(vol, monkeypatch, f"{src}/a", f"{dst}/a")
    assert [i.name for i in vol.iter_dir(TENANT, dst)] == ["x1", "x2", "x3"]
    names, cursor = [], None
    while True:
        page, cursor = vol.list_dir(TENANT, dst, cursor, limit=2)
        names += [i.name for i in page]
        if cursor is None:
            break
    vol.close()
    assert names == ["x1", "x2", "x3"], "list_dir paging ended early at the hidden pending row"


def test_hidden_pending_move_does_not_make_a_directory_look_empty(
    tmp_path: Path, monkeypatch
) -> None:
    """``has_children`` must see visible children behind a hidden pending row: else a
    non-recursive delete removes a directory that still has files."""
    vol = Volume.init(tmp_path / "s", StoreConfig.embedded(tmp_path / "s", engines=4))
    vol.create_tenant(TENANT)
    src, dst = _cross_engine_dirs(vol)
    vol.write(TENANT, f"{dst}/b", b"precious")
    vol.write(TENANT, f"{src}/a", b"moving")
    _crash_move_after_step_1(vol, monkeypatch, f"{src}/a", f"{dst}/a")
    try:
        with pytest.raises(DirectoryNotEmpty):
            vol.delete(TENANT, dst)
        assert vol.read(TENANT, f"{dst}/b") == b"precious"
    finally:
        vol.close()


def test_dir_replaced_by_move_is_not_served_from_the_dir_cache(tmp_path: Path) -> None:
    """Moving a directory onto an existing empty directory must not leave the replaced
    directory's inode in the volume's directory cache: writes must not land in it."""
    with Volume.init(tmp_path / "s", StoreConfig.embedded(tmp_path / "s", engines=4)) as vol:
        vol.create_tenant(TENANT)
        vol.mkdir(TENANT, "/p/d", parents=True)
        vol.write(TENANT, "/q/f", b"moved")
        assert not vol.exists(TENANT, "/p/d/f")  # resolves /p/d: now in the dir cache
        vol.move(TENANT, "/q", "/p/d", overwrite=True)
        assert vol.read(TENANT, "/p/d/f") == b"moved"
        vol.write(TENANT, "/p/d/g", b"acknowledged")
    with Volume.open(tmp_path / "s") as fresh:
        assert sorted(i.name for i in fresh.iter_dir(TENANT, "/p/d")) == ["f", "g"]

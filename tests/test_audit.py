"""Audit log: durable hash-chained events, Parquet rolling, DuckDB queries, verification."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

pytest.importorskip("pyarrow")
pytest.importorskip("duckdb")

import pyarrow.parquet as pq  # noqa: E402

from governance import audit as audit_mod  # noqa: E402
from governance.audit import (  # noqa: E402
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    AuditQueryError,
    AuditWriteError,
    event_hash,
)
from storage.errors import StorageError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def ev(i: int = 0, **kw) -> AuditEvent:
    base = dict(
        ts=T0 + i, tenant=f"t{i % 3}", agent="bot", operation=("write_file", "read_file")[i % 2],
        path=f"/notes/{i}.md", bytes=100 + i, decision="allow", labels=["EMAIL_ADDRESS"],
        latency_ms=1.5, request_id=f"r{i}", transport="stdio",
    )
    base.update(kw)
    return AuditEvent(**base)


def segs(d: Path, ext: str) -> list[Path]:
    return sorted(d.glob(f"seg-*.{ext}"))


def fill(d: Path, n: int, segment_events: int = 10_000, fsync: bool = False) -> AuditLog:
    log = AuditLog(d, fsync=fsync, segment_events=segment_events)
    for i in range(n):
        log.append(ev(i))
    return log


def wait_until(cond, timeout: float = 20.0) -> None:
    """Conversion to Parquet runs in the background: wait for it to get somewhere."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def run_py(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout,
    )


# --------------------------------------------------------------------------- basics


def test_append_fills_chain_and_query_round_trip(tmp_path):
    log = AuditLog(tmp_path / "audit")
    events = [ev(i) for i in range(30)]
    for e in events:
        log.append(e)
    assert [e.seq for e in events] == list(range(1, 31))
    assert events[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(events, events[1:], strict=False))

    cols, rows = log.query(
        "SELECT operation, count(*) AS n, sum(bytes) AS b FROM audit GROUP BY operation "
        "ORDER BY operation")
    assert cols == ["operation", "n", "b"]
    assert rows == [("read_file", 15, sum(100 + i for i in range(1, 30, 2))),
                    ("write_file", 15, sum(100 + i for i in range(0, 30, 2)))]

    _, rows = log.query("SELECT seq FROM audit WHERE tenant = 't1' ORDER BY seq")
    assert [r[0] for r in rows] == [i + 1 for i in range(30) if i % 3 == 1]

    # ts is also the TIMESTAMP column `time` (UTC)
    _, rows = log.query(
        "SELECT count(*), min(time) FROM audit WHERE time >= TIMESTAMP '2023-11-14 22:13:30' "
        "AND time < TIMESTAMP '2023-11-14 22:13:40'")
    assert rows == [(10, datetime(2023, 11, 14, 22, 13, 30))]

    cols, rows = log.query("SELECT * FROM audit WHERE seq = 3")
    rec = dict(zip(cols, rows[0], strict=True))
    assert rec["labels"] == ["EMAIL_ADDRESS"] and rec["hash"] == events[2].hash
    assert rec["transport"] == "stdio" and rec["error"] is None and rec["latency_ms"] == 1.5
    assert log.query("SELECT seq FROM audit ORDER BY seq", limit=5)[1] == [(i,) for i in range(1, 6)]
    assert log.verify().ok


def test_empty_log_query_and_verify(tmp_path):
    log = AuditLog(tmp_path / "audit")
    assert log.query("SELECT count(*) FROM audit") == (["count_star()"], [(0,)])
    rep = log.verify()
    assert rep.ok and rep.events == 0


def test_events_carry_types_not_values(tmp_path):
    log = AuditLog(tmp_path / "audit", fsync=False)
    for bad in (
        ev(labels=["john@example.com"]),  # a value, not an entity type
        ev(labels="EMAIL_ADDRESS"),
        ev(error="could not read /home/john smith"),
        ev(latency_ms=float("nan")),
        ev(bytes=-1),
        ev(decision="Allow it"),
        ev(tenant=None),
    ):
        with pytest.raises(AuditWriteError, match="audit event rejected"):
            log.append(bad)
    log.append(ev(labels=["PHONE_NUMBER", "EMAIL_ADDRESS", "PHONE_NUMBER"], error="not_found"))
    log.append(ev(decision="error", error=2))  # e.g. SystemExit.code
    assert log.query("SELECT labels, error FROM audit ORDER BY seq")[1] == [
        (["EMAIL_ADDRESS", "PHONE_NUMBER"], "not_found"), (["EMAIL_ADDRESS"], "code_2")]
    assert log.verify().events == 2


def test_reopen_continues_chain(tmp_path):
    d = tmp_path / "audit"
    fill(d, 5, segment_events=3).close()
    log = AuditLog(d, fsync=False, segment_events=3)
    e = ev(99)
    log.append(e)
    assert e.seq == 6
    rep = log.verify()
    assert rep.ok and rep.events == 6 and rep.last_hash == e.hash
    log.close()
    with pytest.raises(AuditWriteError, match="closed"):
        log.append(ev())


# --------------------------------------------------------------------------- concurrency


def test_threads_share_group_commit(tmp_path, monkeypatch):
    calls = []
    real = os.fdatasync

    def slow_fdatasync(fd):
        calls.append(fd)
        time.sleep(0.004)  # a slow disk makes the batching visible
        real(fd)

    monkeypatch.setattr(audit_mod.os, "fdatasync", slow_fdatasync)
    log = AuditLog(tmp_path / "audit", fsync=True)
    calls.clear()

    def worker(k):
        for i in range(20):
            log.append(ev(i, agent=f"w{k}"))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rep = log.verify()
    assert rep.ok and rep.events == 160
    assert len(calls) < 120, f"{len(calls)} fsyncs for 160 events: no group commit"


def test_append_async_batches_without_blocking(tmp_path):
    log = AuditLog(tmp_path / "audit", fsync=True)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        events = [ev(i) for i in range(200)]
        await asyncio.gather(*(log.append_async(e) for e in events))
        t.cancel()
        return events, ticks

    events, ticks = asyncio.run(main())
    assert sorted(e.seq for e in events) == list(range(1, 201))
    assert ticks > 0
    # sync threads and async callers share the chain
    th = threading.Thread(target=lambda: [log.append(ev(i)) for i in range(20)])
    th.start()

    async def more():
        await asyncio.wait_for(asyncio.gather(*(log.append_async(ev(i)) for i in range(20))), 30)

    asyncio.run(more())
    th.join()
    assert log.verify().events == 240
    log.close()


WORKER = """
import sys, threading, time
from pathlib import Path
from governance.audit import AuditEvent, AuditLog
d, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = AuditLog(d, fsync=True, segment_events=70)
go = Path(d).parent / "go"
while not go.exists():
    time.sleep(0.005)
def work(t):
    for i in range(n):
        log.append(AuditEvent(tenant=name, agent=f"th{t}", operation="write_file",
                              path=f"/{i}", bytes=i, request_id=f"{name}-{t}-{i}"))
ts = [threading.Thread(target=work, args=(t,)) for t in range(2)]
[t.start() for t in ts]
[t.join() for t in ts]
log.close()
print("done")
"""


def test_processes_append_one_chain(tmp_path):
    d = tmp_path / "audit"
    AuditLog(d).close()
    n = 60  # per thread; 3 processes x 2 threads
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(d), f"p{k}", str(n)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for k in range(3)
    ]
    time.sleep(0.3)
    (tmp_path / "go").touch()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    log = AuditLog(d)
    rep = log.verify()
    assert rep.ok, rep
    assert rep.events == 3 * 2 * n
    _, rows = log.query("SELECT tenant, count(*), count(DISTINCT request_id), min(seq), "
                        "max(seq) FROM audit GROUP BY tenant ORDER BY tenant")
    assert [r[:3] for r in rows] == [(f"p{k}", 2 * n, 2 * n) for k in range(3)]
    _, rows = log.query("SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM audit")
    assert rows == [(360, 360, 1, 360)]
    assert len(segs(d, "parquet")) >= 4  # rolls happened while others appended


# --------------------------------------------------------------------------- rolling


def test_roll_to_parquet_and_query_across(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 25, segment_events=10)
    wait_until(lambda: len(segs(d, "parquet")) == 2 and len(segs(d, "jsonl")) == 1)
    assert [p.name for p in segs(d, "parquet")] == [
        "seg-0000000000000001.parquet", "seg-0000000000000011.parquet"]
    assert [p.name for p in segs(d, "jsonl")] == ["seg-0000000000000021.jsonl"]
    table = pq.read_table(segs(d, "parquet")[0])
    assert table.column_names == list(audit_mod.FIELDS)
    assert pq.ParquetFile(segs(d, "parquet")[0]).metadata.row_group(0).column(0).compression \
        == "ZSTD"
    _, rows = log.query("SELECT count(*), min(seq), max(seq), count(DISTINCT hash) FROM audit")
    assert rows == [(25, 1, 25, 25)]
    log.roll()  # seals the active segment and converts it before returning
    assert len(segs(d, "parquet")) == 3
    assert [(p.name, p.stat().st_size) for p in segs(d, "jsonl")] == [
        ("seg-0000000000000026.jsonl", 0)]
    assert log.query("SELECT count(*) FROM audit")[1] == [(25,)]
    log.append(ev(25))
    assert log.query("SELECT max(seq) FROM audit")[1] == [(26,)]
    rep = log.verify()
    assert rep.ok and rep.events == 26


def test_half_done_rolls_are_finished_on_open(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 7, segment_events=100)
    active = segs(d, "jsonl")[0]
    saved = active.read_bytes()
    log.roll()
    log.close()
    reader = AuditLog(d)
    # a conversion that died after its rename but before removing the JSONL ...
    active.write_bytes(saved)
    # ... and one that died while writing its Parquet
    (d / "seg-0000000000000001.parquet.999-dead.tmp").write_bytes(b"PAR1 half")
    assert reader.query("SELECT count(*) FROM audit")[1] == [(7,)]  # no double count
    assert reader.verify().ok
    log = AuditLog(d, fsync=False)  # opening finishes both
    assert [p.name for p in segs(d, "jsonl")] == ["seg-0000000000000008.jsonl"]
    assert not list(d.glob("*.tmp"))
    log.append(ev(7))
    rep = log.verify()
    assert rep.ok and rep.events == 8


def test_torn_last_line_is_not_an_event(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 4)
    with open(segs(d, "jsonl")[0], "ab") as f:
        f.write(b'{"seq":5,"prev_hash":"ab')  # a writer died mid-write
    rep = AuditLog(d).verify()
    assert rep.ok and rep.events == 4
    assert log.query("SELECT count(*) FROM audit")[1] == [(4,)]
    log.append(ev(4))  # the next writer cuts the fragment off
    assert segs(d, "jsonl")[0].read_bytes().endswith(b"}\n")
    rep = log.verify()
    assert rep.ok and rep.events == 5


# --------------------------------------------------------------------------- tampering


def lines(p: Path) -> list[bytes]:
    return p.read_bytes().splitlines(keepends=True)


def test_verify_untouched_log(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 35, segment_events=10)
    assert log.verify().ok  # whatever the converter has done so far
    wait_until(lambda: len(segs(d, "parquet")) == 3)
    rep = log.verify()
    assert rep == audit_mod.VerifyReport(True, 35, None, None, rep.last_hash)
    assert rep.last_hash == log.query("SELECT hash FROM audit WHERE seq = 35")[1][0][0]


def test_verify_detects_edited_jsonl_field(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 8)
    p = segs(d, "jsonl")[0]
    ls = lines(p)
    assert b'"tenant":"t2"' in ls[5]
    ls[5] = ls[5].replace(b'"tenant":"t2"', b'"tenant":"t0"')
    p.write_bytes(b"".join(ls))
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 6 and "modified" in rep.problem


def test_verify_detects_edited_parquet_value(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 25, segment_events=10)
    wait_until(lambda: len(segs(d, "parquet")) == 2)
    p = segs(d, "parquet")[1]
    table = pq.read_table(p)
    col = table.column("bytes").to_pylist()
    col[3] = 0  # seq 14
    table = table.set_column(table.column_names.index("bytes"), "bytes",
                             __import__("pyarrow").array(col, type=table.schema.field("bytes").type))
    pq.write_table(table, p)
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 14 and "modified" in rep.problem


def test_verify_detects_deleted_line(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 8)
    p = segs(d, "jsonl")[0]
    ls = lines(p)
    del ls[3]
    p.write_bytes(b"".join(ls))
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 4 and "missing" in rep.problem


def test_verify_detects_swapped_lines(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 8)
    p = segs(d, "jsonl")[0]
    ls = lines(p)
    ls[2], ls[3] = ls[3], ls[2]
    p.write_bytes(b"".join(ls))
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 3 and "out of order" in rep.problem


def test_verify_detects_deleted_parquet_segment(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 35, segment_events=10)
    wait_until(lambda: len(segs(d, "parquet")) == 3)
    segs(d, "parquet")[1].unlink()
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 11 and "missing" in rep.problem


def test_verify_detects_deleted_last_segment_via_head(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 30, segment_events=10)  # three Parquet segments, an empty active JSONL
    wait_until(lambda: len(segs(d, "parquet")) == 3)
    segs(d, "parquet")[-1].unlink()
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 21 and "deleted from the end" in rep.problem


def test_verify_detects_replaced_segment(tmp_path):
    """A forged segment whose own chain is consistent still breaks the link after it."""
    import pyarrow as pa

    d = tmp_path / "audit"
    log = fill(d, 35, segment_events=10)
    wait_until(lambda: len(segs(d, "parquet")) == 3)
    p = segs(d, "parquet")[1]
    recs = pq.read_table(p).to_pylist()
    prev = recs[0]["prev_hash"]
    for r in recs:
        r["tenant"] = "forged"
        r["prev_hash"] = prev
        r["hash"] = prev = event_hash(r)
    pq.write_table(pa.Table.from_pylist(recs, schema=pq.read_schema(p)), p)
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 21 and "chain is broken" in rep.problem


def test_verify_detects_truncated_tail(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 12, segment_events=10)
    p = segs(d, "jsonl")[-1]  # the active segment (seq 11, 12)
    p.write_bytes(b"".join(lines(p)[:-1]))  # drop seq 12
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 12 and "deleted from the end" in rep.problem
    log.close()
    # a writer that opens the cut log records the gap before appending, so the evidence
    # survives HEAD being overwritten
    log = AuditLog(d, fsync=False)
    log.append(ev(50))
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 12 and "lost events" in rep.problem
    _, rows = log.query("SELECT operation, error FROM audit WHERE seq = 12")
    assert rows == [("audit_gap", "tail_truncated")]


def test_truncation_under_a_running_writer_is_recorded(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 6)
    p = segs(d, "jsonl")[0]
    p.write_bytes(b"".join(lines(p)[:-2]))
    log.append(ev(7))
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 5 and "lost events" in rep.problem


def test_running_writer_notices_a_cut_even_when_head_is_rewritten(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 6)
    p = segs(d, "jsonl")[0]
    kept = lines(p)[:-2]
    p.write_bytes(b"".join(kept))
    last = json.loads(kept[-1])
    (d / "HEAD").write_text(f"{last['seq']:020d} {last['hash']}\n")  # a consistent forgery
    assert log.verify().ok  # the files alone no longer show it...
    log.append(ev(7))  # ...but the running writer knew seq 6 and records the gap
    rep = log.verify()
    assert not rep.ok and rep.at_seq == 5 and "lost events" in rep.problem
    _, rows = log.query("SELECT request_id FROM audit WHERE operation = 'audit_gap'")
    assert rows == [("gap:tail_truncated:5-6",)]


def test_verify_detects_missing_head(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 3)
    (d / "HEAD").unlink()
    rep = log.verify()
    assert not rep.ok and "HEAD anchor is missing" in rep.problem


# --------------------------------------------------------------------------- failures


def test_append_fails_when_folder_is_replaced_by_a_file(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 3)
    d.rename(tmp_path / "moved")
    d.write_text("not a folder")
    with pytest.raises(AuditWriteError, match="unusable") as ei:
        log.append(ev(3))
    assert isinstance(ei.value, StorageError) and ei.value.code == "audit_write_failed"
    with pytest.raises(AuditWriteError):
        AuditLog(d)
    d.unlink()
    with pytest.raises(AuditWriteError):  # folder gone: no silent restart of the chain
        log.append(ev(4))
    # the moved log is intact
    assert AuditLog(tmp_path / "moved").verify().events == 3


def test_append_fails_on_full_disk_and_leaves_no_trace(tmp_path):
    """The file size limit makes writes fail like a full disk (EFBIG instead of ENOSPC)."""
    d = tmp_path / "audit"
    r = run_py("""
        import os, resource, signal, sys
        from governance.audit import AuditEvent, AuditLog, AuditWriteError
        log = AuditLog(sys.argv[1], fsync=True)
        e = lambda i: AuditEvent(tenant="t", agent="a", operation="write_file", path="/x" * 40,
                                 bytes=i)
        for i in range(3):
            log.append(e(i))
        seg = next(p for p in os.listdir(sys.argv[1]) if p.endswith(".jsonl"))
        size = os.path.getsize(os.path.join(sys.argv[1], seg))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 1500, size + 1500))
        ok = 3
        try:
            for i in range(100):
                log.append(e(i))
                ok += 1
        except AuditWriteError as exc:
            print("FAILED", ok, exc)
    """, str(d))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("FAILED"), r.stdout
    ok = int(r.stdout.split()[1])
    assert 3 < ok < 10 and "not performed" in r.stdout
    assert segs(d, "jsonl")[0].read_bytes().endswith(b"}\n")  # the failed write was cut back
    rep = AuditLog(d).verify()
    assert rep.ok and rep.events == ok


def test_append_fails_on_full_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a tmpfs")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        log = AuditLog(mnt / "audit", fsync=True)
        n = 0
        with pytest.raises(AuditWriteError, match="not performed"):
            for i in range(10_000):
                log.append(ev(i, path="/p" * 100))
                n += 1
        assert n > 10
        rep = log.verify()
        assert rep.ok and rep.events == n
        log.close()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# --------------------------------------------------------------------------- query safety


@pytest.mark.parametrize("sql,match", [
    ("SELECT * FROM read_csv('/etc/passwd')", "audit query failed"),
    ("SELECT * FROM read_text('/etc/hostname')", "audit query failed"),
    ("SELECT count(*) FROM audit, read_parquet('/tmp/*.parquet')", "audit query failed"),
    ("COPY (SELECT * FROM audit) TO '/tmp/leak.csv'", "only SELECT"),
    ("INSTALL httpfs", "only SELECT"),
    ("LOAD httpfs", "only SELECT"),
    ("SET enable_external_access = true", "only SELECT"),
    ("ATTACH '/tmp/x.db'", "only SELECT"),
    ("DROP VIEW audit", "only SELECT"),
    ("SELECT 1; SET threads = 1", "exactly one"),
    ("SELEC count(*) FROM audit", "invalid SQL"),
    ("SELECT nope FROM audit", "audit query failed"),
])
def test_query_refuses_escapes(tmp_path, sql, match):
    log = fill(tmp_path / "audit", 3)
    with pytest.raises(AuditQueryError, match=match):
        log.query(sql)
    assert not Path("/tmp/leak.csv").exists()


def test_query_cannot_read_other_files_in_the_audit_folder(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 3)
    with pytest.raises(AuditQueryError, match="Permission|disabled"):
        log.query(f"SELECT * FROM read_text('{d / 'HEAD'}')")
    # queries run with a locked configuration even when wrapped in a SELECT
    with pytest.raises(AuditQueryError):
        log.query("SELECT * FROM duckdb_settings() WHERE set_config('threads', '1') IS NULL")
    assert log.query("SELECT current_setting('enable_external_access')")[1] == [(False,)]


def test_query_timeout(tmp_path):
    log = fill(tmp_path / "audit", 2)
    with pytest.raises(AuditQueryError, match="stopped"):
        log.query("SELECT count(*) FROM range(1000000000000) a", timeout=0.3)


def test_query_sees_events_of_a_roll_racing_it(tmp_path):
    d = tmp_path / "audit"
    log = fill(d, 0, segment_events=20)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            log.append(ev(i))
            i += 1
            time.sleep(0.0005)

    th = threading.Thread(target=writer)
    th.start()
    try:
        for _ in range(8):
            _, rows = log.query("SELECT count(*), count(DISTINCT seq), coalesce(max(seq), 0) "
                                "FROM audit")
            n, distinct, top = rows[0]
            assert n == distinct == top  # no duplicates, no holes
    finally:
        stop.set()
        th.join()
    assert log.verify().ok
    assert len(segs(d, "parquet")) > 2  # conversions really raced the queries


def test_jsonl_lines_are_canonical(tmp_path):
    d = tmp_path / "audit"
    fill(d, 2)
    rec = json.loads(lines(segs(d, "jsonl")[0])[1])
    assert list(rec) == list(audit_mod.FIELDS[:1]) + ["prev_hash"] + list(
        audit_mod.FIELDS[1:-2]) + ["hash"]
    assert event_hash(rec) == rec["hash"]


CRASHER = """
import sys
from governance.audit import AuditEvent, AuditLog
log = AuditLog(sys.argv[1], fsync=True, segment_events=15)
i = 0
while True:
    e = AuditEvent(tenant="t", agent="crash", operation="write_file", bytes=i)
    log.append(e)
    print(e.seq, flush=True)
    i += 1
"""


def test_kill_9_at_any_moment_keeps_a_valid_chain(tmp_path):
    """Writers killed mid-write or mid-roll: every acknowledged event survives, the chain
    stays valid, and the next writer carries on."""
    import random
    import signal

    d = tmp_path / "audit"
    rnd = random.Random(7)
    acked = 0
    for _ in range(4):
        p = subprocess.Popen([sys.executable, "-c", CRASHER, str(d)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # wait until it is appending
            line = p.stdout.readline()
            if line:
                break
        time.sleep(rnd.uniform(0.02, 0.25))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate(timeout=30)
        seqs = [int(x) for x in (line + out).split()]
        acked = max([acked, *seqs])
        rep = AuditLog(d).verify()
        assert rep.ok, rep
        assert rep.events >= acked
    assert acked > 15 and segs(d, "parquet")


def test_failed_fsync_fails_the_append_and_is_cut_back(tmp_path, monkeypatch):
    d = tmp_path / "audit"
    log = fill(d, 3, fsync=True)
    real = os.fdatasync
    fail = {"n": 1}

    def flaky(fd):
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(audit_mod.os, "fdatasync", flaky)
    e = ev(3)
    with pytest.raises(AuditWriteError, match="Input/output error"):
        log.append(e)
    assert e.seq is None and e.hash is None
    assert len(lines(segs(d, "jsonl")[0])) == 3
    log.append(ev(4))
    rep = log.verify()
    assert rep.ok and rep.events == 4


def test_failed_roll_keeps_appending_and_retries(tmp_path, monkeypatch):
    import pyarrow.parquet as pq_mod

    d = tmp_path / "audit"
    real = pq_mod.write_table
    broken = {"on": True}

    def write_table(*a, **k):
        if broken["on"]:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(pq_mod, "write_table", write_table)
    log = fill(d, 25, segment_events=10)  # conversions fail: segments stay JSONL
    log.close()
    assert segs(d, "parquet") == [] and not list(d.glob("*.tmp"))
    assert len(segs(d, "jsonl")) == 3
    with pytest.raises(AuditWriteError, match="No space"):
        AuditLog(d).roll()
    log = AuditLog(d)
    assert log.verify().events == 25 and log.query("SELECT count(*) FROM audit")[1] == [(25,)]
    broken["on"] = False
    log = AuditLog(d)  # opening converts the sealed segments (the failed roll sealed #3)
    assert len(segs(d, "parquet")) == 3
    assert [p.name for p in segs(d, "jsonl")] == ["seg-0000000000000026.jsonl"]
    log.append(ev(25))
    log.roll()
    assert len(segs(d, "parquet")) == 4
    rep = log.verify()
    assert rep.ok and rep.events == 26


def test_lazy_events_are_written_at_once_and_fsynced_soon(tmp_path):
    """durable=False (allowed reads): in the file when append returns (a killed process
    loses nothing), fsynced within LAZY_SYNC_S; a durable event syncs everything before."""
    from governance.audit import LAZY_SYNC_S

    log = AuditLog(tmp_path / "audit", fsync=True)
    try:
        log.append(AuditEvent(tenant="acme", agent="a", operation="read_file",
                              path="/lazy-1.md"), durable=False)
        seg = sorted((tmp_path / "audit").glob("seg-*.jsonl"))[-1]
        assert b"/lazy-1.md" in seg.read_bytes()  # written before append returned
        assert log._dirty_since is not None  # not yet fsynced
        deadline = time.monotonic() + LAZY_SYNC_S + 1.0
        while log._dirty_since is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert log._dirty_since is None, "the lazy event was not fsynced in time"
        log.append(AuditEvent(tenant="acme", agent="a", operation="read_file",
                              path="/lazy-2.md"), durable=False)
        log.append(AuditEvent(tenant="acme", agent="a", operation="write_file",
                              path="/durable.md"))
        assert log._dirty_since is None  # the durable event's fsync covered the lazy one
    finally:
        log.close()
    assert log.verify().ok


def test_gateway_fsyncs_writes_and_refusals_at_once_and_reads_lazily(tmp_path):
    from server.wiring import open_app
    from storage import StoreConfig, Volume

    home = tmp_path / "home"
    Volume.init(home, StoreConfig.embedded(home)).close()  # durability fsync
    app = open_app(home)
    try:
        app.principals.add_tenant("acme")
        p = app.gateway.authenticate(app.principals.add_agent("acme", "bot"))
        audit = app.audit
        app.gateway.write(p, "/a.md", b"hello")
        assert audit._dirty_since is None
        app.gateway.read(p, "/a.md")
        assert audit._dirty_since is not None  # an allowed read: lazy
        with pytest.raises(Exception):  # noqa: B017 - any refusal
            app.gateway.read(p, "/missing.md")
        assert audit._dirty_since is None  # an error event is fsynced at once
    finally:
        app.close()


def test_async_reads_on_the_loop_are_audited_like_threaded_ones(tmp_path):
    """aread/astat of small (inline) files run on the event loop: one event each, lazy
    for allowed reads, fsynced for errors; chunked files take the threaded path."""
    import anyio

    from server.wiring import open_app
    from storage import StoreConfig, Volume

    home = tmp_path / "home"
    Volume.init(home, StoreConfig.embedded(home, inline_threshold=1024)).close()
    app = open_app(home)
    try:
        app.principals.add_tenant("acme")
        p = app.gateway.authenticate(app.principals.add_agent("acme", "bot"))
        gw, audit = app.gateway, app.audit
        gw.write(p, "/small.md", b"tiny")
        gw.write(p, "/big.bin", bytes(range(256)) * 64)  # 16 KiB: chunked

        async def flow() -> None:
            r = await gw.aread(p, "/small.md")
            assert r.data == b"tiny" and audit._dirty_since is not None
            assert (await gw.astat(p, "/small.md")).size == 4
            assert (await gw.aread(p, "/big.bin", 100, 10)).data == (bytes(range(256)) * 64)[100:110]
            with pytest.raises(Exception):  # noqa: B017 - not found
                await gw.aread(p, "/nope.md")
            assert audit._dirty_since is None  # the error event was fsynced

        anyio.run(flow)
        _cols, rows = audit.query(
            "SELECT operation, path, decision, error FROM audit WHERE operation IN "
            "('read_file', 'get_file_info') ORDER BY seq")
        assert [(r[0], r[1], r[2]) for r in rows] == [
            ("read_file", "/small.md", "allow"), ("get_file_info", "/small.md", "allow"),
            ("read_file", "/big.bin", "allow"), ("read_file", "/nope.md", "error")]
    finally:
        app.close()

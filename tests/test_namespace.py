"""The volume's POSIX-like namespace, held against both metadata backends.

Every test runs twice: on the embedded default (four SQLite engines) and on two PostgreSQL
databases (control on PostgreSQL too, 64 virtual shards alternating between them), so
listings, moves across engines and compare-and-swap behave the same on both.

Chunks are 64 KiB and the inline threshold 1 KiB, so multi-chunk files stay cheap;
durability is 'none' (no fsync), which these semantics do not depend on. The PostgreSQL
databases are created once per module and emptied before each test.
"""

from __future__ import annotations

import os
import random
import threading
import time
import unicodedata
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import PG_ADMIN_URL, service_missing

from storage import (
    AlreadyExists,
    DirectoryNotEmpty,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    NotFound,
    StoreConfig,
    VersionMismatch,
    Volume,
)
from storage.maintenance import status
from storage.meta import ROOT_INO

KiB = 1024
CHUNK = 64 * KiB
INLINE = 1 * KiB
SHARE = CHUNK // 4  # k = 4: a full chunk's data shares are 16 KiB each
T = "acme"


def blob(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_databases():
    """Two PostgreSQL databases for this module (created as conftest's ``pg_url`` does),
    dropped at the end; ``pg_urls`` empties them before each test."""
    try:
        import psycopg  # noqa: F401
        from sqlalchemy import create_engine, text
    except ImportError as exc:
        service_missing(f"psycopg not installed: {exc}")
    names = [f"lodestore_test_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    created: list[str] = []
    try:
        with admin.connect() as c:
            for name in names:
                c.execute(text(f'CREATE DATABASE "{name}"'))
                created.append(name)
    except Exception as exc:  # noqa: BLE001 - any connection failure means no service
        if created:
            with admin.connect() as c:
                for name in created:
                    c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        service_missing(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}")
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield [f"{base}/{name}" for name in names]
    with admin.connect() as c:
        for name in names:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_urls(pg_databases: list[str]) -> list[str]:
    """The module's two databases, emptied: every test starts from a fresh store."""
    from sqlalchemy import create_engine, text

    for url in pg_databases:
        eng = create_engine(url, isolation_level="AUTOCOMMIT")
        try:
            with eng.connect() as c:
                tables = c.execute(text(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
                if tables:
                    c.execute(text("TRUNCATE " + ", ".join(f'"{t}"' for t in tables)))
        finally:
            eng.dispose()
    return pg_databases


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def cfg(request: pytest.FixtureRequest, tmp_path) -> StoreConfig:
    cfg = StoreConfig.embedded(tmp_path, chunk_size=CHUNK, inline_threshold=INLINE,
                               durability="none")
    if request.param == "postgres":
        urls = request.getfixturevalue("pg_urls")
        cfg.engines = urls
        cfg.shard_map = [v % 2 for v in range(cfg.virtual_shards)]
        cfg.control = urls[0]
    return cfg


@pytest.fixture
def vol(cfg: StoreConfig, tmp_path):
    v = Volume.init(tmp_path, cfg)
    assert v.create_tenant(T)
    yield v
    v.close()


def engine_of_dir(vol: Volume, tenant: str, path: str) -> int:
    """The physical engine that holds the children of directory ``path``."""
    ino = ROOT_INO
    for comp in [c for c in path.split("/") if c]:
        e = vol.meta.get(tenant, ino, comp)
        assert e is not None and e.is_dir
        ino = e.ino
    return vol.meta.shard_map[vol.meta.vshard_of(tenant, ino)]


def tree(vol: Volume, tenant: str, path: str = "/") -> dict[str, bytes | None]:
    """Every entry below ``path``: file contents, None for directories."""
    return {i.path: (None if i.is_dir else vol.read(tenant, i.path))
            for i in vol.walk(tenant, path)}


def counts(vol: Volume) -> dict[str, int]:
    st = status(vol)
    return {k: st[k] for k in ("files", "directories", "bytes", "chunks")}


# -- create, overwrite, append ------------------------------------------------------------


def test_create_inline_and_chunked(vol: Volume) -> None:
    small = b"hello, agents"
    info = vol.write(T, "/notes/a.md", small)
    assert (info.path, info.name, info.kind, info.size, info.version) == (
        "/notes/a.md", "a.md", "file", len(small), 1)
    assert info.inline and info.chunks == 0
    assert vol.read(T, "/notes/a.md") == small

    at_threshold = blob(INLINE, 1)
    info = vol.write(T, "/edge", at_threshold)
    assert info.inline and vol.read(T, "/edge") == at_threshold
    info = vol.write(T, "/edge+1", at_threshold + b"!")
    assert not info.inline and info.chunks == 1

    big = blob(3 * CHUNK + 123, 2)
    info = vol.write(T, "/data/big.bin", big)
    assert not info.inline and info.chunks == 4 and info.size == len(big)
    assert vol.read(T, "/data/big.bin") == big
    st = vol.stat(T, "/data/big.bin")
    assert (st.size, st.chunks, st.inline, st.version) == (len(big), 4, False, 1)

    assert vol.write(T, "/empty", b"").size == 0
    assert vol.read(T, "/empty") == b""
    assert vol.stat(T, "/empty").inline


def test_write_from_stream_and_iterable(vol: Volume) -> None:
    import io

    data = blob(2 * CHUNK + 77, 3)
    assert vol.write(T, "/s", io.BytesIO(data)).size == len(data)
    assert vol.read(T, "/s") == data
    pieces = [data[i : i + 5000] for i in range(0, len(data), 5000)]
    info = vol.write(T, "/i", iter(pieces))
    assert info.size == len(data) and info.chunks == 3
    assert vol.read(T, "/i") == data
    assert vol.write(T, "/small-stream", io.BytesIO(b"tiny")).inline
    assert vol.read(T, "/small-stream") == b"tiny"


def test_overwrite_switches_representation_and_bumps_version(vol: Volume) -> None:
    contents = [b"v1", blob(2 * CHUNK + 5, 4), b"v3 small again", blob(CHUNK, 5), b""]
    for n, data in enumerate(contents, start=1):
        info = vol.write(T, "/f", data)
        assert info.version == n
        assert info.size == len(data)
        assert info.inline == (len(data) <= INLINE)
        assert vol.read(T, "/f") == data
        assert vol.stat(T, "/f").version == n


def test_append_inline_then_chunked_then_chunked(vol: Volume) -> None:
    expect = b""
    version = 0

    def append(data: bytes) -> None:
        nonlocal expect, version
        info = vol.write(T, "/log", data, mode="append")
        expect += data
        version += 1
        assert info.size == len(expect), f"after appending {len(data)} bytes"
        assert info.version == version
        assert vol.read(T, "/log") == expect

    append(blob(500, 6))  # creates the file
    assert vol.stat(T, "/log").inline
    append(blob(400, 7))  # 900 bytes: still inline
    assert vol.stat(T, "/log").inline
    append(blob(200, 8))  # 1100 bytes: now chunked
    st = vol.stat(T, "/log")
    assert not st.inline and st.chunks == 1
    append(blob(100 * KiB, 9))  # big chunked append
    append(blob(2 * CHUNK + 1, 10))
    append(b"")  # empty append: a new version, same bytes
    assert vol.stat(T, "/log").size == len(expect)


def test_many_small_appends_do_not_fragment(vol: Volume) -> None:
    vol.write(T, "/log", blob(CHUNK + 100, 11))
    before = vol.stat(T, "/log").chunks
    expect = vol.read(T, "/log")
    for i in range(40):
        line = f"line {i:03d} {'x' * (i % 17)}\n".encode()
        vol.write(T, "/log", line, mode="append")
        expect += line
    st = vol.stat(T, "/log")
    assert st.size == len(expect) and st.version == 41
    assert vol.read(T, "/log") == expect
    # the short tail chunk absorbs small appends instead of adding one chunk per append
    assert st.chunks <= before + 1
    assert st.chunks == -(-len(expect) // CHUNK)


def test_append_to_missing_file_creates_it_and_inline_appends_add_up(vol: Volume) -> None:
    for i in range(30):
        vol.write(T, "/dir/counter.txt", b"%d," % i, mode="append")
    expect = b"".join(b"%d," % i for i in range(30))
    st = vol.stat(T, "/dir/counter.txt")
    assert st.inline and st.size == len(expect) and st.version == 30
    assert vol.read(T, "/dir/counter.txt") == expect


# -- stat -----------------------------------------------------------------------------------


def test_stat_fields(vol: Volume) -> None:
    t0 = time.time()
    info = vol.write(T, "/a/b/file.txt", b"12345")
    t1 = time.time()
    st = vol.stat(T, "/a/b/file.txt")
    assert st == info
    assert (st.path, st.name, st.kind, st.size, st.version) == (
        "/a/b/file.txt", "file.txt", "file", 5, 1)
    assert not st.is_dir
    assert t0 - 1 <= st.ctime <= st.mtime <= t1 + 1

    time.sleep(0.02)
    t2 = time.time()
    vol.write(T, "/a/b/file.txt", blob(CHUNK + 1, 12))
    st2 = vol.stat(T, "/a/b/file.txt")
    assert st2.version == 2 and st2.size == CHUNK + 1
    assert st2.mtime >= t2 - 1e-3 and st2.mtime > st.mtime
    assert st2.ctime == st.ctime  # content changed, the entry was not re-created

    time.sleep(0.02)
    st3 = vol.write(T, "/a/b/file.txt", b"+", mode="append")
    assert st3.version == 3 and st3.size == CHUNK + 2 and st3.mtime > st2.mtime

    d = vol.stat(T, "/a/b")
    assert (d.kind, d.name, d.path, d.size) == ("directory", "b", "/a/b", 0) and d.is_dir
    root = vol.stat(T, "/")
    assert root.is_dir and root.path == "/"
    # trailing slash and NFC spelling reach the same entry
    assert vol.stat(T, "/a/b/").path == "/a/b"
    assert vol.exists(T, "/a/b/file.txt") and not vol.exists(T, "/a/b/nope")


def test_attrs_round_trip(vol: Volume) -> None:
    info = vol.write(T, "/x", b"1", attrs={"label": "secret", "n": 2})
    assert info.attrs == {"label": "secret", "n": 2}
    assert vol.stat(T, "/x").attrs == {"label": "secret", "n": 2}
    # an append without attrs keeps them
    assert vol.write(T, "/x", b"2", mode="append").attrs == {"label": "secret", "n": 2}


def test_unicode_names_are_nfc_normalised(vol: Volume) -> None:
    nfd = "/caf" + "e\u0301"
    nfc = unicodedata.normalize("NFC", nfd)
    assert nfd != nfc
    vol.write(T, nfd, b"coffee")
    assert vol.read(T, nfc) == b"coffee"
    assert vol.stat(T, nfd).path == nfc
    assert [i.name for i in vol.list_dir(T, "/")[0]] == [nfc[1:]]


# -- reads ------------------------------------------------------------------------------------


def _ranges(size: int) -> list[tuple[int, int | None]]:
    return [
        (0, None), (0, 0), (0, 1), (0, 100), (1, 1), (100, 1000),  # offset 0 / within a chunk
        (SHARE - 5, 10), (SHARE, SHARE), (3 * SHARE - 1, 2),  # across data shares
        (CHUNK - 10, 20), (CHUNK - 1, 1), (CHUNK, 1), (CHUNK, CHUNK),  # chunk boundaries
        (CHUNK - 1, CHUNK + 2), (1000, 2 * CHUNK + 500), (5, size),  # spanning many chunks
        (2 * CHUNK + 7, None), (size - 1, 10), (size - 1, None),  # tail, short at EOF
        (size, 10), (size, None), (size + 100, 10), (size + 100, None),  # past EOF
        (7, 0), (size - 1, 0), (size + 5, 0),  # length 0
    ]


@pytest.mark.parametrize("size", [3 * CHUNK + 5000, 700], ids=["chunked", "inline"])
def test_read_byte_ranges(vol: Volume, size: int) -> None:
    data = blob(size, 13)
    vol.write(T, "/r.bin", data)
    reader = vol.open_file(T, "/r.bin")
    assert reader.size == size
    for off, ln in _ranges(size):
        want = data[off:] if ln is None else data[off : off + ln]
        assert vol.read(T, "/r.bin", off, ln) == want, (off, ln)
        assert reader.read(off, ln) == want, (off, ln)
        assert b"".join(reader.iter(off, ln)) == want, (off, ln)


def test_reader_is_a_snapshot_of_one_version(vol: Volume) -> None:
    old = blob(2 * CHUNK, 14)
    vol.write(T, "/snap", old)
    reader = vol.open_file(T, "/snap")
    vol.write(T, "/snap", b"new and small")
    assert reader.read() == old and reader.info.version == 1
    assert vol.read(T, "/snap") == b"new and small"


def test_reading_a_directory_is_refused(vol: Volume) -> None:
    vol.mkdir(T, "/d")
    with pytest.raises(IsADirectory, match="/d is a directory"):
        vol.read(T, "/d")
    with pytest.raises(IsADirectory):
        vol.write(T, "/d", b"x")
    with pytest.raises(IsADirectory):
        vol.write(T, "/d", b"x", mode="append")
    assert vol.stat(T, "/d").is_dir


# -- listing ----------------------------------------------------------------------------------

NAMES = [
    "Zeta", "alpha", "Alpha", "_under", "-dash", "10", "9", "100", "a b", "a.b", "a~", "ab",
    "Äpfel", "apple", "ß", "é", "z", "日本語", "中文", "😀", "émoji😀", "A", "a", "0",
]


def test_list_dir_pages_in_byte_order(vol: Volume) -> None:
    for i, name in enumerate(NAMES):
        if i % 3 == 0:
            vol.mkdir(T, f"/dir/{name}", parents=True)
        else:
            vol.write(T, f"/dir/{name}", name.encode())
    expect = sorted(NAMES, key=lambda s: s.encode("utf-8"))
    for limit in (1, 2, 5, 7, len(NAMES), 1000):
        got: list[str] = []
        cursor = None
        pages = 0
        while True:
            items, cursor = vol.list_dir(T, "/dir", cursor=cursor, limit=limit)
            pages += 1
            assert len(items) <= limit
            got += [i.name for i in items]
            for i in items:
                assert i.path == f"/dir/{i.name}"
                assert i.kind == ("directory" if NAMES.index(i.name) % 3 == 0 else "file")
            if cursor is None:
                break
            assert pages <= len(NAMES) + 1, "paging does not terminate"
        assert got == expect, f"limit={limit}"
        assert pages == max(1, -(-len(NAMES) // limit)), f"limit={limit}: {pages} pages"
    assert [i.name for i in vol.iter_dir(T, "/dir")] == expect


def test_list_empty_root_and_iter_many(vol: Volume) -> None:
    assert vol.list_dir(T, "/") == ([], None)
    for i in range(25):
        vol.write(T, f"/many/{i:04d}", b"")
    items, cursor = vol.list_dir(T, "/many", limit=10)
    assert [i.name for i in items] == [f"{i:04d}" for i in range(10)] and cursor
    assert [i.name for i in vol.iter_dir(T, "/many")] == [f"{i:04d}" for i in range(25)]
    assert sorted(tree(vol, T)) == ["/many"] + [f"/many/{i:04d}" for i in range(25)]


def test_list_a_file_or_missing_dir_is_refused(vol: Volume) -> None:
    vol.write(T, "/f", b"x")
    with pytest.raises(NotADirectory, match="/f is a file"):
        vol.list_dir(T, "/f")
    with pytest.raises(NotFound, match="/nope"):
        vol.list_dir(T, "/nope")


# -- mkdir ------------------------------------------------------------------------------------


def test_mkdir(vol: Volume) -> None:
    info = vol.mkdir(T, "/a")
    assert info.is_dir and info.path == "/a" and info.version == 1
    with pytest.raises(AlreadyExists, match="/a already exists"):
        vol.mkdir(T, "/a")
    assert vol.mkdir(T, "/a", exist_ok=True).is_dir
    with pytest.raises(NotFound, match="/x"):
        vol.mkdir(T, "/x/y/z")
    assert not vol.exists(T, "/x")
    vol.mkdir(T, "/x/y/z", parents=True)
    assert vol.stat(T, "/x/y").is_dir and vol.stat(T, "/x/y/z").is_dir
    vol.mkdir(T, "/x/y/z", parents=True, exist_ok=True)
    vol.write(T, "/a/file", b"1")
    with pytest.raises((AlreadyExists, NotADirectory)):
        vol.mkdir(T, "/a/file")
    with pytest.raises((AlreadyExists, NotADirectory)):
        vol.mkdir(T, "/a/file", exist_ok=True)
    assert vol.read(T, "/a/file") == b"1"
    assert vol.mkdir(T, "/", exist_ok=True).is_dir
    with pytest.raises(AlreadyExists):
        vol.mkdir(T, "/")
    # write with parents=False needs the directory
    with pytest.raises(NotFound):
        vol.write(T, "/new/dir/f", b"1", parents=False)
    assert not vol.exists(T, "/new")


# -- move -------------------------------------------------------------------------------------


def _dirs_by_engine(vol: Volume, n: int = 12) -> dict[int, list[str]]:
    by: dict[int, list[str]] = {}
    for i in range(n):
        vol.mkdir(T, f"/d{i:02d}")
        by.setdefault(engine_of_dir(vol, T, f"/d{i:02d}"), []).append(f"/d{i:02d}")
    assert len(by) >= 2, "expected directories on at least two engines"
    return by


def test_rename_in_place(vol: Volume) -> None:
    data = blob(CHUNK + 9, 15)
    vol.write(T, "/dir/old", data)
    info = vol.move(T, "/dir/old", "/dir/new")
    assert info.path == "/dir/new" and info.size == len(data) and info.version == 1
    assert not vol.exists(T, "/dir/old")
    assert vol.read(T, "/dir/new") == data
    assert [i.name for i in vol.list_dir(T, "/dir")[0]] == ["new"]
    # moving onto itself is a no-op
    assert vol.move(T, "/dir/new", "/dir/new/").path == "/dir/new"
    assert vol.read(T, "/dir/new") == data


def test_move_files_and_dirs_across_engines(vol: Volume) -> None:
    by = _dirs_by_engine(vol)
    engines = sorted(by)
    a, b = by[engines[0]][0], by[engines[1]][0]
    assert engine_of_dir(vol, T, a) != engine_of_dir(vol, T, b)
    same = next((ds for ds in by.values() if len(ds) >= 2), None)

    big, small = blob(2 * CHUNK + 1, 16), b"small file"
    vol.write(T, f"{a}/big", big)
    vol.write(T, f"{a}/small", small)
    vol.write(T, f"{a}/sub/deep/leaf", b"leaf")

    # files across engines
    vol.move(T, f"{a}/big", f"{b}/big2")
    vol.move(T, f"{a}/small", f"{b}/small")
    assert vol.read(T, f"{b}/big2") == big and vol.read(T, f"{b}/small") == small
    assert not vol.exists(T, f"{a}/big") and not vol.exists(T, f"{a}/small")
    # a directory with a subtree across engines: its children come along
    vol.move(T, f"{a}/sub", f"{b}/sub-moved")
    assert vol.read(T, f"{b}/sub-moved/deep/leaf") == b"leaf"
    assert not vol.exists(T, f"{a}/sub")
    assert [i.name for i in vol.list_dir(T, a)[0]] == []
    assert [i.name for i in vol.list_dir(T, b)[0]] == ["big2", "small", "sub-moved"]
    # and back, plus a move within one engine
    vol.move(T, f"{b}/sub-moved", f"{a}/sub")
    assert vol.read(T, f"{a}/sub/deep/leaf") == b"leaf"
    if same is not None:
        vol.move(T, f"{b}/small", f"{same[0]}/s")
        vol.move(T, f"{same[0]}/s", f"{same[1]}/s")
        assert vol.read(T, f"{same[1]}/s") == small
    # whole top-level directories move between engines' parents too
    vol.move(T, a, f"{b}/nested-a")
    assert vol.read(T, f"{b}/nested-a/sub/deep/leaf") == b"leaf"
    assert not vol.exists(T, a)
    assert status(vol)["files"] == 3
    # nothing left half-moved
    assert all(state == 0 for _e, state, _p in vol.meta.iter_entries())


def test_many_moves_keep_the_namespace_consistent(vol: Volume) -> None:
    rng = random.Random(17)
    dirs = [f"/m{i}" for i in range(6)]
    for d in dirs:
        vol.mkdir(T, d)
    model: dict[str, bytes] = {}
    for i in range(12):
        p = f"{rng.choice(dirs)}/f{i}"
        model[p] = blob(rng.choice([10, 2000, CHUNK + 3]), 100 + i)
        vol.write(T, p, model[p])
    for step in range(40):
        src = rng.choice(sorted(model))
        dst = f"{rng.choice(dirs)}/f{rng.randrange(16)}"
        if dst == src:
            continue
        if dst in model and step % 2:
            with pytest.raises(AlreadyExists):
                vol.move(T, src, dst)
            continue
        vol.move(T, src, dst, overwrite=True)
        model[dst] = model.pop(src)
    files = {p: d for p, d in tree(vol, T).items() if d is not None}
    assert files == model
    assert status(vol)["files"] == len(model)


def test_move_onto_existing(vol: Volume) -> None:
    by = _dirs_by_engine(vol)
    engines = sorted(by)
    a, b = by[engines[0]][0], by[engines[1]][0]
    for src, dst in [(f"{a}/s1", f"{a}/d1"), (f"{a}/s2", f"{b}/d2")]:  # same / cross engine
        vol.write(T, src, b"source " + src.encode())
        vol.write(T, dst, blob(CHUNK + 1, 18))
        vol.write(T, dst, b"dst v2")
        with pytest.raises(AlreadyExists, match="already exists"):
            vol.move(T, src, dst)
        assert vol.read(T, src) == b"source " + src.encode()
        assert vol.read(T, dst) == b"dst v2"
        info = vol.move(T, src, dst, overwrite=True)
        assert info.path == dst
        assert vol.read(T, dst) == b"source " + src.encode()
        assert vol.stat(T, dst).version == 1  # the source entry, not the replaced one
        assert not vol.exists(T, src)
    assert status(vol)["files"] == 2


def test_move_type_clashes(vol: Volume) -> None:
    vol.write(T, "/file", b"f")
    vol.write(T, "/full/child", b"c")
    vol.mkdir(T, "/empty")
    vol.mkdir(T, "/src-dir")
    with pytest.raises(IsADirectory):
        vol.move(T, "/file", "/empty", overwrite=True)
    with pytest.raises(NotADirectory):
        vol.move(T, "/src-dir", "/file", overwrite=True)
    with pytest.raises(DirectoryNotEmpty):
        vol.move(T, "/src-dir", "/full", overwrite=True)
    assert sorted(tree(vol, T)) == ["/empty", "/file", "/full", "/full/child", "/src-dir"]


def test_move_dir_onto_empty_dir_then_use_it(vol: Volume) -> None:
    """Replacing an empty directory by moving another onto it: the new name must lead
    to the moved directory at once, also for a volume that just looked the name up."""
    vol.write(T, "/x/keep", b"moved content")
    vol.mkdir(T, "/y")
    assert not vol.exists(T, "/y/anything")  # a lookup through /y, as any client does
    vol.move(T, "/x", "/y", overwrite=True)
    assert [i.name for i in vol.list_dir(T, "/y")[0]] == ["keep"]
    assert vol.read(T, "/y/keep") == b"moved content"
    vol.write(T, "/y/new", b"written after the move")
    time.sleep(vol.cfg.dir_cache_ttl + 0.1)
    assert sorted(i.name for i in vol.list_dir(T, "/y")[0]) == ["keep", "new"]
    assert vol.read(T, "/y/new") == b"written after the move"


def test_moved_away_directory_name_is_free(vol: Volume) -> None:
    vol.write(T, "/a/f", b"1")
    assert vol.exists(T, "/a/f")
    vol.move(T, "/a", "/b")
    assert not vol.exists(T, "/a/f")
    with pytest.raises(NotFound):
        vol.write(T, "/a/g", b"2", parents=False)
    vol.write(T, "/a/g", b"2")
    assert sorted(tree(vol, T)) == ["/a", "/a/g", "/b", "/b/f"]


def test_move_into_own_subtree_is_refused(vol: Volume) -> None:
    vol.write(T, "/a/b/c/f", b"1")
    for dst in ("/a/b/c/a", "/a/x", "/a/b/a", "/a/b/c/d"):
        with pytest.raises(InvalidArgument, match="into itself"):
            vol.move(T, "/a", dst)
    with pytest.raises(InvalidArgument, match="into itself"):
        vol.move(T, "/a/b", "/a/b/c/b2")
    assert sorted(tree(vol, T)) == ["/a", "/a/b", "/a/b/c", "/a/b/c/f"]
    # into a sibling whose name starts the same is fine
    vol.mkdir(T, "/ab")
    vol.move(T, "/a", "/ab/a")
    assert vol.read(T, "/ab/a/b/c/f") == b"1"


def test_move_missing_or_into_missing_dir(vol: Volume) -> None:
    vol.write(T, "/f", b"1")
    with pytest.raises(NotFound, match="/nope"):
        vol.move(T, "/nope", "/x")
    with pytest.raises(NotFound, match="/no-dir"):
        vol.move(T, "/f", "/no-dir/f")
    assert vol.read(T, "/f") == b"1"


def test_replica_write_after_directory_deleted_elsewhere(vol: Volume, tmp_path) -> None:
    """Two server replicas over one store: when one deletes a directory recursively, a
    write through the other either fails (NotFound) or lands where it can be read. It
    must not be acknowledged into the deleted directory, unreachable and never collected."""
    other = Volume.open(tmp_path)
    try:
        vol.write(T, "/d/old", b"1")
        assert other.exists(T, "/d/old")  # the replica has looked /d up
        vol.delete(T, "/d", recursive=True)
        try:
            other.write(T, "/d/new", b"acknowledged")
        except NotFound:
            pass
        else:
            assert vol.exists(T, "/d/new"), "the replica acknowledged a write that is lost"
            assert vol.read(T, "/d/new") == b"acknowledged"
        visible = [i for i in vol.walk(T) if not i.is_dir]
        assert status(vol)["files"] == len(visible), "entries exist that no path reaches"
    finally:
        other.close()


# -- delete -----------------------------------------------------------------------------------


def test_delete_file_and_empty_dir(vol: Volume) -> None:
    base = counts(vol)
    vol.write(T, "/d/f", blob(CHUNK + 1, 19))
    vol.delete(T, "/d/f")
    assert not vol.exists(T, "/d/f")
    with pytest.raises(NotFound):
        vol.read(T, "/d/f")
    with pytest.raises(NotFound):
        vol.delete(T, "/d/f")
    vol.delete(T, "/d")
    assert not vol.exists(T, "/d")
    after = counts(vol)
    assert (after["files"], after["directories"], after["bytes"]) == (
        base["files"], base["directories"], base["bytes"])
    # the file name can be used again, as a directory even
    vol.mkdir(T, "/d/f", parents=True)
    assert vol.stat(T, "/d/f").is_dir


def test_delete_non_empty_dir_needs_recursive(vol: Volume) -> None:
    base = counts(vol)
    vol.write(T, "/proj/a.txt", b"a")
    vol.write(T, "/proj/src/b.py", blob(CHUNK + 2, 20))
    for i in range(30):
        vol.write(T, f"/proj/src/pkg{i % 3}/m{i}.py", b"x" * i)
    vol.mkdir(T, "/proj/empty/deeper", parents=True)
    vol.write(T, "/other", b"keep")
    snapshot = tree(vol, T)
    with pytest.raises(DirectoryNotEmpty, match="/proj is not empty"):
        vol.delete(T, "/proj")
    assert tree(vol, T) == snapshot

    vol.delete(T, "/proj", recursive=True)
    assert tree(vol, T) == {"/other": b"keep"}
    for p in ("/proj", "/proj/a.txt", "/proj/src/pkg1/m1.py"):
        assert not vol.exists(T, p)
    after = counts(vol)
    assert after["files"] == base["files"] + 1 and after["directories"] == base["directories"]
    assert vol.meta.trash_items() == []
    # a new directory with the same name starts empty
    vol.mkdir(T, "/proj")
    assert vol.list_dir(T, "/proj") == ([], None)
    vol.mkdir(T, "/proj/src")
    assert vol.list_dir(T, "/proj/src") == ([], None)
    assert not vol.exists(T, "/proj/src/b.py")


def test_delete_with_expected_version(vol: Volume) -> None:
    vol.write(T, "/f", b"1")
    vol.write(T, "/f", b"2")
    with pytest.raises(VersionMismatch):
        vol.delete(T, "/f", expected_version=1)
    assert vol.read(T, "/f") == b"2"
    vol.delete(T, "/f", expected_version=2)
    assert not vol.exists(T, "/f")


# -- compare-and-swap -------------------------------------------------------------------------


def test_compare_and_swap(vol: Volume) -> None:
    # 0 = create only
    assert vol.write(T, "/c", b"one", expected_version=0).version == 1
    with pytest.raises(VersionMismatch, match="expected version 0 but it is at version 1"):
        vol.write(T, "/c", b"again", expected_version=0)
    # match
    assert vol.write(T, "/c", b"two", expected_version=1).version == 2
    # mismatch: stale and future versions
    for stale in (1, 3, 99):
        with pytest.raises(VersionMismatch, match=f"expected version {stale}"):
            vol.write(T, "/c", b"lost", expected_version=stale)
        with pytest.raises(VersionMismatch):
            vol.write(T, "/c", b"lost", mode="append", expected_version=stale)
    assert vol.read(T, "/c") == b"two" and vol.stat(T, "/c").version == 2
    # a big (chunked) write is refused the same way, before storing anything
    chunks_before = counts(vol)["chunks"]
    with pytest.raises(VersionMismatch):
        vol.write(T, "/c", blob(3 * CHUNK, 21), expected_version=1)
    assert counts(vol)["chunks"] == chunks_before
    # append with the right version
    assert vol.write(T, "/c", b"+", mode="append", expected_version=2).version == 3
    assert vol.read(T, "/c") == b"two+"
    # expected version on a missing file
    with pytest.raises(VersionMismatch, match="it does not exist"):
        vol.write(T, "/missing", b"x", expected_version=1)
    assert not vol.exists(T, "/missing")


def test_mode_create(vol: Volume) -> None:
    assert vol.write(T, "/once", b"first", mode="create").version == 1
    with pytest.raises(AlreadyExists, match="/once already exists"):
        vol.write(T, "/once", b"second", mode="create")
    with pytest.raises(AlreadyExists):
        vol.write(T, "/once", blob(CHUNK * 2, 22), mode="create")
    assert vol.read(T, "/once") == b"first"


# -- deduplication and tenant isolation ---------------------------------------------------------


def test_identical_content_is_stored_once_per_tenant(vol: Volume) -> None:
    data = blob(3 * CHUNK + 100, 23)
    base = counts(vol)["chunks"]
    vol.write(T, "/one", data)
    after_one = counts(vol)["chunks"]
    assert after_one - base == 4
    vol.write(T, "/two", data)
    vol.write(T, "/dir/three", data)
    vol.write(T, "/one", data)  # overwrite with the same bytes
    assert counts(vol)["chunks"] == after_one
    refs = {p: [c for c, _ in vol.open_file(T, p).refs] for p in ("/one", "/two", "/dir/three")}
    assert refs["/one"] == refs["/two"] == refs["/dir/three"]
    # repeated chunks inside one file are stored once too
    block = blob(CHUNK, 24)
    before = counts(vol)["chunks"]
    vol.write(T, "/rep", block * 4)
    assert counts(vol)["chunks"] == before + 1
    assert vol.read(T, "/rep") == block * 4


def test_tenants_never_share_chunks_or_paths(vol: Volume) -> None:
    assert vol.create_tenant("other")
    assert not vol.create_tenant("other")  # already there
    assert vol.list_tenants() == [T, "other"]
    data = blob(2 * CHUNK + 50, 25)
    base = counts(vol)["chunks"]
    vol.write(T, "/shared/name", data)
    vol.write("other", "/shared/name", data)
    assert counts(vol)["chunks"] - base == 6  # 3 per tenant
    mine = [c for c, _ in vol.open_file(T, "/shared/name").refs]
    theirs = [c for c, _ in vol.open_file("other", "/shared/name").refs]
    assert not set(mine) & set(theirs)

    vol.write(T, "/private/only-mine", b"secret")
    assert not vol.exists("other", "/private/only-mine")
    with pytest.raises(NotFound):
        vol.read("other", "/private/only-mine")
    with pytest.raises(NotFound):
        vol.stat("other", "/private")
    assert [i.name for i in vol.list_dir("other", "/")[0]] == ["shared"]
    # a delete in one tenant leaves the other's copy intact
    vol.delete(T, "/shared", recursive=True)
    assert vol.read("other", "/shared/name") == data


# -- persistence ------------------------------------------------------------------------------


def test_reopen_sees_everything(vol: Volume, tmp_path) -> None:
    data = blob(2 * CHUNK + 3, 26)
    vol.write(T, "/p/big", data)
    vol.write(T, "/p/small", b"s")
    vol.close()
    again = Volume.open(tmp_path)
    try:
        assert again.cfg.engines == vol.cfg.engines
        assert again.read(T, "/p/big") == data and again.read(T, "/p/small") == b"s"
        assert again.list_tenants() == [T]
    finally:
        again.close()
    # the fixture closes ``vol`` again: that must be harmless


# -- concurrency ------------------------------------------------------------------------------


def test_concurrent_appends_lose_nothing(vol: Volume) -> None:
    """Appends carry no precondition, so each must land exactly once; the engine retries
    internally and should not push contention back to callers as an error."""
    threads, per = 8, 20
    barrier = threading.Barrier(threads)
    done: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(t: int) -> None:
        barrier.wait()
        for j in range(per):
            rec = f"{t}:{j:02d}"
            try:
                vol.write(T, "/shared.log", f"<{rec}{'.' * 30}>".encode(), mode="append")
            except Exception as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(exc)
                continue
            with lock:
                done.append(rec)

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join(60)
    data = vol.read(T, "/shared.log").decode()
    records = [r.split(".")[0] for r in data.strip("<>").split("><")]
    # every acknowledged append is there exactly once, nothing else is
    assert sorted(records) == sorted(done)
    for t in range(threads):  # each thread's appends stay in its order
        mine = [r for r in records if r.startswith(f"{t}:")]
        assert mine == sorted(mine)
    st = vol.stat(T, "/shared.log")
    assert st.version == len(done)  # one version per append, the first created it
    assert not st.inline  # 6.4 KB: went from inline to chunked on the way
    assert not errors, f"{len(errors)} of {threads * per} appends failed: {errors[:3]}"


def test_concurrent_cas_increments(vol: Volume) -> None:
    vol.write(T, "/counter", b"0")
    threads, per = 8, 5
    successes = [0] * threads
    conflicts = [0] * threads
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        while successes[t] < per:
            r = vol.open_file(T, "/counter")  # value and version of one snapshot
            value = int(r.read())
            try:
                vol.write(T, "/counter", str(value + 1).encode(), expected_version=r.info.version)
            except VersionMismatch:
                conflicts[t] += 1
                continue
            successes[t] += 1

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, t) for t in range(threads)]:
            f.result(timeout=60)
    assert sum(successes) == threads * per
    assert vol.read(T, "/counter") == str(threads * per).encode()
    assert vol.stat(T, "/counter").version == threads * per + 1


def test_concurrent_create_only_has_one_winner(vol: Volume) -> None:
    threads = 8
    barrier = threading.Barrier(threads)

    def worker(t: int) -> str:
        barrier.wait()
        try:
            vol.write(T, "/lock", f"owner {t}".encode(), expected_version=0)
            return "won"
        except (VersionMismatch, AlreadyExists):
            return "lost"

    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(worker, range(threads)))
    assert results.count("won") == 1
    assert vol.stat(T, "/lock").version == 1
    assert vol.read(T, "/lock") == f"owner {results.index('won')}".encode()


def test_concurrent_moves_of_one_file_have_one_winner(vol: Volume) -> None:
    by = _dirs_by_engine(vol, 8)
    dirs = sorted(d for ds in by.values() for d in ds)
    data = blob(CHUNK + 10, 27)
    for round_ in range(3):
        src = f"{dirs[round_]}/f"
        vol.write(T, src, data)
        barrier = threading.Barrier(len(dirs))

        def mover(dst_dir: str, src: str = src, barrier: threading.Barrier = barrier,
                  name: str = f"moved{round_}") -> str:
            barrier.wait()
            try:
                vol.move(T, src, f"{dst_dir}/{name}")
                return dst_dir
            except NotFound:
                return ""

        with ThreadPoolExecutor(len(dirs)) as pool:
            winners = [w for w in pool.map(mover, dirs) if w]
        assert len(winners) == 1, winners
        assert not vol.exists(T, src)
        copies = [i.path for i in vol.walk(T) if i.name == f"moved{round_}"]
        assert copies == [f"{winners[0]}/moved{round_}"]
        assert vol.read(T, copies[0]) == data
    assert all(state == 0 for _e, state, _p in vol.meta.iter_entries())


def test_concurrent_mkdir_parents(vol: Volume) -> None:
    threads = 8
    barrier = threading.Barrier(threads)

    def worker(t: int) -> None:
        barrier.wait()
        vol.write(T, f"/x/y/z/f{t}", b"%d" % t)

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, t) for t in range(threads)]:
            f.result(timeout=60)
    assert sorted(tree(vol, T)) == ["/x", "/x/y", "/x/y/z"] + [f"/x/y/z/f{t}" for t in range(8)]
    assert status(vol)["directories"] == 3


def test_short_lived_threads_do_not_leak_connections(vol: Volume) -> None:
    """A server that serves each request on a fresh thread must not pile up metadata
    connections (PostgreSQL: each held connection counts against max_connections and the
    pool, which blocks once exhausted; SQLite: three file descriptors each)."""
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd")
    vol.write(T, "/f", b"x")

    def one_request() -> None:
        assert vol.stat(T, "/f").size == 1

    for _ in range(3):  # warm up whatever is cached per process
        th = threading.Thread(target=one_request)
        th.start()
        th.join()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(40):
        th = threading.Thread(target=one_request)
        th.start()
        th.join()
    grown = len(os.listdir("/proc/self/fd")) - before
    assert grown < 10, f"40 finished threads left {grown} more open descriptors behind"


def test_control_character_check_is_exactly_unicode_category_cc():
    from storage.paths import _CONTROL

    for c in range(0x110000):
        ch = chr(c)
        assert (_CONTROL.match(ch) is not None) == (unicodedata.category(ch) == "Cc"), hex(c)


def test_per_write_chunk_size(vol: Volume):
    data = blob(5 * CHUNK + 123, seed=9)
    big = vol.write("acme", "/whole.bin", data, chunk_size=8 * CHUNK)
    assert big.chunks == 1  # the whole object in one chunk, not six
    assert vol.read("acme", "/whole.bin") == data
    assert vol.read("acme", "/whole.bin", 3 * CHUNK - 5, CHUNK) == data[3 * CHUNK - 5:4 * CHUNK - 5]
    cut = vol.write("acme", "/cut.bin", data, chunk_size=2 * CHUNK)
    assert cut.chunks == 3 and vol.read("acme", "/cut.bin") == data
    # appends then follow the store's chunk size; the file reads back whole
    vol.write("acme", "/whole.bin", b"tail" * 300, mode="append")
    assert vol.read("acme", "/whole.bin") == data + b"tail" * 300
    for bad in (100, 4095, 257 * 1024 * KiB):
        with pytest.raises(InvalidArgument, match="chunk_size must be between"):
            vol.write("acme", "/bad.bin", data, chunk_size=bad)
    with pytest.raises(InvalidArgument, match="appends"):
        vol.write("acme", "/whole.bin", data, mode="append", chunk_size=8 * CHUNK)
    assert not vol.exists("acme", "/bad.bin")

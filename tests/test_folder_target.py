"""The folder target's write and read machinery.

Writes: big fragments go through a page-aligned buffer with O_DIRECT and their unaligned
tail through the page cache; small ones are written buffered. Every byte must land where
a buffered write puts it, whatever the part boundaries, sizes and alignment, and a file
system that refuses O_DIRECT must get a correct buffered write instead.

Reads: descriptors come from one process-wide cache sized from the descriptor limit; a
descriptor in use is never closed (or its number reused) under its reader, and running
short of descriptors shrinks the cache instead of failing reads.
"""

from __future__ import annotations

import errno
import os
import random

import pytest
from test_fragment_layout import make_volume

from storage import Volume
from storage.config import StoreConfig
from storage.errors import ConfigError
from storage.targets import local
from storage.targets.local import DIRECT_MIN, LocalDirTarget

KiB = 1024
MiB = 1024 * KiB


def _supports_direct(folder) -> bool:
    path = os.path.join(folder, ".probe")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | getattr(os, "O_DIRECT", 0))
    except OSError:
        return False
    try:
        import mmap

        os.write(fd, mmap.mmap(-1, 4096))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.fixture()
def target(tmp_path):
    t = LocalDirTarget("t0", (tmp_path / "t0").as_uri(), direct=True)
    t.ensure()
    yield t
    t.close()


@pytest.fixture()
def spy(monkeypatch):
    calls: list[int] = []
    real = local._write_direct

    def counting(fd, views):
        calls.append(sum(len(v) for v in views))
        return real(fd, views)

    monkeypatch.setattr(local, "_write_direct", counting)
    return calls


SIZES = [DIRECT_MIN - 1, DIRECT_MIN, 1 * MiB - 3, 1 * MiB, 1 * MiB + 4096,
         1 * MiB + 4096 + 7, 3 * MiB + 12 * KiB, 2 * MiB + 1]


@pytest.mark.parametrize("size", SIZES)
def test_any_size_and_split_reads_back_identical(target, spy, tmp_path, size):
    rng = random.Random(size)
    data = rng.randbytes(size)
    cuts = sorted({0, size, 68, 4096, size // 3, size - 5} & set(range(size + 1)))
    parts = [data[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]
    parts = [memoryview(p) if i % 2 else p for i, p in enumerate(parts)]
    target.put(f"acme/ab/chunk{size}.0", parts)
    assert target.get(f"acme/ab/chunk{size}.0") == data
    assert target.get_range(f"acme/ab/chunk{size}.0", size // 2, 9) == data[size // 2:size // 2 + 9]
    if _supports_direct(tmp_path):
        assert target.direct, "a file system that takes O_DIRECT keeps direct writes on"
        assert spy == ([size] if size >= DIRECT_MIN else [])
    assert not [n for n in os.listdir(tmp_path / "t0" / "acme" / "ab") if n.startswith(".tmp-")]


def test_refused_direct_io_falls_back_to_a_correct_buffered_write(target, monkeypatch):
    """A file system that refuses O_DIRECT (none here takes that path, so it is played
    by raising EINVAL after writing garbage, as a device with bigger sectors could)."""

    def refuse(fd, views):
        os.write(fd, b"garbage that must not survive" * 1000)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(local, "_write_direct", refuse)
    data = random.Random(1).randbytes(2 * MiB + 99)
    target.put("acme/cd/x.1", [data[:100], data[100:]])
    assert target.get("acme/cd/x.1") == data
    assert target.direct is False  # remembered: later writes go buffered at once
    target.put("acme/cd/y.1", [data])
    assert target.get("acme/cd/y.1") == data


def test_other_write_errors_are_not_taken_for_a_refusal(target, monkeypatch):
    def full(fd, views):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local, "_write_direct", full)
    with pytest.raises(Exception, match="No space left"):
        target.put("acme/ef/z.2", [bytes(DIRECT_MIN)])
    assert target.direct is True
    assert not target.exists("acme/ef/z.2")


def test_store_with_direct_writes_reads_back_and_scrubs_clean(tmp_path, spy):
    vol = make_volume(tmp_path, chunk=4 * MiB)
    try:
        data = random.Random(5).randbytes(9 * MiB + 12_345)  # 2 full chunks, odd tail
        vol.write("acme", "/big.bin", data)
        assert vol.read("acme", "/big.bin") == data
        assert vol.read("acme", "/big.bin", 4 * MiB - 10, 20) == data[4 * MiB - 10:4 * MiB + 10]
        if _supports_direct(tmp_path):
            assert len(spy) >= 12  # the two full chunks' fragments at least
        from storage.maintenance import scrub

        report = scrub(vol)
        assert not report.problems
    finally:
        vol.close()


def test_direct_writes_setting_round_trips_and_is_validated(tmp_path):
    cfg = StoreConfig.embedded(tmp_path / "s", direct_writes=False)
    vol = Volume.init(tmp_path / "s", cfg)
    try:
        assert all(t.direct is False for t in vol.chunks.targets.values())
    finally:
        vol.close()
    again = Volume.open(tmp_path / "s")
    try:
        assert again.cfg.direct_writes is False
        assert all(t.direct is False for t in again.chunks.targets.values())
    finally:
        again.close()
    bad = StoreConfig.embedded(tmp_path / "b", direct_writes="yes")
    with pytest.raises(ConfigError, match="direct_writes must be true or false"):
        bad.validate()


# -- the shared descriptor cache --------------------------------------------------------

def _fragments(target, n: int) -> dict[str, bytes]:
    out = {}
    for i in range(n):
        key = f"acme/{i % 7:02x}/frag{i}.0"
        out[key] = bytes([i % 251]) * 3000 + i.to_bytes(4, "little")
        target.put(key, [out[key]])
    return out


def test_evicted_descriptor_stays_open_while_pinned():
    import tempfile

    cache = local._FdCache(2)
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for i in range(3):
            paths.append(os.path.join(d, f"f{i}"))
            with open(paths[-1], "wb") as f:
                f.write(bytes([i]) * 10)
        a = cache.acquire(paths[0])  # pinned
        for p in paths[1:]:
            cache.release(cache.acquire(p))  # evicts paths[0] from the cache
        assert len(cache) == 2 and a.gone
        assert os.pread(a.fd, 10, 0) == bytes([0]) * 10  # still open: not closed under us
        cache.release(a)
        with pytest.raises(OSError):
            os.fstat(a.fd)  # the last unpin closed it
        cache.drop_where(lambda p: True)
        assert len(cache) == 0


def test_concurrent_reads_through_a_tiny_cache_return_the_right_bytes(target, monkeypatch):
    """Readers racing with evictions: a descriptor closed and its number reused by
    another fragment would hand one reader another fragment's bytes."""
    import threading

    frags = _fragments(target, 40)
    monkeypatch.setattr(local._FDS, "size", 3)
    keys = list(frags)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(1500):
            key = rng.choice(keys)
            got = target.get_range(key, 2990, 14)
            if got != frags[key][2990:3004]:
                errors.append(key)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(local._FDS) <= 3


def test_running_short_of_descriptors_shrinks_the_cache_instead_of_failing(tmp_path):
    """A process whose descriptor limit is lowered below the cache's budget after start:
    opens that fail with EMFILE give half the cache back and the read goes on."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, resource, sys
        sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})
        from storage.targets import local
        t = local.LocalDirTarget("t0", {(tmp_path / "t0").as_uri()!r})
        t.ensure()
        keys = []
        for i in range(300):
            keys.append(f"acme/{{i % 5:02x}}/f{{i}}.0")
            t.put(keys[-1], [i.to_bytes(4, "little") * 50])
        resource.setrlimit(resource.RLIMIT_NOFILE, (128, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        for rnd in range(2):
            for i, k in enumerate(keys):
                assert t.get_range(k, 0, 4) == i.to_bytes(4, "little"), k
        print("ok", local._FDS.size < 128)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["ok", "True"]


def test_closing_one_of_two_targets_on_a_folder_keeps_the_others_descriptors(tmp_path):
    a = LocalDirTarget("t0", (tmp_path / "t0").as_uri())
    a.ensure()
    b = LocalDirTarget("t0", (tmp_path / "t0").as_uri())
    frags = _fragments(a, 5)
    for key in frags:
        assert b.get_range(key, 0, 3) == frags[key][:3]
    prefix = f"{b.root}/"
    held = sum(1 for p in list(local._FDS._fds) if p.startswith(prefix))
    assert held == 5
    a.close()
    a.close()  # idempotent: does not count twice
    assert sum(1 for p in list(local._FDS._fds) if p.startswith(prefix)) == 5
    b.close()
    assert sum(1 for p in list(local._FDS._fds) if p.startswith(prefix)) == 0


def test_a_target_collected_unclosed_releases_its_folder(tmp_path):
    import gc

    t = LocalDirTarget("t0", (tmp_path / "t0").as_uri())
    t.ensure()
    frags = _fragments(t, 3)
    for key in frags:
        t.get_range(key, 0, 1)
    prefix = f"{t.root}/"
    assert sum(1 for p in list(local._FDS._fds) if p.startswith(prefix)) == 3
    del t
    gc.collect()
    assert sum(1 for p in list(local._FDS._fds) if p.startswith(prefix)) == 0

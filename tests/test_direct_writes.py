"""Fragments written with O_DIRECT (folder targets, ``direct_writes``).

Big fragments go through a page-aligned buffer with O_DIRECT and their unaligned tail
through the page cache; small ones are written buffered. Every byte must land where a
buffered write puts it, whatever the part boundaries, sizes and alignment, and a file
system that refuses O_DIRECT must get a correct buffered write instead.
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

"""Reads made in place: shares read by the kernel straight into the bytes returned.

The in-place path (``FileReader.read_ranges``, ``ChunkStore.read_into``,
``fragment.read_range3_into``, ``Target.get_range_into``) must return exactly what the
copying path returns for any range, never hand out bytes that failed their checksums,
read around a damaged or missing share, and keep the bytes it returns immutable.
"""

from __future__ import annotations

import random

import pytest
from test_fragment_layout import frag_path, make_volume

from storage import buffers, fragment
from storage.targets.base import Target

KiB = 1024
MiB = 1024 * KiB


@pytest.fixture()
def store(tmp_path):
    vol = make_volume(tmp_path, chunk=1 * MiB)
    data = random.Random(3).randbytes(5 * MiB + 12_345)  # chunks of 1 MiB, a short tail
    vol.write("acme", "/f.bin", data)
    yield tmp_path, vol, data
    vol.close()


def test_fresh_bytes_are_filled_in_place_and_immutable_after():
    f = buffers.Fresh(10_000)
    f.view[:] = bytes(range(100)) * 100
    out = f.finish()
    assert type(out) is bytes and out == bytes(range(100)) * 100
    assert hash(out) == hash(bytes(range(100)) * 100)
    with pytest.raises(ValueError):  # the view is released: no writes after finish
        f.view[0] = 1
    assert buffers.Fresh(0).finish() == b""


def test_fresh_bytes_fallback_without_the_trick(monkeypatch):
    monkeypatch.setattr(buffers, "_new", None)
    f = buffers.Fresh(5)
    f.view[:] = b"hello"
    assert f.finish() == b"hello"


def test_any_range_reads_back_identical(store):
    _home, vol, data = store
    r = vol.open_file("acme", "/f.bin")
    rng = random.Random(7)
    n = len(data)
    edges = [0, 1, 4095, 4096, 4097, 256 * KiB, MiB - 1, MiB, MiB + 1, 3 * MiB + 5, n - 1, n]
    ranges = [(a, b - a) for a in edges for b in edges if b >= a]
    ranges += [(o, rng.randrange(1, 3 * MiB)) for o in (rng.randrange(n) for _ in range(40))]
    ranges += [(n + 5, 10), (n - 3, 100)]  # past the end: empty, then short
    got = r.read_ranges(ranges)
    for (off, ln), out in zip(ranges, got, strict=True):
        assert out == data[off:off + ln], (off, ln)
        assert type(out) is bytes
    for off, ln in ranges[::7]:  # read() and iter() take the same path for big ranges
        assert r.read(off, ln) == data[off:off + ln]
        assert b"".join(r.iter(off, ln)) == data[off:off + ln]


def test_a_flipped_byte_is_never_returned_and_is_read_around(store):
    home, vol, data = store
    r = vol.open_file("acme", "/f.bin")
    cid = r.refs[2][0].hex()  # the third chunk: bytes [2 MiB, 3 MiB)
    p = frag_path(home, vol, cid, 1)  # its second data share: chunk bytes [256K, 512K)
    raw = bytearray(p.read_bytes())
    raw[len(raw) - 200 * KiB] ^= 0x40  # a byte in that share's data
    p.write_bytes(bytes(raw))
    vol.chunks._tables.d.clear()
    fresh = vol.open_file("acme", "/f.bin")
    assert fresh.read_ranges([(2 * MiB, MiB)]) == [data[2 * MiB:3 * MiB]]
    assert fresh.read() == data


def test_a_missing_share_is_read_around(store):
    home, vol, data = store
    r = vol.open_file("acme", "/f.bin")
    for ref, _n in r.refs[:3]:
        frag_path(home, vol, ref.hex(), 0).unlink()
    assert vol.open_file("acme", "/f.bin").read() == data
    assert b"".join(vol.open_file("acme", "/f.bin").iter()) == data


def test_a_truncated_fragment_on_a_cold_read_is_read_around(store):
    home, vol, data = store
    r = vol.open_file("acme", "/f.bin")
    cid = r.refs[0][0].hex()
    p = frag_path(home, vol, cid, 3)
    p.write_bytes(p.read_bytes()[:-5000])
    vol.chunks._tables.d.clear()  # cold: header, tables and data in one read
    assert vol.open_file("acme", "/f.bin").read(0, MiB) == data[:MiB]


def test_read_range3_into_matches_read_range3_and_refuses_unaligned():
    rng = random.Random(11)
    share = rng.randbytes(300 * KiB + 17)
    cid = rng.randbytes(32)
    head = fragment.FragmentHeader(4, 6, 1, 4096, len(share) * 4, len(share), cid)
    stored = fragment.encode(head, share)

    def fetch(off: int, n: int) -> bytes:
        return stored[off:off + n]

    def fetch_into(off: int, views: list[memoryview]) -> int:
        pos = off
        for v in views:
            piece = stored[pos:pos + len(v)]
            v[:len(piece)] = piece
            pos += len(piece)
        return pos - off

    kept: list[fragment.Tables] = []
    for start, end in [(0, len(share)), (4096, 8192), (256 * KiB, len(share)), (0, 4096),
                       (280 * KiB, len(share))]:
        for tables in (None, *kept[:1]):
            out = bytearray(end - start)
            fragment.read_range3_into(fetch, fetch_into, cid, 1, 4096, len(share), start,
                                      end, memoryview(out), tables, kept.append)
            assert bytes(out) == share[start:end]
    with pytest.raises(ValueError):
        fragment.read_range3_into(fetch, fetch_into, cid, 1, 4096, len(share), 10, 4096,
                                  memoryview(bytearray(4086)), None)


def test_object_store_style_targets_fill_views_by_copy():
    class Blob(Target):  # only what get_range_into's default needs
        def __init__(self, data: bytes) -> None:
            self.data = data

        def get_range(self, key: str, start: int, length: int) -> bytes:
            return self.data[start:start + length]

        put = get = delete = exists = list = health = ensure = None  # type: ignore[assignment]

    t = Blob(bytes(range(256)) * 4)
    a, b = bytearray(10), bytearray(20)
    assert t.get_range_into("k", 1000, [memoryview(a), memoryview(b)]) == 24
    assert bytes(a) == (bytes(range(256)) * 4)[1000:1010]
    assert bytes(b[:14]) == (bytes(range(256)) * 4)[1010:1024]


def test_small_reads_take_the_cached_path_and_read_around_damage(store):
    home, vol, data = store
    r = vol.open_file("acme", "/f.bin")
    r.read()  # caches the records and every share's checksum tables
    chunks = vol.chunks
    rng = random.Random(5)
    share = MiB // 4
    cases = [(0, 1), (4095, 2), (4096, 4096), (share - 3, 3), (share - 3, 6), (MiB - 1, 1),
             (5 * MiB, 12_345), (5 * MiB + 12_340, 10)]
    cases += [(o, rng.randrange(1, 9000)) for o in (rng.randrange(len(data)) for _ in range(300))]
    fast = 0
    for off, ln in cases:
        ci = off // MiB
        cid = r.refs[ci][0].hex()
        end = min(off + ln, (ci + 1) * MiB, len(data))
        got = chunks.read_small("acme", cid, off - ci * MiB, end - ci * MiB)
        if got is not None:
            fast += 1
            assert got == data[off:end], (off, ln)
        assert r.read(off, ln) == data[off:off + ln]
    assert fast > len(cases) // 2  # within one share and cached: most of them
    # a flipped byte: the fast path declines, the general path reads around it
    cid = r.refs[1][0].hex()
    p = frag_path(home, vol, cid, 0)
    raw = bytearray(p.read_bytes())
    raw[-share + 5000] ^= 1  # share byte 5000: block 1 of share 0
    p.write_bytes(bytes(raw))
    assert chunks.read_small("acme", cid, 4096, 8192) is None
    assert r.read(MiB + 4096, 4096) == data[MiB + 4096:MiB + 8192]
    # a target marked down: declined too
    chunks.mark_down(vol.chunks.record("acme", cid).placement[2])
    assert chunks.read_small("acme", cid, 2 * share, 2 * share + 10) is None
    assert r.read(MiB + 2 * share, 10) == data[MiB + 2 * share:MiB + 2 * share + 10]


def test_any_range_reads_back_with_two_targets_gone(store):
    home, vol, data = store
    for t in ("t1", "t4"):
        (home / "targets" / t).rename(home / "targets" / f"{t}.gone")
    vol.chunks._tables.d.clear()
    r = vol.open_file("acme", "/f.bin")
    rng = random.Random(9)
    ranges = [(0, len(data)), (1, 3 * MiB), (MiB - 5, 70_000), (4096, 65_536)]
    ranges += [(o, rng.randrange(64 * KiB, 2 * MiB)) for o in
               (rng.randrange(len(data)) for _ in range(30))]
    for (off, ln), out in zip(ranges, r.read_ranges(ranges), strict=True):
        assert out == data[off:off + ln], (off, ln)
    assert b"".join(vol.open_file("acme", "/f.bin").iter()) == data

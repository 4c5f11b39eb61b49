"""Fragment layout 3 (checksum tables, contiguous data) and stores written in layout 2.

Reads of any range verify what they return against block or segment checksums; a flipped
byte anywhere in a fragment is caught by a read of the range it affects or by scrub; and
stores written before layout 3 (including their metadata schema) keep reading, scrubbing
and repairing.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from storage import StoreConfig, TargetSpec, Volume, fragment
from storage.chunks import fragment_key
from storage.errors import CorruptFragment
from storage.maintenance import repair, scrub

KiB = 1024
MiB = 1024 * KiB


def make_volume(home: Path, chunk: int = 4 * MiB, block: int = 4 * KiB) -> Volume:
    cfg = StoreConfig.embedded(home, chunk_size=chunk, inline_threshold=1 * KiB,
                               checksum_block=block, durability="none")
    cfg.targets = [TargetSpec(f"t{i}", (home / "targets" / f"t{i}").as_uri())
                   for i in range(6)]
    vol = Volume.init(home, cfg)
    vol.create_tenant("acme")
    return vol


def frag_path(home: Path, vol: Volume, cid: str, i: int) -> Path:
    rec = vol.meta.chunk_get("acme", cid)
    return home / "targets" / rec.placement[i] / fragment_key("acme", cid, i)


# -- the codec itself -------------------------------------------------------------------

@pytest.mark.parametrize("share_len,block", [(1, 4096), (4096, 4096), (1 * MiB + 7, 4096),
                                             (300 * KiB, 512), (3 * MiB, 1 * MiB)])
def test_layout3_any_range_reads_back_verified(share_len, block):
    rng = random.Random(share_len ^ block)
    share = rng.randbytes(share_len)
    cid = rng.randbytes(32)
    head = fragment.FragmentHeader(4, 6, 2, block, share_len * 4, share_len, cid)
    stored = fragment.encode(head, share)
    assert len(stored) == fragment.fragment_size(share_len, block)
    fetches: list[tuple[int, int]] = []

    def fetch(off: int, n: int) -> bytes:
        fetches.append((off, n))
        return stored[off:off + n]

    cuts = {0, 1, share_len - 1, share_len, block - 1, block, block + 1,
            fragment.SEGMENT - 1, fragment.SEGMENT, fragment.SEGMENT + block + 3}
    cuts |= {rng.randrange(share_len + 1) for _ in range(20)}
    cuts = sorted(c for c in cuts if 0 <= c <= share_len)
    kept: list[fragment.Tables] = []
    for a in cuts:
        for b in cuts:
            if a >= b:
                continue
            for tables in (None, kept[0] if kept else None):
                got = fragment.read_range3(fetch, cid, 2, block, share_len, a, b, tables,
                                           kept.append)
                assert bytes(got) == share[a:b], (a, b)
    # with the tables cached, a read is one fetch of just the blocks it covers
    fetches.clear()
    a = min(share_len - 1, 3 * block + 5)
    fragment.read_range3(fetch, cid, 2, block, share_len, a, a + 1, kept[0])
    assert fetches == [(kept[0].data_off + a // block * block,
                        min(block, share_len - a // block * block))]
    header, whole = fragment.decode_whole(stored, cid, 2)
    assert whole == share and header.layout == 3


def test_layout3_every_flipped_byte_is_caught():
    rng = random.Random(5)
    share_len, block = 600 * KiB + 11, 4096
    share = rng.randbytes(share_len)
    cid = rng.randbytes(32)
    stored = fragment.encode(fragment.FragmentHeader(4, 6, 1, block, share_len * 4,
                                                     share_len, cid), share)
    doff = fragment.data_offset(share_len, block)
    positions = list(range(0, doff)) + rng.sample(range(doff, len(stored)), 400)
    for pos in positions:
        bad = bytearray(stored)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptFragment):
            fragment.decode_whole(bytes(bad), cid, 1)
        if pos >= doff:  # a read of the range holding it, with tables from a good copy
            good_tables = fragment.Tables.parse(stored, cid, 1, block, share_len)
            d = pos - doff
            with pytest.raises(CorruptFragment):
                fragment.read_range3(lambda o, n, b=bad: bytes(b[o:o + n]), cid, 1, block,
                                     share_len, d, d + 1, good_tables)
            with pytest.raises(CorruptFragment):  # and a big read that spans it
                fragment.read_range3(lambda o, n, b=bad: bytes(b[o:o + n]), cid, 1, block,
                                     share_len, 0, share_len, None)


def test_layout3_rejects_a_fragment_of_another_share_or_truncated():
    share = bytes(range(256)) * 40
    cid = bytes(32)
    stored = fragment.encode(fragment.FragmentHeader(4, 6, 0, 1024, 40_000, len(share), cid),
                             share)

    def fetch(off: int, n: int) -> bytes:
        return stored[off:off + n]

    with pytest.raises(CorruptFragment):  # asked as share 1: the header names share 0
        fragment.read_range3(fetch, cid, 1, 1024, len(share), 0, 10, None)
    with pytest.raises(CorruptFragment):  # truncated
        fragment.read_range3(lambda o, n: stored[:-5][o:o + n], cid, 0, 1024, len(share),
                             0, len(share), None)


# -- through the store --------------------------------------------------------------------

def test_store_writes_layout3_and_reads_ranges(tmp_path):
    vol = make_volume(tmp_path)
    rng = random.Random(3)
    payload = rng.randbytes(9 * MiB + 12345)
    vol.write("acme", "/big.bin", payload)
    refs = vol.open_file("acme", "/big.bin").refs
    assert all(vol.meta.chunk_get("acme", c.hex()).layout == 3 for c, _n in refs)
    for _ in range(60):
        a = rng.randrange(len(payload))
        n = rng.choice([1, 4096, 70_000, 1 * MiB + 3, 5 * MiB])
        assert vol.read("acme", "/big.bin", a, n) == payload[a:a + n]
    assert b"".join(vol.open_file("acme", "/big.bin").iter()) == payload
    vol.close()


def test_corrupt_tables_are_caught_on_a_cold_read_and_repaired(tmp_path):
    home = tmp_path / "s"
    vol = make_volume(home)
    payload = random.Random(1).randbytes(4 * MiB)
    vol.write("acme", "/x.bin", payload)
    (cid, _n), = vol.open_file("acme", "/x.bin").refs
    path = frag_path(home, vol, cid.hex(), 0)
    raw = bytearray(path.read_bytes())
    raw[fragment.HEADER3_SIZE + 100] ^= 0x40  # inside the block table
    path.write_bytes(bytes(raw))
    vol.close()
    vol = Volume.open(home)  # no cached tables
    assert vol.read("acme", "/x.bin", 2 * MiB, 1000) == payload[2 * MiB:2 * MiB + 1000]
    assert vol.read("acme", "/x.bin") == payload
    s = scrub(vol)
    assert list(s.degraded.values()) == [[0]]
    assert repair(vol).shares_rebuilt == 1
    assert scrub(vol).clean
    assert vol.read("acme", "/x.bin") == payload
    vol.close()


def test_layout2_store_keeps_working_beside_layout3(tmp_path):
    """A store written before layout 3: its chunks stay layout 2 (reads, scrub, repair
    in layout 2), new chunks are layout 3, and both read back."""
    home = tmp_path / "s"
    vol = make_volume(home, chunk=1 * MiB)
    vol.chunks.layout = 2
    rng = random.Random(9)
    old = rng.randbytes(3 * MiB + 100)
    vol.write("acme", "/old.bin", old)
    vol.close()
    vol = Volume.open(home)
    new = rng.randbytes(2 * MiB + 7)
    vol.write("acme", "/new.bin", new)
    layouts = {p: {vol.meta.chunk_get("acme", c.hex()).layout
                   for c, _n in vol.open_file("acme", p).refs}
               for p in ("/old.bin", "/new.bin")}
    assert layouts == {"/old.bin": {2}, "/new.bin": {3}}
    for p, b in (("/old.bin", old), ("/new.bin", new)):
        assert vol.read("acme", p) == b
        assert vol.read("acme", p, 300_000, 5000) == b[300_000:305_000]
    # damage one share of an old chunk: read around it, scrub finds it, repair rebuilds it
    cid = vol.open_file("acme", "/old.bin").refs[1][0].hex()
    path = frag_path(home, vol, cid, 2)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 1
    path.write_bytes(bytes(raw))
    vol.close()
    vol = Volume.open(home)
    assert vol.read("acme", "/old.bin") == old
    s = scrub(vol)
    assert list(s.degraded.values()) == [[2]]
    assert repair(vol).shares_rebuilt == 1
    assert fragment.FragmentHeader.unpack(path.read_bytes()).layout == 2
    assert scrub(vol).clean
    assert vol.read("acme", "/old.bin") == old
    vol.close()


def test_metadata_from_before_the_layout_column_is_migrated(tmp_path):
    """Chunk rows without ``layout`` (stores made before it) open as layout 2."""
    home = tmp_path / "s"
    vol = make_volume(home, chunk=1 * MiB)
    vol.chunks.layout = 2
    data = random.Random(2).randbytes(2 * MiB + 5)
    vol.write("acme", "/a.bin", data)
    urls = list(vol.meta.urls)
    vol.close()
    for url in urls:  # take the schema back to what it was
        db = sqlite3.connect(url.removeprefix("sqlite:///"))
        if "layout" in {r[1] for r in db.execute("PRAGMA table_info(chunks)")}:
            db.execute("ALTER TABLE chunks DROP COLUMN layout")
        db.commit()
        db.close()
    vol = Volume.open(home)
    recs = list(vol.meta.iter_chunks())
    assert recs and {r.layout for r in recs} == {2}
    assert vol.read("acme", "/a.bin") == data
    vol.write("acme", "/b.bin", data[::-1])
    assert vol.read("acme", "/b.bin") == data[::-1]
    assert scrub(vol).clean
    vol.close()


def test_checksum_table_cache_is_bounded_in_bytes():
    """Bigger chunks (warehouse packs, per-write chunk sizes) have bigger tables: the cache
    is capped by their bytes as well as their count, evicting the least recently used."""
    from storage.chunks import _LRU

    lru = _LRU(100, 10_000, len)
    for i in range(8):
        lru.put(i, b"x" * 3000)
    assert lru.weight <= 10_000 and list(lru.d) == [5, 6, 7]
    lru.get(5)
    lru.put(8, b"y" * 3000)  # 6 is now the least recently used
    assert list(lru.d) == [7, 5, 8] and lru.weight == 9000
    lru.put(8, b"z" * 100)  # replacing an entry re-weighs it
    lru.pop(7)
    assert lru.weight == 3100
    lru.put(9, b"w" * 50_000)  # one entry over the cap alone is kept, the rest go
    assert list(lru.d) == [9] and lru.weight == 50_000

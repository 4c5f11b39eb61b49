"""Losing targets and corrupting fragments: every byte still reads back, nothing corrupt
is ever returned, and repair restores full redundancy."""

from __future__ import annotations

import itertools
import os
import random
import shutil
from pathlib import Path

import pytest

from storage import DataLost, StoreConfig, TargetSpec, Volume
from storage.chunks import fragment_key
from storage.maintenance import repair, scrub, status

KiB = 1024


def make_volume(home: Path, targets: int = 6, **kw) -> Volume:
    cfg = StoreConfig.embedded(home, chunk_size=64 * KiB, inline_threshold=1 * KiB,
                               checksum_block=4 * KiB, durability="none", **kw)
    cfg.targets = [TargetSpec(f"t{i}", (home / "targets" / f"t{i}").as_uri())
                   for i in range(targets)]
    vol = Volume.init(home, cfg)
    vol.create_tenant("acme")
    return vol


def reopen(vol: Volume) -> Volume:
    home = vol.home
    vol.close()
    return Volume.open(home)


@pytest.fixture
def data() -> dict[str, bytes]:
    rng = random.Random(7)
    return {
        f"/d{i % 3}/f{i}.bin": rng.randbytes(rng.choice([3 * KiB, 64 * KiB, 200 * KiB + 17]))
        for i in range(12)
    }


def write_all(vol: Volume, data: dict[str, bytes]) -> None:
    for p, b in data.items():
        vol.write("acme", p, b)


def check_all(vol: Volume, data: dict[str, bytes]) -> None:
    for p, b in data.items():
        assert vol.read("acme", p) == b, p
        # ranged reads too: a small one inside a share and one spanning shares
        assert vol.read("acme", p, 5000, 4096) == b[5000:9096]
        assert vol.read("acme", p, 1000, 50_000) == b[1000:51_000]


@pytest.mark.parametrize("lost", list(itertools.combinations(range(6), 2)))
def test_any_two_targets_lost_reads_identical(tmp_path, data, lost):
    vol = make_volume(tmp_path)
    write_all(vol, data)
    for i in lost:
        shutil.rmtree(tmp_path / "targets" / f"t{i}")
    vol = reopen(vol)
    check_all(vol, data)
    st = status(vol)
    assert st["degraded_chunks"] > 0
    assert sum(not t["healthy"] for t in st["targets"]) == 2
    rep = repair(vol)
    assert rep.lost == 0 and rep.still_degraded == 0
    assert sorted(rep.targets_recreated) == [f"t{i}" for i in lost]
    s = scrub(vol)
    assert s.clean and s.healthy_chunks == s.chunks, s.problems
    assert status(vol)["degraded_chunks"] == 0
    vol.close()


def test_three_targets_lost_is_a_clear_error(tmp_path, data):
    vol = make_volume(tmp_path)
    write_all(vol, data)
    for i in (0, 2, 4):
        shutil.rmtree(tmp_path / "targets" / f"t{i}")
    vol = reopen(vol)
    big = next(p for p, b in data.items() if len(b) > 64 * KiB)
    with pytest.raises(DataLost, match="repair"):
        vol.read("acme", big)
    vol.close()


def test_unreadable_targets_repair_onto_spares(tmp_path, data):
    """Two folders become unreadable (replaced by files); with spare targets, repair
    rebuilds their shares elsewhere and redundancy is full again."""
    vol = make_volume(tmp_path, targets=8)
    write_all(vol, data)
    for i in (1, 5):
        d = tmp_path / "targets" / f"t{i}"
        shutil.rmtree(d)
        d.write_text("not a folder any more")
    vol = reopen(vol)
    check_all(vol, data)
    rep = repair(vol)
    assert rep.lost == 0 and rep.still_degraded == 0, rep.problems
    s = scrub(vol)
    assert s.lost == [] and s.dangling == []
    # nothing references the broken targets any more
    for rec in vol.meta.iter_chunks():
        assert "t1" not in rec.placement and "t5" not in rec.placement
    check_all(vol, data)
    vol.close()


def _fragment_files(home: Path) -> list[Path]:
    return [p for p in (home / "targets").rglob("*.[0-9]") if p.is_file()]


def test_flipped_bit_in_any_fragment_is_detected_and_repaired(tmp_path, data):
    vol = make_volume(tmp_path)
    write_all(vol, data)
    rng = random.Random(11)
    frags = _fragment_files(tmp_path)
    assert len(frags) > 30
    victims = rng.sample(frags, 25)
    for f in victims:
        raw = bytearray(f.read_bytes())
        pos = rng.randrange(len(raw))  # header, data or checksum: all must be caught
        raw[pos] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(raw))
    vol = reopen(vol)
    s = scrub(vol)
    assert not s.clean
    assert sum(len(v) for v in s.degraded.values()) + len(s.lost) * 3 >= 1
    # Reads never return corrupt bytes: either correct data (decoded around the bad
    # share) or, if a chunk lost more than m-k shares, a DataLost error.
    lost_chunks = {c for _t, c in s.lost}
    for p, b in data.items():
        try:
            assert vol.read("acme", p) == b
        except DataLost:
            refs = vol.open_file("acme", p).refs
            assert any(c.hex() in lost_chunks for c, _ in refs)
    if not lost_chunks:
        rep = repair(vol)
        assert rep.lost == 0
        assert scrub(vol).clean
        check_all(vol, data)
    vol.close()


def test_single_bit_flip_each_share_position(tmp_path):
    """A bit flipped in each share of one chunk in turn: detected, repaired."""
    vol = make_volume(tmp_path)
    payload = os.urandom(60 * KiB)
    vol.write("acme", "/x.bin", payload)
    (cid, _n), = vol.open_file("acme", "/x.bin").refs
    rec = vol.meta.chunk_get("acme", cid.hex())
    for i in range(rec.m):
        path = tmp_path / "targets" / rec.placement[i] / fragment_key("acme", rec.cid, i)
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        path.write_bytes(bytes(raw))
        vol.chunks._records.pop(("acme", rec.cid))
        assert vol.read("acme", "/x.bin") == payload
        s = scrub(vol)
        assert list(s.degraded.values()) == [[i]]
        assert repair(vol).shares_rebuilt == 1
        assert scrub(vol).clean
    vol.close()


def test_stale_fragment_from_other_chunk_is_rejected(tmp_path):
    """A fragment copied over another (same size, valid format) fails its checksums."""
    vol = make_volume(tmp_path)
    a, b = os.urandom(40 * KiB), os.urandom(40 * KiB)
    vol.write("acme", "/a", a)
    vol.write("acme", "/b", b)
    ra = vol.meta.chunk_get("acme", vol.open_file("acme", "/a").refs[0][0].hex())
    rb = vol.meta.chunk_get("acme", vol.open_file("acme", "/b").refs[0][0].hex())
    pa = tmp_path / "targets" / ra.placement[0] / fragment_key("acme", ra.cid, 0)
    pb = tmp_path / "targets" / rb.placement[0] / fragment_key("acme", rb.cid, 0)
    pa.write_bytes(pb.read_bytes())
    vol = reopen(vol)
    assert vol.read("acme", "/a") == a
    assert vol.read("acme", "/a", 100, 10) == a[100:110]
    assert not scrub(vol).clean
    vol.close()


def test_a_removed_target_folder_is_marked_down_and_read_around_in_one_round(tmp_path, data):
    """A missing folder (an unmounted disk) is a down target, not a lost fragment: readers
    skip it for a while, and fetch parity alongside the healthy data shares."""
    vol = make_volume(tmp_path / "home")
    write_all(vol, data)
    vol = reopen(vol)
    os.rename(tmp_path / "home" / "targets" / "t0", tmp_path / "home" / "targets" / "t0.gone")
    os.rename(tmp_path / "home" / "targets" / "t3", tmp_path / "home" / "targets" / "t3.gone")
    check_all(vol, data)
    assert vol.chunks.is_down("t0") and vol.chunks.is_down("t3")
    assert not vol.chunks.is_down("t1")
    check_all(vol, data)  # again, with both known down from the start
    vol.close()

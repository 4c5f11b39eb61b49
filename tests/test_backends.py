"""A volume whose six fragment targets are all S3 prefixes on one moto server (over real
HTTP): round trips, losing two targets' objects, repair back to full redundancy."""

from __future__ import annotations

import random
import uuid

import pytest
from s3_server import KEY_ID, REGION, SECRET, moto_s3, target_url  # noqa: F401 - fixture

from storage import DataLost, StoreConfig, TargetSpec, Volume
from storage.maintenance import repair, scrub, status

pytestmark = pytest.mark.s3

CHUNK = 64 * 1024
T = "acme"


def blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
def moto(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(endpoint, bucket) of the module's moto server."""
    return request.getfixturevalue("moto_s3")


@pytest.fixture
def s3(moto: tuple[str, str]):
    import boto3

    endpoint, _bucket = moto
    client = boto3.client("s3", endpoint_url=endpoint, region_name=REGION,
                          aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET)
    yield client
    client.close()


@pytest.fixture
def store(moto: tuple[str, str], tmp_path):
    """(volume, {target id: key prefix in the bucket}) with six S3 targets."""
    endpoint, bucket = moto
    run = uuid.uuid4().hex[:10]
    prefixes = {f"s{i}": f"{run}/p{i}" for i in range(6)}
    cfg = StoreConfig.embedded(tmp_path, chunk_size=CHUNK, inline_threshold=1024,
                               durability="none")
    cfg.targets = [TargetSpec(tid, target_url(endpoint, bucket, p)) for tid, p in prefixes.items()]
    vol = Volume.init(tmp_path, cfg)
    vol.create_tenant(T)
    yield vol, prefixes
    vol.close()


def objects(s3, bucket: str, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def wipe(s3, bucket: str, prefix: str) -> int:
    keys = objects(s3, bucket, prefix)
    for i in range(0, len(keys), 1000):
        s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True})
    assert objects(s3, bucket, prefix) == []
    return len(keys)


RANGES = [(0, 10), (CHUNK - 5, 10), (CHUNK // 4 - 3, 6), (3 * CHUNK + 1, CHUNK), (100, None)]


def check_reads(vol: Volume, files: dict[str, bytes]) -> None:
    for path, data in files.items():
        assert vol.read(T, path) == data, path
        r = vol.open_file(T, path)
        assert b"".join(r.iter()) == data
        for off, ln in RANGES:
            want = data[off:] if ln is None else data[off : off + ln]
            assert r.read(off, ln) == want, (path, off, ln)


def test_round_trip_on_s3_targets(store, s3, moto) -> None:
    vol, prefixes = store
    _endpoint, bucket = moto
    files = {"/big.bin": blob(5 * CHUNK + 777, 1), "/dir/small": b"inline", "/dir/two": blob(
        CHUNK + 1, 2)}
    for p, d in files.items():
        vol.write(T, p, d)
    check_reads(vol, files)
    st = status(vol)
    assert all(t["healthy"] for t in st["targets"]), st["targets"]
    assert "secret_access_key=***" in st["targets"][0]["url"]
    assert st["chunks"] == 8 and st["degraded_chunks"] == 0
    # one share of every chunk on each of the six targets, plus the target's marker
    for prefix in prefixes.values():
        keys = objects(s3, bucket, prefix)
        assert len(keys) == 8 + 1, (prefix, keys)
        assert f"{prefix}/.lodestore-target" in keys
    assert scrub(vol).clean


def test_survives_two_lost_targets_and_repair_restores_redundancy(store, s3, moto) -> None:
    vol, prefixes = store
    _endpoint, bucket = moto
    files = {"/big.bin": blob(5 * CHUNK + 777, 3), "/b/c": blob(2 * CHUNK, 4)}
    for p, d in files.items():
        vol.write(T, p, d)
    n_chunks = status(vol)["chunks"]
    assert n_chunks == 8

    lost = ["s0", "s3"]  # s0 holds data shares of some chunks, so reads must decode
    for tid in lost:
        assert wipe(s3, bucket, prefixes[tid]) == n_chunks + 1
    health = {t["id"]: t["healthy"] for t in status(vol)["targets"]}
    assert [tid for tid, ok in health.items() if not ok] == lost

    check_reads(vol, files)  # identical reads from the four survivors

    rep = scrub(vol)
    assert not rep.clean and not rep.lost and len(rep.degraded) == n_chunks
    assert all(len(bad) == 2 for bad in rep.degraded.values())

    fixed = repair(vol)
    assert fixed.lost == 0 and fixed.still_degraded == 0, fixed.problems
    assert sorted(fixed.targets_recreated) == lost
    assert fixed.chunks_repaired == n_chunks and fixed.shares_rebuilt == 2 * n_chunks

    after = scrub(vol)
    assert after.clean, after.problems
    assert after.healthy_chunks == n_chunks
    st = status(vol)
    assert st["degraded_chunks"] == 0 and all(t["healthy"] for t in st["targets"])
    for prefix in prefixes.values():
        assert len(objects(s3, bucket, prefix)) == n_chunks + 1
    check_reads(vol, files)

    # full redundancy again: any two other targets may go now
    for tid in ("s1", "s5"):
        wipe(s3, bucket, prefixes[tid])
    check_reads(vol, files)


def test_three_lost_targets_is_reported_as_data_loss(store, s3, moto) -> None:
    vol, prefixes = store
    _endpoint, bucket = moto
    data = blob(2 * CHUNK + 5, 5)
    vol.write(T, "/f", data)
    vol.write(T, "/small", b"inline survives")
    for tid in ("s1", "s2", "s4"):
        wipe(s3, bucket, prefixes[tid])
    with pytest.raises(DataLost, match="run `lodestore repair`"):
        vol.read(T, "/f")
    assert vol.read(T, "/small") == b"inline survives"
    rep = scrub(vol)
    assert len(rep.lost) == 3 and not rep.clean
    fixed = repair(vol)
    assert fixed.lost == 3

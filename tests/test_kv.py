"""The KV tier (issue #5): the same behaviour on the embedded SQLite backend and on Redis.

Every test runs on both backends: real SQLite in a temporary folder, real Redis on
127.0.0.1:6379 under a key prefix of its own (deleted afterwards).
"""

from __future__ import annotations

import threading
import time

import pytest

from storage import StoreConfig, Volume
from storage.errors import ConfigError, InvalidArgument, InvalidPath
from storage.kv import MAX_VALUE_BYTES, open_kv


@pytest.fixture(params=["sqlite", "redis"])
def kv(request, tmp_path):
    if request.param == "sqlite":
        store = open_kv(f"sqlite:///{tmp_path / 'kv.db'}")
    else:
        store = open_kv(request.getfixturevalue("redis_kv_url"))
    yield store
    for ns in ("acme", "beta"):
        store.drop_namespace(ns)
    store.close()


def test_put_get_delete(kv):
    assert kv.get("acme", "a") is None
    kv.put("acme", "a", b"1")
    assert kv.get("acme", "a") == b"1"
    kv.put("acme", "a", b"2")
    assert kv.get("acme", "a") == b"2"
    assert kv.delete("acme", "a") is True
    assert kv.delete("acme", "a") is False
    assert kv.get("acme", "a") is None


def test_namespaces_are_isolated(kv):
    kv.put("acme", "k", b"acme")
    kv.put("beta", "k", b"beta")
    assert kv.get("acme", "k") == b"acme" and kv.get("beta", "k") == b"beta"
    assert [k for k, _ in kv.scan("acme")] == ["k"]
    kv.drop_namespace("beta")
    assert kv.get("beta", "k") is None and kv.get("acme", "k") == b"acme"


def test_scan_is_ordered_prefix_bounded_and_paged(kv):
    keys = [f"s/{i:03d}" for i in range(40)] + ["s", "t/1", "r/9", "s0"]
    kv.put_many("acme", [(k, k.encode()) for k in keys])
    got = [k for k, _ in kv.scan("acme", "s/")]
    assert got == [f"s/{i:03d}" for i in range(40)]
    page = kv.scan("acme", "s/", limit=7)
    assert [k for k, _ in page] == got[:7]
    rest = kv.scan("acme", "s/", start_after=page[-1][0])
    assert [k for k, _ in rest] == got[7:]
    assert [k for k, _ in kv.scan("acme")] == sorted(keys)
    # unicode keys sort by code point on both backends
    kv.put_many("acme", [("u/é", b"1"), ("u/z", b"2"), ("u/ä", b"3")])
    assert [k for k, _ in kv.scan("acme", "u/")] == ["u/z", "u/ä", "u/é"]


def test_ttl_expires(kv):
    kv.put("acme", "short", b"x", ttl=0.2)
    kv.put("acme", "long", b"y", ttl=60)
    kv.put_many("acme", [("m1", b"1"), ("m2", b"2")], ttl=0.2)
    assert kv.get("acme", "short") == b"x"
    time.sleep(0.35)
    assert kv.get("acme", "short") is None
    assert kv.get_many("acme", ["short", "long", "m1"]) == [None, b"y", None]
    assert [k for k, _ in kv.scan("acme")] == ["long"]
    assert kv.cas("acme", "short", None, b"new")  # expired counts as absent
    kv.purge()


def test_cas(kv):
    assert kv.cas("acme", "c", None, b"1") is True
    assert kv.cas("acme", "c", None, b"2") is False  # exists
    assert kv.cas("acme", "c", b"9", b"2") is False  # wrong expectation
    assert kv.get("acme", "c") == b"1"
    assert kv.cas("acme", "c", b"1", b"2") is True
    assert kv.cas("acme", "c", b"2", None) is True  # delete
    assert kv.get("acme", "c") is None
    assert [k for k, _ in kv.scan("acme")] == []


def test_cas_is_atomic_under_contention(kv):
    kv.put("acme", "n", b"0")
    wins = []

    def worker():
        for _ in range(25):
            while True:
                cur = kv.get("acme", "n")
                if kv.cas("acme", "n", cur, str(int(cur) + 1).encode()):
                    wins.append(1)
                    break

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kv.get("acme", "n") == b"100" and len(wins) == 100


def test_incr_concurrent(kv):
    def worker():
        for _ in range(50):
            kv.incr("acme", "ctr")

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert kv.incr("acme", "ctr", 0) == 200


@pytest.mark.parametrize("key", ["", "a\x00b", "x" * 1025, 5, None])
def test_bad_keys_refused(kv, key):
    with pytest.raises(InvalidArgument):
        kv.put("acme", key, b"v")


def test_bad_values_and_ttls_refused(kv):
    with pytest.raises(InvalidArgument, match="bytes"):
        kv.put("acme", "k", "text")
    with pytest.raises(InvalidArgument, match="limit"):
        kv.put("acme", "k", b"x" * (MAX_VALUE_BYTES + 1))
    for ttl in (0, -1, "10", True):
        with pytest.raises(InvalidArgument, match="ttl"):
            kv.put("acme", "k", b"v", ttl=ttl)
    assert kv.get("acme", "k") is None


@pytest.mark.parametrize("ns", ["", "Acme", "a:b", "../x", "a" * 64])
def test_bad_namespaces_refused(kv, ns):
    with pytest.raises(InvalidPath):
        kv.put(ns, "k", b"v")


def test_url_selects_backend(tmp_path):
    with pytest.raises(ConfigError, match="not supported"):
        open_kv("mysql://nowhere/kv")
    home = tmp_path / "home"
    vol = Volume.init(home, StoreConfig.embedded(home, durability="none"))
    try:
        assert vol.kv.url.endswith("kv.db")
        vol.kv.put("acme", "k", b"v")
    finally:
        vol.close()
    vol = Volume.open(home)
    try:
        assert vol.kv.get("acme", "k") == b"v"  # durable across reopen
    finally:
        vol.close()


def test_store_config_can_point_kv_at_redis(tmp_path, redis_kv_url):
    home = tmp_path / "home"
    vol = Volume.init(home, StoreConfig.embedded(home, durability="none", kv=redis_kv_url))
    try:
        assert type(vol.kv).__name__ == "RedisKV"
        vol.kv.put("acme", "k", b"v")
        assert vol.kv.get("acme", "k") == b"v"
        vol.kv.drop_namespace("acme")
    finally:
        vol.close()
    assert "kv: 'redis://" in (home / "lodestore.yaml").read_text()


def test_count_range(kv):
    kv.put_many("acme", [(f"t/{i:04d}", b"x") for i in range(50)] + [("u/1", b"y")])
    kv.put("acme", "t/0100", b"short", ttl=0.2)
    assert kv.count_range("acme", "t/0000", "t/9999") == 51
    assert kv.count_range("acme", "t/0010", "t/0019") == 10
    assert kv.count_range("beta", "t/0000", "t/9999") == 0
    time.sleep(0.3)
    kv.scan("acme", "t/")  # a scan drops expired keys (Redis keeps index entries until then)
    assert kv.count_range("acme", "t/0000", "t/9999") == 50


def test_delete_many(kv):
    kv.put_many("acme", [(f"d/{i}", b"x") for i in range(10)])
    kv.put("beta", "d/1", b"other tenant")
    assert kv.delete_many("acme", ["d/1", "d/2", "d/nope"]) == 2
    assert [k for k, _ in kv.scan("acme", "d/")] == [f"d/{i}" for i in (0, 3, 4, 5, 6, 7, 8, 9)]
    assert kv.get("beta", "d/1") == b"other tenant"
    assert kv.delete_many("acme", []) == 0

"""The target contract, held against the object-store target (moto over HTTP, memory) and
the local-folder target alike; plus failure modes only an object store has."""

from __future__ import annotations

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import obstore
import pytest
from s3_server import moto_s3, s3_target_url, target_url  # noqa: F401 - fixtures

from storage.errors import ConfigError, NotFound, TargetUnavailable
from storage.targets import LocalDirTarget, Target, open_target
from storage.targets.objectstore import ObjectStoreTarget


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.s3), "memory", "local"])
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_target_url")
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    return (tmp_path / "target").as_uri()


@pytest.fixture
def target(url: str):
    t = open_target("t1", url)
    t.ensure()
    yield t
    t.close()


def test_open_target_picks_class(url: str) -> None:
    t = open_target("t1", url)
    expected = LocalDirTarget if url.startswith("file:") else ObjectStoreTarget
    assert isinstance(t, expected)


def test_put_get_range(target: Target) -> None:
    target.put("ab/cd/frag1", [b"hello ", memoryview(b"world"), bytearray(b"!")])
    assert target.get("ab/cd/frag1") == b"hello world!"
    assert target.exists("ab/cd/frag1")
    assert target.get_range("ab/cd/frag1", 6, 5) == b"world"
    assert target.get_range("ab/cd/frag1", 10, 100) == b"d!"  # short at the end
    assert target.get_range("ab/cd/frag1", 12, 4) == b""  # at the end
    assert target.get_range("ab/cd/frag1", 50, 4) == b""  # past the end
    assert target.get_range("ab/cd/frag1", 3, 0) == b""


def test_missing_key(target: Target) -> None:
    with pytest.raises(NotFound):
        target.get("no/such")
    with pytest.raises(NotFound):
        target.get_range("no/such", 0, 10)
    assert not target.exists("no/such")


def test_reput_same_key_is_accepted(target: Target) -> None:
    target.put("k", [b"same bytes"])
    target.put("k", [b"same bytes"])
    assert target.get("k") == b"same bytes"


def test_delete_is_idempotent(target: Target) -> None:
    target.put("d/x", [b"1"])
    target.delete("d/x")
    target.delete("d/x")
    target.delete("never/was")
    assert not target.exists("d/x")
    with pytest.raises(NotFound):
        target.get("d/x")


def test_list_prefixes(target: Target) -> None:
    keys = {"aa/f1": b"1", "aa/f22": b"22", "ab/f3": b"333", "b/f4": b"4444"}
    for k, v in keys.items():
        target.put(k, [v])
    before = time.time()
    infos = {i.key: i for i in target.list()}
    assert set(infos) == set(keys)  # marker excluded
    assert all(infos[k].size == len(v) for k, v in keys.items())
    assert all(abs(i.mtime - before) < 120 for i in infos.values())
    assert {i.key for i in target.list("a")} == {"aa/f1", "aa/f22", "ab/f3"}
    assert {i.key for i in target.list("aa/")} == {"aa/f1", "aa/f22"}
    assert {i.key for i in target.list("aa/f2")} == {"aa/f22"}
    assert list(target.list("zz")) == []


def test_bad_keys(target: Target) -> None:
    for key in ("/abs", "a/../b"):
        with pytest.raises(ValueError):
            target.put(key, [b"x"])


def test_health_and_marker(url: str) -> None:
    t = open_target("t1", url)
    assert not t.health().healthy  # before ensure
    t.ensure()
    assert t.health().healthy
    t.ensure()  # idempotent
    assert t.health().healthy
    other = open_target("t2", url)
    h = other.health()
    assert not h.healthy and "t1" in h.detail  # marker names another target


def test_concurrent_puts_and_gets(target: Target) -> None:
    payloads = {f"c/{i:03d}": bytes([i % 251]) * (1000 + i) for i in range(64)}

    def work(i: int) -> None:
        k = f"c/{i % 64:03d}"  # every key written by two threads at once
        target.put(k, [payloads[k]])
        assert target.get(k) == payloads[k]
        assert target.get_range(k, 10, 20) == payloads[k][10:30]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(128)))
    assert {i.key for i in target.list("c/")} == set(payloads)


# -- object-store specific ----------------------------------------------------------------


def test_unreachable_endpoint_fails_fast() -> None:
    url = target_url(f"http://127.0.0.1:{_closed_port()}", "bucket", "p")
    t = ObjectStoreTarget("t9", url)
    t0 = time.monotonic()
    h = t.health()
    assert not h.healthy and "t9" in h.detail and "127.0.0.1" in h.detail
    for call in (lambda: t.put("k", [b"x"]), lambda: t.get("k"), t.ensure):
        with pytest.raises(TargetUnavailable) as info:
            call()
        assert "t9" in str(info.value) and "127.0.0.1" in str(info.value)
    assert time.monotonic() - t0 < 10


@pytest.mark.s3
def test_missing_bucket(moto_s3: tuple[str, str]) -> None:  # noqa: F811 - fixture
    endpoint, _ = moto_s3
    t = ObjectStoreTarget("t8", target_url(endpoint, "no-such-bucket", "p"))
    with pytest.raises(TargetUnavailable, match="does not exist"):
        t.ensure()
    with pytest.raises(TargetUnavailable, match="does not exist"):
        t.get("k")
    assert not t.health().healthy


def test_secrets_not_in_messages() -> None:
    url = target_url(f"http://127.0.0.1:{_closed_port()}", "bucket", "p")
    url = url.replace("secret_access_key=testing", "secret_access_key=TOPSECRET")
    t = ObjectStoreTarget("t7", url)
    with pytest.raises(TargetUnavailable) as info:
        t.get("k")
    assert "TOPSECRET" not in str(info.value)
    assert "TOPSECRET" not in t.health().detail


def test_bad_url() -> None:
    with pytest.raises(ConfigError):
        ObjectStoreTarget("t", "s3:///prefix-without-bucket")
    with pytest.raises(ConfigError):
        ObjectStoreTarget("t", "s3://b/p?max_retries=lots")
    with pytest.raises(ConfigError, match="bogus") as info:
        ObjectStoreTarget("t", "s3://b/p?bogus=1&secret_access_key=TOPSECRET")
    assert "TOPSECRET" not in str(info.value)


def test_memory_stores_shared_by_name() -> None:
    name = f"memory://{uuid.uuid4().hex}"
    a, b = ObjectStoreTarget("m", name), ObjectStoreTarget("m", name)
    a.ensure()
    a.put("k", [b"v"])
    assert b.get("k") == b"v" and b.health().healthy


def test_stalled_server_times_out() -> None:
    """A server that accepts connections but never answers is caught by the read timeout."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        endpoint = f"http://127.0.0.1:{srv.getsockname()[1]}"
        t = ObjectStoreTarget("t6", target_url(endpoint, "bucket", "p") + "&read_timeout=1s")
        t0 = time.monotonic()
        assert not t.health().healthy
        assert time.monotonic() - t0 < 5
        t0 = time.monotonic()
        with pytest.raises(TargetUnavailable, match="t6"):
            t.put("k", [b"x"])
        assert time.monotonic() - t0 < 5


def test_falls_back_without_conditional_put(monkeypatch: pytest.MonkeyPatch) -> None:
    t = ObjectStoreTarget("m", f"memory://{uuid.uuid4().hex}")
    real_put = obstore.put
    modes: list[object] = []

    def put(store, key, data, *, mode=None, **kw):  # a store without If-None-Match
        modes.append(mode)
        if mode == "create":
            raise obstore.exceptions.NotSupportedError("conditional put not supported")
        return real_put(store, key, data, **kw)

    monkeypatch.setattr(obstore, "put", put)
    t.put("k", [b"v1"])
    t.put("k", [b"v1"])
    t.ensure()
    assert t.get("k") == b"v1" and t.health().healthy
    assert modes == ["create", None, None, None]  # probed once, then plain puts

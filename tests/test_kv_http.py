"""The token warehouse over HTTP with real components: ``lodestore serve --transport http
--port 0`` in a subprocess (uvicorn on 127.0.0.1), real agent tokens, the Python client
(``server/kv_client.py``) and raw HTTP for the auth and error rules, and the LMCache
connector (``server/lmcache_connector.py``) against LMCache's RemoteConnector contract
(and against real LMCache where it is installed)."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mcp_support as ms  # noqa: E402

from server.kv_client import FRAME_TYPE, KVClient, KVError, pack_frame  # noqa: E402
from server.lmcache_connector import BytesMemoryObj, LodestoreConnector  # noqa: E402
from storage.warehouse import block_hashes  # noqa: E402

pytestmark = pytest.mark.timeout(180)

MODEL = "HuggingFaceTB/SmolLM2-135M"
BS = 16
BLOCK = 30 * 2 * 3 * 64 * 2 * BS  # SmolLM2-135M: layers x (K,V) x kv heads x head dim x bf16
POLICY = """
paths:
  - prefix: /
    read: [agent, reader, admin]
    write: [agent, admin]
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    home = tmp_path_factory.mktemp("kv-http") / "home"
    tokens = ms.make_agents(home, [
        ("acme", "bob", "agent"), ("acme", "ro", "reader"), ("acme", "visitor", "guest"),
        ("acme", "gone", "agent"), ("globex", "alice", "agent")])
    from server.wiring import open_app

    app = open_app(home)
    try:
        app.principals.set_policy("acme", POLICY)
        app.principals.revoke("acme", "gone")
    finally:
        app.close()
    with ms.HttpServer(home, demo=False) as srv:
        yield {"base": srv.base, "tokens": tokens}


def blocks_for(n: int, seed: int = 0) -> list[bytes]:
    return [hashlib.shake_256(f"{seed}:{i}".encode()).digest(BLOCK) for i in range(n)]


def tokens(n: int, base: int = 1) -> list[int]:
    return [(base + i * 31) % 49_152 for i in range(n)]


def test_auth_rules(server: dict[str, Any]) -> None:
    base, tok = server["base"], server["tokens"]
    url = base + "/v1/kv/models"
    for token in (None, "lds_" + "y" * 43, "not-a-token", tok["acme/gone"]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        r = httpx.get(url, headers=headers, timeout=10)
        assert r.status_code == 401, (token, r.text)
        www = r.headers["www-authenticate"]
        assert www.startswith("Bearer ") and 'error="invalid_token"' in www
        assert r.json()["error"] == "invalid_token"
    r = httpx.get(url, headers={"Authorization": f"Basic {tok['acme/bob']}"}, timeout=10)
    assert r.status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {tok['acme/bob']}"},
                     timeout=10).status_code == 200
    # a role without access to /.lodestore/kv: 403 with a JSON reason
    r = httpx.get(url, headers={"Authorization": f"Bearer {tok['acme/visitor']}"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    # foreign Origin refused like the MCP routes
    r = httpx.get(url, headers={"Authorization": f"Bearer {tok['acme/bob']}",
                                "Origin": "https://evil.example"}, timeout=10)
    assert r.status_code == 403


def test_client_round_trip(server: dict[str, Any]) -> None:
    base, tok = server["base"], server["tokens"]
    toks = tokens(4 * BS + 5)
    data = blocks_for(4)
    with KVClient(base, tok["acme/bob"]) as kv, KVClient(base, tok["acme/ro"]) as ro:
        info = kv.register_model(MODEL, BS, dtype="bfloat16")
        assert info["block_size"] == BS and info["model"] == MODEL
        assert kv.model_info(MODEL)["dtype"] == "bfloat16"
        hs = kv.put_blocks(MODEL, toks, data[:2])
        assert hs == block_hashes(toks, BS)[:2]
        assert kv.put_blocks(MODEL, toks, data[2:], start_block=2,
                             hashes=block_hashes(toks, BS)[2:4]) == block_hashes(toks, BS)[2:]
        hs = block_hashes(toks, BS)
        assert kv.block_hashes(MODEL, toks) == hs
        assert ro.lookup(MODEL, toks) == 4 * BS
        doc = ro.lookup_ex(MODEL, toks[:3 * BS] + [7] * BS)
        assert doc["tokens"] == 3 * BS and doc["hashes"] == [h.hex() for h in hs[:3]]
        assert ro.get_blocks(MODEL, hs) == data
        missing = b"\x00" * 32
        assert ro.get_blocks(MODEL, [hs[1], missing]) == [data[1], None]
        assert ro.get_block(MODEL, hs[2]) == data[2] and ro.get_block(MODEL, missing) is None
        assert ro.exists(MODEL, hs[0]) and not ro.exists(MODEL, missing)
        items, cursor = ro.list(MODEL, limit=3)
        more, end = ro.list(MODEL, cursor=cursor)
        assert end is None and sorted(b["hash"] for b in items + more) == sorted(
            h.hex() for h in hs)
        assert [m["model"] for m in ro.list_models()] == [MODEL]
        # the reader may not write or delete
        with pytest.raises(KVError) as e:
            ro.put_blocks(MODEL, toks, data[:1])
        assert e.value.status == 403
        with pytest.raises(KVError) as e:
            ro.delete(MODEL, hs[:1])
        assert e.value.status == 403
        assert kv.delete(MODEL, [hs[3]]) == 1
        assert ro.lookup(MODEL, toks) == 3 * BS


def test_bad_input_over_http(server: dict[str, Any]) -> None:
    base, tok = server["base"], server["tokens"]
    model = "bad/input-model"
    toks = tokens(2 * BS, base=77)
    data = blocks_for(2, seed=4)
    hs = block_hashes(toks, BS)
    with KVClient(base, tok["acme/bob"]) as kv:
        for call, status, code in [
            (lambda: kv.lookup(model, toks), 404, "unknown_model"),
            (lambda: kv.get_blocks(model, hs), 404, "unknown_model"),
            (lambda: kv.put_blocks(model, toks, data), 404, "unknown_model"),
        ]:
            with pytest.raises(KVError) as e:
                call()
            assert (e.value.status, e.value.code) == (status, code), e.value
            assert "put blocks for it first" in e.value.message
        kv.register_model(model, BS, block_bytes=BLOCK)
        bad = [
            (dict(blocks=[data[0], data[1][:-10]]), 400, "kv_bad_block", "truncated"),
            (dict(hashes=[hs[1], hs[0]]), 400, "kv_hash_mismatch", "nothing was stored"),
            (dict(block_size=8), 409, "kv_model_mismatch", "not 8"),
            (dict(token_ids=toks[:BS]), 400, "kv_bad_block", "full blocks"),
            (dict(token_ids=["a"] * 2 * BS), 400, "invalid_argument", "token_ids[0]"),
        ]
        for over, status, code, text in bad:
            args: dict[str, Any] = dict(model=model, token_ids=toks, blocks=data)
            args.update(over)
            with pytest.raises(KVError) as e:
                kv.put_blocks(**args)
            assert (e.value.status, e.value.code) == (status, code), e.value
            assert text in e.value.message
        assert kv.lookup(model, toks) == 0 and kv.list(model) == ([], None)
        # malformed frames and bodies
        url = base + "/v1/kv/blocks"
        h = {"Authorization": f"Bearer {tok['acme/bob']}", "Content-Type": FRAME_TYPE}
        frame = b"".join(pack_frame({"model": model, "token_ids": toks}, data))
        for body, text in [(frame[:-100], "truncated KV frame"), (b"junk", "not a KV frame"),
                           (b"LKV1" + struct.pack(">I", 3) + b"[1]", "JSON object")]:
            r = httpx.post(url, content=body, headers=h, timeout=30)
            assert r.status_code == 400 and text in r.json()["error_description"], r.text
        r = httpx.post(url, json={"model": model}, headers={"Authorization": h["Authorization"]},
                       timeout=10)
        assert r.status_code == 415
        r = httpx.post(base + "/v1/kv/lookup", content=b"{nope",
                       headers={"Authorization": h["Authorization"]}, timeout=10)
        assert r.status_code == 400 and r.json()["error"] == "bad_json"
        assert kv.lookup(model, toks) == 0 and kv.list(model) == ([], None)


def test_tenant_isolation_over_http(server: dict[str, Any]) -> None:
    base, tok = server["base"], server["tokens"]
    model = "iso/model"
    toks = tokens(2 * BS, base=5)
    with KVClient(base, tok["acme/bob"]) as acme, KVClient(base, tok["globex/alice"]) as glob:
        hs = acme.put_blocks(model, toks, blocks_for(2, seed=8), BS)
        acme.put_object(model, "acme-key", b"secret")
        assert model not in [m["model"] for m in glob.list_models()]
        with pytest.raises(KVError) as e:
            glob.lookup(model, toks)
        assert e.value.status == 404
        with pytest.raises(KVError):
            glob.get_blocks(model, hs)
        assert glob.list_objects() == [] and not glob.has_object(model, "acme-key")
        glob.register_model(model, BS)
        assert glob.lookup(model, toks) == 0
        assert glob.get_blocks(model, hs) == [None, None]
        assert acme.lookup(model, toks) == 2 * BS


# -- LMCache's RemoteConnector contract -------------------------------------------------


class FakeKey:
    """The parts of LMCache's CacheEngineKey a remote connector uses."""

    def __init__(self, model_name: str, chunk_hash: int) -> None:
        self.model_name, self.chunk_hash = model_name, chunk_hash

    def to_string(self) -> str:
        return f"{self.model_name}@1@0@{self.chunk_hash:x}@bfloat16"


def test_lmcache_connector_contract(server: dict[str, Any]) -> None:
    base, tok = server["base"], server["tokens"]

    async def run() -> None:
        conn = LodestoreConnector(base, token=tok["acme/bob"])
        other = LodestoreConnector(base, token=tok["globex/alice"])
        key = FakeKey("lmcache/SmolLM2", 0xABCDEF)
        obj = BytesMemoryObj(blocks_for(1, seed=21)[0], [(2, 30, BS, 192)], ["bfloat16"], 1)
        assert not await conn.exists(key)
        assert await conn.get(key) is None
        await conn.put(key, obj)
        assert await conn.exists(key) and conn.exists_sync(key)
        got = await conn.get(key)
        assert bytes(got.byte_array) == obj.data
        assert [tuple(s) for s in got.get_shapes()] == [(2, 30, BS, 192)]
        assert [str(d).removeprefix("torch.") for d in got.get_dtypes()] == ["bfloat16"]
        assert getattr(got.get_memory_format(), "value", got.get_memory_format()) == 1
        assert key.to_string() in await conn.list()
        assert not await other.exists(key) and await other.get(key) is None
        assert key.to_string() not in await other.list()
        assert conn.remove_sync(key) and not await conn.exists(key)
        await conn.close()
        await other.close()

    asyncio.run(run())


def test_real_lmcache_remote_backend(server: dict[str, Any]) -> None:
    """Real LMCache drives the connector (skipped where LMCache is not installed): its own
    RemoteBackend loads ``LodestoreConnector`` from an ``external://`` remote_url, puts a
    KV chunk allocated by its LocalCPUBackend, and reads it back through Lodestore."""
    try:
        import torch
        from lmcache.utils import CacheEngineKey
        from lmcache.v1.config import LMCacheEngineConfig
        from lmcache.v1.memory_allocators.ad_hoc_memory_allocator import AdHocMemoryAllocator
        from lmcache.v1.memory_management import MemoryFormat
        from lmcache.v1.metadata import LMCacheMetadata
        from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector
        from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
        from lmcache.v1.storage_backend.remote_backend import RemoteBackend
    except Exception as exc:  # noqa: BLE001 - not installed, or no native backend here
        pytest.skip(f"LMCache is not installed (optional: pip install lmcache): {exc}")
    import threading

    from server import lmcache_connector

    assert lmcache_connector.HAVE_LMCACHE and issubclass(LodestoreConnector, RemoteConnector)
    base, tok = server["base"], server["tokens"]
    url = "external://lodestore:0/server.lmcache_connector/?connector_name=LodestoreConnector"
    cfg = LMCacheEngineConfig.from_defaults(
        chunk_size=BS, local_cpu=False, max_local_cpu_size=0.05, remote_url=url,
        remote_serde="naive",
        extra_config={"lodestore_url": base, "lodestore_token": tok["acme/bob"]})
    meta = LMCacheMetadata(model_name=MODEL, world_size=1, local_world_size=1, worker_id=0,
                           local_worker_id=0, kv_dtype=torch.bfloat16,
                           kv_shape=(30, 2, BS, 3, 64), chunk_size=BS)
    cpu = LocalCPUBackend(cfg, meta, memory_allocator=AdHocMemoryAllocator())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    backend = RemoteBackend(cfg, meta, loop, cpu)
    try:
        assert backend.connection is not None, "LMCache could not create the connector"
        shape = torch.Size([2, 30, BS, 192])
        obj = cpu.allocate(shape, torch.bfloat16, MemoryFormat.KV_2LTD)
        obj.tensor.copy_(torch.randn(shape).to(torch.bfloat16))
        want = obj.tensor.clone()
        key = CacheEngineKey(MODEL, 1, 0, 0x1234ABCD, torch.bfloat16)
        assert not backend.contains(key)
        backend.submit_put_task(key, obj).result(60)
        assert backend.contains(key)
        got = backend.get_blocking(key)
        assert got is not None and got.get_shapes() == [shape]
        assert got.get_memory_format() == MemoryFormat.KV_2LTD
        assert torch.equal(got.tensor, want)
        # stored in acme's warehouse: another tenant's connector does not see it
        with KVClient(base, tok["globex/alice"]) as glob:
            assert key.to_string() not in glob.list_objects()
        with KVClient(base, tok["acme/bob"]) as kv:
            assert key.to_string() in kv.list_objects(MODEL)
    finally:
        backend.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_body_limit_in_process(tmp_path: Path) -> None:
    """Bodies past ``max_body`` get 413 before they are read whole (in-process app)."""
    from starlette.testclient import TestClient

    from server.kv_http import KVApi
    from server.wiring import open_app

    home = tmp_path / "home"
    tok = ms.make_agents(home, [("acme", "bob", "agent")])["acme/bob"]
    app = open_app(home)
    try:
        api = KVApi(app.gateway, max_body=64 << 10)
        with TestClient(api.app()) as c:
            h = {"Authorization": f"Bearer {tok}", "Content-Type": FRAME_TYPE}
            body = b"".join(pack_frame({"model": "m", "token_ids": tokens(BS)},
                                       [b"x" * (100 << 10)]))
            r = c.post("/blocks", content=body, headers=h)
            assert r.status_code == 413 and r.json()["error"] == "body_too_large"
            r = c.get("/models")
            assert r.status_code == 401 and "WWW-Authenticate" in r.headers
            small = b"".join(pack_frame({"model": "m", "token_ids": tokens(BS),
                                         "block_size": BS}, [b"y" * 1000]))
            assert c.post("/blocks", content=small, headers=h).status_code == 200
            r = c.post("/lookup", json={"model": "m", "token_ids": tokens(BS)},
                       headers={"Authorization": f"Bearer {tok}"})
            assert r.json()["tokens"] == BS
    finally:
        api.door.close()
        app.close()


def test_serve_flags_set_the_warehouse_ttl(tmp_path: Path) -> None:
    """`lodestore serve --kv-ttl 1`: blocks put without a TTL expire after a second."""
    import time

    home = tmp_path / "home"
    tok = ms.make_agents(home, [("acme", "bob", "agent")])["acme/bob"]
    with ms.HttpServer(home, "--kv-ttl", "1", "--kv-hot-mib", "8", demo=False) as srv, \
            KVClient(srv.base, tok) as kv:
        toks = tokens(2 * BS)
        kv.register_model(MODEL, BS)
        kv.put_blocks(MODEL, toks, blocks_for(2))
        assert kv.lookup(MODEL, toks) == 2 * BS
        time.sleep(1.5)
        assert kv.lookup(MODEL, toks) == 0

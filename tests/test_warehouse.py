"""The token warehouse (issue 5, item 4): vLLM-compatible block hashes, put/get/lookup in
the chunk store behind the hot tier, dedup and isolation per tenant, TTL and capacity
eviction, GC safety, bad input, and the governed door.

Every test runs on a real embedded store (SQLite metadata, six local fragment folders,
k=4 m=6) in ``tmp_path``; chunks are small (64 KiB, inline up to 1 KiB) so test blocks
span chunks and go through erasure coding.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import cbor2
import pytest

from governance.errors import Forbidden
from governance.warehouse import WarehouseDoor
from server.wiring import open_app
from storage import StoreConfig, UnknownTenant, Volume
from storage.errors import InvalidArgument, NotFound
from storage.maintenance import gc
from storage.warehouse import (
    KV_ROOT,
    NONE_HASH,
    BadBlock,
    HashMismatch,
    ModelMismatch,
    TokenWarehouse,
    UnknownModel,
    block_hashes,
    hash_block_tokens,
    model_dir,
    root_hash,
    sha256_cbor,
)
from storage.warehouse import store as store_mod

MODEL = "HuggingFaceTB/SmolLM2-135M"
BS = 4  # tokens per block in most tests
BLOCK = 80_000  # bytes per block: over the inline threshold, two 64 KiB chunks


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _volume(home: Path) -> Volume:
    cfg = StoreConfig.embedded(home, chunk_size=65536, inline_threshold=1024, durability="none")
    vol = Volume.init(home, cfg)
    for t in ("acme", "globex"):
        vol.create_tenant(t)
    return vol


@pytest.fixture
def vol(tmp_path: Path):
    v = _volume(tmp_path / "store")
    yield v
    v.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def wh(vol: Volume, clock: Clock):
    w = TokenWarehouse(vol, clock=clock)
    yield w
    w.close()


def blocks_for(n: int, seed: int = 0, size: int = BLOCK) -> list[bytes]:
    return [hashlib.shake_256(f"{seed}:{i}".encode()).digest(size) for i in range(n)]


def tokens(n: int, base: int = 1000) -> list[int]:
    return [base + i * 7 for i in range(n)]


def chunk_count(vol: Volume, tenant: str) -> int:
    return sum(1 for rec in vol.meta.iter_chunks() if rec.tenant == tenant)


def pack_files(vol: Volume, tenant: str) -> list:
    if not vol.exists(tenant, KV_ROOT):
        return []
    return [fi for fi in vol.walk(tenant, KV_ROOT) if not fi.is_dir and "/p/" in fi.path]


# -- hashing: bit-compatible with vLLM -------------------------------------------------


def _cbor_uint(major: int, n: int) -> bytes:
    """Canonical CBOR head for major type and argument (RFC 8949 §4.2.1), by hand."""
    if n < 24:
        return bytes([major << 5 | n])
    for code, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | code]) + struct.pack(fmt, n)
    raise ValueError(n)


def _vllm_block_hash_by_hand(parent: bytes, token_ids: list[int]) -> bytes:
    """sha256 over CBOR([parent bytes, [tokens...], null]) encoded without cbor2."""
    enc = (_cbor_uint(4, 3) + _cbor_uint(2, len(parent)) + parent
           + _cbor_uint(4, len(token_ids)) + b"".join(_cbor_uint(0, t) for t in token_ids)
           + b"\xf6")
    return hashlib.sha256(enc).digest()


def _vllm_literal(token_ids: list[int], block_size: int, seed: str = "0",
                  extra: list | None = None) -> list[bytes]:
    """vLLM's code, followed literally: init_none_hash with PYTHONHASHSEED=seed, then
    get_request_block_hasher's loop over full blocks calling hash_block_tokens."""
    def sha256_cbor_vllm(input):  # vllm/utils/hashing.py
        input_bytes = cbor2.dumps(input, canonical=True)
        return hashlib.sha256(input_bytes).digest()

    none_hash = sha256_cbor_vllm(seed)  # init_none_hash: hash_fn(os.getenv("PYTHONHASHSEED"))

    def hash_block_tokens_vllm(hash_function, parent_block_hash, curr_block_token_ids,
                               extra_keys=None):
        if not parent_block_hash:
            parent_block_hash = none_hash
        curr_block_token_ids_tuple = tuple(curr_block_token_ids)
        return hash_function((parent_block_hash, curr_block_token_ids_tuple, extra_keys))

    out, prev, start = [], None, 0
    while start + block_size <= len(token_ids):
        ek = extra[len(out)] if extra else None
        prev = hash_block_tokens_vllm(sha256_cbor_vllm, prev,
                                      token_ids[start:start + block_size], ek)
        out.append(prev)
        start += block_size
    return out


def test_hash_vectors_match_vllm() -> None:
    # the root: vLLM's NONE_HASH with PYTHONHASHSEED=0 is sha256(CBOR text "0")
    assert NONE_HASH == hashlib.sha256(b"\x61\x30").digest() == root_hash()
    assert root_hash("42") == hashlib.sha256(b"\x62" + b"42").digest()
    assert root_hash(root=b"\x01" * 32) == b"\x01" * 32
    assert sha256_cbor(("x", (1, 2), None)) == hashlib.sha256(
        bytes.fromhex("83617882010 2f6".replace(" ", ""))).digest()

    # token ids across every CBOR integer width, and a trailing partial block
    toks = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 151_000, 49_151, 7]
    got = block_hashes(toks, 4)
    assert len(got) == 3  # 13 tokens: 3 full blocks, the partial one has no hash
    assert got == _vllm_literal(toks, 4)
    by_hand, parent = [], NONE_HASH
    for i in range(3):
        parent = _vllm_block_hash_by_hand(parent, toks[i * 4:(i + 1) * 4])
        by_hand.append(parent)
    assert got == by_hand
    # chaining: block i depends on every token before it
    other = block_hashes([9] + toks[1:], 4)
    assert all(a != b for a, b in zip(got, other, strict=True))
    assert block_hashes(toks[:8] + [5, 5, 5, 5], 4)[:2] == got[:2]
    # another seed, extra keys (LoRA name, multimodal ids) and a long prompt
    long = [(i * 7919) % 50_000 for i in range(2048)]
    assert block_hashes(long, 16, none_hash=root_hash("1234")) == _vllm_literal(long, 16, "1234")
    extra = [("lora-a",), None, ("img-3f", 0)]
    assert block_hashes(toks, 4, extra) == _vllm_literal(toks, 4, extra=extra)
    assert block_hashes(toks, 4, extra) != got
    assert hash_block_tokens(None, toks[:4]) == got[0]
    # pinned vector (vLLM v0.17 semantics, PYTHONHASHSEED=0, block_size 4)
    assert block_hashes([1, 2, 3, 4], 4)[0] == _vllm_block_hash_by_hand(NONE_HASH, [1, 2, 3, 4])


def test_warehouse_hashes_equal_module_hashes(wh: TokenWarehouse) -> None:
    toks = tokens(40)
    assert wh.block_hashes(toks, 8) == _vllm_literal(toks, 8)
    seeded = TokenWarehouse(wh.vol, hash_seed="7")
    try:
        assert seeded.block_hashes(toks, 8) == _vllm_literal(toks, 8, "7")
    finally:
        seeded.close()


# -- put, get, lookup ------------------------------------------------------------------


def test_round_trip_lookup_and_chunk_store_reads(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(5 * BS + 2)  # five full blocks and a partial one
    data = blocks_for(5)
    hs = wh.put_blocks("acme", MODEL, toks, data, BS)
    assert hs == block_hashes(toks, BS)
    info = wh.model_info("acme", MODEL)
    assert (info.block_size, info.block_bytes) == (BS, BLOCK)
    assert wh.get_blocks("acme", MODEL, hs) == data
    assert wh.get_blocks("acme", MODEL, [h.hex() for h in hs[:2]]) == data[:2]
    # lookup: the longest cached prefix, in tokens
    assert wh.lookup("acme", MODEL, toks) == 5 * BS
    assert wh.lookup("acme", MODEL, toks[:3 * BS + 1]) == 3 * BS
    assert wh.lookup("acme", MODEL, toks[:2 * BS] + [1, 2, 3, 4] + toks[3 * BS:]) == 2 * BS
    assert wh.lookup("acme", MODEL, [1] + toks[1:]) == 0
    assert wh.lookup("acme", MODEL, toks, BS) == 5 * BS
    # the files: one pack per put under the reserved root, stored as one erasure-coded
    # chunk (m fragment files, however small the store's own chunk size: 64 KiB here)
    packs = pack_files(vol, "acme")
    assert len(packs) == 1
    assert packs[0].size == 5 * BLOCK and packs[0].chunks == 1
    assert packs[0].attrs["kind"] == "kv_pack"
    assert not vol.exists("acme", f"{KV_ROOT}/{model_dir(MODEL)}/b")
    assert [b.position for b in wh.list_blocks("acme", MODEL)[0] if b.hash == hs[0]] == [0]
    # the hot tier dropped, reads come from the chunk store
    assert len(wh.hot) == 5
    wh.drop_hot()
    assert len(wh.hot) == 0
    reads: list[str] = []
    real_open = vol.open_file

    def counting_open(tenant: str, p: str):  # type: ignore[no-untyped-def]
        reads.append(p)
        return real_open(tenant, p)

    vol.open_file = counting_open  # type: ignore[method-assign]
    try:
        assert wh.get_blocks("acme", MODEL, hs) == data
        assert len([p for p in reads if "/p/" in p]) == 1  # contiguous: one pack read
        reads.clear()
        assert wh.get_blocks("acme", MODEL, hs) == data  # now hot again
        assert not [p for p in reads if "/p/" in p]
    finally:
        del vol.open_file
    # a second warehouse (another process, restart) sees the same blocks
    other = TokenWarehouse(vol, hot_bytes=0)
    try:
        assert other.lookup("acme", MODEL, toks) == 5 * BS
        assert other.get_blocks("acme", MODEL, hs) == data
    finally:
        other.close()


def test_incremental_put_exists_list_delete(wh: TokenWarehouse) -> None:
    toks = tokens(6 * BS)
    data = blocks_for(6, seed=3)
    hs = block_hashes(toks, BS)
    wh.put_blocks("acme", MODEL, toks[:2 * BS], data[:2], BS)
    # later blocks, with the whole prefix for the chain and the hashes as a check
    assert wh.put_blocks("acme", MODEL, toks, data[2:], start_block=2, hashes=hs[2:]) == hs[2:]
    assert wh.lookup("acme", MODEL, toks) == 6 * BS
    # putting the same blocks again writes nothing
    res = wh.put_blocks_ex("acme", MODEL, toks, data, BS)
    assert (res.written, res.bytes_written) == (0, 0)
    assert wh.exists("acme", MODEL, hs[3]) and wh.exists("acme", MODEL, hs[3].hex())
    items, cursor = wh.list_blocks("acme", MODEL, limit=4)
    rest, end = wh.list_blocks("acme", MODEL, cursor=cursor)
    assert end is None and len(items) == 4 and len(rest) == 2
    listed = items + rest
    assert sorted(b.hash for b in listed) == sorted(hs) == [b.hash for b in listed]
    assert {b.position for b in listed} == set(range(6))
    assert wh.delete_blocks("acme", MODEL, [hs[3]]) == 1
    assert not wh.exists("acme", MODEL, hs[3])
    assert wh.lookup("acme", MODEL, toks) == 3 * BS  # the chain breaks at the hole
    assert wh.get_blocks("acme", MODEL, [hs[3], hs[4]]) == [None, data[4]]
    assert [m.model for m in wh.list_models("acme")] == [MODEL]
    assert wh.delete_model("acme", MODEL) == 5
    with pytest.raises(UnknownModel):
        wh.lookup("acme", MODEL, toks)


def test_register_model_manifest(wh: TokenWarehouse) -> None:
    info = wh.register_model("acme", "m/one", 16, block_bytes=BLOCK, dtype="bfloat16",
                             hash_seed="42")
    assert info.root == root_hash("42") and info.block_size == 16
    assert wh.register_model("acme", "m/one", 16) == info  # idempotent
    with pytest.raises(ModelMismatch, match="blocks of 16 tokens, not 32"):
        wh.register_model("acme", "m/one", 32)
    with pytest.raises(ModelMismatch, match="hash root"):
        wh.register_model("acme", "m/one", 16, hash_seed="43")
    toks = tokens(32)
    hs = wh.put_blocks("acme", "m/one", toks, blocks_for(2))
    assert hs == _vllm_literal(toks, 16, "42")  # the model's own root
    with pytest.raises(UnknownTenant):
        wh.register_model("nobody", "m/one", 16)


# -- dedup and isolation ---------------------------------------------------------------


def test_dedup_within_tenant_not_across(wh: TokenWarehouse, vol: Volume) -> None:
    data = blocks_for(3, seed=11)
    base = chunk_count(vol, "acme")
    wh.put_blocks("acme", "model-a", tokens(3 * BS), data, BS)
    one = chunk_count(vol, "acme") - base
    assert one == 1  # one pack of three blocks (240,000 bytes), stored as one chunk
    # the same bytes under another model (other hashes, another pack): no new chunks
    wh.put_blocks("acme", "model-b", tokens(3 * BS, base=5), data, BS)
    assert chunk_count(vol, "acme") - base == one
    # another tenant stores its own chunks, never shared
    g0 = chunk_count(vol, "globex")
    wh.put_blocks("globex", "model-a", tokens(3 * BS), data, BS)
    assert chunk_count(vol, "globex") - g0 == one
    acme_ids = {r.cid for r in vol.meta.iter_chunks() if r.tenant == "acme"}
    globex_ids = {r.cid for r in vol.meta.iter_chunks() if r.tenant == "globex"}
    assert not acme_ids & globex_ids


def test_tenant_isolation(wh: TokenWarehouse) -> None:
    toks = tokens(3 * BS)
    hs = wh.put_blocks("acme", MODEL, toks, blocks_for(3), BS)
    with pytest.raises(UnknownModel):
        wh.lookup("globex", MODEL, toks)
    with pytest.raises(UnknownModel):
        wh.get_blocks("globex", MODEL, hs)
    assert wh.list_models("globex") == []
    # globex with the same model: the same hashes name nothing of acme's
    wh.register_model("globex", MODEL, BS)
    assert wh.lookup("globex", MODEL, toks) == 0
    assert wh.get_blocks("globex", MODEL, hs) == [None] * 3
    assert not wh.exists("globex", MODEL, hs[0])
    assert wh.list_blocks("globex", MODEL) == ([], None)
    assert wh.lookup("acme", MODEL, toks) == 3 * BS


# -- TTL, capacity, GC -----------------------------------------------------------------


def test_ttl_expiry(vol: Volume, clock: Clock) -> None:
    wh = TokenWarehouse(vol, clock=clock, default_ttl=3600)
    try:
        toks = tokens(4 * BS)
        data = blocks_for(4)
        hs = wh.put_blocks("acme", MODEL, toks[:2 * BS], data[:2], BS, ttl=10)
        wh.put_blocks("acme", MODEL, toks, data[2:], BS, start_block=2)  # default TTL
        clock.t += 5
        assert wh.lookup("acme", MODEL, toks) == 4 * BS
        clock.t += 6  # the first two blocks are past their TTL
        assert wh.lookup("acme", MODEL, toks) == 0
        assert wh.get_blocks("acme", MODEL, hs) == [None, None]
        wh.drop_hot()
        assert wh.get_blocks("acme", MODEL, hs) == [None, None]
        assert not wh.exists("acme", MODEL, hs[0])
        assert [b.position for b in wh.list_blocks("acme", MODEL)[0]] in ([2, 3], [3, 2])
        # re-putting an expired block stores it again
        wh.put_blocks("acme", MODEL, toks, data[:1], BS, ttl=100)
        assert wh.lookup("acme", MODEL, toks) == BS
        # evict() deletes what has expired
        clock.t += 4000
        assert wh.evict("acme") == {"expired": 4, "capacity": 0}
        assert wh.list_blocks("acme", MODEL) == ([], None)
        assert wh.usage("acme") == 0
        with pytest.raises(InvalidArgument, match="ttl"):
            wh.put_blocks("acme", MODEL, toks, data[:1], BS, ttl=-1)
    finally:
        wh.close()


def test_refreshing_ttl_keeps_data(vol: Volume, clock: Clock) -> None:
    wh = TokenWarehouse(vol, clock=clock)
    try:
        toks = tokens(BS)
        [h] = wh.put_blocks("acme", MODEL, toks, blocks_for(1), BS, ttl=10)
        wh.put_blocks("acme", MODEL, toks, blocks_for(1), BS, ttl=1000)  # extends, no rewrite
        clock.t += 100
        wh.drop_hot()
        assert wh.get_blocks("acme", MODEL, [h]) == blocks_for(1)
    finally:
        wh.close()


def test_capacity_eviction_lru(vol: Volume, clock: Clock) -> None:
    wh = TokenWarehouse(vol, clock=clock, capacity_bytes=3 * BLOCK)
    try:
        toks = tokens(5 * BS)
        data = blocks_for(5)
        hs = block_hashes(toks, BS)
        for i in range(3):
            wh.put_blocks("acme", MODEL, toks, [data[i]], BS, start_block=i)
        assert wh.usage("acme") == 3 * BLOCK
        wh.get_blocks("acme", MODEL, [hs[0]])  # block 0 is now the most recently used
        wh.put_blocks("acme", MODEL, toks, [data[3]], BS, start_block=3)
        assert wh.usage("acme") == 3 * BLOCK
        present = [wh.exists("acme", MODEL, h) for h in hs[:4]]
        assert present == [True, False, True, True]  # block 1 was least recently used
        wh.lookup("acme", MODEL, toks)  # touches block 0 only (the chain breaks at 1)
        wh.put_blocks("acme", MODEL, toks, [data[4]], BS, start_block=4)
        assert [wh.exists("acme", MODEL, h) for h in hs] == [True, False, False, True, True]
        # a restarted warehouse seeds its usage from the store
        again = TokenWarehouse(vol, clock=clock, capacity_bytes=2 * BLOCK)
        try:
            assert again.usage("acme") == 3 * BLOCK
            assert again.evict("acme")["capacity"] == 1
            assert again.usage("acme") == 2 * BLOCK
        finally:
            again.close()
        with pytest.raises(InvalidArgument, match="capacity"):
            wh.put_blocks("acme", MODEL, toks, data[:4], BS)
    finally:
        wh.close()


def test_gc_never_collects_live_blocks(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(4 * BS)
    data = blocks_for(4, seed=5)
    hs = wh.put_blocks("acme", MODEL, toks, data, BS)
    rep = gc(vol, grace=0)
    assert rep.chunks_deleted == 0 and rep.orphan_fragments_deleted == 0
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs) == data
    # deleting some blocks of a pack keeps the pack (and every chunk) for the others
    wh.delete_blocks("acme", MODEL, hs[:2])
    rep = gc(vol, grace=0)
    assert rep.chunks_deleted == 0
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs) == [None, None, *data[2:]]
    # a second put (another pack) survives gc once the first pack is gone
    more = tokens(6 * BS)
    data2 = blocks_for(2, seed=6)
    hs2 = wh.put_blocks("acme", MODEL, more, data2, BS, start_block=4)
    wh.delete_blocks("acme", MODEL, hs[2:])
    assert len(pack_files(vol, "acme")) == 1
    rep = gc(vol, grace=0)
    assert rep.chunks_deleted == 1  # the first pack (320,000 bytes): one chunk
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs + hs2) == [None] * 4 + data2


# -- packs: the blocks of one put in one file, indexed in the KV tier -------------------


def test_many_small_blocks_in_packs(wh: TokenWarehouse, vol: Volume,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "PACK_MAX_BYTES", 10 * 3000)  # ten blocks per pack
    toks = tokens(64 * BS)
    data = blocks_for(64, seed=21, size=3000)
    hs = wh.put_blocks("acme", MODEL, toks[:40 * BS], data[:40], BS)
    res = wh.put_blocks_ex("acme", MODEL, toks, data, BS)  # 40 known, 24 new
    assert (res.written, res.bytes_written) == (24, 24 * 3000)
    hs += res.hashes[40:]
    assert len(pack_files(vol, "acme")) == 4 + 3
    assert wh.lookup("acme", MODEL, toks) == 64 * BS
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs) == data
    wh.drop_hot()
    sparse = [0, 2, 3, 9, 10, 33, 63]  # gaps, runs and pack boundaries
    assert wh.get_blocks("acme", MODEL, [hs[i] for i in sparse]) == [data[i] for i in sparse]
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs[::-1]) == data[::-1]
    other = TokenWarehouse(vol, hot_bytes=0)
    try:
        assert other.get_blocks("acme", MODEL, hs) == data
        assert other.usage("acme") == 64 * 3000
    finally:
        other.close()
    listed, cursor = wh.list_blocks("acme", MODEL, limit=50)
    rest, end = wh.list_blocks("acme", MODEL, cursor=cursor)
    assert end is None and sorted(hs) == [b.hash for b in listed + rest]
    assert {b.position for b in listed + rest} == set(range(64))


def test_partial_delete_then_pack_removed(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(4 * BS)
    data = blocks_for(4, seed=8)
    hs = wh.put_blocks("acme", MODEL, toks, data, BS)
    [pack] = pack_files(vol, "acme")
    assert wh.delete_blocks("acme", MODEL, [hs[1], hs[3]]) == 2
    assert wh.delete_blocks("acme", MODEL, [hs[1]]) == 0
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs) == [data[0], None, data[2], None]
    assert wh.lookup("acme", MODEL, toks) == BS
    assert [p.path for p in pack_files(vol, "acme")] == [pack.path]
    assert wh.delete_blocks("acme", MODEL, [hs[0], hs[2]]) == 2
    assert pack_files(vol, "acme") == []  # no block of it left: the pack is gone
    assert wh.list_blocks("acme", MODEL) == ([], None)
    assert wh.usage("acme") == 0
    # deleting the model removes packs and index entries
    wh.put_blocks("acme", MODEL, toks, data, BS)
    assert wh.delete_model("acme", MODEL) == 4
    assert pack_files(vol, "acme") == []
    assert not [k for k, _ in vol.kv.scan("acme", store_mod.INDEX + "/")]


def test_unindexed_pack_is_invisible_and_swept(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(2 * BS)
    data = blocks_for(2, seed=4)
    hs = block_hashes(toks, BS)
    wh.register_model("acme", MODEL, BS, block_bytes=BLOCK)
    # a crash after the pack was written, before its index entries: data without index
    mdir = model_dir(MODEL)
    vol.write("acme", f"{KV_ROOT}/{mdir}/p/ab/ab{'0' * 30}", b"".join(data),
              attrs={"kind": "kv_pack", "blocks": 2})
    assert wh.lookup("acme", MODEL, toks) == 0
    assert wh.get_blocks("acme", MODEL, hs) == [None, None]
    assert not wh.exists("acme", MODEL, hs[0])
    assert wh.list_blocks("acme", MODEL) == ([], None)
    assert wh.usage("acme") == 0
    live = wh.put_blocks("acme", MODEL, toks, data, BS)  # stored anew, in its own pack
    assert len(pack_files(vol, "acme")) == 2
    assert wh.sweep_packs("acme", grace=3600) == 0  # too young: maybe a put in flight
    assert wh.sweep_packs("acme", grace=0) == 1
    assert len(pack_files(vol, "acme")) == 1
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, live) == data


def test_pack_expiry(vol: Volume, clock: Clock) -> None:
    wh = TokenWarehouse(vol, clock=clock)
    try:
        toks = tokens(3 * BS)
        data = blocks_for(3, seed=2)
        hs = wh.put_blocks("acme", MODEL, toks[:2 * BS], data[:2], BS, ttl=10)
        wh.put_blocks("acme", MODEL, toks, data[2:], BS, start_block=2, ttl=100)
        assert len(pack_files(vol, "acme")) == 2
        clock.t += 11  # the first put's blocks expire together
        wh.drop_hot()
        assert wh.get_blocks("acme", MODEL, hs + [block_hashes(toks, BS)[2]]) == \
            [None, None, data[2]]
        assert wh.lookup("acme", MODEL, toks) == 0
        assert [b.position for b in wh.list_blocks("acme", MODEL)[0]] == [2]
        assert wh.evict("acme") == {"expired": 2, "capacity": 0}
        assert len(pack_files(vol, "acme")) == 1  # the expired pack is deleted
        # re-putting an expired block stores it again
        wh.put_blocks("acme", MODEL, toks, data[:1], BS)
        wh.drop_hot()
        assert wh.lookup("acme", MODEL, toks) == BS
    finally:
        wh.close()


def test_old_layout_blocks_still_read(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(3 * BS)
    data = blocks_for(3, seed=13)
    hs = block_hashes(toks, BS)
    info = wh.register_model("acme", MODEL, BS, block_bytes=BLOCK)
    for i in range(2):  # blocks 0 and 1 as an older version stored them: a file each
        x = hs[i].hex()
        vol.write("acme", f"{KV_ROOT}/{info.dir}/b/{x[:2]}/{x}", data[i],
                  attrs={"kind": "kv_block", "pos": i, "exp": None,
                         "parent": hs[i - 1].hex() if i else None})
    fresh = TokenWarehouse(vol, hot_bytes=0)
    try:
        assert fresh.lookup("acme", MODEL, toks) == 2 * BS
        assert fresh.get_blocks("acme", MODEL, hs) == [data[0], data[1], None]
        res = fresh.put_blocks_ex("acme", MODEL, toks, data, BS)
        assert res.written == 1  # the old files count as stored
        assert fresh.get_blocks("acme", MODEL, hs) == data
        assert sorted(b.hash for b in fresh.list_blocks("acme", MODEL)[0]) == sorted(hs)
        page, cur = fresh.list_blocks("acme", MODEL, limit=2)
        rest, end = fresh.list_blocks("acme", MODEL, cursor=cur)
        assert end is None and [b.hash for b in page + rest] == sorted(hs)
        assert fresh.usage("acme") == 3 * BLOCK
        assert fresh.delete_blocks("acme", MODEL, hs[:2]) == 2
        assert fresh.get_blocks("acme", MODEL, hs) == [None, None, data[2]]
    finally:
        fresh.close()


# -- bad input: clear errors, nothing stored -------------------------------------------


def _nothing_stored(wh: TokenWarehouse, vol: Volume) -> None:
    assert not vol.exists("acme", KV_ROOT) or not any(
        fi.name != "model.json" for fi in vol.walk("acme", KV_ROOT) if not fi.is_dir)


def test_bad_input_clear_errors_nothing_stored(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(3 * BS)
    data = blocks_for(3)
    hs = block_hashes(toks, BS)
    with pytest.raises(UnknownModel, match="unknown model 'nope'.*put blocks"):
        wh.get_blocks("acme", "nope", hs)
    with pytest.raises(UnknownModel):
        wh.lookup("acme", "nope", toks, BS)
    with pytest.raises(UnknownModel):
        wh.put_blocks("acme", "nope", toks, data)  # no block_size: cannot register
    cases = [
        (HashMismatch, "not the hash of its token ids",
         dict(hashes=[hs[0], hs[2], hs[1]])),
        (HashMismatch, "one hash per block", dict(hashes=hs[:2])),
        (InvalidArgument, "hashes\\[0\\] must be", dict(hashes=["xyz", hs[1], hs[2]])),
        (BadBlock, "truncated or malformed",
         dict(blocks=[data[0], data[1][:-1], data[2]])),
        (BadBlock, "block 1 is empty", dict(blocks=[data[0], b"", data[2]])),
        (BadBlock, "block 2 is str", dict(blocks=[data[0], data[1], "text"])),
        (BadBlock, "2 full blocks of 4", dict(token_ids=toks[:-1])),
        (InvalidArgument, "token_ids\\[2\\]", dict(token_ids=[1, 2, -3] + toks[3:])),
        (InvalidArgument, "token_ids must be a list", dict(token_ids="1 2 3")),
        (InvalidArgument, "block_size", dict(block_size=0)),
        (InvalidArgument, "model id", dict(model="")),
        (UnknownTenant, "unknown tenant", dict(tenant="nobody")),
    ]
    for exc, msg, over in cases:
        args = dict(tenant="acme", model=MODEL, token_ids=toks, blocks=data, block_size=BS)
        args.update(over)
        with pytest.raises(exc, match=msg):
            wh.put_blocks(**args)
        _nothing_stored(wh, vol)
    assert wh.list_models("acme") == []
    # a registered model: wrong block size, wrong block bytes
    wh.put_blocks("acme", MODEL, toks, data, BS)
    before = len(wh.list_blocks("acme", MODEL)[0])
    with pytest.raises(ModelMismatch, match="blocks of 4 tokens, not 8"):
        wh.put_blocks("acme", MODEL, tokens(16, base=9), blocks_for(2, seed=9), 8)
    with pytest.raises(ModelMismatch, match="not 8"):
        wh.lookup("acme", MODEL, toks, 8)
    with pytest.raises(BadBlock, match="80,000 bytes"):
        wh.put_blocks("acme", MODEL, tokens(4, base=3), [b"x" * 100], BS)
    assert len(wh.list_blocks("acme", MODEL)[0]) == before
    with pytest.raises(InvalidArgument, match="64 hex digits"):
        wh.get_blocks("acme", MODEL, ["00" * 31])
    with pytest.raises(NotFound):
        wh.get_blocks("acme", "other", hs)


def test_failed_write_leaves_no_partial_put(wh: TokenWarehouse, vol: Volume) -> None:
    toks = tokens(4 * BS)
    data = blocks_for(4)
    real = vol.write
    calls = {"n": 0}

    def flaky(tenant, path, payload, **kw):  # type: ignore[no-untyped-def]
        if "/p/" in path:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError("disk full")
        return real(tenant, path, payload, **kw)

    vol.write = flaky  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="disk full"):
            wh.put_blocks("acme", MODEL, toks, data, BS)
    finally:
        del vol.write
    wh.drop_hot()
    assert wh.lookup("acme", MODEL, toks) == 0
    assert wh.list_blocks("acme", MODEL) == ([], None)
    assert pack_files(vol, "acme") == []
    # the pack is written but the index is not: the put fails, the pack is deleted
    real_put_many = vol.kv.put_many

    def failing_index(ns, items, ttl=None):  # type: ignore[no-untyped-def]
        raise OSError("kv down")

    vol.kv.put_many = failing_index  # type: ignore[method-assign]
    try:
        with pytest.raises(OSError, match="kv down"):
            wh.put_blocks("acme", MODEL, toks, data, BS)
    finally:
        vol.kv.put_many = real_put_many  # type: ignore[method-assign]
    wh.drop_hot()
    assert wh.lookup("acme", MODEL, toks) == 0
    assert wh.get_blocks("acme", MODEL, block_hashes(toks, BS)) == [None] * 4
    assert pack_files(vol, "acme") == []
    hs = wh.put_blocks("acme", MODEL, toks, data, BS)  # and a retry works
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, hs) == data


def test_keyed_objects(wh: TokenWarehouse, clock: Clock) -> None:
    key = "lmcache/model@1@0@abcdef@bfloat16"
    wh.put_object("acme", "lmcache/model", key, b"payload" * 100)
    assert wh.has_object("acme", "lmcache/model", key)
    assert wh.get_object("acme", "lmcache/model", key) == b"payload" * 100
    assert wh.list_objects("acme") == [key]
    assert wh.list_objects("acme", "lmcache/model") == [key]
    assert not wh.has_object("globex", "lmcache/model", key)
    wh.put_object("acme", "lmcache/model", "k2", b"x", ttl=5)
    clock.t += 6
    assert wh.get_object("acme", "lmcache/model", "k2") is None
    assert wh.delete_object("acme", "lmcache/model", key)
    assert wh.get_object("acme", "lmcache/model", key) is None
    assert wh.list_objects("acme") == []


# -- the governed door -----------------------------------------------------------------


def test_door_authorizes_and_audits(tmp_path: Path) -> None:
    home = tmp_path / "home"
    _volume(home).close()
    app = open_app(home)
    door = WarehouseDoor(app.gateway)
    try:
        app.principals.add_tenant("kvt")
        app.principals.set_policy("kvt", """
paths:
  - {prefix: /, read: [agent, reader], write: [agent]}
  - {prefix: /.lodestore/kv, read: [agent, reader], write: [agent]}
quotas: {bytes: 300000}
""")
        agent = app.gateway.authenticate(app.principals.add_agent("kvt", "eng", role="agent"))
        reader = app.gateway.authenticate(app.principals.add_agent("kvt", "ro", role="reader"))
        guest = app.gateway.authenticate(app.principals.add_agent("kvt", "g", role="guest"))
        toks = tokens(2 * BS)
        res = door.put_blocks(agent, MODEL, toks, blocks_for(2), BS)
        assert res.written == 2 and res.bytes_written == 2 * BLOCK
        assert door.lookup(reader, MODEL, toks) == (2 * BS, res.hashes)
        assert door.get_blocks(reader, MODEL, res.hashes) == blocks_for(2)
        with pytest.raises(Forbidden, match="may not write"):
            door.put_blocks(reader, MODEL, toks, blocks_for(2), BS)
        with pytest.raises(Forbidden, match="may not read"):
            door.lookup(guest, MODEL, toks)
        with pytest.raises(Exception, match="quota"):
            door.put_blocks(agent, MODEL, tokens(4 * BS, base=3), blocks_for(4, 8), BS)
        cols, rows = app.audit.query(
            "SELECT operation, agent, decision, bytes, path FROM audit WHERE tenant = 'kvt' "
            "AND operation LIKE 'kv_%' ORDER BY seq")
        ops = [(r[0], r[1], r[2]) for r in rows]
        assert ops == [("kv_put", "eng", "allow"), ("kv_lookup", "ro", "allow"),
                       ("kv_get", "ro", "allow"), ("kv_put", "ro", "deny"),
                       ("kv_lookup", "g", "deny"), ("kv_put", "eng", "error")]
        assert rows[0][3] == 2 * BLOCK and rows[2][3] == 2 * BLOCK
        assert rows[0][4] == f"{KV_ROOT}/{model_dir(MODEL)}"
    finally:
        door.close()
        app.close()


def test_model_dir_is_safe() -> None:
    assert model_dir(MODEL).startswith("huggingfacetb-smollm2-135m-")
    assert model_dir("../../etc") != model_dir("etc")
    assert "/" not in model_dir("a/b/c") and model_dir("日本語").startswith("model-")
    with pytest.raises(InvalidArgument):
        model_dir("bad\nid")
    assert len(os.path.basename(model_dir("x" * 500))) <= 65


def test_gc_sweeps_unindexed_packs_and_keeps_live_blocks(wh: TokenWarehouse, vol: Volume
                                                          ) -> None:
    """`lodestore gc` (storage.maintenance.gc) deletes a crash's unindexed pack and frees
    its chunks in the same run; indexed blocks stay readable."""
    from storage.maintenance import gc

    toks = tokens(2 * BS)
    data = blocks_for(2, seed=9)
    wh.register_model("acme", MODEL, BS, block_bytes=BLOCK)
    live = wh.put_blocks("acme", MODEL, toks, data, BS)
    vol.write("acme", f"{KV_ROOT}/{model_dir(MODEL)}/p/cd/cd{'1' * 30}",
              blocks_for(3, seed=10)[2] * 2, attrs={"kind": "kv_pack", "blocks": 2})
    assert len(pack_files(vol, "acme")) == 2
    rep = gc(vol, grace=0)
    assert rep.kv_packs_deleted == 1 and rep.chunks_deleted >= 1
    assert len(pack_files(vol, "acme")) == 1
    wh.drop_hot()
    assert wh.get_blocks("acme", MODEL, live) == data


# -- the chain-hash cache of recent puts ---------------------------------------------------

def test_incremental_puts_hash_only_new_blocks_and_match_full_chain(
        wh: TokenWarehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt put in pieces (blocks 0..3, then 4..7, ...) hashes each block once, and
    the hashes and parent links equal a full recompute."""
    toks = tokens(12 * BS)
    data = blocks_for(12, seed=9)
    want = block_hashes(toks, BS)
    calls = []
    real = store_mod.hashing.hash_block_tokens

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(store_mod.hashing, "hash_block_tokens", counting)
    got = []
    for s in range(0, 12, 4):
        got += wh.put_blocks("acme", MODEL, toks[:(s + 4) * BS], data[s:s + 4], BS,
                             start_block=s)
    assert got == want
    assert len(calls) == 12  # not 4 + 8 + 12
    mdir = model_dir(MODEL)
    entries = wh._index_get("acme", mdir, [h.hex() for h in want])
    assert [e.parent for e in entries] == [None, *(h.hex() for h in want[:-1])]
    # another tenant, and another prompt with the same length, recompute their own chain
    other = tokens(12 * BS, base=5)
    other_want = block_hashes(other, BS)
    calls.clear()
    assert wh.put_blocks("globex", MODEL, toks, data[4:8], BS, start_block=4) == want[4:8]
    assert wh.put_blocks("acme", MODEL, other, data[4:8], BS,
                         start_block=4) == other_want[4:8]
    assert len(calls) == 16  # 8 each: blocks 0..7 hashed, nothing taken from acme's chain


@pytest.mark.parametrize("bad,where", [([1, 2, True], 2), ([1, -3], 1), ([1, 2.0], 1),
                                       ([1 << 63], 0), (["7"], 0)])
def test_token_ids_checked_with_the_bad_entry_named(wh: TokenWarehouse, bad, where) -> None:
    with pytest.raises(InvalidArgument, match=rf"token_ids\[{where}\]"):
        wh.put_blocks("acme", MODEL, bad * BS, blocks_for(1), 1)


def test_blocks_read_back_with_two_targets_gone(tmp_path: Path) -> None:
    """A pack is one erasure-coded chunk: with any two of its six targets gone, every
    block still reads back (decoded from parity), and repair restores the lost shares."""
    import shutil

    from storage.maintenance import repair, scrub, status
    from storage.targets.local import path_from_url

    home = tmp_path / "store"
    vol = _volume(home)
    wh = TokenWarehouse(vol)
    data = blocks_for(12, seed=21)
    toks = tokens(12 * BS)
    hs = wh.put_blocks("acme", MODEL, toks, data, BS)
    roots = [path_from_url(t.url) for t in vol.cfg.targets]
    assert len(roots) == vol.cfg.m == 6
    wh.close()
    vol.close()
    for root in roots[:2]:  # data-share targets for some packs, parity for others
        shutil.rmtree(root)
    vol = Volume.open(home)
    wh = TokenWarehouse(vol)
    try:
        assert wh.lookup("acme", MODEL, toks) == 12 * BS
        assert wh.get_blocks("acme", MODEL, hs) == data
        assert wh.get_blocks("acme", MODEL, hs[5:7]) == data[5:7]  # ranges inside the pack
        assert status(vol)["degraded_chunks"] >= 1
        rep = repair(vol)
        assert rep.lost == 0 and rep.still_degraded == 0
        assert scrub(vol).clean
        wh.drop_hot()
        assert wh.get_blocks("acme", MODEL, hs) == data
    finally:
        wh.close()
        vol.close()

"""KV blocks through the token warehouse give the same next-token logits as a recompute.

A small version of ``examples/ttft_demo.py`` (2 layers of the SmolLM2-135M shape, random
weights, a 256-token prompt, 16-token blocks). Skips when the ``inference`` extra (torch,
transformers) is not installed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import ttft_demo as demo  # noqa: E402

N, BLOCK, SUFFIX = 256, 16, 8


@pytest.fixture(scope="module")
def threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def warehouse(tmp_path):
    vol, wh = demo.open_warehouse(tmp_path / "home")
    yield wh
    demo.close_warehouse(vol, wh)


def test_block_roundtrip_is_bit_exact(threads):
    model = demo.build_model(layers=2, dtype=torch.bfloat16, max_positions=N)
    _, cache, _, _ = demo.prefill(model, demo.random_prompt(64))
    blobs = demo.serialize_blocks(cache, 4, BLOCK)
    assert len(blobs) == 4 and all(len(b) == len(blobs[0]) for b in blobs)
    back = demo.cache_layers(demo.deserialize_blocks(blobs))
    for (k, v), (k2, v2) in zip(demo.cache_layers(cache), back, strict=True):
        assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(ValueError):
        demo.deserialize_blocks([b"nope" + blobs[0][4:]])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cached_logits_equal_recompute(threads, warehouse, dtype):
    model = demo.build_model(layers=2, dtype=demo.DTYPES[dtype], max_positions=N)
    mid = demo.model_id(model, 0)
    lines: list[str] = []
    r = demo.measure(model, warehouse, "demo", mid, N, BLOCK, SUFFIX, repeat=1,
                     drop_os_cache=False, log=lines.append)
    prefix = (N - SUFFIX) // BLOCK * BLOCK
    assert r.prefix_tokens == prefix == 240
    assert r.hit_tokens == prefix, lines  # every stored block came back from the warehouse
    assert r.suffix_tokens == N - prefix
    assert r.bytes_loaded >= prefix * 2 * 2 * 3 * 64 * (4 if dtype == "fp32" else 2)
    assert r.allclose and r.same_token, (r.max_abs_diff, lines)
    assert r.max_abs_diff <= r.atol + r.rtol * r.max_logit


def test_other_prompt_misses(threads, warehouse):
    """A prompt differing in its first token shares no block: the cached path then
    computes everything and still gets the recompute's logits."""
    model = demo.build_model(layers=2, dtype=torch.float32, max_positions=N)
    mid = demo.model_id(model, 0)
    demo.measure(model, warehouse, "demo", mid, 64, BLOCK, SUFFIX, drop_os_cache=False,
                 log=lambda _: None)
    ids = demo.random_prompt(64, seed=1 + 64)
    ids[0] = (ids[0] + 1) % model.config.vocab_size
    ref, _, ref_tok, _ = demo.prefill(model, ids)
    logits, tok, hit, nbytes, _, _ = demo.cached_first_token(warehouse, "demo", mid, model, ids,
                                                            BLOCK)
    assert hit == 0 and nbytes == 0
    assert tok == ref_tok and torch.allclose(logits, ref, rtol=1e-4, atol=1e-4)

#!/usr/bin/env python
"""Time to first token: full prefill vs KV-cache blocks loaded from the token warehouse.

A causal language model in the shape of SmolLM2-135M (Llama architecture, 30 layers,
576 hidden, 9 query / 3 key-value heads, 8,192 positions) is built locally with random
weights: nothing is downloaded, and the cost of a prefill does not depend on the weight
values. For each prompt length N:

1. **Full prefill**: ``model(prompt)`` on all N tokens, then the argmax of the last
   position's logits (the first token). Its wall time is ``TTFT full``.
2. The KV cache that prefill produced is cut into blocks of ``--block-size`` tokens (all
   layers' K and V for those positions, raw bytes behind a 16-byte header) and the blocks
   of the prefix (every full block of the first N - ``--suffix`` tokens: the earlier
   turns of a conversation) are put into the warehouse.
3. The warehouse's hot (in-memory) tier is dropped, and so is the OS page cache when
   running as root, so the blocks come back from the chunk store on disk.
4. **Cached**: longest-cached-prefix lookup, read the blocks, rebuild a transformers
   ``DynamicCache``, run the model on the remaining tokens only, argmax. Its wall time
   is ``TTFT cached``.
5. **Correctness**: the last-position logits of step 4 against those of the full
   recompute in step 1 (``torch.allclose`` with the stated tolerances, the max |diff|,
   and the first token must be the same).

Needs the ``inference`` extra (``pip install -e '.[inference]'``: CPU torch and
transformers). Run from the repository root::

    .venv/bin/python examples/ttft_demo.py                       # 2K, 4K, 8K tokens
    .venv/bin/python examples/ttft_demo.py --tokens 1024 --layers 4   # a quick look

``benchmarks/bench_ttft.py`` runs the same steps and prints a table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage import Volume  # noqa: E402
from storage.warehouse import TokenWarehouse, UnknownModel  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_DTYPE_CODE = {torch.float32: 1, torch.bfloat16: 2}
_CODE_DTYPE = {v: k for k, v in _DTYPE_CODE.items()}
# magic, format version, dtype code, layers, kv heads, tokens in the block, head dim
_HEADER = struct.Struct("<4sBBHHHHxx")
_MAGIC = b"LKVB"
HEADER_SIZE = _HEADER.size  # 16: keeps the payload aligned for 2- and 4-byte dtypes

# Tolerances for "loaded KV gives the same next-token logits as a recompute". The loaded K
# and V are bit-identical to what the prefill produced; what differs is the shape of the
# work on the suffix (a GEMM over a few hundred rows instead of N, an attention call with a
# cache), i.e. the order of floating-point sums. In fp32 that is ~1e-6 of the logits; in
# bf16 every activation is rounded to 8 mantissa bits, so one flipped rounding in an early
# layer moves the logits by up to a few bf16 ulps of their magnitude.
TOLERANCE = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def smollm2_135m_config(layers: int = 30, max_positions: int = 8192) -> LlamaConfig:
    """SmolLM2-135M's architecture (HuggingFaceTB/SmolLM2-135M config.json), 8K positions."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )


def build_model(layers: int = 30, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                max_positions: int = 8192) -> LlamaForCausalLM:
    """A randomly initialised model (seeded), eval mode, in ``dtype``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(smollm2_135m_config(layers, max_positions))
    return model.to(dtype).eval()


def model_id(model: LlamaForCausalLM, seed: int) -> str:
    """What the warehouse keys blocks by: weights (here: the seed), shape and dtype."""
    c = model.config
    dt = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"smollm2-135m-shape-random-s{seed}-L{c.num_hidden_layers}-{dt}"


def random_prompt(n: int, vocab: int = 49152, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


# ------------------------------------------------------------------ model calls

def _forward(model: LlamaForCausalLM, ids: list[int], cache: DynamicCache | None = None):
    """One forward pass keeping only the last position's logits (what an engine computes
    for the first token; materialising N x 49,152 logits would only slow the baseline)."""
    x = torch.tensor([ids], dtype=torch.long)
    kwargs = {"use_cache": True, "logits_to_keep": 1}
    if cache is not None:
        kwargs[_CACHE_KWARG] = cache
    with torch.inference_mode():
        out = model(x, **kwargs)
    cache_out = getattr(out, "cache", None)
    if cache_out is None:
        cache_out = out.past_key_values
    return out.logits[0, -1].float(), cache_out


def _cache_kwarg() -> str:
    import inspect

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


_CACHE_KWARG = _cache_kwarg()


def prefill(model: LlamaForCausalLM, ids: list[int]) -> tuple[torch.Tensor, DynamicCache, int, float]:
    """Full prefill: (last logits, KV cache, first token, seconds to the first token)."""
    t0 = time.perf_counter()
    logits, cache = _forward(model, ids)
    token = int(torch.argmax(logits))
    return logits, cache, token, time.perf_counter() - t0


def warm_up(model: LlamaForCausalLM, tokens: int = 512) -> None:
    """One small prefill and one small cached forward, so that neither measured path pays
    for first-call set-up (kernel selection, allocator growth)."""
    ids = random_prompt(tokens, model.config.vocab_size, seed=0)
    _, cache = _forward(model, ids[: tokens - 64])
    _forward(model, ids[tokens - 64:], cache)


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (K, V), each [1, kv_heads, seq, head_dim]."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))  # transformers 4.x


# ------------------------------------------------------------------ block (de)serialization

def serialize_blocks(cache: DynamicCache, n_blocks: int, block_size: int) -> list[bytes]:
    """The first ``n_blocks`` blocks of the cache: per block, one [layers, 2, kv_heads,
    block_size, head_dim] array (K then V for each layer) as raw bytes behind a header."""
    layers = cache_layers(cache)
    k0 = layers[0][0]
    _, heads, _, head_dim = k0.shape
    header = _HEADER.pack(_MAGIC, 1, _DTYPE_CODE[k0.dtype], len(layers), heads, block_size,
                          head_dim)
    out = []
    for b in range(n_blocks):
        s, e = b * block_size, (b + 1) * block_size
        block = torch.stack([torch.stack((k[0, :, s:e], v[0, :, s:e])) for k, v in layers])
        out.append(header + block.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def deserialize_blocks(blobs: list[bytes]) -> DynamicCache:
    """Concatenate blocks back into a DynamicCache of len(blobs) * block_size positions.
    Each block is read in place (``torch.frombuffer``) and copied once into the layer
    tensors."""
    magic, version, code, n_layers, heads, block_size, head_dim = _HEADER.unpack_from(blobs[0])
    if magic != _MAGIC or version != 1:
        raise ValueError("not a KV block")
    dtype = _CODE_DTYPE[code]
    count = n_layers * 2 * heads * block_size * head_dim
    total = len(blobs) * block_size
    kv = torch.empty((n_layers, 2, 1, heads, total, head_dim), dtype=dtype)
    with warnings.catch_warnings():  # frombuffer on immutable bytes: we only read from it
        warnings.simplefilter("ignore", UserWarning)
        for i, blob in enumerate(blobs):
            if _HEADER.unpack_from(blob) != (magic, version, code, n_layers, heads, block_size,
                                             head_dim):
                raise ValueError(f"block {i} has a different shape")
            src = torch.frombuffer(blob, dtype=dtype, count=count, offset=HEADER_SIZE)
            kv[:, :, 0, :, i * block_size:(i + 1) * block_size].copy_(
                src.view(n_layers, 2, heads, block_size, head_dim))
    return DynamicCache([(kv[layer, 0], kv[layer, 1]) for layer in range(n_layers)])


# ------------------------------------------------------------------ page cache

def can_drop_page_cache() -> bool:
    return os.geteuid() == 0 and os.path.exists("/proc/sys/vm/drop_caches")


def drop_page_cache() -> bool:
    """``sync; echo 3 > /proc/sys/vm/drop_caches`` when root; False when not possible."""
    if not can_drop_page_cache():
        return False
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ machine load

def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """Cores' worth of CPU used by *other* processes while a block of code ran (machine
    busy time minus this process's own CPU time, over the wall time): on a shared machine
    it tells which timings were taken beside someone else's work."""

    def __enter__(self) -> OtherLoad:
        self.busy0, self.own0, self.t0 = _busy_seconds(), _own_cpu(), time.perf_counter()
        self.cores = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy1, own1, wall = _busy_seconds(), _own_cpu(), time.perf_counter() - self.t0
        if self.busy0 is None or busy1 is None or wall <= 0:
            return
        self.cores = max(0.0, ((busy1 - self.busy0) - (own1 - self.own0)) / wall)


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------ the measurement

@dataclass
class Result:
    tokens: int
    prefix_tokens: int  # stored in the warehouse (whole blocks)
    hit_tokens: int  # what lookup found
    suffix_tokens: int  # computed on the cached path
    ttft_full: list[float] = field(default_factory=list)
    ttft_cached: list[float] = field(default_factory=list)
    load_s: list[float] = field(default_factory=list)  # lookup + get_blocks + deserialize
    bytes_loaded: int = 0
    max_abs_diff: float = 0.0
    max_logit: float = 0.0
    allclose: bool = False
    same_token: bool = False
    rtol: float = 0.0
    atol: float = 0.0
    page_cache_dropped: bool = False
    other_load: list[float | None] = field(default_factory=list)  # per round, see OtherLoad

    @property
    def full_s(self) -> float:
        return statistics.median(self.ttft_full)

    @property
    def cached_s(self) -> float:
        return statistics.median(self.ttft_cached)

    @property
    def speedup(self) -> float:
        return self.full_s / self.cached_s

    @property
    def best_speedup(self) -> float:
        """Best of each path over the rounds: the least disturbed by other processes."""
        return min(self.ttft_full) / min(self.ttft_cached)

    @property
    def max_other_load(self) -> float | None:
        loads = [x for x in self.other_load if x is not None]
        return max(loads) if loads else None

    @property
    def load_mb_s(self) -> float:
        return self.bytes_loaded / statistics.median(self.load_s) / 1e6


def cached_first_token(wh: TokenWarehouse, tenant: str, mid: str, model: LlamaForCausalLM,
                       ids: list[int], block_size: int
                       ) -> tuple[torch.Tensor, int, int, int, float, float]:
    """The cached path, timed end to end: (logits, token, hit tokens, bytes, load s, total s)."""
    t0 = time.perf_counter()
    try:  # the longest cached prefix, and the chained hashes of its blocks
        hit, hashes = wh.lookup_ex(tenant, mid, ids, block_size)
    except UnknownModel:
        hit, hashes = 0, []
    cache = None
    nbytes = 0
    if hit:
        blobs = wh.get_blocks(tenant, mid, hashes)
        if any(b is None for b in blobs):
            raise RuntimeError("a block found by lookup could not be read")
        nbytes = sum(len(b) for b in blobs)
        cache = deserialize_blocks(blobs)
    t_load = time.perf_counter() - t0
    logits, _ = _forward(model, ids[hit:], cache)
    token = int(torch.argmax(logits))
    return logits, token, hit, nbytes, t_load, time.perf_counter() - t0


def measure(model: LlamaForCausalLM, wh: TokenWarehouse, tenant: str, mid: str, n: int,
            block_size: int, suffix: int, repeat: int = 1, seed: int = 1,
            drop_os_cache: bool = True, log=print) -> Result:
    """Full prefill vs warehouse-loaded prefix for one prompt length.

    ``repeat`` rounds, each a full prefill then a cached run, so that both paths see the
    same machine load; medians are reported. The first round's prefill puts the prefix
    blocks; its logits are the reference every cached run is compared with."""
    ids = random_prompt(n, model.config.vocab_size, seed=seed + n)
    n_blocks = max(0, n - suffix) // block_size
    res = Result(tokens=n, prefix_tokens=n_blocks * block_size, hit_tokens=0,
                 suffix_tokens=n - n_blocks * block_size)
    tol = TOLERANCE[next(model.parameters()).dtype]
    res.rtol, res.atol = tol["rtol"], tol["atol"]
    ref_logits = None
    ref_token = -1
    res.allclose = res.same_token = True
    for r in range(repeat):
        with OtherLoad() as full_load:
            logits, cache, token, secs = prefill(model, ids)
        res.ttft_full.append(secs)
        log(f"  [{n}] full prefill #{r + 1}: {secs:.3f} s")
        if ref_logits is None:
            ref_logits, ref_token = logits, token
            if n_blocks:
                blocks = serialize_blocks(cache, n_blocks, block_size)
                wh.put_blocks(tenant, mid, ids[:n_blocks * block_size], blocks, block_size)
                del blocks
        del cache, logits

        wh.drop_hot()
        res.page_cache_dropped = drop_page_cache() if drop_os_cache else False
        with OtherLoad() as cached_load:
            logits, token, hit, nbytes, t_load, secs = cached_first_token(
                wh, tenant, mid, model, ids, block_size)
        loads = [x.cores for x in (full_load, cached_load) if x.cores is not None]
        res.other_load.append(max(loads) if loads else None)
        res.hit_tokens, res.bytes_loaded = hit, nbytes
        res.ttft_cached.append(secs)
        res.load_s.append(t_load)
        log(f"  [{n}] cached #{r + 1}: {secs:.3f} s (load {t_load:.3f} s, "
            f"{nbytes / 1e6:.1f} MB, {hit} tokens from the warehouse, "
            f"{n - hit} computed)")
        res.max_abs_diff = max(res.max_abs_diff, float((logits - ref_logits).abs().max()))
        res.allclose = res.allclose and bool(torch.allclose(logits, ref_logits, **tol))
        res.same_token = res.same_token and token == ref_token
        other = "" if not loads else (
            f"; other processes used {full_load.cores or 0:.2f} / {cached_load.cores or 0:.2f}"
            " cores during the full / cached run")
        log(f"  [{n}] round #{r + 1}: {res.ttft_full[-1] / secs:.1f}x{other}")
    res.max_logit = float(ref_logits.abs().max())
    return res


def open_warehouse(home: str | Path, tenant: str = "demo") -> tuple[Volume, TokenWarehouse]:
    vol = Volume.open(home, create=True)
    if tenant not in vol.list_tenants():
        vol.create_tenant(tenant)
    return vol, TokenWarehouse(vol)


def close_warehouse(vol: Volume, wh: TokenWarehouse) -> None:
    close = getattr(wh, "close", None)
    if close is not None:
        close()
    vol.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--home", help="store home (default: a temporary folder, removed at the end)")
    p.add_argument("--tokens", default="2048,4096,8192", help="prompt lengths, comma-separated")
    p.add_argument("--block-size", type=int, default=256, help="tokens per KV block")
    p.add_argument("--suffix", type=int, default=64,
                   help="new tokens at the end of the prompt (the new user turn); the cached "
                        "prefix is every full block before them, the rest is computed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--repeat", type=int, default=1, help="runs per size (median reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-drop-caches", action="store_true",
                   help="do not drop the OS page cache before the cached runs")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    sizes = [int(x) for x in a.tokens.split(",") if x.strip()]
    tmp = None
    home = a.home
    if home is None:
        tmp = tempfile.mkdtemp(prefix="lodestore-ttft-")
        home = tmp
    try:
        model = build_model(a.layers, DTYPES[a.dtype], seed=a.seed,
                            max_positions=max(8192, *sizes))
        mid = model_id(model, a.seed)
        warm_up(model)
        vol, wh = open_warehouse(home)
        try:
            for n in sizes:
                r = measure(model, wh, "demo", mid, n, a.block_size, a.suffix, a.repeat,
                            drop_os_cache=not a.no_drop_caches)
                print(f"{n} tokens: TTFT full {r.full_s:.3f} s, cached {r.cached_s:.3f} s "
                      f"({r.hit_tokens} loaded, {r.suffix_tokens} computed) -> "
                      f"{r.speedup:.1f}x; logits allclose(rtol={r.rtol}, atol={r.atol}) "
                      f"{r.allclose}, max |diff| {r.max_abs_diff:.2e} "
                      f"(max |logit| {r.max_logit:.2f}), same first token {r.same_token}")
        finally:
            close_warehouse(vol, wh)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Systematic Reed-Solomon erasure coding with zfec.

A chunk of length L is padded to k·S bytes (S = ceil(L/k)) and split into k data shares;
share i holds chunk bytes [i·S, (i+1)·S). zfec adds m−k parity shares. zfec works column
by column, so the byte range [a, b) of any k shares decodes to the byte range [a, b) of
every data share: a degraded read decodes only the columns it needs. zfec releases the
GIL, so encoding in a thread pool uses every core.
"""

from __future__ import annotations

import threading
from typing import Any

import zfec

_local = threading.local()


def _coder(kind: str, k: int, m: int):
    key = (kind, k, m)
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    coder = cache.get(key)
    if coder is None:
        coder = cache[key] = (zfec.Encoder if kind == "e" else zfec.Decoder)(k, m)
    return coder


def share_len(chunk_len: int, k: int) -> int:
    return max(1, -(-chunk_len // k))


def split(chunk: bytes | memoryview, k: int) -> list[bytes | memoryview]:
    """The k data shares of ``chunk``: views into it, except zero-padded tails."""
    s = share_len(len(chunk), k)
    view = memoryview(chunk)
    shares: list[bytes | memoryview] = []
    for i in range(k):
        part = view[i * s : (i + 1) * s]
        shares.append(part if len(part) == s else bytes(part).ljust(s, b"\0"))
    return shares


def encode(chunk: bytes | memoryview, k: int, m: int) -> list[bytes | memoryview]:
    """All m shares of ``chunk``: k data shares (views) then m−k parity shares."""
    data = split(chunk, k)
    if m == k:
        return data
    parity = _coder("e", k, m).encode(tuple(data), tuple(range(k, m)))
    return data + list(parity)


def decode_columns(pieces: dict[int, Any], k: int, m: int) -> list[Any]:
    """Recover the same column range of all k data shares from any k shares' ranges."""
    if len(pieces) < k:
        raise ValueError(f"need {k} shares to decode, have {len(pieces)}")
    nums = sorted(pieces)[:k]
    if nums == list(range(k)):
        return [pieces[i] for i in nums]
    # zfec wants primary blocks in their own positions where present.
    blocks = tuple(pieces[i] for i in nums)
    # the data shares given come back as given, the rebuilt ones as bytes: no copies
    return list(_coder("d", k, m).decode(blocks, tuple(nums)))

"""Systematic Reed-Solomon erasure coding: zfec's code, computed by ISA-L where present.

A chunk of length L is padded to k·S bytes (S = ceil(L/k)) and split into k data shares;
share i holds chunk bytes [i·S, (i+1)·S). zfec adds m−k parity shares. zfec works column
by column, so the byte range [a, b) of any k shares decodes to the byte range [a, b) of
every data share: a degraded read decodes only the columns it needs. Where ISA-L's SIMD
kernels load (:mod:`storage.isal`) they compute the very same shares 15-25x faster; zfec
does the work otherwise. Both release the GIL, so a thread pool uses every core.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import zfec

from . import isal

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
    kern = isal.kernel()
    if kern is not None and len(data[0]) <= isal.MAX_LENGTH:
        return data + list(kern.dot(k, _parity_rows(k, m), data, len(data[0])))
    parity = _coder("e", k, m).encode(tuple(data), tuple(range(k, m)))
    return data + list(parity)


def decode_columns(pieces: dict[int, Any], k: int, m: int) -> list[Any]:
    """Recover the same column range of all k data shares from any k shares' ranges."""
    if len(pieces) < k:
        raise ValueError(f"need {k} shares to decode, have {len(pieces)}")
    nums = sorted(pieces)[:k]
    if nums == list(range(k)):
        return [pieces[i] for i in nums]
    kern = isal.kernel()
    length = len(pieces[nums[0]])
    if kern is not None and length <= isal.MAX_LENGTH:
        if any(len(pieces[i]) != length for i in nums):
            raise ValueError("shares to decode differ in length")
        lost = [i for i in range(k) if i not in pieces]
        rows = _decode_rows(kern, k, m, tuple(nums), tuple(lost))
        rebuilt = dict(zip(lost, kern.dot(k, rows, [pieces[i] for i in nums], length),
                           strict=True))
        return [pieces[i] if i in pieces else rebuilt[i] for i in range(k)]
    # zfec wants primary blocks in their own positions where present.
    blocks = tuple(pieces[i] for i in nums)
    # the data shares given come back as given, the rebuilt ones as bytes: no copies
    return list(_coder("d", k, m).decode(blocks, tuple(nums)))


@lru_cache(maxsize=64)
def _parity_rows(k: int, m: int) -> bytes:
    return isal.zfec_parity_rows(k, m)


@lru_cache(maxsize=1024)
def _decode_rows(kern: isal.Kernel, k: int, m: int, nums: tuple[int, ...],
                 lost: tuple[int, ...]) -> bytes:
    """Rows of the inverse of the code's rows ``nums``: data share i = row i · shares."""
    inv = kern.invert(isal.code_rows(k, m, nums), k)
    return b"".join(inv[i * k:(i + 1) * k] for i in lost)

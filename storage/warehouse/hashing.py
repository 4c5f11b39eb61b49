"""Chained prefix-block hashes, bit-compatible with vLLM's prefix caching.

vLLM (``vllm/v1/core/kv_cache_utils.py``, ``vllm/utils/hashing.py``) names a full block of
``block_size`` token ids by::

    sha256_cbor(x)  = sha256(cbor2.dumps(x, canonical=True)).digest()
    block_hash[i]   = sha256_cbor((parent, tuple(block_token_ids), extra_keys))
    parent          = block_hash[i - 1], or NONE_HASH for the first block

so a block's hash certifies the whole prefix up to its end, and two prompts share block i
only if they share every token before it. ``extra_keys`` is ``None`` or a tuple (LoRA name,
multimodal ids, cache salt) and is hashed as given.

The root ``NONE_HASH`` is random per process in vLLM unless ``PYTHONHASHSEED`` is set, in
which case it is ``sha256_cbor(os.environ["PYTHONHASHSEED"])`` (the seed *string*). A store
shared across processes needs a fixed root, so the default here is vLLM's root with
``PYTHONHASHSEED=0``: ``sha256_cbor("0")``. Engines that run with another seed pass it
(``root_hash(seed="42")``) or pass the 32 root bytes themselves.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Any

import cbor2

from ..errors import InvalidArgument

HASH_ALGORITHM = "sha256_cbor"
HASH_BYTES = 32
DEFAULT_HASH_SEED = "0"
MAX_TOKEN_ID = (1 << 63) - 1


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 over the canonical CBOR encoding of ``obj``."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def root_hash(seed: str | None = None, root: bytes | None = None) -> bytes:
    """The chain root: ``root`` as given, else vLLM's ``NONE_HASH`` for ``PYTHONHASHSEED=seed``
    (default ``"0"``)."""
    if root is not None:
        if not isinstance(root, bytes | bytearray) or len(root) != HASH_BYTES:
            raise InvalidArgument(f"root hash must be {HASH_BYTES} bytes")
        return bytes(root)
    s = DEFAULT_HASH_SEED if seed is None else seed
    if not isinstance(s, str):
        raise InvalidArgument("hash seed must be a string (the value of PYTHONHASHSEED)")
    return sha256_cbor(s)


NONE_HASH = root_hash()


def hash_block_tokens(parent_block_hash: bytes | None, curr_block_token_ids: Sequence[int],
                      extra_keys: tuple[Any, ...] | None = None, *,
                      none_hash: bytes = NONE_HASH) -> bytes:
    """vLLM's ``hash_block_tokens`` with ``sha256_cbor`` (a falsy parent means the root)."""
    if not parent_block_hash:
        parent_block_hash = none_hash
    return sha256_cbor((parent_block_hash, tuple(curr_block_token_ids), extra_keys))


def check_token_ids(token_ids: Any) -> list[int]:
    """Token ids as a list of non-negative ints, or a clear error.

    Checked in C first (exact int types, then a signed 64-bit array for the range): a prompt's ids are re-sent with every put, so a per-id Python check cost
    more than hashing. Only a list that fails is walked, to name the bad entry."""
    if isinstance(token_ids, str | bytes | bytearray) or not isinstance(token_ids, Sequence):
        raise InvalidArgument("token_ids must be a list of integers")
    out = list(token_ids)
    if set(map(type, out)) <= {int}:  # exactly int: no bools, no numpy scalars
        try:
            arr = array("q", out)
            if not arr or min(arr) >= 0:
                return out
        except OverflowError:
            pass
    for i, t in enumerate(out):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID:
            raise InvalidArgument(
                f"token_ids[{i}] is {t!r}; token ids must be integers from 0 to {MAX_TOKEN_ID}")
    return out


def check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not 1 <= block_size <= 1 << 20:
        raise InvalidArgument(f"block_size must be an integer from 1 to {1 << 20}, "
                              f"got {block_size!r}")
    return block_size


def block_hashes(token_ids: Sequence[int], block_size: int,
                 extra_keys: Sequence[tuple[Any, ...] | None] | None = None, *,
                 none_hash: bytes = NONE_HASH, limit: int | None = None,
                 parent: bytes | None = None) -> list[bytes]:
    """Hashes of the full blocks of ``token_ids`` (a trailing partial block has none).

    ``extra_keys``: one entry (``None`` or a tuple) per full block, as vLLM's
    ``generate_block_hash_extra_keys`` yields them; ``None`` means no extra keys anywhere.
    ``limit``: hash at most this many blocks (lookups stop early this way).
    ``parent``: the hash of the block before ``token_ids`` (None: they start the chain).
    """
    check_block_size(block_size)
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    if extra_keys is not None:
        extra_keys = list(extra_keys)
        if len(extra_keys) < n:
            raise InvalidArgument(f"extra_keys has {len(extra_keys)} entries but there are {n} "
                                  "full blocks; give one entry (null or a list) per block")
    out: list[bytes] = []
    for i in range(n):
        ek = extra_keys[i] if extra_keys is not None else None
        if ek is not None and not isinstance(ek, tuple):
            ek = tuple(ek) if isinstance(ek, list) else ek
        parent = hash_block_tokens(parent, token_ids[i * block_size:(i + 1) * block_size], ek,
                                   none_hash=none_hash)
        out.append(parent)
    return out


__all__ = ["DEFAULT_HASH_SEED", "HASH_ALGORITHM", "HASH_BYTES", "NONE_HASH", "block_hashes",
           "check_block_size", "check_token_ids", "hash_block_tokens", "root_hash",
           "sha256_cbor"]

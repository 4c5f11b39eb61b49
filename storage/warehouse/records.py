"""What the token warehouse names and returns: its errors, model and block records, and
the checks on what callers hand it (model ids, block hashes, block bytes, object keys)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgument, NotFound
from .hashing import HASH_BYTES

MAX_MODEL_ID = 512
MAX_BLOCK_BYTES = 256 << 20
MAX_KEY_CHARS = 1024


class UnknownModel(NotFound):
    code = "unknown_model"

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(
            f"unknown model {model!r} in the token warehouse; register it (with its "
            "block_size) or put blocks for it first")


class ModelMismatch(InvalidArgument):
    """The call disagrees with the model's manifest (block size, block bytes, root)."""

    code = "kv_model_mismatch"


class BadBlock(InvalidArgument):
    """A block that is empty, truncated, oversized or not bytes."""

    code = "kv_bad_block"


class HashMismatch(InvalidArgument):
    """A given block hash is not the hash of the given token ids."""

    code = "kv_hash_mismatch"


@dataclass(frozen=True)
class ModelInfo:
    model: str
    dir: str
    block_size: int | None  # None until token blocks are put (keyed objects need none)
    block_bytes: int | None  # bytes of one full block; None until known
    dtype: str | None
    root: bytes  # the chain root (vLLM's NONE_HASH)
    hash_algorithm: str
    created: float
    version: int = 0  # the manifest file's version

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dir": self.dir, "block_size": self.block_size,
                "block_bytes": self.block_bytes, "dtype": self.dtype,
                "root": self.root.hex(), "hash_algorithm": self.hash_algorithm,
                "created": self.created}


@dataclass(frozen=True)
class BlockInfo:
    hash: bytes
    size: int
    position: int | None  # index in its chain: it covers (position + 1) * block_size tokens
    expires: float | None
    mtime: float

    def as_dict(self) -> dict[str, Any]:
        return {"hash": self.hash.hex(), "size": self.size, "position": self.position,
                "expires": self.expires, "mtime": self.mtime}


@dataclass(frozen=True)
class PutResult:
    hashes: list[bytes]
    written: int  # blocks stored by this call (the rest were already there)
    bytes_written: int


def check_model_id(model: Any) -> str:
    if not isinstance(model, str) or not 1 <= len(model) <= MAX_MODEL_ID:
        raise InvalidArgument(f"model id must be a string of 1-{MAX_MODEL_ID} characters, "
                              f"e.g. 'HuggingFaceTB/SmolLM2-135M'")
    if not model.isprintable():
        raise InvalidArgument(f"model id {model[:60]!r} contains control characters")
    return model


def model_dir(model: str) -> str:
    """A safe, unique folder name for a model id: slug plus 16 hex digits of its SHA-256."""
    check_model_id(model)
    slug = re.sub(r"[^a-z0-9._-]+", "-", model.lower()).strip("-._")[:48].strip("-._")
    return f"{slug or 'model'}-{hashlib.sha256(model.encode()).hexdigest()[:16]}"


def parse_hash(h: Any, what: str = "hash") -> bytes:
    """A block hash given as 32 bytes or 64 hex digits."""
    if isinstance(h, bytes | bytearray | memoryview) and len(h) == HASH_BYTES:
        return bytes(h)
    if isinstance(h, str) and len(h) == 2 * HASH_BYTES:
        try:
            return bytes.fromhex(h)
        except ValueError:
            pass
    raise InvalidArgument(f"{what} must be {HASH_BYTES} bytes or {2 * HASH_BYTES} hex digits, "
                          f"got {str(h)[:80]!r}")


def _check_key(key: Any) -> str:
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_CHARS or not key.isprintable():
        raise InvalidArgument(f"object key must be 1-{MAX_KEY_CHARS} printable characters")
    return key


def _as_block(b: Any, i: int) -> bytes | memoryview:
    if not isinstance(b, bytes | bytearray | memoryview):
        raise BadBlock(f"block {i} is {type(b).__name__}, not bytes; send raw block bytes")
    if len(b) == 0:
        raise BadBlock(f"block {i} is empty; a block holds the KV tensors of its tokens")
    if len(b) > MAX_BLOCK_BYTES:
        raise BadBlock(f"block {i} is {len(b):,} bytes, over the {MAX_BLOCK_BYTES:,}-byte limit")
    return b

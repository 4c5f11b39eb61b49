"""The token warehouse: LLM KV-cache blocks keyed by model and a chained hash of the
token-id prefix (bit-compatible with vLLM's prefix-block hashes), stored in the chunk
store behind an in-memory hot tier."""

from .hashing import (
    DEFAULT_HASH_SEED,
    HASH_ALGORITHM,
    NONE_HASH,
    block_hashes,
    hash_block_tokens,
    root_hash,
    sha256_cbor,
)
from .records import (
    BadBlock,
    BlockInfo,
    HashMismatch,
    ModelInfo,
    ModelMismatch,
    PutResult,
    UnknownModel,
    model_dir,
    parse_hash,
)
from .store import KV_ROOT, TokenWarehouse

__all__ = [
    "DEFAULT_HASH_SEED", "HASH_ALGORITHM", "KV_ROOT", "NONE_HASH", "BadBlock", "BlockInfo",
    "HashMismatch", "ModelInfo", "ModelMismatch", "PutResult", "TokenWarehouse",
    "UnknownModel", "block_hashes", "hash_block_tokens", "model_dir", "parse_hash",
    "root_hash", "sha256_cbor",
]

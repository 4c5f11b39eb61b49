"""Fragment format: one erasure-coded share of one chunk, self-describing and checksummed.

Layout::

    header (64 bytes)                       magic, format, k, m, index, block size,
                                            chunk length, share length, chunk id, xxh32
    block 0 data  | xxh3_64(block 0)        blocks of ``block_size`` share bytes, each
    block 1 data  | xxh3_64(block 1)        followed by its own 8-byte checksum
    ...

Per-block checksums let a small ranged read verify exactly the bytes it fetched in one
``pread`` (no separate header or table read). The checksum seed mixes in the chunk id,
share index and block number, so a fragment that is misplaced, stale or spliced from
another chunk fails verification like a flipped bit does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import xxhash

from .errors import CorruptFragment

MAGIC = b"LSF1"
FORMAT_VERSION = 2  # 2: big-endian xxh3 digests
_HEAD = struct.Struct("<4sBBBBIQQ32s")  # 60 bytes, then xxh32 of them
HEADER_SIZE = 64
CSUM = 8
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class FragmentHeader:
    k: int
    m: int
    index: int
    block_size: int
    chunk_len: int
    share_len: int
    cid: bytes

    def pack(self) -> bytes:
        head = _HEAD.pack(
            MAGIC, FORMAT_VERSION, self.k, self.m, self.index, self.block_size,
            self.chunk_len, self.share_len, self.cid,
        )
        return head + struct.pack("<I", xxhash.xxh32_intdigest(head))

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> FragmentHeader:
        if len(raw) < HEADER_SIZE:
            raise CorruptFragment("fragment shorter than its header")
        head = bytes(raw[:60])
        (want,) = struct.unpack_from("<I", raw, 60)
        if xxhash.xxh32_intdigest(head) != want:
            raise CorruptFragment("fragment header checksum mismatch")
        magic, ver, k, m, index, bs, clen, slen, cid = _HEAD.unpack(head)
        if magic != MAGIC or ver != FORMAT_VERSION:
            raise CorruptFragment(f"not a fragment (magic {magic!r}, format {ver})")
        return cls(k, m, index, bs, clen, slen, cid)

    def stored_size(self) -> int:
        return fragment_size(self.share_len, self.block_size)


def fragment_size(share_len: int, block_size: int) -> int:
    nblocks = -(-share_len // block_size)
    return HEADER_SIZE + share_len + nblocks * CSUM


def _seed(cid: bytes, index: int, block: int) -> int:
    return _seed_base(cid, index) ^ block


def _seed_base(cid: bytes, index: int) -> int:
    return (int.from_bytes(cid[:8], "little") ^ (index << 56)) & _MASK64


def encode(header: FragmentHeader, share: bytes | memoryview) -> bytearray:
    """Serialise one share into its stored form."""
    bs = header.block_size
    view = memoryview(share)
    out = bytearray(header.stored_size())
    out[:HEADER_SIZE] = header.pack()
    pos = HEADER_SIZE
    digest = xxhash.xxh3_64_digest
    base = _seed_base(header.cid, header.index)
    for j, off in enumerate(range(0, len(view), bs)):
        block = view[off : off + bs]
        end = pos + len(block)
        out[pos:end] = block
        out[end : end + CSUM] = digest(block, base ^ j)
        pos = end + CSUM
    return out


def block_span(share_start: int, share_end: int, block_size: int) -> tuple[int, int, int]:
    """Blocks covering share bytes [start, end): (first block, stored offset, stored length)."""
    first = share_start // block_size
    last = (max(share_end, share_start + 1) - 1) // block_size
    offset = HEADER_SIZE + first * (block_size + CSUM)
    length = (last - first + 1) * (block_size + CSUM)
    return first, offset, length


def verify_blocks(
    raw: bytes | memoryview, first_block: int, cid: bytes, index: int, block_size: int,
    share_len: int, as_parts: bool = False,
) -> Any:
    """Check the stored blocks in ``raw`` (starting at block ``first_block``), return data.

    Raises CorruptFragment on any mismatch or truncation.
    """
    view = memoryview(raw)
    size = len(view)
    digest = xxhash.xxh3_64_digest
    base = _seed_base(cid, index)
    step = block_size + CSUM
    nblocks = -(-size // step)
    last = first_block + nblocks - 1
    if last * block_size >= share_len:
        raise CorruptFragment("fragment has bytes past its share length")
    tail = min(block_size, share_len - last * block_size)  # data bytes in the last block
    if size != (nblocks - 1) * step + tail + CSUM:
        raise CorruptFragment("fragment is truncated")
    parts = []
    pos = 0
    for j in range(first_block, last + 1):
        end = pos + (block_size if j < last else tail)
        block = view[pos:end]
        if digest(block, base ^ j) != view[end : end + CSUM]:
            raise CorruptFragment(f"checksum mismatch in block {j} of share {index}")
        parts.append(block)
        pos = end + CSUM
    return parts if as_parts else b"".join(parts)


def read_range(
    fetch, header_cid: bytes, index: int, block_size: int, share_len: int, start: int, end: int
) -> bytes:
    """Read share bytes [start, end) through ``fetch(offset, length)`` and verify them."""
    return b"".join(read_range_parts(fetch, header_cid, index, block_size, share_len,
                                     start, end))


def read_range_parts(
    fetch, header_cid: bytes, index: int, block_size: int, share_len: int, start: int, end: int
) -> list[memoryview]:
    """Like ``read_range`` but as views into the fetched buffer, so a caller assembling
    many shares copies the data once."""
    end = min(end, share_len)
    if start >= end:
        return []
    first, off, length = block_span(start, end, block_size)
    raw = fetch(off, length)
    parts = verify_blocks(raw, first, header_cid, index, block_size, share_len, as_parts=True)
    lo = start - first * block_size
    need = end - start
    if sum(len(p) for p in parts) < lo + need:
        raise CorruptFragment("fragment is truncated")
    if lo:
        parts[0] = parts[0][lo:]
    extra = sum(len(p) for p in parts) - need
    if extra:
        parts[-1] = parts[-1][: len(parts[-1]) - extra]
    return parts


def decode_whole(raw: bytes | memoryview, cid: bytes, index: int) -> tuple[FragmentHeader, bytes]:
    """Parse and verify a whole stored fragment."""
    header = FragmentHeader.unpack(raw)
    if header.cid != cid or header.index != index:
        raise CorruptFragment("fragment header names another chunk or share")
    if len(raw) != header.stored_size():
        raise CorruptFragment(
            f"fragment is {len(raw)} bytes, header says {header.stored_size()}"
        )
    data = verify_blocks(
        memoryview(raw)[HEADER_SIZE:], 0, cid, index, header.block_size, header.share_len
    )
    return header, data

"""Fragment format: one erasure-coded share of one chunk, self-describing and checksummed.

Layout 3 (written today)::

    header (80 bytes)      magic, format, k, m, index, block size, chunk length,
                           share length, chunk id, xxh3 of the tables, xxh32 of the header
    block table            xxh3_64 of every ``block_size`` block of the share
    segment table          xxh3_64 of every 256 KiB segment (a run of whole blocks)
    zero padding           to a 4 KiB boundary, for shares of 256 KiB or more
    data                   the share, contiguous

A small ranged read verifies only the blocks it fetched, against the block table; a large
read verifies whole segments with one hash call per 256 KiB. Both need the tables, which a
reader fetches once per fragment and caches (fragments are content-addressed and never
change, so a cached table stays right). Keeping the data contiguous lets a big read land
in one ``pread`` with no per-block slicing and joining: that per-block Python work made
big reads GIL-bound in layout 2.

Layout 2 (read for stores written before it)::

    header (64 bytes) | block 0 | xxh3(block 0) | block 1 | xxh3(block 1) | ...

Checksum seeds mix in the chunk id, share index and block (or segment) number, so a
fragment that is misplaced, stale or spliced from another chunk fails verification like a
flipped bit does.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import xxhash

from .errors import CorruptFragment

MAGIC = b"LSF1"
FORMAT_VERSION = 3  # the layout new fragments are written in
LAYOUTS = (2, 3)
_HEAD2 = struct.Struct("<4sBBBBIQQ32s")  # 60 bytes, then xxh32 of them
_HEAD3 = struct.Struct("<4sBBBBIQQ32sQ")  # 68 bytes, then xxh32, then 8 reserved
HEADER_SIZE = 64  # layout 2
HEADER3_SIZE = 80
CSUM = 8
SEGMENT = 256 * 1024  # bytes one segment checksum covers (whole blocks; at least one)
PAGE = 4096
ALIGN_FROM = 256 * 1024  # shares at least this long start their data on a page boundary
_SEG_TAG = 1 << 48  # keeps segment seeds apart from block seeds
_MASK64 = (1 << 64) - 1

Fetch = Callable[[int, int], bytes]


@dataclass(frozen=True)
class FragmentHeader:
    k: int
    m: int
    index: int
    block_size: int
    chunk_len: int
    share_len: int
    cid: bytes
    layout: int = FORMAT_VERSION
    tables_hash: int = 0  # layout 3: xxh3 of the block and segment tables

    def pack(self) -> bytes:
        if self.layout == 2:
            head = _HEAD2.pack(MAGIC, 2, self.k, self.m, self.index, self.block_size,
                               self.chunk_len, self.share_len, self.cid)
            return head + struct.pack("<I", xxhash.xxh32_intdigest(head))
        head = _HEAD3.pack(MAGIC, 3, self.k, self.m, self.index, self.block_size,
                           self.chunk_len, self.share_len, self.cid, self.tables_hash)
        return head + struct.pack("<I", xxhash.xxh32_intdigest(head)) + bytes(8)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> FragmentHeader:
        if len(raw) < 5:
            raise CorruptFragment("fragment shorter than its header")
        ver = raw[4]
        st, size = (_HEAD2, HEADER_SIZE) if ver == 2 else (_HEAD3, HEADER3_SIZE)
        if len(raw) < size:
            raise CorruptFragment("fragment shorter than its header")
        head = bytes(raw[: st.size])
        (want,) = struct.unpack_from("<I", raw, st.size)
        if xxhash.xxh32_intdigest(head) != want or any(raw[st.size + 4:size]):
            raise CorruptFragment("fragment header checksum mismatch")
        fields = st.unpack(head)
        magic, ver, k, m, index, bs, clen, slen, cid = fields[:9]
        if magic != MAGIC or ver not in LAYOUTS:
            raise CorruptFragment(f"not a fragment (magic {magic!r}, format {ver})")
        return cls(k, m, index, bs, clen, slen, cid, ver, fields[9] if ver == 3 else 0)

    @property
    def header_size(self) -> int:
        return HEADER_SIZE if self.layout == 2 else HEADER3_SIZE

    def stored_size(self) -> int:
        return fragment_size(self.share_len, self.block_size, self.layout)


# -- geometry ---------------------------------------------------------------------------

def _nblocks(share_len: int, block_size: int) -> int:
    return -(-share_len // block_size)


def segment_blocks(block_size: int) -> int:
    return max(1, SEGMENT // block_size)


def data_offset(share_len: int, block_size: int) -> int:
    """Where a layout-3 fragment's data starts: after the header and both tables, padded
    to a page boundary for shares of 256 KiB or more, so that a block read is one page
    of I/O, not two (the padding costs under 1.6% there)."""
    nb = _nblocks(share_len, block_size)
    off = HEADER3_SIZE + CSUM * (nb + -(-nb // segment_blocks(block_size)))
    return -(-off // PAGE) * PAGE if share_len >= ALIGN_FROM else off


def fragment_size(share_len: int, block_size: int, layout: int = FORMAT_VERSION) -> int:
    if layout == 2:
        return HEADER_SIZE + share_len + _nblocks(share_len, block_size) * CSUM
    return data_offset(share_len, block_size) + share_len


def seed_base(cid: bytes, index: int) -> int:
    """The xxh3 seed of share ``index`` of chunk ``cid`` (its first 8 bytes suffice)."""
    return (int.from_bytes(cid[:8], "little") ^ (index << 56)) & _MASK64


# -- writing ----------------------------------------------------------------------------

def encode_parts(header: FragmentHeader, share: bytes | memoryview) -> list[Any]:
    """The stored form of one share as parts to write one after the other: for layout 3
    the header and tables, then the share itself (no copy of the data)."""
    if header.layout == 2:
        return [_encode2(header, share)]
    bs = header.block_size
    view = memoryview(share)
    n = len(view)
    digest = xxhash.xxh3_64_digest
    base = seed_base(header.cid, header.index)
    blocks = b"".join([digest(view[o:o + bs], base ^ j)
                       for j, o in enumerate(range(0, n, bs))])
    seg = segment_blocks(bs) * bs
    segs = b"".join([digest(view[o:o + seg], base ^ _SEG_TAG ^ s)
                     for s, o in enumerate(range(0, n, seg))])
    pad = data_offset(n, bs) - HEADER3_SIZE - len(blocks) - len(segs)
    tables = blocks + segs + bytes(pad)  # the hash covers the padding too
    head = FragmentHeader(header.k, header.m, header.index, bs, header.chunk_len,
                          header.share_len, header.cid, 3, xxhash.xxh3_64_intdigest(tables))
    return [head.pack() + tables, view]


def encode(header: FragmentHeader, share: bytes | memoryview) -> bytes:
    """Serialise one share into its stored form (one buffer)."""
    return b"".join(encode_parts(header, share))


def _encode2(header: FragmentHeader, share: bytes | memoryview) -> bytearray:
    bs = header.block_size
    view = memoryview(share)
    out = bytearray(header.stored_size())
    out[:HEADER_SIZE] = header.pack()
    pos = HEADER_SIZE
    digest = xxhash.xxh3_64_digest
    base = seed_base(header.cid, header.index)
    for j, off in enumerate(range(0, len(view), bs)):
        block = view[off : off + bs]
        end = pos + len(block)
        out[pos:end] = block
        out[end : end + CSUM] = digest(block, base ^ j)
        pos = end + CSUM
    return out


# -- layout 3 reads -----------------------------------------------------------------------

@dataclass(frozen=True)
class Tables:
    """A layout-3 fragment's checksum tables, parsed and checked against its header."""

    blocks: bytes
    segments: bytes
    data_off: int

    @classmethod
    def parse(cls, raw: bytes | memoryview, cid: bytes, index: int, block_size: int,
              share_len: int) -> Tables:
        """From the first ``data_offset`` bytes of a fragment (header and tables)."""
        h = FragmentHeader.unpack(raw)
        if h.layout != 3:
            raise CorruptFragment(f"fragment is in layout {h.layout}, its record says 3")
        if (h.cid, h.index, h.block_size, h.share_len) != (cid, index, block_size, share_len):
            raise CorruptFragment("fragment header names another chunk, share or geometry")
        off = data_offset(share_len, block_size)
        if len(raw) < off:
            raise CorruptFragment("fragment is truncated in its checksum tables")
        tables = bytes(raw[HEADER3_SIZE:off])
        if xxhash.xxh3_64_intdigest(tables) != h.tables_hash:
            raise CorruptFragment("fragment checksum tables are damaged")
        nb = _nblocks(share_len, block_size)
        ns = -(-nb // segment_blocks(block_size))
        return cls(tables[: nb * CSUM], tables[nb * CSUM:(nb + ns) * CSUM], off)


def verify3(data: bytes | memoryview, first: int, tables: Tables, cid: bytes, index: int,
            block_size: int, share_len: int) -> None:
    """Check share bytes ``data`` that start at block ``first``: whole segments with one
    hash each, blocks at the edges one by one. Raises CorruptFragment."""
    view = memoryview(data)
    bs = block_size
    sb = segment_blocks(bs)
    nb = _nblocks(share_len, bs)
    digest = xxhash.xxh3_64_digest
    base = seed_base(cid, index)
    blocks, segs = tables.blocks, tables.segments
    end_block = first + -(-len(view) // bs)
    if first * bs + len(view) > share_len or end_block > nb:
        raise CorruptFragment("fragment has bytes past its share length")
    j, pos, n = first, 0, len(view)
    while pos < n:
        if j % sb == 0:
            seg_end = min(j + sb, nb)
            size = min(seg_end * bs, share_len) - j * bs
            if pos + size <= n:
                s = j // sb
                if digest(view[pos:pos + size], base ^ _SEG_TAG ^ s) != segs[s * 8:s * 8 + 8]:
                    raise CorruptFragment(f"checksum mismatch in segment {s} of share {index}")
                j, pos = seg_end, pos + size
                continue
        size = min(bs, share_len - j * bs)
        if pos + size > n:
            raise CorruptFragment("fragment is truncated")
        if digest(view[pos:pos + size], base ^ j) != blocks[j * 8:j * 8 + 8]:
            raise CorruptFragment(f"checksum mismatch in block {j} of share {index}")
        j, pos = j + 1, pos + size


ONE_SHOT = 256 * 1024  # read header and tables with the data when the data starts this near


def read_range3(
    fetch: Fetch, cid: bytes, index: int, block_size: int, share_len: int, start: int,
    end: int, tables: Tables | None, keep: Callable[[Tables], None] | None = None,
) -> memoryview:
    """Share bytes [start, end) of a layout-3 fragment, verified. ``tables`` are the
    fragment's cached tables, if any; freshly read ones are handed to ``keep``."""
    end = min(end, share_len)
    if start >= end:
        return memoryview(b"")
    bs = block_size
    first = start // bs
    lo, hi = first * bs, min(-(-end // bs) * bs, share_len)
    if tables is None:
        doff = data_offset(share_len, bs)
        if lo <= ONE_SHOT:
            raw = memoryview(fetch(0, doff + hi))
            tables = Tables.parse(raw, cid, index, bs, share_len)
            data = raw[doff + lo:]
        else:
            tables = Tables.parse(fetch(0, doff), cid, index, bs, share_len)
            data = memoryview(fetch(doff + lo, hi - lo))
        if keep is not None:
            keep(tables)
    else:
        data = memoryview(fetch(tables.data_off + lo, hi - lo))
    if len(data) != hi - lo:
        raise CorruptFragment("fragment is truncated")
    verify3(data, first, tables, cid, index, bs, share_len)
    return data[start - lo:end - lo]


FetchInto = Callable[[int, list[memoryview]], int]


def aligned3(start: int, end: int, block_size: int, share_len: int) -> bool:
    """Can ``read_range3_into`` read share bytes [start, end) straight into a buffer of
    their size? (Both edges on block boundaries, or the end at the share's end.)"""
    return start % block_size == 0 and (end % block_size == 0 or end >= share_len)


def read_range3_into(
    fetch: Fetch, fetch_into: FetchInto, cid: bytes, index: int, block_size: int,
    share_len: int, start: int, end: int, out: memoryview, tables: Tables | None,
    keep: Callable[[Tables], None] | None = None,
) -> None:
    """``read_range3`` into ``out`` (``end - start`` bytes, ``aligned3`` edges): the
    kernel copies the data into place and nothing copies it again. Raises
    CorruptFragment (``out`` then holds garbage: the caller reads around it)."""
    end = min(end, share_len)
    if len(out) != end - start or not aligned3(start, end, block_size, share_len):
        raise ValueError("read_range3_into needs a buffer of the range's size, block-aligned")
    if start >= end:
        return
    bs = block_size
    if tables is None:
        doff = data_offset(share_len, bs)
        if start <= ONE_SHOT:  # header, tables and the data in one read
            head = bytearray(doff + start)
            got = fetch_into(0, [memoryview(head), out]) - len(head)
            tables = Tables.parse(memoryview(head), cid, index, bs, share_len)
        else:
            tables = Tables.parse(fetch(0, doff), cid, index, bs, share_len)
            got = fetch_into(doff + start, [out])
        if keep is not None:
            keep(tables)
    else:
        got = fetch_into(tables.data_off + start, [out])
    if got != len(out):
        raise CorruptFragment("fragment is truncated")
    verify3(out, start // bs, tables, cid, index, bs, share_len)


# -- layout 2 reads ---------------------------------------------------------------------

def block_span(share_start: int, share_end: int, block_size: int) -> tuple[int, int, int]:
    """Layout 2: blocks covering share bytes [start, end): (first block, stored offset,
    stored length)."""
    first = share_start // block_size
    last = (max(share_end, share_start + 1) - 1) // block_size
    offset = HEADER_SIZE + first * (block_size + CSUM)
    length = (last - first + 1) * (block_size + CSUM)
    return first, offset, length


def verify_blocks(
    raw: bytes | memoryview, first_block: int, cid: bytes, index: int, block_size: int,
    share_len: int, as_parts: bool = False,
) -> Any:
    """Layout 2: check the stored blocks in ``raw`` (from block ``first_block``), return
    the data. Raises CorruptFragment on any mismatch or truncation."""
    view = memoryview(raw)
    size = len(view)
    digest = xxhash.xxh3_64_digest
    base = seed_base(cid, index)
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


def read_range2(
    fetch: Fetch, cid: bytes, index: int, block_size: int, share_len: int, start: int,
    end: int,
) -> list[memoryview]:
    """Layout 2: share bytes [start, end) as views into the fetched buffer."""
    end = min(end, share_len)
    if start >= end:
        return []
    first, off, length = block_span(start, end, block_size)
    raw = fetch(off, length)
    parts = verify_blocks(raw, first, cid, index, block_size, share_len, as_parts=True)
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


# -- whole fragments (scrub) --------------------------------------------------------------

def decode_whole(raw: bytes | memoryview, cid: bytes, index: int) -> tuple[FragmentHeader, bytes]:
    """Parse and verify a whole stored fragment, either layout: every block and, for
    layout 3, every segment checksum too (reads rely on both)."""
    header = FragmentHeader.unpack(raw)
    if header.cid != cid or header.index != index:
        raise CorruptFragment("fragment header names another chunk or share")
    if len(raw) != header.stored_size():
        raise CorruptFragment(
            f"fragment is {len(raw)} bytes, header says {header.stored_size()}"
        )
    bs, slen = header.block_size, header.share_len
    if header.layout == 2:
        return header, verify_blocks(memoryview(raw)[HEADER_SIZE:], 0, cid, index, bs, slen)
    tables = Tables.parse(raw, cid, index, bs, slen)
    data = memoryview(raw)[tables.data_off:]
    verify3(data, 0, tables, cid, index, bs, slen)  # segments
    only_blocks = Tables(tables.blocks, b"", tables.data_off)
    _verify_each_block(data, only_blocks, cid, index, bs, slen)
    return header, bytes(data)


def _verify_each_block(data: memoryview, tables: Tables, cid: bytes, index: int, bs: int,
                       share_len: int) -> None:
    digest = xxhash.xxh3_64_digest
    base = seed_base(cid, index)
    for j, off in enumerate(range(0, share_len, bs)):
        if digest(data[off:off + bs], base ^ j) != tables.blocks[j * 8:j * 8 + 8]:
            raise CorruptFragment(f"checksum mismatch in block {j} of share {index}")

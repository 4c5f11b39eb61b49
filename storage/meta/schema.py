"""Metadata tables. Every physical engine holds the same tables; rows carry their
virtual shard so whole shards can move between engines."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
)

meta = MetaData()

# Names sort byte-wise on every engine, so listings page in the same stable order.
NameType = Text().with_variant(Text(collation="C"), "postgresql")

# One row per directory entry (file or directory), keyed by (tenant, parent inode, name).
# Directories are rows too; their children live under their inode, so renaming a
# directory moves one row, never its subtree.
entries = Table(
    "entries",
    meta,
    Column("tenant", String(63), primary_key=True),
    Column("parent", BigInteger, primary_key=True, autoincrement=False),
    Column("name", NameType, primary_key=True),
    Column("vshard", Integer, nullable=False),
    Column("ino", BigInteger, nullable=False),
    Column("kind", String(1), nullable=False),  # 'f' file, 'd' directory
    Column("version", BigInteger, nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("ctime", Float, nullable=False),
    Column("mtime", Float, nullable=False),
    Column("data", LargeBinary, nullable=True),  # inline content of small files
    Column("chunks", LargeBinary, nullable=True),  # packed (chunk id, length) list
    Column("attrs", Text, nullable=True),  # JSON owned by upper layers (labels, spans)
    # Cross-engine moves: 0 = visible, 1 = new row pending, 2 = replacement pending.
    Column("state", SmallInteger, nullable=False, default=0),
    Column("intent", String(80), nullable=True),
    Column("pending", LargeBinary, nullable=True),
)

# Chunk registry: where each chunk's shares live. Keyed by (tenant, chunk id).
chunks = Table(
    "chunks",
    meta,
    Column("tenant", String(63), primary_key=True),
    Column("cid", String(64), primary_key=True),
    Column("vshard", Integer, nullable=False),
    Column("length", BigInteger, nullable=False),
    Column("k", SmallInteger, nullable=False),
    Column("m", SmallInteger, nullable=False),
    Column("share_len", BigInteger, nullable=False),
    Column("block_size", Integer, nullable=False),
    Column("placement", Text, nullable=False),  # target id per share, comma-separated
    Column("created", Float, nullable=False),
    Column("touched", Float, nullable=False),
    # fragment layout (see storage/fragment.py); rows from before the column are layout 2
    Column("layout", SmallInteger, nullable=False, server_default="2"),
)

# Commit records of cross-engine moves, kept in the source engine.
intents = Table(
    "intents",
    meta,
    Column("id", String(80), primary_key=True),
    Column("tenant", String(63), nullable=False),
    Column("state", String(10), nullable=False),  # 'committed' | 'aborted'
    Column("created", Float, nullable=False),
)

# Directories unlinked by a recursive delete whose children are still to be removed.
trash = Table(
    "trash",
    meta,
    Column("tenant", String(63), primary_key=True),
    Column("ino", BigInteger, primary_key=True, autoincrement=False),
    Column("vshard", Integer, nullable=False),
    Column("created", Float, nullable=False),
)

control = MetaData()

tenants = Table(
    "tenants",
    control,
    Column("id", String(63), primary_key=True),
    Column("chunk_key", LargeBinary, nullable=False),
    Column("created", Float, nullable=False),
)

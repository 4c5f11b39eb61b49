"""Metadata: namespace entries and the chunk registry over virtual shards on SQL engines."""

from .store import ROOT_INO, ChunkRecord, ConcurrentChange, Entry, MetaStore, new_ino

__all__ = ["ROOT_INO", "ChunkRecord", "ConcurrentChange", "Entry", "MetaStore", "new_ino"]

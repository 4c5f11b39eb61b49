"""One hyperscan pass over the text that says where each recognizer regex could match.

Why: hyperscan scans for all patterns at once at memory speed; presidio's own regexes
(with lookarounds, backreferences and Unicode classes hyperscan lacks) then run only
around these candidates. Expressions come from `regex_plan`; they match a superset of
match prefixes, so no candidate is lost.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import hyperscan
import platformdirs
import regex

from .regex_plan import NONWORD_PLACEHOLDER, WORD_PLACEHOLDER

_WORD = chr(WORD_PLACEHOLDER)
_NONWORD = chr(NONWORD_PLACEHOLDER)
_ERRORS = "lodestore-prefilter"
_state = threading.local()
# Non-ASCII characters that `re`/`regex` match case-insensitively against ASCII letters
# (found by testing every code point of planes 0-2); mapping them to those letters keeps
# case-insensitive expressions a superset without widening every letter.
FOLDS = {"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"}
_char_map: dict[str, str] = dict(FOLDS)


def _classify(ch: str) -> str | None:
    """Placeholder preserving word-boundary semantics, or None when `re`/`regex` disagree."""
    a = re.match(r"\w", ch) is not None
    b = regex.match(r"\w", ch) is not None
    if a != b:
        return None
    return _WORD if a else _NONWORD


def _handler(err: UnicodeError) -> tuple[str, int]:
    assert isinstance(err, UnicodeEncodeError)
    out = []
    for ch in err.object[err.start : err.end]:
        mapped = _char_map.get(ch)
        if mapped is None:
            cls = _classify(ch)
            if cls is None:
                _state.ambiguous = True
                cls = _NONWORD
            else:
                _char_map[ch] = cls
            mapped = cls
        out.append(mapped)
    return "".join(out), err.end


codecs.register_error(_ERRORS, _handler)


def to_scan_bytes(text: str) -> tuple[bytes, bool]:
    """One byte per character; returns (bytes, word boundaries are reliable)."""
    if text.isascii():
        return text.encode("ascii"), True
    _state.ambiguous = False
    data = text.encode("ascii", _ERRORS)
    return data, not _state.ambiguous


def _cache_dir() -> Path:
    env = os.environ.get("LODESTORE_CLASSIFY_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("lodestore")) / "hyperscan"


class Prefilter:
    """Two compiled databases: with word boundaries (usual) and without (fallback)."""

    def __init__(self, ascii_exprs: Sequence[bytes], nob_exprs: Sequence[bytes]) -> None:
        self.size = len(ascii_exprs)
        dbs = [self._compile(ascii_exprs), self._compile(nob_exprs)]
        # a loaded database has no scratch space of its own
        self._dbs = [(db, hyperscan.Scratch(db) if db is not None else None) for db in dbs]

    @staticmethod
    def _compile(exprs: Sequence[bytes]) -> hyperscan.Database | None:
        """Compile, or load what an earlier process compiled (compiling takes seconds)."""
        if not exprs:
            return None
        key = hashlib.sha256(b"\0".join([hyperscan.__version__.encode(), *exprs])).hexdigest()
        path = _cache_dir() / f"{key[:32]}.hsdb"
        try:
            return hyperscan.loadb(path.read_bytes(), mode=hyperscan.HS_MODE_BLOCK)
        except (OSError, hyperscan.error, TypeError):
            pass
        db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        db.compile(
            expressions=list(exprs),
            ids=list(range(len(exprs))),
            elements=len(exprs),
            flags=[0] * len(exprs),
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(hyperscan.dumpb(db))
            tmp.replace(path)
        except OSError:
            pass  # a cache is an optimisation
        return db

    def scan(self, text: str, lo: int, hi: int) -> dict[int, list[int]]:
        """End offsets (absolute, ascending) of candidate prefixes in text[lo:hi], by
        pattern index; patterns without candidates are absent."""
        hits: dict[int, list[int]] = {}
        if self.size == 0 or lo >= hi:
            return hits
        data, with_b = to_scan_bytes(text if lo == 0 and hi == len(text) else text[lo:hi])
        db, scratch = self._dbs[0 if with_b else 1]

        def on_match(pid: int, _from: int, to: int, _flags: int, _ctx: object) -> None:
            ends = hits.get(pid)
            if ends is None:
                hits[pid] = [to + lo]
            else:
                ends.append(to + lo)

        db.scan(data, match_event_handler=on_match, scratch=scratch)
        return hits


class LiteralScanner:
    """Which of a fixed set of ASCII words occur in a text, case-insensitively, in one pass.

    Used to rule out context boosts for a whole document at once. A superset is fine:
    mapped non-ASCII characters (FOLDS) may create extra matches, never hide one.
    `positions=True` compiles for `positions()` (every occurrence) instead of `found()`.
    """

    def __init__(self, words: Sequence[str], positions: bool = False) -> None:
        self.words = [w for w in dict.fromkeys(w.lower() for w in words) if w.isascii() and w]
        self._lengths = [len(w) for w in self.words]
        exprs = [
            "".join(ch if ch.isalnum() else f"\\x{ord(ch):02x}" for ch in w).encode()
            for w in self.words
        ]
        self._db = None
        if exprs:
            self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
            flags = hyperscan.HS_FLAG_CASELESS
            if not positions:
                flags |= hyperscan.HS_FLAG_SINGLEMATCH
            self._db.compile(
                expressions=exprs,
                ids=list(range(len(exprs))),
                elements=len(exprs),
                flags=[flags] * len(exprs),
            )
            self._scratch = hyperscan.Scratch(self._db)

    def found(self, data: bytes) -> set[str]:
        """The words occurring in `data` (from `to_scan_bytes`)."""
        out: set[str] = set()
        if self._db is None or not data:
            return out

        def on_match(wid: int, _from: int, _to: int, _flags: int, _ctx: object) -> None:
            out.add(self.words[wid])

        self._db.scan(data, match_event_handler=on_match, scratch=self._scratch)
        return out

    def positions(self, data: bytes, cap: int) -> list[tuple[int, str]] | None:
        """(start, word) of every occurrence, or None once there are more than `cap`.

        The cap bounds the cost: callers use occurrences only while they are sparse.
        """
        out: list[tuple[int, str]] = []
        if self._db is None or not data:
            return out
        words, lengths = self.words, self._lengths

        def on_match(wid: int, _from: int, to: int, _flags: int, _ctx: object) -> bool:
            out.append((to - lengths[wid], words[wid]))
            return len(out) > cap

        try:
            self._db.scan(data, match_event_handler=on_match, scratch=self._scratch)
        except hyperscan.ScanTerminated:
            return None
        return out

"""Token counting for context budgets: one function, a documented approximation.

No tokenizer that works offline ships with the core install (tiktoken and Hugging Face
tokenizers download their vocabularies), so Lodestore counts with the pre-tokenizer rule
GPT-style BPE tokenizers use — words with their leading space, runs of up to three digits,
punctuation runs, whitespace runs — and counts a long word as one token per 4 characters
(BPE splits rare long words). On English prose this lands within about 10-15% of
cl100k_base, usually above it, so a budget computed here rarely overflows a real one.

The count is exact *for this function*: ``session_context`` never returns more tokens than
asked for by this measure, and cuts only at piece boundaries.
"""

from __future__ import annotations

import regex

_PIECES = regex.compile(
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def _cost(piece: str) -> int:
    n = len(piece.strip()) or len(piece)
    return 1 if n <= 6 else (n + 3) // 4


def count_tokens(text: str) -> int:
    """Tokens in ``text`` (see the module docstring for the rule)."""
    return sum(_cost(p) for p in _PIECES.findall(text))


def tail_within(text: str, budget: int) -> tuple[str, int]:
    """The longest suffix of ``text`` made of whole pieces costing at most ``budget``."""
    pieces = _PIECES.findall(text)
    used = 0
    cut = len(pieces)
    while cut > 0:
        c = _cost(pieces[cut - 1])
        if used + c > budget:
            break
        used += c
        cut -= 1
    return "".join(pieces[cut:]), used


__all__ = ["count_tokens", "tail_within"]

"""Linear-time equivalent of presidio's LemmaContextAwareEnhancer.

Why: presidio looks up each finding's token by scanning the token list and tests
keyword membership against a *list* of all keywords, so its cost grows with
findings x tokens. The decision it makes per finding is: collect up to 6 keywords at or
before the finding's first token and the first keyword at or after it, then boost the
score if a recognizer context word is a substring of one of them. We make the same
decision from a tokenization of just the neighbourhood of each finding, or, where a
recognizer's context words are rare, from the neighbourhood of each occurrence of them
("zones of influence": a keyword supports the findings whose first token lies after
the keyword before it and before the 6th keyword after it).

Exactness notes (all verified against stock presidio and spaCy by the tests):
- spaCy tokenizes whitespace-separated chunks independently, except that its special-case
  matcher (emoticons, "'s", abbreviations, ...) can join tokens across a single space. We
  only cut the text at chunk boundaries where no special case can straddle; a chunk that
  is a single token can only take part as that token.
- presidio's keyword list also holds the ':'-separated pieces of every token, so whether
  a stop word or punctuation token counts as a keyword depends on the whole document. We
  collect those pieces once per document from the chunks holding a colon.
- Walks pass over stop words that are one token, joined to nothing and (in this
  document) no ':'-piece; plain words, numbers and "word," units are tokenized without
  spaCy where its rules provably give one answer (checked at start-up and by the tests).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache

import regex
from spacy.attrs import IS_PUNCT, IS_STOP
from spacy.language import Language
from spacy.tokenizer import Tokenizer
from spacy.vocab import Vocab

from .prefilter import LiteralScanner, to_scan_bytes

PREFIX_COUNT = 5  # LemmaContextAwareEnhancer defaults
SUFFIX_COUNT = 0
SIMILARITY_FACTOR = 0.35
MIN_SCORE_WITH_CONTEXT = 0.4

# str.isspace() is what spaCy splits on; no code point above U+3000 is whitespace.
_WS_CHARS = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_WS_CLASS = "[" + regex.escape(_WS_CHARS) + "]"
_NONWS_CLASS = "[^" + regex.escape(_WS_CHARS) + "]"
# Forward searches use `re`, whose \s is exactly str.isspace() (checked by the tests)
# and which costs a third of `regex` per call; `regex` only for its REVERSE searches.
_WS_FWD = re.compile(r"\s")
_NONWS_FWD = re.compile(r"\S")
_WS_REV = regex.compile(_WS_CLASS, regex.REVERSE)
_NONWS_REV = regex.compile(_NONWS_CLASS, regex.REVERSE)
_UNITS = re.compile(r"\S+\s*")  # re's \s is str.isspace(), as spaCy's split
_WINDOW = 256  # characters of units read at a time by keyword walks
# The first read of a backward walk: six keywords usually lie within ~80 characters,
# and splitting a longer window into units costs more than the walk over them.
_FIRST_WINDOW = 96
# An ASCII word, or ASCII letters and digits ending with a digit (then at most one
# space): one token unless a special case. spaCy splits such a chunk only at other
# characters (punctuation, symbols, operators) or before a unit ("5km"), which ends in
# a letter; checked at start-up (ContextScorer._alnum_are_tokens) and by the tests.
_PLAIN_WORD = regex.compile(r"(?:[A-Za-z]+|[A-Za-z0-9]*[0-9]) ?")
_WORD_PUNCT = regex.compile(rf"([A-Za-z]+|[0-9]+)([,;!?.:])({_WS_CLASS}*)")

_KEY, _NO, _QUERY = 0, 1, 2
SMALL_DOC = 1 << 16  # characters: texts up to this size take the colon shortcuts
_CACHE_LIMIT = 200_000
# Zones of influence replace per-finding walks for a recognizer once it has had
# _ZONE_MIN_QUERIES queries in a document, if its context words occur at most
# 1/_ZONE_COST times as often as the queries it is expected to get there: an
# occurrence costs two walks and a block, a query at most one walk, often shared
# with other recognizers' queries at the same finding.
_ZONE_MIN_QUERIES = 8
_ZONE_COST = 4

Token = tuple[int, str]  # absolute start, text


def boosted(score: float) -> float:
    """The score presidio gives a result whose context matched (same float operations)."""
    score += SIMILARITY_FACTOR
    score = max(score, MIN_SCORE_WITH_CONTEXT)
    return min(score, 1.0)


def supported(words: Iterable[str], context: list[str]) -> bool:
    """presidio's substring-mode test: some context word inside some surrounding word.

    A context word without NUL occurs in the NUL-joined words iff it occurs in one of
    them; one with NUL can occur in none.
    """
    if not words:
        return False
    joined = "\x00".join(words)
    return any(c in joined for c in _lowered(tuple(context)))


@lru_cache(maxsize=1024)
def _lowered(context: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(c.lower() for c in context if "\x00" not in c.lower())


class ContextScorer:
    """Per-process state: the tokenizer, caches, and the special-case straddle table."""

    def __init__(self, nlp: Language, context_words: list[str] | None = None) -> None:
        self._nlp = nlp
        self._positions: dict[tuple[str, ...], LiteralScanner | None] = {}
        self._covered: dict[tuple[str, ...], bool] = {}
        self.tokenizer: Tokenizer = self._lite(nlp.tokenizer)
        getters = nlp.vocab.lex_attr_getters
        self._is_stop: Callable[[str], bool] = getters[IS_STOP]
        self._is_punct: Callable[[str], bool] = getters[IS_PUNCT]
        self._blocks: dict[str, tuple[tuple[int, str], ...]] = {}
        self._status: dict[str, tuple[int, str]] = {}
        self._chunk_pieces: dict[str, frozenset[str]] = {}
        self._unit_keys: dict[str, tuple[tuple[int, str], ...]] = {}
        self.zone_uses: dict[tuple[str, ...], int] = {}  # per context: zones chosen (stats)
        self._pairs = self._straddle_pairs(self.tokenizer)
        rules = self.tokenizer.rules or {}
        self._plain_specials = {k for k in rules if _PLAIN_WORD.fullmatch(k)}
        self._alnum_plain = self._alnum_are_tokens()
        self._pair_index: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for pairs in self._pairs.values():
            for a, b in pairs:
                if a:
                    self._pair_index.setdefault((a[-1], b[0]), []).append((a, b))
        self._rules = set(rules)
        self._pair_tokens = {t for ps in self._pairs.values() for a, b in ps for t in (a, b)}
        self._adjacent = {(a, b) for ps in self._pairs.values() for a, b in ps}
        self.skip_words, self.skip_units = self._skippable()
        self._word_punct_ok = self._check_word_punct()
        self.scanner = LiteralScanner(context_words) if context_words else None
        # For small documents the document-wide scan also looks for skippable stop
        # words next to a colon ("when:", ":it"): where none occurs, no token piece can
        # be one (see DocContext.skipping), which spares tokenizing the chunks around
        # colons. Big documents keep the plain scan (more literals cost more there).
        self.colon_words = frozenset(x for w in self.skip_words for x in (w + ":", ":" + w))
        self.small_scanner = (
            LiteralScanner([*context_words, *sorted(self.colon_words)]) if context_words else None
        )

    @staticmethod
    def _lite(tok: Tokenizer) -> Tokenizer:
        """The same tokenizer over a vocabulary without lexical attributes.

        Tokenization does not read them, and computing them for every new string
        (PII values are all new) is most of spaCy's per-call cost.
        """
        return Tokenizer(
            Vocab(),
            rules=tok.rules,
            prefix_search=tok.prefix_search,
            suffix_search=tok.suffix_search,
            infix_finditer=tok.infix_finditer,
            token_match=tok.token_match,
            url_match=tok.url_match,
            faster_heuristics=tok.faster_heuristics,
        )

    def _alnum_are_tokens(self) -> bool:
        """Is a chunk of ASCII letters and digits ending with a digit always one token?

        True for spaCy's English rules (see _PLAIN_WORD); checked on samples so that a
        rule set that differs turns the shortcut off rather than changing results.
        """
        samples = ["0", "7", "42", "2024", "1" * 25, "A1", "Z67806361", "ab12cd34", "x9"]
        return all([t.text for t in self.tokenizer(w + " ")] == [w] for w in samples)

    @staticmethod
    def _straddle_pairs(tok: Tokenizer) -> dict[str, list[tuple[str, str]]]:
        """Adjacent token pairs (a, b) inside special cases the matcher may join.

        spaCy's tokenizer adds a special case to its phrase matcher when it has affixes;
        the matcher runs on the affix-split tokens, which we reproduce with a rule-less
        copy of the tokenizer. Keyed by the first character of b.
        """
        raw = Tokenizer(
            tok.vocab,
            rules={},
            prefix_search=tok.prefix_search,
            suffix_search=tok.suffix_search,
            infix_finditer=tok.infix_finditer,
            token_match=tok.token_match,
            url_match=tok.url_match,
        )
        pairs: dict[str, list[tuple[str, str]]] = {}
        for special in tok.rules or {}:
            if tok.faster_heuristics and not (
                tok.find_prefix(special)
                or tok.find_infix(special)
                or tok.find_suffix(special)
                or " " in special
            ):
                continue
            parts = [t.text for t in raw(special)]
            for a, b in zip(parts, parts[1:], strict=False):
                if b:
                    pairs.setdefault(b[0], []).append((a, b))
        return pairs

    def _skippable(self) -> tuple[frozenset[str], frozenset[str]]:
        """Stop words whose unit (word + one space, in lower, title or upper case) is one
        token, filtered from presidio's keywords and no side of a special-case pair
        (so never joined to a neighbour); and those units.

        Why: walks for keywords cross mostly such units (presidio drops stop words);
        a set lookup passes over them. They count only where the document makes the
        word a ':'-piece (see DocContext.skipping).
        """
        words, units = set(), set()
        for w in self._nlp.Defaults.stop_words:
            if not (w.isascii() and w.isalpha()):
                continue
            variants = {w, w.capitalize(), w.upper()}
            if not (variants & self._pair_tokens) and all(
                self.filtered(v) and [t.text for t in self.tokenizer(v + " ")] == [v]
                for v in variants
            ):
                words.add(w)
                units.update(v + " " for v in variants)
        return frozenset(words), frozenset(units)

    def single_token(self, chunk: str) -> bool:
        """Is this whitespace-free chunk a plain word or number, hence one token?

        A special case can join two chunks only where the token pair at their boundary
        is a pair inside it; a one-token chunk offers only itself to such a pair.
        """
        return (
            _PLAIN_WORD.fullmatch(chunk) is not None
            and chunk not in self._plain_specials
            and (self._alnum_plain or chunk[0].isalpha())
        )

    def filtered(self, word: str) -> bool:
        """presidio drops these lemmas from its keyword list."""
        return word == "-PRON-" or word == "be" or self._is_stop(word) or self._is_punct(word)

    def status(self, word: str) -> tuple[int, str]:
        """(_KEY|_NO|_QUERY, lowercase word) for a token whose lemma is its text."""
        hit = self._status.get(word)
        if hit is not None:
            return hit
        low = word.lower()
        if ":" in low:
            res = (_NO, low)  # keyword pieces never contain ':'
        elif not self.filtered(word):
            res = (_KEY, low)
        else:
            res = (_QUERY, low)  # a keyword only if some token elsewhere yields this piece
        if len(self._status) > _CACHE_LIMIT:
            self._status.clear()
        self._status[word] = res
        return res

    def chunk_pieces(self, chunk: str) -> frozenset[str]:
        """Keyword-list pieces contributed by the tokens of a standalone chunk."""
        hit = self._chunk_pieces.get(chunk)
        if hit is None:
            hit = frozenset(
                piece
                for _, t in self.tokenize(chunk)
                if ":" in t and not self.filtered(t)
                for piece in t.lower().split(":")
            )
            if len(self._chunk_pieces) > _CACHE_LIMIT:
                self._chunk_pieces.clear()
            self._chunk_pieces[chunk] = hit
        return hit

    def contributes(self, token: str, piece: str) -> bool:
        """Does `token` put `piece` into presidio's keyword list?"""
        return not self.filtered(token) and piece in token.lower().split(":")

    def tokenize(self, block: str) -> tuple[tuple[int, str], ...]:
        """(offset, text) of the tokens of a standalone block (cached)."""
        hit = self._blocks.get(block)
        if hit is None:
            word = block.rstrip(" ")
            if (
                _PLAIN_WORD.fullmatch(block)
                and word not in self._plain_specials
                and (self._alnum_plain or word[0].isalpha())
            ):
                hit = ((0, word),)
            else:
                hit = self._word_punct(block) or tuple(
                    [(t.idx, t.text) for t in self.tokenizer(block)]
                )
            if len(self._blocks) > _CACHE_LIMIT:
                self._blocks.clear()
                if len(self.tokenizer.vocab.strings) > 2_000_000:
                    # spaCy interns every distinct token; start over to bound memory
                    self.tokenizer = self._lite(self.tokenizer)
            self._blocks[block] = hit
        return hit

    def _word_punct(self, block: str) -> tuple[tuple[int, str], ...] | None:
        """Tokens of an ASCII word or number, one of , ; ! ? . : and whitespace,
        without spaCy.

        spaCy splits that mark off as a suffix (the period only after a lowercase
        letter or a digit: "A." stays whole) and keeps the word, unless a special case
        covers the word, the word with its mark ("Mr.", "D:"), or the pair; then
        trailing whitespace is one token, less a first space. A word that is one side
        of a special-case pair ("when" of "when's", "and" of "and/or") is safe with
        any mark that is not its partner in such a pair: the phrase matcher can only
        join a block's tokens where the pair itself is adjacent. Checked at start-up and
        by the tests.
        """
        m = _WORD_PUNCT.fullmatch(block) if self._word_punct_ok else None
        if m is None:
            return None
        word, mark, ws = m.groups()
        if (
            word in self._plain_specials
            or (word, mark) in self._adjacent
            or word + mark in self._rules
            or (mark == "." and not ("a" <= word[-1] <= "z" or word[-1].isdigit()))
            or (word[0].isdigit() and not self._alnum_plain)
        ):
            return None
        toks = [(0, word), (len(word), mark)]
        if ws[:1] == " ":
            if len(ws) > 1:
                toks.append((len(word) + 2, ws[1:]))
        elif ws:
            toks.append((len(word) + 1, ws))
        return tuple(toks)

    def _check_word_punct(self) -> bool:
        """Does the shortcut in _word_punct agree with the tokenizer on samples?"""
        self._word_punct_ok = True
        samples = [
            w + m + ws
            for w in ("our", "Our", "OUR", "know", "x", "Judy", "7", "2024", "when", "and", "It")
            for m in ",;!?.:"
            for ws in ("", " ", "\n\n", "  ", " \n", "\t", "\n \n")
        ]
        for block in samples:
            fast = self._word_punct(block)
            if fast is not None and fast != tuple((t.idx, t.text) for t in self.tokenizer(block)):
                return False
        return True

    def unit_keys(self, unit: str) -> tuple[tuple[int, str], ...]:
        """Keyword status of each token of a standalone unit (cached)."""
        hit = self._unit_keys.get(unit)
        if hit is None:
            hit = tuple([self.status(t) for _, t in self.tokenize(unit)])
            if len(self._unit_keys) > _CACHE_LIMIT:
                self._unit_keys.clear()
            self._unit_keys[unit] = hit
        return hit

    def covered(self, context: tuple[str, ...]) -> bool:
        """Does the document-wide scanner know every word of this context list?"""
        hit = self._covered.get(context)
        if hit is None:
            words = self.scanner.words if self.scanner is not None else []
            hit = self._covered[context] = all([c.lower() in words for c in context])
        return hit

    def positions_scanner(self, context: tuple[str, ...]) -> LiteralScanner | None:
        """A scanner for every occurrence of one recognizer's context words (None when
        some word is not plain ASCII: those documents take the per-finding path)."""
        if context not in self._positions:
            words = [c.lower() for c in context]
            ok = bool(words) and all(w and w.isascii() for w in words)
            self._positions[context] = LiteralScanner(words, positions=True) if ok else None
        return self._positions[context]

    def doc(self, text: str) -> DocContext:
        return DocContext(self, text)


class DocContext:
    """Context decisions for one document, tokenizing only around findings."""

    def __init__(self, scorer: ContextScorer, text: str) -> None:
        self.s = scorer
        self.text = text
        self.n = len(text)
        # Memo values are tuples of plain values, which the garbage collector stops
        # tracking: a big document keeps thousands alive while it is analysed.
        self._blocks: dict[int, tuple[int, tuple[Token, ...]]] = {}
        self._starts: list[int] = []  # sorted keys of _blocks
        self._pieces: dict[str, bool] = {}
        self._low: str | None = None
        self._all_pieces: set[str] | None = None
        self._colon_pieces: set[str] | None = None
        self._skipping: bool | None = None
        self._memo: dict[int, tuple[str, ...]] = {}
        self._outer_memo: dict[tuple[int, int], tuple[str, ...]] = {}
        self._bounds: dict[int, tuple[int, int]] = {}
        self._present: dict[tuple[str, ...], bool] = {}
        self._found: set[str] | None = None
        self._before: dict[int, tuple[str, ...]] = {}
        self._data: bytes | None = None
        self._zones: dict[tuple[str, ...], list[int] | None] = {}
        self._queries: dict[tuple[str, ...], int] = {}
        self._expected: dict[tuple[str, ...], int] = {}
        self.lo, self.hi = 0, self.n  # the range whose findings are queried
        # colon shortcuts (see `skipping`, `is_piece`) search the whole text: small ones
        self.small = self.n <= SMALL_DOC and scorer.small_scanner is not None

    # -- chunk / block geometry -------------------------------------------------------
    def _unit_start(self, p: int) -> int:
        """Start of the unit (chunk + trailing whitespace) containing position p."""
        text = self.text
        if text[p].isspace():
            m = _NONWS_REV.search(text, 0, p)
            if m is None:
                return 0  # leading whitespace is its own unit
            p = m.start()
        m = _WS_REV.search(text, 0, p)
        return 0 if m is None else m.end()

    def _unit_end(self, u: int) -> int:
        text = self.text
        m = _WS_FWD.search(text, u)
        if m is None:
            return self.n
        m2 = _NONWS_FWD.search(text, m.start())
        return self.n if m2 is None else m2.start()

    def _safe(self, c: int) -> bool:
        """Can no special case straddle the boundary before the chunk starting at c?"""
        text = self.text
        if c == 0 or text[c - 1] != " " or c < 2 or text[c - 2].isspace():
            return True  # start, or not exactly one space: a whitespace token separates
        cands = self.s._pairs.get(text[c])
        if not cands:
            return True
        w = c - 1  # the single space; previous chunk ends at w
        for a, b in cands:
            if text.startswith(b, c) and text.endswith(a, 0, w):
                chunk_b = text[c : c + len(b)]
                chunk_a = text[w - len(a) : w]
                if not any([ch.isspace() for ch in chunk_a + chunk_b]) and self._pair_fits(
                    text[self._unit_start(w - 1) : w], text[c : self._chunk_end(c)], a, b
                ):
                    return False
        return True

    def _chunk_end(self, c: int) -> int:
        m = _WS_FWD.search(self.text, c)
        return self.n if m is None else m.start()

    def _pair_fits(self, left: str, right: str, a: str, b: str) -> bool:
        """Can the chunks `left` and `right` (no whitespace) end and start with tokens
        `a` and `b`? Not where one is a single token other than its side of the pair."""
        if right != b and self.s.single_token(right):
            return False
        return not (left != a and self.s.single_token(left))

    def bounds(self, p: int) -> tuple[int, int]:
        """The smallest span around p that tokenizes on its own (no tokenization)."""
        hit = self._bounds.get(p)
        if hit is None:
            hit = self._bounds[p] = self._compute_bounds(p)
        return hit

    def _compute_bounds(self, p: int) -> tuple[int, int]:
        start = self._unit_start(p)
        while not self._safe(start):
            start = self._unit_start(start - 1)
        end = self._unit_end(start)
        while end < self.n and not self._safe(end):
            end = self._unit_end(end)
        return start, end

    def block(self, p: int) -> tuple[int, int, tuple[Token, ...]]:
        """The tokenizable block around position p: [start, end) and its tokens."""
        i = bisect.bisect_right(self._starts, p) - 1
        if i >= 0:
            start = self._starts[i]
            end, toks = self._blocks[start]
            if p < end:
                return start, end, toks
        start, end = self.bounds(p)
        toks = tuple([(start + idx, t) for idx, t in self.s.tokenize(self.text[start:end])])
        self._blocks[start] = (end, toks)
        bisect.insort(self._starts, start)
        return start, end, toks

    # -- keyword membership -------------------------------------------------------------
    @property
    def low(self) -> str:
        if self._low is None:
            self._low = self.text.lower()
        return self._low

    def is_piece(self, piece: str) -> bool:
        """Is `piece` one of the ':'-split pieces of some non-filtered token?"""
        hit = self._pieces.get(piece)
        if hit is None:
            if piece == "-pron-":  # also the whole of a token such as "-pron-"
                hit = "-pron-" in self.low and piece in self._everything()
            elif (
                self.small
                and self._colon_pieces is None
                and not (piece + ":" in self.low or ":" + piece in self.low)
            ):
                hit = False  # a piece is next to a ':' (see `skipping`)
            else:
                hit = piece in self.colon_pieces()
            self._pieces[piece] = hit
        return hit

    def colon_pieces(self) -> set[str]:
        """The ':'-split pieces of every non-filtered token holding a colon.

        Why: they decide whether a stop word or punctuation counts as a keyword; only
        chunks with a colon hold such tokens, and most chunks recur (cached per chunk).
        """
        if self._colon_pieces is None:
            text, n = self.text, self.n
            pieces: set[str] = set()
            seen: set[str] = set()
            pos = text.find(":")
            while pos >= 0:
                m = _WS_REV.search(text, 0, pos)
                cs = 0 if m is None else m.end()
                if pos + 1 < n and text[pos + 1] == " ":
                    ce = pos + 1  # the usual "word: "
                else:
                    m = _WS_FWD.search(text, pos)
                    ce = n if m is None else m.start()
                chunk = text[cs:ce]
                if chunk not in seen:
                    m = _NONWS_FWD.search(text, ce)
                    if self._safe(cs) and (m is None or self._safe(m.start())):
                        seen.add(chunk)  # tokenizes on its own, wherever it occurs
                        pieces |= self.s.chunk_pieces(chunk)
                    else:
                        for _, t in self.block(pos)[2]:
                            if ":" in t and not self.s.filtered(t):
                                pieces.update(t.lower().split(":"))
                pos = text.find(":", ce)
            self._colon_pieces = pieces
        return self._colon_pieces

    def _everything(self) -> set[str]:
        if self._all_pieces is None:
            pieces: set[str] = set()
            for t in self.s.tokenizer(self.text):
                if not self.s.filtered(t.text):
                    pieces.update(t.text.lower().split(":"))
            self._all_pieces = pieces
        return self._all_pieces

    @property
    def skipping(self) -> bool:
        """May keyword walks pass over the scorer's skippable units here? Not where one
        of their words is a ':'-piece of some token in this document (then it is a
        keyword wherever it occurs)."""
        if self._skipping is None:
            if self.small and self.found().isdisjoint(self.s.colon_words):
                # A piece is next to a ':' in its token, and a token's lowercase is
                # the text's there (lowercasing is per character but for Σ, which no
                # stop word holds): no "w:" or ":w" in the text, no piece w.
                self._skipping = True
            else:
                self._skipping = not (self.s.skip_words & self.colon_pieces())
        return self._skipping

    def _keyword(self, tok: str) -> str | None:
        kind, low = self.s.status(tok)
        if kind == _KEY or (kind == _QUERY and self.is_piece(low)):
            return low
        return None

    # -- the decision -------------------------------------------------------------------

    def _straddles(self, left: str, right: str) -> bool:
        """Could a special case join units `left` (chunk + whitespace) and `right`?"""
        if left[-1] != " " or len(left) < 2 or left[-2].isspace():
            return False  # not exactly one space: a whitespace token separates them
        cands = self.s._pair_index.get((left[-2], right[0]))
        if not cands:
            return False
        chunk = left[:-1]
        for a, b in cands:
            if (
                right.startswith(b)
                and chunk.endswith(a)
                and self._pair_fits(chunk.rsplit(None, 1)[-1], right.split(None, 1)[0], a, b)
            ):
                return True
        return False

    def _take(self, block: str, out: list[str], need: int, backward: bool) -> bool:
        """Append the block's keywords (in walk order) to out; True when out is full."""
        keys = self.s.unit_keys(block)
        pieces = self._pieces
        for kind, low in reversed(keys) if backward else keys:
            if kind == _KEY or (
                kind == _QUERY and (pieces[low] if low in pieces else self.is_piece(low))
            ):
                out.append(low)
                if len(out) == need:
                    return True
        return False

    def _keywords_before(self, end: int, need: int) -> list[str]:
        """The `need` keywords nearest before `end` (a safe block boundary)."""
        text, out, pairs = self.text, [], self.s._pair_index
        skip = self.s.skip_units if self.skipping else frozenset()
        block = ""  # units whose left boundary is not yet known to be safe
        hi, span = end, _FIRST_WINDOW
        while hi > 0:
            lo = max(0, hi - span)
            units = _UNITS.findall(text, lo, hi)
            if lo > 0 and units and not text[lo].isspace() and not text[lo - 1].isspace():
                units = units[1:]  # cut mid-chunk
            if not units and lo > 0:
                span *= 4  # one chunk longer than the window
                continue
            for u in reversed(units):
                if u in skip:  # one filtered token that joins nothing: no keyword
                    if block:
                        if self._take(block, out, need, True):
                            return out
                        block = ""
                    continue
                if block:
                    if (
                        u[-1] == " "
                        and len(u) > 1
                        and (u[-2], block[0]) in pairs
                        and self._straddles(u, block)
                    ):
                        block = u + block
                        continue
                    if self._take(block, out, need, True):
                        return out
                block = u
            hi -= sum(map(len, units))
            span = max(span, _WINDOW)
            if lo == 0:
                break
        if block and self._take(block, out, need, True):
            return out
        if hi > 0:  # leading whitespace of the text
            self._take(text[:hi], out, need, True)
        return out

    def _blocks_after(self, start: int, span: int = _WINDOW) -> Iterator[tuple[int, str, bool]]:
        """Tokenizable blocks (absolute start, text, skipped) from `start` (a safe block
        boundary) on: units joined where a special case could straddle them; skippable
        units (one filtered token that joins nothing) come alone, marked skipped."""
        text, n, pairs = self.text, self.n, self.s._pair_index
        skip = self.s.skip_units if self.skipping else frozenset()
        block, bstart = "", start
        lo = start
        while lo < n:
            hi = min(n, lo + span)
            units = _UNITS.findall(text, lo, hi)
            if hi < n and units and not (text[hi - 1].isspace() and not text[hi].isspace()):
                units = units[:-1]  # cut inside a chunk or its trailing whitespace
            if not units and hi < n:
                span *= 4
                continue
            for u in units:
                if u in skip:
                    if block:
                        yield bstart, block, False
                        bstart += len(block)
                        block = ""
                    yield bstart, u, True
                    bstart += len(u)
                    continue
                if block:
                    if (
                        block[-1] == " "
                        and len(block) > 1
                        and (block[-2], u[0]) in pairs
                        and self._straddles(block, u)
                    ):
                        block += u
                        continue
                    yield bstart, block, False
                    bstart += len(block)
                block = u
            lo += sum(map(len, units))
        if block:
            yield bstart, block, False

    def _keywords_after(self, start: int, need: int) -> list[str]:
        """The `need` keywords nearest at or after `start` (a safe block boundary)."""
        out: list[str] = []
        span = _WINDOW if need > 1 else _WINDOW // 4  # usually the next unit or two
        for _, block, skipped in self._blocks_after(start, span):
            if not skipped and self._take(block, out, need, False):
                break
        return out

    def words(self, start: int) -> tuple[str, ...]:
        """Surrounding keywords presidio would compare with context words."""
        hit = self._memo.get(start)
        if hit is None:
            hit = self._memo[start] = self._words(start)
        return hit

    def _words(self, start: int) -> tuple[str, ...]:
        if self.n == 0:
            return ()
        b0, b1, toks = self.block(min(start, self.n - 1))
        i = 0
        while True:  # first token ending after `start` (presidio's match token)
            while i < len(toks) and toks[i][0] + len(toks[i][1]) <= start:
                i += 1
            if i < len(toks) or b1 >= self.n:
                break
            b0, b1, toks = self.block(b1)
            i = 0
        if i == len(toks):
            return ()  # presidio would raise; no token covers the finding
        words: set[str] = set()
        need = PREFIX_COUNT + 1  # keywords at or before the match token
        for _, t in reversed(toks[: i + 1]):
            w = self._keyword(t)
            if w is not None:
                words.add(w)
                need -= 1
                if not need:
                    break
        if need and b0:
            words.update(self._six_before(b0)[:need])
        for _, t in toks[i:]:  # the first keyword at or after the match token
            w = self._keyword(t)
            if w is not None:
                words.add(w)
                return tuple(words)
        if b1 < self.n:
            words.update(self._keywords_after(b1, SUFFIX_COUNT + 1))
        return tuple(words)

    def _outer(self, b0: int, b1: int) -> tuple[str, ...]:
        """Keywords a walk from inside [b0, b1) may reach outside it (memoized)."""
        key = (b0, b1)
        hit = self._outer_memo.get(key)
        if hit is not None:
            return hit
        words = self._six_before(b0)
        if b1 < self.n:
            words += tuple(self._keywords_after(b1, SUFFIX_COUNT + 1))
        self._outer_memo[key] = words
        return words

    @property
    def scan_bytes(self) -> bytes:
        """The text as hyperscan sees it (one byte per character), made once."""
        if self._data is None:
            self._data = to_scan_bytes(self.text)[0]
        return self._data

    def found(self) -> set[str]:
        """The scanner words occurring in the text (a superset), scanned once; with
        the colon words (ContextScorer.colon_words) in small documents."""
        if self._found is None:
            scanner = self.s.small_scanner if self.small else self.s.scanner
            self._found = scanner.found(self.scan_bytes) if scanner is not None else set()
        return self._found

    def present(self, context: list[str]) -> bool:
        """Does any context word occur anywhere in the text? (Collected words are
        pieces of the text, so otherwise no boost is possible.)"""
        key = tuple(context)
        hit = self._present.get(key)
        if hit is None:
            scanner = self.s.scanner
            if scanner is not None and self.s.covered(key):
                hit = not self.found().isdisjoint(_lowered(key))
            else:
                low = self.low if len(self.low) == self.n else self.text.lower()
                hit = any([c.lower() in low for c in context])
            self._present[key] = hit
        return hit

    def _six_before(self, b0: int) -> tuple[str, ...]:
        hit = self._before.get(b0)
        if hit is None:
            hit = tuple(self._keywords_before(b0, PREFIX_COUNT + 1)) if b0 else ()
            self._before[b0] = hit
        return hit

    def any_supported(self, x: int, y: int, context: list[str]) -> bool:
        """Does some finding starting in [x, y) get a context boost? Exact for one
        start (y == x + 1); for a range, never no when some start gets one.

        Where the context words occur sparsely, answered from their zones of influence
        (`zones`). Otherwise: when no context word occurs in the text of the blocks
        holding [x, y), only keywords outside them can support, so the blocks
        (typically the PII value, a string spaCy has never seen) need no tokenization
        to say no.
        """
        if not context or not self.present(context):
            return False
        key = tuple(context)
        zones = self._zones[key] if key in self._zones else self._decide(key, x)
        if zones is not None:
            i = bisect.bisect_right(zones, x)
            return bool(i & 1) or (i < len(zones) and zones[i] < y)
        b0, _ = self.bounds(x)
        if (
            (x == b0 or y > x + 1)
            and b0
            and supported(self._six_before(b0)[:PREFIX_COUNT], context)
        ):
            # A finding at the block's start has the block's first token as its first:
            # its words include the 5 keywords before the block, whatever the value's
            # tokens are. For a range, "yes" only has to be possible: a finding at x
            # would be boosted, and each finding is then asked on its own.
            return True
        _, b1 = self.bounds(y - 1)
        low = self.low[b0:b1] if len(self.low) == self.n else self.text[b0:b1].lower()
        inside = any([c in low for c in _lowered(key)])
        if not inside and not supported(self._outer(b0, b1), context):
            return False
        if y == x + 1:
            if not inside and x == b0 and self._leads_keyword(x):
                # the finding's first token is a keyword without a context word: its
                # words are it and the 5 keywords before; no need to tokenize the value
                return supported(self._six_before(b0)[:PREFIX_COUNT], context)
            return supported(self.words(x), context)
        return supported(self.words_span(x, y), context)

    def _leads_keyword(self, x: int) -> bool:
        """Is the token starting at x (a block start) surely a keyword? It is when its
        chunk starts with an ASCII digit and holds no ':' (no stop word or punctuation
        starts with a digit; a token with ':' counts only by its pieces), or when the
        chunk is one plain token that is a keyword."""
        text = self.text
        m = _WS_FWD.search(text, x)
        chunk = text[x : self.n if m is None else m.start()]
        if ":" in chunk:
            return False
        if "0" <= chunk[0] <= "9":
            return True
        return self.s.single_token(chunk) and self._keyword(chunk) is not None

    # -- zones of influence -------------------------------------------------------------
    def expect(self, context: list[str], n: int) -> None:
        """Announce n more `any_supported` queries for `context` (the caller knows its
        findings), so the zones decision needs no extrapolation and can be made at the
        first query. Only a hint: the answers are the same either way."""
        key = tuple(context)
        self._expected[key] = self._queries.get(key, 0) + n
        if key in self._zones and self._zones[key] is None:
            del self._zones[key]  # decide again, for the queries to come

    def _decide(self, key: tuple[str, ...], x: int) -> list[int] | None:
        """Zones for `key` once they look cheaper than walking per query, else None."""
        q = self._queries[key] = self._queries.get(key, 0) + 1
        total = self._expected.get(key)
        if total is None:  # extrapolate from the queries so far (made in text order)
            if q < _ZONE_MIN_QUERIES:
                return None
            total = q * (self.hi - self.lo) // max(1, x - self.lo)
        cap = max(0, total - q + 1) // _ZONE_COST
        zones = self.zones(list(key), cap=cap) if cap else None
        self._zones[key] = zones
        if zones is not None:
            self.s.zone_uses[key] = self.s.zone_uses.get(key, 0) + 1
        return zones

    def zones(self, context: list[str], cap: int | None = None) -> list[int] | None:
        """Where findings get a boost from `context`: sorted disjoint intervals
        [a0, b0, a1, b1, ...] of start positions; None when the words occur more than
        `cap` times (or offsets of the lowercase text do not align).

        Why: a finding's words are the 6 keywords up to its first token and the first
        keyword from it on, so a keyword K supports exactly the findings whose first
        token lies after the keyword before K and before the 6th keyword after K. Where
        context words are rare (phone words, against every digit run in the text), a
        short walk around each occurrence replaces a walk around each candidate.
        """
        scanner = self.s.positions_scanner(tuple(context)) if len(self.low) == self.n else None
        if scanner is None:
            return None
        occurrences = scanner.positions(self.scan_bytes, self.n if cap is None else cap)
        return None if occurrences is None else self._build_zones(occurrences)

    def _build_zones(self, occurrences: list[tuple[int, str]]) -> list[int]:
        spans: list[tuple[int, int]] = []
        done: set[int] = set()  # keyword tokens handled, by start
        low = self.low
        for start, word in occurrences:
            end = start + len(word)
            if not low.startswith(word, start):
                continue  # a folded character matched, not the lowercase text
            b0, b1, toks = self.block(start)
            if end > b1:
                continue  # spans a block boundary: inside no token
            k = next((j for j, (a, t) in enumerate(toks) if a <= start and end <= a + len(t)), -1)
            if k < 0:
                continue  # spans a token boundary
            ts, tok = toks[k]
            if ts in done:
                continue
            done.add(ts)
            kw = self._keyword(tok)
            if kw is None or word not in kw:
                continue
            spans.append((self._keyword_end_before(b0, toks, k), self._sixth_after(b1, toks, k)))
        spans.sort()
        flat: list[int] = []
        for a, b in spans:
            if a >= b:
                continue
            if flat and a <= flat[-1]:
                flat[-1] = max(flat[-1], b)
            else:
                flat += [a, b]
        return flat

    def _keyword_end_before(self, b0: int, toks: Sequence[Token], k: int) -> int:
        """End of the nearest keyword token before toks[k] (0 if none)."""
        for st, t in reversed(toks[:k]):
            if self._keyword(t) is not None:
                return st + len(t)
        while b0 > 0:
            b0, _, toks = self.block(b0 - 1)
            for st, t in reversed(toks):
                if self._keyword(t) is not None:
                    return st + len(t)
        return 0

    def _sixth_after(self, b1: int, toks: Sequence[Token], k: int) -> int:
        """End of the token before the 6th keyword after toks[k] (or of the last token):
        findings whose first token ends later have six nearer keywords before them."""
        need = PREFIX_COUNT + 1
        st, t = toks[k]
        prev_end = st + len(t)
        for st, t in toks[k + 1 :]:
            if self._keyword(t) is not None:
                need -= 1
                if not need:
                    return prev_end
            prev_end = st + len(t)
        pieces = self._pieces
        for bstart, block, skipped in self._blocks_after(b1):
            if skipped:
                prev_end = bstart + len(block) - 1  # the word, then one space
                continue
            keys = self.s.unit_keys(block)
            for (idx, t), (kind, low) in zip(self.s.tokenize(block), keys, strict=True):
                if kind == _KEY or (
                    kind == _QUERY and (pieces[low] if low in pieces else self.is_piece(low))
                ):
                    need -= 1
                    if not need:
                        return prev_end
                prev_end = bstart + idx + len(t)
        return prev_end

    def words_span(self, x: int, y: int) -> set[str]:
        """A superset of `words(s)` for every s in [x, y)."""
        words = set(self.words(x)) | set(self.words(y - 1))
        p = x
        while p < y:
            _, b1, toks = self.block(p)
            for st, t in toks:
                if st < y and st + len(t) > x:
                    w = self._keyword(t)
                    if w is not None:
                        words.add(w)
            p = b1
        return words


class ArtifactsContext:
    """The same decision from a full presidio NlpArtifacts (NER mode), via bisection."""

    def __init__(self, artifacts) -> None:  # presidio NlpArtifacts
        keywords = set(artifacts.keywords)
        tokens = artifacts.tokens
        self._ends = [idx + len(t) for idx, t in zip(artifacts.tokens_indices, tokens, strict=True)]
        self._lemmas = [lemma.lower() for lemma in artifacts.lemmas]
        self._kw = [i for i, lemma in enumerate(self._lemmas) if lemma in keywords]

    def words(self, start: int) -> set[str]:
        i = bisect.bisect_right(self._ends, start)
        if i == len(self._ends):
            return set()
        k = bisect.bisect_right(self._kw, i)
        back = self._kw[max(0, k - PREFIX_COUNT - 1) : k]
        f = bisect.bisect_left(self._kw, i)
        fwd = self._kw[f : f + SUFFIX_COUNT + 1]
        return {self._lemmas[j] for j in back + fwd}

"""Linear-time equivalent of presidio's LemmaContextAwareEnhancer.

Why: presidio looks up each finding's token by scanning the token list and tests
keyword membership against a *list* of all keywords, so its cost grows with
findings x tokens. The decision it makes per finding is: collect up to 6 keywords at or
before the finding's first token and the first keyword at or after it, then boost the
score if a recognizer context word is a substring of one of them. We make the same
decision from a tokenization of just the neighbourhood of each finding.

Exactness notes (all verified against stock presidio by the tests):
- spaCy tokenizes whitespace-separated chunks independently, except that its special-case
  matcher (emoticons, "'s", abbreviations, ...) can join tokens across a single space. We
  only cut the text at chunk boundaries where no special case can straddle.
- presidio's keyword list also holds the ':'-separated pieces of every token, so whether
  a stop word or punctuation token counts as a keyword depends on the whole document. We
  answer that question per distinct word, lazily, by inspecting only the places where
  the word touches a ':'.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from functools import lru_cache

import regex
from spacy.attrs import IS_PUNCT, IS_STOP
from spacy.language import Language
from spacy.tokenizer import Tokenizer
from spacy.vocab import Vocab

from .prefilter import LiteralScanner

PREFIX_COUNT = 5  # LemmaContextAwareEnhancer defaults
SUFFIX_COUNT = 0
SIMILARITY_FACTOR = 0.35
MIN_SCORE_WITH_CONTEXT = 0.4

# str.isspace() is what spaCy splits on; no code point above U+3000 is whitespace.
_WS_CHARS = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
_WS_CLASS = "[" + regex.escape(_WS_CHARS) + "]"
_NONWS_CLASS = "[^" + regex.escape(_WS_CHARS) + "]"
_WS_FWD = regex.compile(_WS_CLASS)
_NONWS_FWD = regex.compile(_NONWS_CLASS)
_WS_REV = regex.compile(_WS_CLASS, regex.REVERSE)
_NONWS_REV = regex.compile(_NONWS_CLASS, regex.REVERSE)
_PLAIN_WORD = regex.compile(r"[A-Za-z]+ ?")
_UNITS = re.compile(r"\S+\s*")  # re's \s is str.isspace(), as spaCy's split
_WINDOW = 256  # one token unless a special case (tested)

_KEY, _NO, _QUERY = 0, 1, 2
_AFFIX = 16
_CACHE_LIMIT = 200_000

Token = tuple[int, str]  # absolute start, text


def boosted(score: float) -> float:
    """The score presidio gives a result whose context matched (same float operations)."""
    score += SIMILARITY_FACTOR
    score = max(score, MIN_SCORE_WITH_CONTEXT)
    return min(score, 1.0)


def supported(words: set[str], context: list[str]) -> bool:
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
        self.scanner = LiteralScanner(context_words) if context_words else None
        self.tokenizer: Tokenizer = self._lite(nlp.tokenizer)
        getters = nlp.vocab.lex_attr_getters
        self._is_stop: Callable[[str], bool] = getters[IS_STOP]
        self._is_punct: Callable[[str], bool] = getters[IS_PUNCT]
        self._blocks: dict[str, tuple[tuple[int, str], ...]] = {}
        self._status: dict[str, tuple[int, str]] = {}
        self._chunk_pieces: dict[str, frozenset[str]] = {}
        self._unit_keys: dict[str, tuple[tuple[int, str], ...]] = {}
        self._pairs = self._straddle_pairs(self.tokenizer)
        self._alpha_specials = {k for k in (self.tokenizer.rules or {}) if k.isalpha()}
        self._pair_index: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for pairs in self._pairs.values():
            for a, b in pairs:
                if a:
                    self._pair_index.setdefault((a[-1], b[0]), []).append((a, b))

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
        hit = self._blocks.get(block)
        if hit is None:
            word = block.rstrip(" ")
            if _PLAIN_WORD.fullmatch(block) and word not in self._alpha_specials:
                hit = ((0, word),)
            else:
                hit = tuple((t.idx, t.text) for t in self.tokenizer(block))
            if len(self._blocks) > _CACHE_LIMIT:
                self._blocks.clear()
                if len(self.tokenizer.vocab.strings) > 2_000_000:
                    # spaCy interns every distinct token; start over to bound memory
                    self.tokenizer = self._lite(self.tokenizer)
            self._blocks[block] = hit
        return hit

    def unit_keys(self, unit: str) -> tuple[tuple[int, str], ...]:
        """Keyword status of each token of a standalone unit (cached)."""
        hit = self._unit_keys.get(unit)
        if hit is None:
            hit = tuple(self.status(t) for _, t in self.tokenize(unit))
            if len(self._unit_keys) > _CACHE_LIMIT:
                self._unit_keys.clear()
            self._unit_keys[unit] = hit
        return hit

    def doc(self, text: str) -> DocContext:
        return DocContext(self, text)


class DocContext:
    """Context decisions for one document, tokenizing only around findings."""

    def __init__(self, scorer: ContextScorer, text: str) -> None:
        self.s = scorer
        self.text = text
        self.n = len(text)
        self._blocks: dict[int, tuple[int, list[Token]]] = {}
        self._starts: list[int] = []  # sorted keys of _blocks
        self._pieces: dict[str, bool] = {}
        self._low: str | None = None
        self._all_pieces: set[str] | None = None
        self._colons: tuple[dict[str, list[int]], dict[str, list[int]]] | None = None
        self._memo: dict[int, set[str]] = {}
        self._outer_memo: dict[tuple[int, int], set[str]] = {}
        self._bounds: dict[int, tuple[int, int]] = {}
        self._present: dict[tuple[str, ...], bool] = {}
        self._found: set[str] | None = None
        self._before: dict[int, list[str]] = {}

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
                if not any(ch.isspace() for ch in chunk_a + chunk_b):
                    return False
        return True

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

    def block(self, p: int) -> tuple[int, int, list[Token]]:
        """The tokenizable block around position p: [start, end) and its tokens."""
        i = bisect.bisect_right(self._starts, p) - 1
        if i >= 0:
            start = self._starts[i]
            end, toks = self._blocks[start]
            if p < end:
                return start, end, toks
        start, end = self.bounds(p)
        toks = [(start + idx, t) for idx, t in self.s.tokenize(self.text[start:end])]
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
            hit = self._pieces[piece] = self._find_piece(piece)
        return hit

    def _colon_index(self) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
        """Colon positions keyed by every suffix of the text just before them and every
        prefix of the text just after them (lowercased, within the chunk, <= 16 chars).

        One pass over the colons replaces a full-text search per queried word.
        """
        if self._colons is None:
            before: dict[str, list[int]] = {}
            after: dict[str, list[int]] = {}
            low = self.low
            if ":" in low:
                segs = low.split(":")
                pos = -1
                for i, seg in enumerate(segs):
                    if i and seg and not seg[0].isspace():  # colon at pos, then seg
                        head = seg[:_AFFIX].split(None, 1)[0]
                        for k in range(1, len(head) + 1):
                            after.setdefault(head[:k], []).append(pos)
                    pos += len(seg) + 1
                    if i < len(segs) - 1 and seg and not seg[-1].isspace():
                        tail = seg[-_AFFIX:].rsplit(None, 1)[-1]
                        for k in range(len(tail)):
                            before.setdefault(tail[k:], []).append(pos)
            self._colons = (before, after)
        return self._colons

    def _find_piece(self, piece: str) -> bool:
        low = self.low
        if len(low) != self.n:  # lower() changed lengths: offsets do not align
            return piece in self._everything()
        if len(piece) > _AFFIX or piece == "-pron-":
            needles = [piece + ":", ":" + piece, piece]
            return any(nd in low for nd in needles) and piece in self._everything()
        before, after = self._colon_index()
        text = self.text
        seen: set[str] = set()
        for p in sorted(before.get(piece, []) + after.get(piece, [])):
            m = _WS_REV.search(text, 0, p)
            cs = 0 if m is None else m.end()
            m = _WS_FWD.search(text, p)
            ce = self.n if m is None else m.start()
            chunk = text[cs:ce]
            if chunk in seen:
                continue
            m = _NONWS_FWD.search(text, ce)
            if self._safe(cs) and (m is None or self._safe(m.start())):
                seen.add(chunk)  # tokenizes on its own: same answer wherever it occurs
                if piece in self.s.chunk_pieces(chunk):
                    return True
            elif any(self.s.contributes(t, piece) for _, t in self.block(p)[2]):
                return True
        return False

    def _everything(self) -> set[str]:
        if self._all_pieces is None:
            pieces: set[str] = set()
            for t in self.s.tokenizer(self.text):
                if not self.s.filtered(t.text):
                    pieces.update(t.text.lower().split(":"))
            self._all_pieces = pieces
        return self._all_pieces

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
        return any(right.startswith(b) and chunk.endswith(a) for a, b in cands)

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
        text, out = self.text, []
        block = ""  # units whose left boundary is not yet known to be safe
        hi, span = end, _WINDOW
        while hi > 0:
            lo = max(0, hi - span)
            units = _UNITS.findall(text, lo, hi)
            if lo > 0 and units and not text[lo].isspace() and not text[lo - 1].isspace():
                units = units[1:]  # cut mid-chunk
            if not units and lo > 0:
                span *= 4  # one chunk longer than the window
                continue
            for u in reversed(units):
                if block:
                    if self._straddles(u, block):
                        block = u + block
                        continue
                    if self._take(block, out, need, True):
                        return out
                block = u
            hi -= sum(map(len, units))
            if lo == 0:
                break
        if block and self._take(block, out, need, True):
            return out
        if hi > 0:  # leading whitespace of the text
            self._take(text[:hi], out, need, True)
        return out

    def _keywords_after(self, start: int, need: int) -> list[str]:
        """The `need` keywords nearest at or after `start` (a safe block boundary)."""
        text, n, out = self.text, self.n, []
        block = ""
        lo, span = start, _WINDOW
        while lo < n:
            hi = min(n, lo + span)
            units = _UNITS.findall(text, lo, hi)
            if hi < n and units and not (text[hi - 1].isspace() and not text[hi].isspace()):
                units = units[:-1]  # cut inside a chunk or its trailing whitespace
            if not units and hi < n:
                span *= 4
                continue
            for u in units:
                if block:
                    if self._straddles(block, u):
                        block += u
                        continue
                    if self._take(block, out, need, False):
                        return out
                block = u
            lo += sum(map(len, units))
        if block:
            self._take(block, out, need, False)
        return out

    def words(self, start: int) -> set[str]:
        """Surrounding keywords presidio would compare with context words."""
        hit = self._memo.get(start)
        if hit is None:
            hit = self._memo[start] = self._words(start)
        return hit

    def _words(self, start: int) -> set[str]:
        if self.n == 0:
            return set()
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
            return set()  # presidio would raise; no token covers the finding
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
                return words
        if b1 < self.n:
            words.update(self._keywords_after(b1, SUFFIX_COUNT + 1))
        return words

    def _outer(self, b0: int, b1: int) -> set[str]:
        """Keywords a walk from inside [b0, b1) may reach outside it (memoized)."""
        key = (b0, b1)
        hit = self._outer_memo.get(key)
        if hit is not None:
            return hit
        words: set[str] = set(self._six_before(b0))
        if b1 < self.n:
            words.update(self._keywords_after(b1, SUFFIX_COUNT + 1))
        self._outer_memo[key] = words
        return words

    def present(self, context: list[str]) -> bool:
        """Does any context word occur anywhere in the text? (Collected words are
        pieces of the text, so otherwise no boost is possible.)"""
        key = tuple(context)
        hit = self._present.get(key)
        if hit is None:
            scanner = self.s.scanner
            if scanner is not None and all(c.lower() in scanner.words for c in context):
                if self._found is None:
                    self._found = scanner.found(self.text)
                hit = any(c.lower() in self._found for c in context)
            else:
                low = self.low if len(self.low) == self.n else self.text.lower()
                hit = any(c.lower() in low for c in context)
            self._present[key] = hit
        return hit

    def _six_before(self, b0: int) -> list[str]:
        hit = self._before.get(b0)
        if hit is None:
            hit = self._keywords_before(b0, PREFIX_COUNT + 1) if b0 else []
            self._before[b0] = hit
        return hit

    def any_supported(self, x: int, y: int, context: list[str]) -> bool:
        """Exactly: does some finding starting in [x, y) get a context boost?

        When no context word occurs in the text of the blocks holding [x, y), only
        keywords outside them can support, so the blocks (typically the PII value,
        a string spaCy has never seen) need no tokenization to say no.
        """
        if not context or not self.present(context):
            return False
        b0, _ = self.bounds(x)
        _, b1 = self.bounds(y - 1)
        low = self.low[b0:b1] if len(self.low) == self.n else self.text[b0:b1].lower()
        inside = any(c.lower() in low for c in context)
        if not inside and not supported(self._outer(b0, b1), context):
            return False
        if y == x + 1:
            return supported(self.words(x), context)
        return supported(self.words_span(x, y), context)

    def words_span(self, x: int, y: int) -> set[str]:
        """A superset of `words(s)` for every s in [x, y)."""
        words = self.words(x) | self.words(y - 1)
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

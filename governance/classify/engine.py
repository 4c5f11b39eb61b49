"""The per-process classification engine: candidates -> exact matches -> scored results.

Exactness argument, per regex P (see `regex_plan` for the prefilter expression R):
every path by which P can match [s, e) has a prefix matched by R, and hyperscan reports
every end of an R match. From a report we bound where the P match can start and end
(by widths, or by separator characters P can never consume). Merging these intervals
gives disjoint stretches outside of which P cannot match at all, so `finditer` over the
whole text and `finditer` restarted at each stretch (with full lookbehind context and a
lookahead guard) produce the same matches. Recognizer logic (validation, invalidation,
scores, duplicates) is presidio's own, applied to those matches.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import hyperscan
import regex
from phonenumbers import phonenumbermatcher
from presidio_analyzer import EntityRecognizer, PatternRecognizer, RecognizerResult
from presidio_analyzer.predefined_recognizers import IbanRecognizer, PhoneRecognizer

from . import regex_plan
from .context import ContextScorer, DocContext, boosted
from .prefilter import Prefilter
from .stock import LANGUAGE, blank_pipeline, offline_registry, warm_up

log = logging.getLogger(__name__)

WINDOW = 1 << 20  # characters owned by one prefilter scan
# Scan windows start after and end on one of these: non-word characters (so hyperscan's
# \b is exact at the edges) that no unbounded pattern can consume.
EDGE_CHARS = frozenset(" \t\n\r")
_PHONE_CACHE_LIMIT = 100_000
_MAX_EXPRESSION = 4000  # longer prefilter expressions (URL's TLD list) compile too slowly
_DIGITS = regex.compile(r"\d")
# phonenumbers' candidate regex starts with a digit or a lead character and ends with a
# digit or '#'; no valid number has fewer than 4 digits (German pager numbers).
_PHONE_START = regex.compile(r"\d|" + phonenumbermatcher._LEAD_CLASS)
_PHONE_END = regex.compile(r"[\d#]", regex.REVERSE)
_MIN_PHONE_DIGITS = 4


@dataclass
class RawResult:
    """A recognizer result before duplicate removal; `boost` = context word found."""

    rec: int  # index into Engine.recognizers
    entity: str
    start: int
    end: int
    score: float
    boost: bool = False


@dataclass
class _Pattern:
    rec: int
    pattern: object  # presidio Pattern
    rx: regex.Pattern
    plan: regex_plan.PatternPlan | None  # None: run over the whole text
    sep_fwd: regex.Pattern | None
    sep_rev: regex.Pattern | None


def _separator_searchers(plan: regex_plan.PatternPlan):
    seps = "".join(chr(c) for c in range(128) if chr(c) not in plan.consumable)
    if not seps:
        return None, None
    cls = "[" + regex.escape(seps) + "]"
    return regex.compile(cls), regex.compile(cls, regex.REVERSE)


def dedupe_raw(results: list[RawResult]) -> list[RawResult]:
    """presidio's EntityRecognizer.remove_duplicates, keeping our records."""
    if len(results) < 2:
        return results  # nothing to remove (scores are never 0 here)
    keyed = {(r.entity, r.start, r.end, r.score): r for r in results}
    kept = EntityRecognizer.remove_duplicates(
        [RecognizerResult(e, s, t, sc) for e, s, t, sc in keyed]
    )
    return [keyed[(k.entity_type, k.start, k.end, k.score)] for k in kept]


class Engine:
    """Runs the configured recognizers over (a range of) a text, exactly as presidio."""

    def __init__(self, entities: Sequence[str], context: bool = True) -> None:
        registry = offline_registry()
        recs = registry.get_recognizers(LANGUAGE, entities=list(entities))
        self.recognizers: list[EntityRecognizer] = sorted(recs, key=lambda r: (r.name, r.id))
        self.kinds: list[str] = []
        self.patterns: list[_Pattern] = []
        self.global_patterns: list[_Pattern] = []
        words = [c for rec in self.recognizers for c in (rec.context or [])]
        self.context = ContextScorer(blank_pipeline(lemmas=True), words) if context else None
        ascii_exprs: list[bytes] = []
        nob_exprs: list[bytes] = []
        for i, rec in enumerate(self.recognizers):
            kind = self._kind(rec)
            self.kinds.append(kind)
            if kind not in ("pattern", "iban"):
                continue
            for pat in rec.patterns:
                rx = regex.compile(pat.regex, flags=rec.global_regex_flags)
                try:
                    plan = self._plan(pat.regex, rec.global_regex_flags)
                except regex_plan.Unsupported as exc:
                    log.warning("pattern %r runs unfiltered: %s", pat.name, exc)
                    self.global_patterns.append(_Pattern(i, pat, rx, None, None, None))
                    continue
                fwd, rev = _separator_searchers(plan)
                self.patterns.append(_Pattern(i, pat, rx, plan, fwd, rev))
                ascii_exprs.append(plan.hs_ascii)
                nob_exprs.append(plan.hs_nob)
        self.prefilter = self._prefilter(ascii_exprs, nob_exprs)
        self.margin = 8 + max(
            [(p.plan.pmax or 0) + (p.plan.wmax or 0) + (p.plan.guard or 0) for p in self.patterns]
            or [0]
        )
        self._phone_cache: dict[str, tuple[tuple[int, int], ...]] = {}
        warm_up()  # build lazily loaded tables now, not on a write
        self._phone_idx = [i for i, k in enumerate(self.kinds) if k == "phone"]
        if self._phone_idx:
            stretch, self._phone_fwd, self._phone_rev = self._phone_separators()
            self.prefilter = Prefilter(
                [*ascii_exprs, stretch.hs_ascii], [*nob_exprs, stretch.hs_nob]
            )
            # a phone number's digits lie within its maximal candidate length of its start
            self.margin = max(self.margin, 1024)

    # -- setup ---------------------------------------------------------------------------
    @staticmethod
    def _kind(rec: EntityRecognizer) -> str:
        analyze = type(rec).analyze
        if type(rec) is PhoneRecognizer:
            return "phone"
        if isinstance(rec, IbanRecognizer) and analyze is IbanRecognizer.analyze:
            return "iban"
        if isinstance(rec, PatternRecognizer) and analyze is PatternRecognizer.analyze:
            return "pattern"
        return "other"

    @classmethod
    def _plan(cls, pattern: str, flags: int) -> regex_plan.PatternPlan:
        """The most precise plan that is small enough for hyperscan and windows."""
        for loosen in (0, 1, 2):
            plan = regex_plan.plan(pattern, flags, loosen)
            if not cls._window_safe(plan):
                raise regex_plan.Unsupported("unbounded and consumes whitespace")
            if len(plan.hs_ascii) <= _MAX_EXPRESSION:
                return plan
        return plan

    def _prefilter(self, ascii_exprs: list[bytes], nob_exprs: list[bytes]) -> Prefilter:
        """Compile (or load from cache); a pattern hyperscan rejects runs unfiltered."""
        try:
            return Prefilter(ascii_exprs, nob_exprs)
        except hyperscan.error:
            pass
        keep = []
        for i, (a, b) in enumerate(zip(ascii_exprs, nob_exprs, strict=True)):
            try:
                Prefilter([a], [b])
                keep.append(i)
            except hyperscan.error as exc:
                p = self.patterns[i]
                log.warning("pattern %r runs unfiltered: %s", p.pattern.name, exc)
                self.global_patterns.append(_Pattern(p.rec, p.pattern, p.rx, None, None, None))
        self.patterns = [self.patterns[i] for i in keep]
        return Prefilter([ascii_exprs[i] for i in keep], [nob_exprs[i] for i in keep])

    @staticmethod
    def _window_safe(plan: regex_plan.PatternPlan) -> bool:
        """Unbounded extents are bounded by separators; windows cut at whitespace."""
        unbounded = plan.pmax is None or plan.wmax is None or plan.guard is None
        return not unbounded or not (EDGE_CHARS & plan.consumable)

    @staticmethod
    def _phone_separators() -> tuple[regex_plan.PatternPlan, regex.Pattern, regex.Pattern]:
        """Prefilter plan for separator-free stretches holding 4 digits, and separator
        searches (forward, reverse), for phonenumbers' candidate regex."""
        pat = phonenumbermatcher._PATTERN
        consumable = regex_plan.consumable_ascii(pat.pattern, pat.flags)
        cls = re.escape("".join(chr(c) for c in range(128) if chr(c) not in consumable))
        plan = regex_plan.plan(rf"\d(?:[^{cls}]*\d){{{_MIN_PHONE_DIGITS - 1}}}", 0)
        return plan, regex.compile(f"[{cls}]"), regex.compile(f"[{cls}]", regex.REVERSE)

    # -- public --------------------------------------------------------------------------
    def analyze_range(
        self, text: str, lo: int, hi: int, mins: Mapping[str, float] | None = None
    ) -> list[RawResult]:
        """Results starting in [lo, hi), with whole-text semantics (and, when lo == 0,
        those of recognizers that must see the whole text), after each recognizer's own
        duplicate removal, with context flags set where they can change the score.

        mins: per-entity score thresholds the caller will apply (None: keep all). Work
        whose results cannot reach them is skipped; the surviving findings are
        unchanged. This matters for phone numbers: phonenumbers' matcher is by far the
        most expensive recognizer and scores 0.4 (0.75 with a context word), so with a
        threshold above 0.4 only stretches with a phone context word in reach are run.
        """
        doc = self.context.doc(text) if self.context is not None else None
        phone_min = (mins or {}).get("PHONE_NUMBER", 0.0) if self._phone_idx else 0.0
        raw: list[RawResult] = []
        w = lo
        while w < hi:
            w_end = min(hi, w + WINDOW)
            raw.extend(self._window(text, w, w_end, doc, phone_min))
            w = w_end
        if lo == 0:
            raw.extend(self._globals(text))
        by_rec: dict[int, list[RawResult]] = {}
        for r in raw:
            by_rec.setdefault(r.rec, []).append(r)
        out: list[RawResult] = []
        for i, group in by_rec.items():
            if self.kinds[i] in ("pattern", "phone"):
                group = dedupe_raw(group)
            context = self.recognizers[i].context
            for r in group:
                if mins is not None:
                    best = boosted(r.score) if context and doc is not None else r.score
                    if best < mins.get(r.entity, 0.0):
                        continue
                if doc is not None and context and r.score < 1.0:
                    r.boost = doc.any_supported(r.start, r.start + 1, context)
                out.append(r)
        return out

    # -- regex recognizers --------------------------------------------------------------
    def _window(
        self, text: str, lo: int, hi: int, doc: DocContext | None, phone_min: float
    ) -> list[RawResult]:
        n = len(text)
        npat = len(self.patterns)
        ov = 2 * self.margin
        while True:
            scan_lo = _ws_before(text, lo - ov)
            scan_hi = _ws_after(text, hi + ov)
            hits = self.prefilter.scan(text, scan_lo, scan_hi)
            per_pattern: list[tuple[_Pattern, list[tuple[int, int]]]] = []
            complete = True
            for pid, ends in hits.items():
                if pid >= npat:
                    continue
                p = self.patterns[pid]
                ivs = self._intervals(p, text, ends)
                for a, b in ivs:
                    if b <= lo or a >= hi:
                        continue
                    if (scan_lo > 0 and a < scan_lo + self.margin) or (
                        scan_hi < n and b > scan_hi - self.margin
                    ):
                        complete = False
                        break
                if not complete:
                    break
                per_pattern.append((p, ivs))
            if complete:
                break
            ov *= 4
        out: list[RawResult] = []
        for p, ivs in per_pattern:
            spans = self._matches(p, text, ivs, lo, hi)
            if spans:
                out.extend(self._results(p, text, spans))
        if self._phone_idx and npat in hits:
            out.extend(self._phones(text, lo, hi, hits[npat], doc, phone_min))
        return out

    def _intervals(self, p: _Pattern, text: str, ends: list[int]) -> list[tuple[int, int]]:
        plan = p.plan
        assert plan is not None
        n = len(text)
        ivs: list[tuple[int, int]] = []
        cur_a = cur_b = -1
        for e in ends:
            if plan.pmax is not None:
                a = e - plan.pmax
            elif cur_b > e:
                a = cur_a  # same separator-free stretch as the previous report
            else:
                m = p.sep_rev.search(text, 0, e) if p.sep_rev else None
                a = 0 if m is None else m.end()
            if plan.wmax is not None:
                b = e - plan.pmin + plan.wmax
            elif cur_b > e:
                b = cur_b
            else:
                m = p.sep_fwd.search(text, e) if p.sep_fwd else None
                b = n if m is None else m.start()
            a, b = max(a, 0), min(b, n)
            if cur_b >= 0 and a <= cur_b:
                cur_b = max(cur_b, b)
                cur_a = min(cur_a, a)
            else:
                if cur_b >= 0:
                    ivs.append((cur_a, cur_b))
                cur_a, cur_b = a, b
        if cur_b >= 0:
            ivs.append((cur_a, cur_b))
        return ivs

    def _matches(
        self, p: _Pattern, text: str, ivs, lo: int, hi: int
    ) -> list[tuple[int, int, object]]:
        plan = p.plan
        assert plan is not None
        n = len(text)
        found = []
        for a, b in ivs:
            if b <= lo or a >= hi:
                continue
            endpos = n if plan.guard is None else min(n, b + plan.guard)
            for m in p.rx.finditer(text, a, endpos):
                s = m.start()
                if s >= b:
                    break
                if m.end() > b:  # would contradict the analysis; stay exact anyway
                    log.error("pattern %r escaped its interval; rescanning", p.pattern.name)
                    return [
                        (x.start(), x.end(), x) for x in p.rx.finditer(text) if lo <= x.start() < hi
                    ]
                if lo <= s < hi:
                    found.append((s, m.end(), m))
        return found

    def _globals(self, text: str) -> list[RawResult]:
        out: list[RawResult] = []
        for p in self.global_patterns:
            spans = [(m.start(), m.end(), m) for m in p.rx.finditer(text)]
            out.extend(self._results(p, text, spans))
        for i, rec in enumerate(self.recognizers):
            if self.kinds[i] == "other":
                for r in (
                    rec.analyze(text=text, entities=rec.supported_entities, nlp_artifacts=None)
                    or []
                ):
                    out.append(RawResult(i, r.entity_type, r.start, r.end, r.score))
        return out

    def _results(self, p: _Pattern, text: str, spans) -> list[RawResult]:
        """presidio's per-match scoring (PatternRecognizer / IbanRecognizer logic)."""
        rec = self.recognizers[p.rec]
        entity = rec.supported_entities[0]
        out: list[RawResult] = []
        iban = self.kinds[p.rec] == "iban"
        for s, e, m in spans:
            if iban:
                for grp in reversed(range(1, len(m.groups()) + 1)):
                    end = m.span(grp)[1] if m.span(grp)[1] > 0 else e
                    cur = text[s:end]
                    if cur == "":
                        continue
                    score = p.pattern.score
                    ok = rec.validate_result(cur)
                    if ok is not None:
                        score = EntityRecognizer.MAX_SCORE if ok else EntityRecognizer.MIN_SCORE
                    if score > EntityRecognizer.MIN_SCORE:
                        out.append(RawResult(p.rec, entity, s, end, score))
                        break
                continue
            cur = text[s:e]
            if cur == "":
                continue
            score = p.pattern.score
            ok = rec.validate_result(cur)
            if ok is not None:
                score = EntityRecognizer.MAX_SCORE if ok else EntityRecognizer.MIN_SCORE
            bad = rec.invalidate_result(cur)
            if bad is not None and bad:
                score = EntityRecognizer.MIN_SCORE
            if score > EntityRecognizer.MIN_SCORE:
                out.append(RawResult(p.rec, entity, s, e, score))
        return out

    # -- phone numbers ------------------------------------------------------------------
    def _phones(
        self, text: str, lo: int, hi: int, ends: list[int], doc: DocContext | None, phone_min: float
    ) -> list[RawResult]:
        """phonenumbers' matcher on each digit-bearing stretch free of separators.

        Its candidate regex cannot consume a separator, starts with a digit or a leading
        bracket/plus, and ends with a digit or '#'; the matcher looks one character
        around a candidate (and, for time stamps, at ":dd" after it, which would be part
        of the stretch). So running it on [first start char - 1, last end char + 1]
        of each stretch gives the whole-text answer; a stretch with fewer digits than
        the shortest valid number (4, a German pager number) cannot yield one.
        """
        out: list[RawResult] = []
        n = len(text)
        lazy = phone_min > PhoneRecognizer.SCORE
        contexts = [c for i in self._phone_idx for c in (self.recognizers[i].context or [])]
        if lazy and (
            doc is None
            or not contexts
            or boosted(PhoneRecognizer.SCORE) < phone_min
            or not doc.present(contexts)
        ):
            return out  # no phone number can reach the threshold
        stretch_end = -1
        for e in ends:
            if e <= stretch_end:
                continue
            m = self._phone_rev.search(text, 0, e)
            a = 0 if m is None else m.end()
            m = self._phone_fwd.search(text, e)
            b = stretch_end = n if m is None else m.start()
            if b <= lo or a >= hi or len(_DIGITS.findall(text, a, b)) < _MIN_PHONE_DIGITS:
                continue
            x = _PHONE_START.search(text, a, b).start()
            y = _PHONE_END.search(text, a, b).end()
            if lazy and not doc.any_supported(x, y, contexts):  # type: ignore[union-attr]
                continue
            base = max(0, x - 1)
            for rs, re_ in self._phone_chunk(text[base : min(n, y + 1)]):
                s = base + rs
                if lo <= s < hi:
                    for i in self._phone_idx:
                        out.append(
                            RawResult(
                                i,
                                self.recognizers[i].supported_entities[0],
                                s,
                                base + re_,
                                PhoneRecognizer.SCORE,
                            )
                        )
        return out

    def _phone_chunk(self, chunk: str) -> tuple[tuple[int, int], ...]:
        hit = self._phone_cache.get(chunk)
        if hit is None:
            rec = self.recognizers[self.kinds.index("phone")]
            res = rec.analyze(chunk, rec.supported_entities)
            hit = tuple(sorted((r.start, r.end) for r in res))
            if len(self._phone_cache) > _PHONE_CACHE_LIMIT:
                self._phone_cache.clear()
            self._phone_cache[chunk] = hit
        return hit


def _ws_before(text: str, pos: int) -> int:
    """A scan start at or before pos that follows an edge character (or 0)."""
    if pos <= 0:
        return 0
    i = pos
    while i > 0 and text[i - 1] not in EDGE_CHARS:
        i -= 1
        if pos - i > 4096:
            j = text.rfind(" ", 0, i)
            return 0 if j < 0 else j + 1
    return i


def _ws_after(text: str, pos: int) -> int:
    """A scan end at or after pos that sits on an edge character (or the text end)."""
    n = len(text)
    if pos >= n:
        return n
    i = pos
    while i < n and text[i] not in EDGE_CHARS:
        i += 1
        if i - pos > 4096:
            j = text.find(" ", i)
            return n if j < 0 else j
    return i

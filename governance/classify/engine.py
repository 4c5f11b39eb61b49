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

import contextlib
import gc
import logging
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import hyperscan
import phonenumbers
import regex
from phonenumbers import phonenumbermatcher
from presidio_analyzer import EntityRecognizer, PatternRecognizer
from presidio_analyzer.predefined_recognizers import IbanRecognizer, PhoneRecognizer

from . import phones, regex_plan
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


# A recognizer result before duplicate removal: (index into Engine.recognizers, entity,
# start, end, score, context word found). A plain tuple of plain values, because the
# garbage collector stops tracking those: a big document holds thousands of results
# while it is analysed, and as objects they would set off full collections, which cost
# ~0.1 s each in a process that has loaded presidio and spaCy.
RawResult = tuple[int, str, int, int, float, bool]


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


def remove_duplicates(
    items: Iterable[tuple[str, int, int, float]],
) -> list[tuple[str, int, int, float]]:
    """presidio's EntityRecognizer.remove_duplicates on (entity, start, end, score).

    Same decisions without building RecognizerResult objects (hashing each through
    an f-string): equal results once, zero scores dropped, a result dropped when
    another of its type contains it with an equal or higher score. Order: presidio's
    (score descending, then position).
    """
    ordered = sorted(set(items), key=lambda r: (r[0], r[1], r[1] - r[2], -r[3]))
    kept: list[tuple[str, int, int, float]] = []
    active: list[tuple[str, int, int, float]] = []
    entity = None
    for r in ordered:
        if r[0] != entity:
            entity, active = r[0], []
        if r[3] == 0:
            continue
        active = [f for f in active if f[2] >= r[1]]
        if any(r[1] >= f[1] and r[2] <= f[2] and r[3] <= f[3] for f in active):
            continue
        kept.append(r)
        active.append(r)
    kept.sort(key=lambda r: (-r[3], r[1], r[1] - r[2]))
    return kept


def dedupe_raw(results: list[RawResult]) -> list[RawResult]:
    """presidio's EntityRecognizer.remove_duplicates, keeping our records."""
    if len(results) < 2:
        return results  # nothing to remove (scores are never 0 here)
    keyed = {(r[1], r[2], r[3], r[4]): r for r in results}
    return [keyed[k] for k in remove_duplicates(keyed)]


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
        if self.context is not None:
            for rec in self.recognizers:  # compile the zones scanners now, not on a write
                if rec.context:
                    self.context.positions_scanner(tuple(rec.context))
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
        self._gate_mins: Mapping[str, float] | None = None
        self._gate: list[bool] = [False] * len(self.patterns)
        self._phone_cache: dict[str, tuple[tuple[int, int], ...]] = {}
        self._phone_shapes: list[phones.RegionShape] | None = None
        self._phone_order: list[int] = []  # indices into the shapes, most successful first
        self._phone_wins: list[int] = []
        warm_up()  # build lazily loaded tables now, not on a write
        self._warm_ibans()
        self._phone_idx = [i for i, k in enumerate(self.kinds) if k == "phone"]
        self._phone_contexts = [
            c for i in self._phone_idx for c in (self.recognizers[i].context or [])
        ]
        self._other_idx = [i for i, k in enumerate(self.kinds) if k == "other"]
        if self._phone_idx:
            (hs_ascii, hs_nob), self._phone_fwd, self._phone_rev = self._phone_separators()
            self.prefilter = Prefilter([*ascii_exprs, hs_ascii], [*nob_exprs, hs_nob])
            # a phone number's digits lie within its maximal candidate length of its start
            self.margin = max(self.margin, 1024)
            self._warm_phones()
        # Collect what loading presidio, spaCy and phonenumbers left behind now: left to
        # the collector, that backlog sets off a full collection (~0.1 s with this heap)
        # in the middle of some later write.
        gc.collect()

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
    def _phone_separators() -> tuple[tuple[bytes, bytes], regex.Pattern, regex.Pattern]:
        """Prefilter expressions (with and without word boundaries) for separator-free
        stretches holding 4 digits, and separator searches (forward, reverse), for
        phonenumbers' candidate regex.

        Each stretch is reported once: at the separator that ends it, or at the end of
        the scanned text. (Reporting where its 4th digit lies, hyperscan would report
        every later digit too: most callbacks of a scan, for no new stretch.)
        """
        pat = phonenumbermatcher._PATTERN
        consumable = regex_plan.consumable_ascii(pat.pattern, pat.flags)
        cls = re.escape("".join(chr(c) for c in range(128) if chr(c) not in consumable))
        plan = regex_plan.plan(rf"\d(?:[^{cls}]*\d){{{_MIN_PHONE_DIGITS - 1}}}", 0)
        rest, _ = regex_plan.expression(rf"[^{cls}]*")
        sep, _ = regex_plan.expression(rf"[{cls}]")
        tail = rest + b"(?:" + sep + rb"|\z)"
        return (
            (plan.hs_ascii + tail, plan.hs_nob + tail),
            regex.compile(f"[{cls}]"),
            regex.compile(f"[{cls}]", regex.REVERSE),
        )

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
        if doc is not None:
            doc.lo, doc.hi = lo, hi
        phone_min = (mins or {}).get("PHONE_NUMBER", 0.0) if self._phone_idx else 0.0
        gate = self._gates(mins)
        raw: list[RawResult] = []
        w = lo
        while w < hi:
            w_end = min(hi, w + WINDOW)
            raw.extend(self._window(text, w, w_end, doc, phone_min, gate))
            w = w_end
        if lo == 0:
            raw.extend(self._globals(text))
        if not raw:
            return raw
        by_rec: dict[int, list[RawResult]] = {}
        for r in raw:
            by_rec.setdefault(r[0], []).append(r)
        # With the whole text in one range, each recognizer's duplicates are removed
        # here for good, so a result whose final score misses its threshold can go now:
        # it could only remove results of its type with lower scores (see
        # `remove_duplicates`), which miss it too. Across ranges it must stay, since
        # it may still remove a result from another range before the boost.
        final = mins is not None and lo == 0 and hi == len(text)
        groups = [
            (i, dedupe_raw(g) if len(g) > 1 and self.kinds[i] in ("pattern", "phone") else g)
            for i, g in by_rec.items()
        ]
        if doc is not None:
            for i, group in groups:
                context = self.recognizers[i].context
                if context:
                    floor = mins.get(group[0][1], 0.0) if mins is not None else 0.0
                    n = len([r for r in group if r[4] < 1.0 and boosted(r[4]) >= floor])
                    if n:
                        doc.expect(context, n)
        out: list[RawResult] = []
        for i, group in groups:
            context = self.recognizers[i].context if doc is not None else None
            for r in group:
                score = r[4]
                floor = mins.get(r[1], 0.0) if mins is not None else 0.0
                if context and score < 1.0:
                    if boosted(score) < floor:
                        continue
                    if doc.any_supported(r[2], r[2] + 1, context):  # type: ignore[union-attr]
                        r = (r[0], r[1], r[2], r[3], score, True)
                    elif final and score < floor:
                        continue
                elif score < floor:
                    continue
                out.append(r)
        return out

    # -- regex recognizers --------------------------------------------------------------
    def _gates(self, mins: Mapping[str, float] | None) -> list[bool] | None:
        """Per pattern: can its results reach the caller's threshold only with a
        context boost? (Its score is below the threshold and its recognizer never
        raises a score by validation.) None when no pattern is so gated.

        Why: such a pattern's matches matter only in a document where one of its
        recognizer's context words occurs; elsewhere the regex, validation and
        context walks for them are skipped. Exact: a result that stays below its
        threshold is dropped, and can only remove results of its type with lower
        scores, which are dropped too (see `remove_duplicates`).
        """
        if mins is None:
            return None
        if mins != self._gate_mins:
            gate = []
            for p in self.patterns:
                rec = self.recognizers[p.rec]
                lifts = self.kinds[p.rec] == "iban" or (
                    type(rec).validate_result is not PatternRecognizer.validate_result
                )
                floor = mins.get(rec.supported_entities[0], 0.0)
                gate.append(not lifts and p.pattern.score < floor)
            self._gate = gate
            self._gate_mins = dict(mins)
        return self._gate if any(self._gate) else None

    def _window(
        self,
        text: str,
        lo: int,
        hi: int,
        doc: DocContext | None,
        phone_min: float,
        gate: list[bool] | None = None,
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
                if gate is not None and gate[pid]:
                    context = self.recognizers[p.rec].context
                    if doc is None or not context or not doc.present(context):
                        continue  # no result of it can reach the threshold
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
        for i in self._other_idx:
            rec = self.recognizers[i]
            for r in (
                rec.analyze(text=text, entities=rec.supported_entities, nlp_artifacts=None) or []
            ):
                out.append((i, r.entity_type, r.start, r.end, r.score, False))
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
                        out.append((p.rec, entity, s, end, score, False))
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
                out.append((p.rec, entity, s, e, score, False))
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
        contexts = self._phone_contexts
        if lazy and (
            doc is None
            or not contexts
            or boosted(PhoneRecognizer.SCORE) < phone_min
            or not doc.present(contexts)
        ):
            return out  # no phone number can reach the threshold
        stretches: list[tuple[int, int]] = []
        stretch_end = -1
        for e in ends:
            if e <= stretch_end:
                continue
            if self._phone_fwd.match(text, e - 1):
                e -= 1  # reported at the separator after the stretch
            m = self._phone_rev.search(text, 0, e)
            a = 0 if m is None else m.end()
            m = self._phone_fwd.search(text, e)
            b = stretch_end = n if m is None else m.start()
            if b <= lo or a >= hi or len(_DIGITS.findall(text, a, b)) < _MIN_PHONE_DIGITS:
                continue
            x = _PHONE_START.search(text, a, b).start()
            y = _PHONE_END.search(text, a, b).end()
            stretches.append((x, y))
        if lazy and stretches:
            # zones cover the whole text: announce this window's rate over the rest of
            # the range (windows come in order)
            rest = max(1, doc.hi - lo)  # type: ignore[union-attr]
            doc.expect(contexts, len(stretches) * rest // max(1, hi - lo))  # type: ignore[union-attr]
        for x, y in stretches:
            if lazy and not doc.any_supported(x, y, contexts):  # type: ignore[union-attr]
                continue
            base = max(0, x - 1)
            for rs, re_ in self._phone_chunk(text[base : min(n, y + 1)], (x - base, y - base)):
                s = base + rs
                if lo <= s < hi:
                    for i in self._phone_idx:
                        out.append(
                            (
                                i,
                                self.recognizers[i].supported_entities[0],
                                s,
                                base + re_,
                                PhoneRecognizer.SCORE,
                                False,
                            )
                        )
        return out

    def _phone_chunk(
        self, chunk: str, extent: tuple[int, int] | None = None
    ) -> tuple[tuple[int, int], ...]:
        hit = self._phone_cache.get(chunk)
        if hit is None:
            hit = self._phone_spans(chunk, extent)
            if len(self._phone_cache) > _PHONE_CACHE_LIMIT:
                self._phone_cache.clear()
            self._phone_cache[chunk] = hit
        return hit

    def _phone_spans(
        self, text: str, extent: tuple[int, int] | None = None
    ) -> tuple[tuple[int, int], ...]:
        """PhoneRecognizer.analyze's spans, sorted, without its per-match re-parse.

        presidio parses every match again (without a region) only to name the region
        in the explanation; the spans, all scored PhoneRecognizer.SCORE, come from the
        matcher alone. Then its remove_duplicates: equal spans once, and a span inside
        another dropped (equal scores). So once one region's matcher returns `extent`,
        the span no match can exceed (first possible start to last possible end), the
        answer is that span alone and the other regions need not run. The answer is a
        union over regions, so their order is free: the region that most often
        returned a whole extent goes first. Each region runs `phones.Matcher`, which
        skips parsing candidates the region cannot validate (see `phones`).
        """
        rec = self.recognizers[self.kinds.index("phone")]
        assert isinstance(rec, PhoneRecognizer)
        shapes = self._shapes(rec)
        found: set[tuple[int, int]] = set()
        if shapes is None:
            for region in rec.supported_regions:
                for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=rec.leniency):
                    found.add((m.start, m.end))
                if extent is not None and extent in found:
                    return (extent,)
        else:
            for j, i in enumerate(self._phone_order):
                for m in phones.Matcher(text, shapes[i], rec.leniency):
                    found.add((m.start, m.end))
                if extent is not None and extent in found:
                    self._phone_won(j)
                    return (extent,)
        spans = sorted(found, key=lambda se: (se[0], se[0] - se[1]))
        kept: list[tuple[int, int]] = []
        for s, e in spans:
            if not any(ks <= s and e <= ke for ks, ke in kept):
                kept.append((s, e))
        return tuple(sorted(kept))

    def _shapes(self, rec: PhoneRecognizer) -> list[phones.RegionShape] | None:
        """One RegionShape per supported region (None: use phonenumbers' matcher as is)."""
        if self._phone_shapes is None:
            if rec.leniency != phonenumbers.Leniency.VALID or not phones.supported():
                return None
            self._phone_shapes = [phones.RegionShape(r) for r in rec.supported_regions]
            self._phone_order = list(range(len(self._phone_shapes)))
            self._phone_wins = [0] * len(self._phone_shapes)
        return self._phone_shapes

    def _phone_won(self, j: int) -> None:
        """Count a whole-extent answer for the j-th region tried; keep the order by
        wins (ties: presidio's order)."""
        order, wins = self._phone_order, self._phone_wins
        i = order[j]
        wins[i] += 1
        if wins[i] >= 1 << 20:
            self._phone_wins = wins = [w >> 1 for w in wins]
        while j > 0 and (wins[order[j - 1]], -order[j - 1]) < (wins[i], -i):
            order[j] = order[j - 1]
            j -= 1
        order[j] = i

    def _warm_ibans(self) -> None:
        """Compile IbanRecognizer's per-country format regexes now: it compiles one
        (through `regex`'s cache) the first time it validates an IBAN of that country,
        ~0.4 ms each, on a write."""
        for i, kind in enumerate(self.kinds):
            if kind != "iban":
                continue
            rec = self.recognizers[i]
            check = getattr(rec, "_IbanRecognizer__is_valid_format", None)
            countries = getattr(sys.modules.get(type(rec).__module__), "regex_per_country", None)
            if check is None or not isinstance(countries, dict):
                continue
            for country in countries:
                with contextlib.suppress(Exception):  # only a warm-up
                    check(country + "00", rec.BOSEOS)

    def _warm_phones(self) -> None:
        """Load phonenumbers' metadata and compile its patterns now: lazily, the first
        writes with phone numbers pay for them (milliseconds each)."""
        phonenumbers.PhoneMetadata.load_all()
        rec = self.recognizers[self.kinds.index("phone")]
        assert isinstance(rec, PhoneRecognizer)
        sample = ["078-05-1120 4111 1111 1111 1111 212.555.0123 (415) 555-0188 x12"]
        for region in rec.supported_regions:
            for kind in (
                phonenumbers.PhoneNumberType.FIXED_LINE,
                phonenumbers.PhoneNumberType.MOBILE,
            ):
                number = phonenumbers.example_number_for_type(region, kind)
                if number is None:
                    continue
                for fmt in (
                    phonenumbers.PhoneNumberFormat.NATIONAL,
                    phonenumbers.PhoneNumberFormat.INTERNATIONAL,
                    phonenumbers.PhoneNumberFormat.E164,
                ):
                    sample.append(phonenumbers.format_number(number, fmt))
        self._phone_spans(", call ".join(sample))


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

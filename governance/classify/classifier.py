"""`Classifier`: presidio's pattern findings, fast enough for the write path.

The findings are, by construction and by test, those of stock presidio configured as in
`stock.reference_engine` (same recognizers, spans and scores), followed by per-entity
score thresholds. Large texts are split into ranges analysed in parallel by worker
processes; each range owns the results starting inside it and sees the whole text, so
nothing is found twice or lost at a range boundary.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor

from .binary import decode_text, is_binary
from .context import ArtifactsContext, boosted, supported
from .engine import Engine, RawResult, remove_duplicates
from .findings import Finding
from .stock import LANGUAGE, load_model, nlp_engine, offline_registry

# Everything presidio's default English registry detects with patterns.
DEFAULT_ENTITIES: tuple[str, ...] = (
    "CREDIT_CARD",
    "CRYPTO",
    "DATE_TIME",
    "EMAIL_ADDRESS",
    "IBAN_CODE",
    "IP_ADDRESS",
    "MAC_ADDRESS",
    "MEDICAL_LICENSE",
    "PHONE_NUMBER",
    "UK_NHS",
    "URL",
    "US_BANK_NUMBER",
    "US_DRIVER_LICENSE",
    "US_ITIN",
    "US_PASSPORT",
    "US_SSN",
    "UUID",
)

# Minimum score per entity. presidio's scores: validated checksums 1.0; well-formed
# patterns 0.5-0.6; phone numbers 0.4; "weak" patterns 0.01-0.3; +0.35 with a context
# word nearby (at least 0.4). Thresholds of 0.4 keep every "medium" pattern and every
# weak one with context, and drop bare digit runs (bank account, licence, passport).
# PHONE_NUMBER requires context: phonenumbers accepts most bare 10-digit ids as valid
# numbers, so at 0.4 identifier-heavy text is flooded with false phone numbers.
DEFAULT_THRESHOLDS: dict[str, float] = {
    "CREDIT_CARD": 0.4,
    "CRYPTO": 0.4,
    "DATE_TIME": 0.6,
    "EMAIL_ADDRESS": 0.4,
    "IBAN_CODE": 0.4,
    "IP_ADDRESS": 0.4,
    "MAC_ADDRESS": 0.4,
    "MEDICAL_LICENSE": 0.4,
    "PHONE_NUMBER": 0.5,
    "UK_NHS": 0.4,
    "URL": 0.5,
    "US_BANK_NUMBER": 0.4,
    "US_DRIVER_LICENSE": 0.4,
    "US_ITIN": 0.4,
    "US_PASSPORT": 0.4,
    "US_SSN": 0.4,
    "UUID": 0.5,
}
FALLBACK_THRESHOLD = 0.4
PARALLEL_MIN_CHARS = 2_000_000
_NER_WINDOW = 500_000

_worker_engine: Engine | None = None


def _init_worker(entities: tuple[str, ...], context: bool) -> None:
    global _worker_engine
    _worker_engine = Engine(entities, context=context)


def _work(text: str, lo: int, hi: int, mins: dict[str, float] | None) -> list[RawResult]:
    assert _worker_engine is not None
    return _worker_engine.analyze_range(text, lo, hi, mins)


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = [n * i // parts for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts) if bounds[i] < bounds[i + 1]]


def _dedupe(items: Iterable[tuple[str, int, int, float]]) -> list[tuple[str, int, int, float]]:
    """presidio's EntityRecognizer.remove_duplicates (per entity type), on plain tuples."""
    items = list(items)
    if len(items) < 2:
        return [r for r in items if r[3] > 0]
    return remove_duplicates(items)


class Classifier:
    """PII classifier for text on the write path. Not thread-safe: one per thread.

    entities: entity types to look for (default: every pattern entity of presidio's
        English registry, plus the model's entities in NER mode).
    thresholds: minimum score per entity (defaults: DEFAULT_THRESHOLDS; others 0.4).
    context: score boosts from context words, as presidio with a tokenizer whose lemma
        is the token text; False reproduces a bare `spacy.blank("en")` (no boosts).
    ner_model: an *installed* spaCy model (name or path) for NER entities such as
        PERSON; never downloaded. Much slower; runs in this process.
    workers: processes for inputs of `parallel_min_chars` or more (default: all cores);
        this process works on one share. mp_context "spawn" is safe in threaded servers;
        "fork" starts instantly but only before other threads exist.
    """

    def __init__(
        self,
        entities: Sequence[str] | None = None,
        thresholds: Mapping[str, float] | None = None,
        *,
        context: bool = True,
        ner_model: str | None = None,
        workers: int | None = None,
        parallel_min_chars: int = PARALLEL_MIN_CHARS,
        mp_context: str = "spawn",
    ) -> None:
        self._ner = None
        if ner_model:
            engine = nlp_engine(load_model(ner_model))
            registry = offline_registry()
            registry.add_nlp_recognizer(nlp_engine=engine)
            self._ner = (
                engine,
                [
                    r
                    for r in registry.recognizers
                    if r.supported_language == LANGUAGE and type(r).__name__ == "SpacyRecognizer"
                ],
            )
        if entities is None:
            extra = [e for r in (self._ner[1] if self._ner else []) for e in r.supported_entities]
            entities = tuple(dict.fromkeys([*DEFAULT_ENTITIES, *extra]))
        self.entities = tuple(entities)
        self.thresholds = dict(DEFAULT_THRESHOLDS)
        if thresholds is not None:
            self.thresholds.update(thresholds)
        self._context = context
        pattern_entities = tuple(e for e in self.entities if e in DEFAULT_ENTITIES)
        self._engine = Engine(pattern_entities, context=context and not self._ner)
        self._workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self._parallel_min = parallel_min_chars
        self._pool: ProcessPoolExecutor | None = None
        self._mp_context = mp_context
        self._mins: dict[str, float] = {}
        self._mins_for: dict[str, float] | None = None

    # -- public ----------------------------------------------------------------------------
    def analyze(self, text: str) -> list[Finding]:
        """Findings at or above the thresholds, sorted by position."""
        if self._mins_for != self.thresholds:  # built once, rebuilt if thresholds change
            self._mins = {e: self.thresholds.get(e, FALLBACK_THRESHOLD) for e in self.entities}
            self._mins_for = dict(self.thresholds)
        items = self._analyze(text, self._mins)
        out = [
            Finding(s, t, e, sc)
            for e, s, t, sc in items
            if sc >= self.thresholds.get(e, FALLBACK_THRESHOLD)
        ]
        out.sort()
        return out

    def analyze_bytes(self, data: bytes) -> list[Finding] | None:
        """Findings for stored content, or None when it is binary (not scanned)."""
        if is_binary(data):
            return None
        return self.analyze(decode_text(data))

    def analyze_raw(self, text: str) -> list[tuple[str, int, int, float]]:
        """All findings as presidio returns them (no thresholds): (entity, start, end, score)."""
        return self._analyze(text, None)

    def _analyze(
        self, text: str, mins: dict[str, float] | None
    ) -> list[tuple[str, int, int, float]]:
        if not text:
            return []
        raw, deduped = self._raw(text, mins)
        if deduped and not self._ner:
            # one range: duplicates per recognizer are gone and context flags are final
            return _dedupe([(r[1], r[2], r[3], boosted(r[4]) if r[5] else r[4]) for r in raw])
        recs = self._engine.recognizers
        kinds = self._engine.kinds
        # 1. per-recognizer duplicate removal inside PatternRecognizer/PhoneRecognizer
        by_rec: dict[int, list[RawResult]] = {}
        for r in raw:
            by_rec.setdefault(r[0], []).append(r)
        scored: list[tuple[str, int, int, float]] = []
        ctx = self._ner_context(text) if self._ner else None
        for i, group in by_rec.items():
            boost = {(r[2], r[3]): r[5] for r in group}
            items = [(r[1], r[2], r[3], r[4]) for r in group]
            if kinds[i] in ("pattern", "phone") and not deduped:
                items = _dedupe(items)
            # 2. context enhancement (LemmaContextAwareEnhancer)
            context = recs[i].context
            for e, s, t, sc in items:
                if context and (boost.get((s, t)) if ctx is None else ctx(s, context)):
                    sc = boosted(sc)
                scored.append((e, s, t, sc))
        if self._ner:
            scored.extend(self._ner_results(text))
        # 3. engine-level duplicate removal across recognizers
        return _dedupe(scored)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------
    def _raw(self, text: str, mins: dict[str, float] | None) -> tuple[list[RawResult], bool]:
        """Results, and whether each recognizer's duplicates are removed already (one
        range: the engine did it; several: results meet only here)."""
        n = len(text)
        if self._workers < 2 or n < self._parallel_min:
            return self._engine.analyze_range(text, 0, n, mins), True
        ranges = _split(n, self._workers)
        pool = self._get_pool()
        futures: list[Future] = [pool.submit(_work, text, lo, hi, mins) for lo, hi in ranges[1:]]
        out = self._engine.analyze_range(text, *ranges[0], mins)
        for f in futures:
            out.extend(f.result())
        return out, False

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self._workers - 1,
                mp_context=multiprocessing.get_context(self._mp_context),
                initializer=_init_worker,
                initargs=(self._engine_entities(), self._context),
            )
        return self._pool

    def _engine_entities(self) -> tuple[str, ...]:
        return tuple(e for e in self.entities if e in DEFAULT_ENTITIES)

    def _ner_windows(self, text: str) -> list[tuple[int, str]]:
        """spaCy's length limit: cut very long texts at whitespace (approximate at cuts)."""
        out, lo, n = [], 0, len(text)
        while lo < n:
            hi = min(n, lo + _NER_WINDOW)
            if hi < n:
                cut = text.rfind("\n", lo, hi)
                cut = cut if cut > lo else text.rfind(" ", lo, hi)
                hi = cut + 1 if cut > lo else hi
            out.append((lo, text[lo:hi]))
            lo = hi
        return out

    def _ner_context(self, text: str):
        assert self._ner is not None
        engine, _ = self._ner
        self._ner_docs = [
            (lo, engine.process_text(chunk, LANGUAGE)) for lo, chunk in self._ner_windows(text)
        ]
        ctxs = [(lo, ArtifactsContext(a)) for lo, a in self._ner_docs]

        def has_context(start: int, context: list[str]) -> bool:
            lo, c = max((x for x in ctxs if x[0] <= start), key=lambda x: x[0])
            return supported(c.words(start - lo), context)

        return has_context

    def _ner_results(self, text: str) -> list[tuple[str, int, int, float]]:
        assert self._ner is not None
        _, recognizers = self._ner
        out = []
        for lo, artifacts in self._ner_docs:
            chunk = artifacts.tokens.text
            for rec in recognizers:
                for r in rec.analyze(chunk, list(self.entities), artifacts) or []:
                    out.append((r.entity_type, lo + r.start, lo + r.end, r.score))
        return out

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


__all__ = ["DEFAULT_ENTITIES", "DEFAULT_THRESHOLDS", "Classifier", "decode_text", "is_binary"]

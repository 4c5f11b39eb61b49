"""The fast classifier returns exactly stock presidio's findings (pattern mode).

Same recognizers, same text: same entity type, start, end and score, on a seeded corpus
of prose, code, JSON, CSV, logs and identifier-heavy text (1 KB .. 100 KB) with PII of
every supported type injected, half of it next to context words, some of it running
into neighbouring tokens. Also checks the thresholded output, window and process
boundaries, the context-free mode, NER mode and offline operation.
"""

from __future__ import annotations

import random
import socket

import pytest

from governance.classify import Classifier, corpus
from governance.classify import engine as engine_mod
from governance.classify.classifier import DEFAULT_ENTITIES, DEFAULT_THRESHOLDS
from governance.classify.stock import IDENTITY_LEMMA, blank_pipeline, reference_engine

EVERYTHING = dict.fromkeys(DEFAULT_ENTITIES, 0.0)

TRICKY = [
    # context words, stop words and colons that change presidio's keyword list
    "Call: 212-555-0123. the: call us at 415-555-0188 or SSN: 078-05-1121 and ssn 219-09-9999",
    "x:the phone:212-555-0101 be:be -PRON- 10:30 std::vector<int> a:b call:2125550199",
    # special cases spaCy joins across a single space, next to PII
    "' 's :) 212 555 0123 ) :)4111 1111 1111 1111 it 's card 5500-0000-0000-0004 Mr . 4111",
    # unicode: folding letters, curly quotes, non-ASCII digits and spaces
    "İstanbul ıp 10.0.0.1 \u212aelvin \u017fsn 078-05-1120 \u201cDE89 3704 0044 0532 0130 00\u201d "
    "\u0661\u0662\u0663-45-6789 caf\u00e9 \u00a0 192.168.1.1\u3000phone\u2003+1 (212) 555-0123",
    # PII at the very start and end, tabs, CRLF, long separator-free runs
    "4111111111111111\tjohn.doe@example.com\r\nhttps://www.example.com/a/b?c=d"
    + "a1b2c3" * 400
    + " 1BoatSLRHtKNngkdXEeobR76b53LETtpyT",
    "DEA AB1234563 NHS 943 476 5919 iban GB82WEST12345698765432 bitcoin "
    "bc1qar0srrr7xfkvy5l643lydnw9re59gtzzwf5mdq mac 00:1a:2b:3c:4d:5e uuid "
    "123e4567-e89b-12d3-a456-426614174000 passport A12345678 itin 912-70-1234 12/31/2024",
]


def _docs() -> list[tuple[str, str]]:
    rng = random.Random(20240531)
    kinds = list(corpus.FILLERS)
    docs = [("tricky", t) for t in TRICKY]
    for i in range(9):
        size = int(1024 * 100 ** (i / 8))  # 1 KB .. 100 KB, log-spaced
        kind = kinds[i % len(kinds)]
        doc = corpus.document(rng, size, kind, pii_per_kb=1.5, context_ratio=0.5)
        docs.append((f"{kind}-{size}", doc.text))
    return docs


DOCS = _docs()


def _norm(items) -> list[tuple[str, int, int, float]]:
    return sorted((e, s, t, round(sc, 9)) for e, s, t, sc in items)


@pytest.fixture(scope="module")
def stock():
    return reference_engine()


@pytest.fixture(scope="module")
def stock_results(stock):
    entities = list(DEFAULT_ENTITIES)
    return [
        _norm(
            (r.entity_type, r.start, r.end, r.score)
            for r in stock.analyze(text, "en", entities=entities)
        )
        for _, text in DOCS
    ]


@pytest.fixture(scope="module")
def exhaustive():
    clf = Classifier(thresholds=EVERYTHING, workers=1)
    yield clf
    clf.close()


@pytest.fixture(scope="module")
def default():
    clf = Classifier(workers=1)
    yield clf
    clf.close()


@pytest.mark.parametrize("i", range(len(DOCS)), ids=[name for name, _ in DOCS])
def test_same_findings_as_stock(i, exhaustive, stock_results):
    assert _norm(exhaustive.analyze_raw(DOCS[i][1])) == stock_results[i]


@pytest.mark.parametrize("i", range(len(DOCS)), ids=[name for name, _ in DOCS])
def test_same_findings_above_thresholds(i, default, stock_results):
    """The default (lazy) path skips work whose results cannot reach a threshold."""
    expected = [x for x in stock_results[i] if x[3] >= DEFAULT_THRESHOLDS[x[0]]]
    got = _norm((f.entity_type, f.start, f.end, f.score) for f in default.analyze(DOCS[i][1]))
    assert got == expected


def test_some_findings_depend_on_context(stock_results):
    """The corpus exercises context boosts (scores only reachable with a context word)."""
    boosted = {round(s + 0.35, 9) for s in (0.05, 0.1, 0.3, 0.4, 0.5, 0.6)} | {0.4}
    assert sum(x[3] in boosted for doc in stock_results for x in doc) > 50


def test_windows_are_seamless(exhaustive, monkeypatch):
    rng = random.Random(7)
    text = "\n".join(
        corpus.document(rng, 12_000, kind, pii_per_kb=4).text for kind in corpus.FILLERS
    )
    whole = _norm(exhaustive.analyze_raw(text))
    monkeypatch.setattr(engine_mod, "WINDOW", 2_500)
    assert _norm(exhaustive.analyze_raw(text)) == whole


def test_ranges_are_seamless(exhaustive):
    """Results owned by range (by start) and merged as the process pool does."""
    rng = random.Random(8)
    text = "\n".join(
        corpus.document(rng, 15_000, kind, pii_per_kb=3).text for kind in corpus.FILLERS
    )
    whole = exhaustive._engine.analyze_range(text, 0, len(text))
    cuts = [0, 9_000, 9_001, 31_337, 60_000, len(text)]
    parts = [
        r
        for lo, hi in zip(cuts, cuts[1:], strict=False)
        for r in exhaustive._engine.analyze_range(text, lo, hi)
    ]
    key = lambda r: (r[0], r[2], r[3], r[4], r[5])  # noqa: E731  (rec, start, end, score, boost)
    # per-recognizer duplicate removal is redone globally by the classifier
    assert {key(r) for r in whole} <= {key(r) for r in parts}


def test_processes_are_seamless(exhaustive):
    rng = random.Random(8)
    text = "\n".join(
        corpus.document(rng, 8_000, kind, pii_per_kb=2).text for kind in corpus.FILLERS
    )
    with Classifier(
        thresholds=EVERYTHING, workers=2, parallel_min_chars=10_000, mp_context="fork"
    ) as par:
        assert _norm(par.analyze_raw(text)) == _norm(exhaustive.analyze_raw(text))


def test_context_off_matches_bare_blank_pipeline():
    """context=False mirrors presidio over spacy.blank("en"): empty lemmas, no boosts."""
    stock = reference_engine(context=False)
    clf = Classifier(thresholds=EVERYTHING, context=False, workers=1)
    for _, text in DOCS[:8]:
        expected = _norm(
            (r.entity_type, r.start, r.end, r.score)
            for r in stock.analyze(text, "en", entities=list(DEFAULT_ENTITIES))
        )
        assert _norm(clf.analyze_raw(text)) == expected


def test_ner_mode_with_an_installed_model(tmp_path):
    """NER mode wires an installed pipeline (here a rule-based stand-in saved to disk)."""
    nlp = blank_pipeline(lemmas=False)
    ruler = nlp.add_pipe("entity_ruler")
    ruler.add_patterns(
        [{"label": "PERSON", "pattern": "Alice Smith"}, {"label": "GPE", "pattern": "Paris"}]
    )
    nlp.add_pipe(IDENTITY_LEMMA)
    nlp.to_disk(tmp_path / "model")
    model = str(tmp_path / "model")
    text = (
        "Alice Smith moved to Paris. Her phone number is 212-555-0123 and her "
        "ssn is 078-05-1121; email alice@example.com. " * 3
    )
    entities = [*DEFAULT_ENTITIES, "PERSON", "LOCATION"]
    stock = reference_engine(ner_model=model)
    expected = _norm(
        (r.entity_type, r.start, r.end, r.score)
        for r in stock.analyze(text, "en", entities=entities)
    )
    clf = Classifier(
        entities=entities, thresholds=dict.fromkeys(entities, 0.0), ner_model=model, workers=1
    )
    got = _norm(clf.analyze_raw(text))
    assert got == expected
    assert {"PERSON", "LOCATION", "PHONE_NUMBER"} <= {x[0] for x in got}


def test_missing_model_is_not_downloaded():
    with pytest.raises(ValueError, match="not installed"):
        Classifier(ner_model="en_core_web_lg_not_installed")


def test_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    clf = Classifier(workers=1)
    found = clf.analyze("write to john.doe@example.co.uk or jane@mail.example.org today")
    assert [f.entity_type for f in found if f.entity_type != "URL"] == ["EMAIL_ADDRESS"] * 2


def test_plain_words_tokenize_as_themselves():
    """The tokenizer shortcut for plain words agrees with spaCy."""
    nlp = blank_pipeline(lemmas=False)
    specials = {k for k in nlp.tokenizer.rules if k.isalpha()}
    rng = random.Random(3)
    words = list(corpus.WORDS) + [w.upper() for w in corpus.WORDS]
    words += [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCXYZ") for _ in range(rng.randint(1, 9)))
        for _ in range(3000)
    ]
    for w in words:
        if w not in specials:
            assert [t.text for t in nlp.tokenizer(w + " ")] == [w]


def test_processes_are_seamless_above_thresholds(default):
    """With thresholds, one range drops results below them early (duplicates are
    final there); across ranges they stay for the global duplicate removal."""
    rng = random.Random(9)
    text = "\n".join(
        corpus.document(rng, 8_000, kind, pii_per_kb=4, context_ratio=0.7).text
        for kind in corpus.FILLERS
    )
    want = [(f.start, f.end, f.entity_type, f.score) for f in default.analyze(text)]
    with Classifier(workers=3, parallel_min_chars=10_000, mp_context="fork") as par:
        got = [(f.start, f.end, f.entity_type, f.score) for f in par.analyze(text)]
    assert got == want
    assert len(want) > 20


def _stock_above(stock, text: str, thresholds) -> list[tuple[str, int, int, float]]:
    """Stock presidio's findings at or above per-entity thresholds."""
    return _norm(
        (r.entity_type, r.start, r.end, r.score)
        for r in stock.analyze(text, "en", entities=list(DEFAULT_ENTITIES))
        if r.score >= thresholds[r.entity_type]
    )


def _weak_docs() -> list[str]:
    """Short prose with values that only weak patterns match (bank numbers, licences,
    passports, ITINs, SSN shapes), with and without their recognizers' context words."""
    rng = random.Random(11)
    weak = ("US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_PASSPORT", "US_ITIN", "US_SSN")
    docs = [
        "order 123456789 shipped to the depot; ref 0012345678901",
        "the permit lic# A1234567 was renewed; passport 912345678 is due",
        "Account 12345678901 and acct 987654321; taxpayer id 912-70-1234",
        "id 123456789 " + "quarterly report filed " * 40 + "passport",
    ]
    for ratio in (0.0, 0.5, 1.0):
        for _ in range(20):
            docs.append(
                corpus.document(
                    rng, 1024, "prose", pii_per_kb=2, entities=weak, context_ratio=ratio
                ).text
            )
    return docs


def test_weak_patterns_skipped_without_context_match_stock(default, stock, monkeypatch):
    """A pattern that can reach its threshold only with a context boost is not run in a
    document without its recognizer's context words; the findings stay stock's."""
    ran: list[tuple[str, str]] = []

    class Spy:  # records every run of a pattern's regex
        def __init__(self, rx, name: str) -> None:
            self.rx, self.name = rx, name

        def finditer(self, text, *args):
            ran.append((text, self.name))
            return self.rx.finditer(text, *args)

        def search(self, text, *args):
            return self.rx.search(text, *args)

    for p in default._engine.patterns:
        monkeypatch.setattr(p, "rx", Spy(p.rx, p.pattern.name))
    skipped = 0
    for text in _weak_docs():
        expected = _stock_above(stock, text, DEFAULT_THRESHOLDS)
        ran.clear()
        got = _norm((f.entity_type, f.start, f.end, f.score) for f in default.analyze(text))
        assert got == expected, text
        engine = default._engine
        low = text.lower()
        for p in engine.patterns:
            rec = engine.recognizers[p.rec]
            gated = p.pattern.score < DEFAULT_THRESHOLDS[rec.supported_entities[0]] and (
                engine.kinds[p.rec] == "pattern"
                and type(rec).validate_result is engine_mod.PatternRecognizer.validate_result
            )
            if gated and not any(c.lower() in low for c in rec.context or []):
                assert (text, p.pattern.name) not in ran
                skipped += p.rx.search(text) is not None
    assert skipped > 10  # weak matches really were skipped


def test_lowered_thresholds_turn_weak_patterns_back_on(stock):
    """With a threshold at a weak pattern's own score, its bare matches are findings."""
    low = {"US_PASSPORT": 0.05, "US_BANK_NUMBER": 0.05, "US_DRIVER_LICENSE": 0.01}
    thresholds = {**DEFAULT_THRESHOLDS, **low}
    with Classifier(thresholds=low, workers=1) as clf:
        found = 0
        for text in _weak_docs():
            expected = _stock_above(stock, text, thresholds)
            got = _norm((f.entity_type, f.start, f.end, f.score) for f in clf.analyze(text))
            assert got == expected, text
            found += sum(1 for x in got if x[3] < 0.4)
        assert found > 10


@pytest.mark.parametrize(
    "text",
    [
        "call me on 212-555-0123",  # the stretch runs to the end of the text
        "phone:(415) 555-0188",
        "phone 212 555 0123 4111 1111 1111 1111 call 020 7946 0958\n",
        "cell +44 20 7946 0958x12 then phone 2125550199",
    ],
)
def test_phone_stretches_at_text_end_and_between_numbers(text, stock):
    """The prefilter reports a digit stretch once, where it ends (or at the end of the
    text); every phone number is still found."""
    expected = _norm(
        (r.entity_type, r.start, r.end, r.score)
        for r in stock.analyze(text, "en", entities=list(DEFAULT_ENTITIES))
    )
    with Classifier(thresholds=EVERYTHING, workers=1) as clf:
        assert _norm(clf.analyze_raw(text)) == expected
    assert any(x[0] == "PHONE_NUMBER" for x in expected)

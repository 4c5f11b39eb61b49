"""The classifier's shortcuts are exact: each is checked against what it replaces.

Context decisions (zones of influence, skipped stop words, one-token chunks, digit-led
findings) against the per-finding keyword walk at every position and against stock
presidio on adversarial text; tokenizer shortcuts against spaCy; duplicate removal and
phone spans against presidio's own code.
"""

from __future__ import annotations

import random
import string

import pytest
from presidio_analyzer import EntityRecognizer, RecognizerResult
from test_classify_equivalence import TRICKY

from governance.classify import Classifier, corpus
from governance.classify.classifier import DEFAULT_ENTITIES, DEFAULT_THRESHOLDS
from governance.classify.context import supported
from governance.classify.engine import remove_duplicates
from governance.classify.stock import offline_registry, reference_engine

EVERYTHING = dict.fromkeys(DEFAULT_ENTITIES, 0.0)
STOPS = ["the", "of", "us", "call", "be", "is", "The", "US", "Call", "-PRON-", "-pron-", "a"]
STOPS += ["it", "'s", "n't", "cannot", "do", "so", "some", "or", "and", "ca", "Let"]
SPECIALS = [":)", ":-)", "Mr.", "a.m.", "p.m.", "e.g.", "o.O", "(:", "' s", "don't", "do n't"]
SPECIALS += ["Let's", "it's", "10a.m.", "w/", "and/or", ":O", ":P", "D:", "' S"]
MARKS = [",", ".", ":", ";", "!", "?", "(", ")", "'", '"', "-", "/", "#", "::"]
SPACES = [" "] * 12 + ["  ", "\n", "\n\n", "\t", " \n", ", ", ": ", " \u00a0"]
CONTEXT_WORDS = sorted({c for r in offline_registry().recognizers for c in r.context or []})


@pytest.fixture(scope="module")
def clf():
    c = Classifier(thresholds=EVERYTHING, workers=1)
    yield c
    c.close()


def _soup(rng: random.Random, words: int) -> str:
    """Stop words, context words, colons, special cases and PII, loosely spaced."""
    out = []
    for _ in range(words):
        r = rng.random()
        if r < 0.3:
            w = rng.choice(STOPS)
        elif r < 0.45:
            w = rng.choice(CONTEXT_WORDS) + rng.choice(["", "", ":", "s", "#"])
        elif r < 0.55:
            w = rng.choice(SPECIALS)
        elif r < 0.65:
            w = rng.choice(corpus.WORDS) + rng.choice(MARKS)
        elif r < 0.72:
            w = rng.choice(STOPS) + ":" + rng.choice([*STOPS, *CONTEXT_WORDS, ""])
        elif r < 0.80:
            w = corpus.GENERATORS[rng.choice(list(corpus.GENERATORS))](rng)
        elif r < 0.85:
            w = str(rng.randint(0, 10 ** rng.randint(1, 12)))
        else:
            w = rng.choice(corpus.WORDS)
        out += [w, rng.choice(SPACES)]
    return "".join(out)


def _texts() -> list[str]:
    rng = random.Random(11)
    texts = list(TRICKY)
    texts += [
        corpus.document(rng, 3000, k, pii_per_kb=4, context_ratio=0.7).text for k in corpus.FILLERS
    ]
    texts += [_soup(rng, rng.randint(5, 150)) for _ in range(12)]
    return texts


TEXTS = _texts()


def _contexts(clf: Classifier) -> list[list[str]]:
    return [r.context for r in clf._engine.recognizers if r.context]


@pytest.mark.parametrize("i", range(len(TEXTS)))
def test_zones_and_shortcuts_agree_with_the_walk(clf, i):
    """At every position, for every recognizer: the zone answer and the per-finding
    answer (skipped stop words, digit-led findings, one-token chunks) equal the
    keyword walk's."""
    text = TEXTS[i]
    scorer = clf._engine.context
    for ctx in _contexts(clf):
        ref, zoned, walked = scorer.doc(text), scorer.doc(text), scorer.doc(text)
        zoned._zones[tuple(ctx)] = zoned.zones(ctx)
        walked._zones[tuple(ctx)] = None
        # no zones where lowercasing changes offsets ("İ"): walks answer there
        assert (zoned._zones[tuple(ctx)] is None) == (len(text.lower()) != len(text))
        for s in range(len(text)):
            if text[s].isspace():
                continue
            want = supported(ref.words(s), ctx)
            assert zoned.any_supported(s, s + 1, ctx) == want, (ctx, s)
            assert walked.any_supported(s, s + 1, ctx) == want, (ctx, s)


@pytest.mark.parametrize("i", range(0, len(TEXTS), 3))
def test_range_queries_never_miss_a_supported_start(clf, i):
    """any_supported over a range of starts (the phone path asks so, to skip ranges no
    boost can reach) answers yes whenever some start in the range gets a boost,
    whichever shortcut answers it (it may say yes more often: a superset is safe)."""
    text = TEXTS[i]
    scorer = clf._engine.context
    rng = random.Random(i)
    for ctx in _contexts(clf):
        ref, walked = scorer.doc(text), scorer.doc(text)
        walked._zones[tuple(ctx)] = None
        for _ in range(60):
            x = rng.randrange(len(text))
            y = min(len(text), x + rng.randint(1, 40))
            want = any(supported(ref.words(s), ctx) for s in range(x, y)
                       if not text[s].isspace())
            if want:
                assert walked.any_supported(x, y, ctx), (ctx, x, y)


@pytest.fixture(scope="module")
def stock():
    return reference_engine()


def _stock_case(case: str) -> str:
    kind, seed = case.split("-")
    rng = random.Random(int(seed))
    if kind == "soup":
        return _soup(rng, rng.randint(20, 400) if int(seed) % 3 else 3000)
    if kind == "prose":  # sparse phone words against many digit runs: zones
        return corpus.english(rng, 80_000, pii_fraction=0.01)
    filler = ("logs", "csv", "json")[int(seed) % 3]
    return corpus.document(rng, 60_000, filler, pii_per_kb=3, context_ratio=0.3).text


STOCK_CASES = [f"soup-{i}" for i in range(6)] + ["prose-1", "prose-2", "mixed-0", "mixed-1"]


@pytest.mark.parametrize("case", STOCK_CASES)
def test_same_findings_as_stock_on_adversarial_text(case, clf, stock):
    """Stop words, colons, special cases and context words in soups; and long prose,
    logs and tables, where zones of influence take over for phone numbers."""
    text = _stock_case(case)
    entities = list(DEFAULT_ENTITIES)
    want = sorted(
        (r.entity_type, r.start, r.end, round(r.score, 9))
        for r in stock.analyze(text, "en", entities=entities)
    )
    got = sorted((e, s, t, round(sc, 9)) for e, s, t, sc in clf.analyze_raw(text))
    assert got == want
    with Classifier(workers=1) as default:
        found = sorted(
            (f.entity_type, f.start, f.end, round(f.score, 9)) for f in default.analyze(text)
        )
        zoned = [key[0] for key in default._engine.context.zone_uses]
    assert found == [x for x in want if x[3] >= DEFAULT_THRESHOLDS[x[0]]]
    if case.startswith("prose"):
        assert "phone" in zoned


def test_one_token_chunks_agree_with_spacy(clf):
    """Plain words and letters-and-digits ending with a digit are single tokens."""
    scorer = clf._engine.context
    rng = random.Random(5)
    alnum = string.ascii_letters + string.digits
    chunks = [
        "".join(rng.choice(alnum) for _ in range(rng.randint(0, 20))) + rng.choice(string.digits)
        for _ in range(3000)
    ]
    chunks += [
        "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(1, 9)))
        for _ in range(2000)
    ]
    checked = 0
    for chunk in chunks:
        if scorer.single_token(chunk):
            checked += 1
            assert [t.text for t in scorer.tokenizer(chunk + " ")] == [chunk]
            assert scorer.tokenize(chunk + " ") == ((0, chunk),)
    assert checked > 4000


def test_word_and_mark_agree_with_spacy(clf):
    scorer = clf._engine.context
    rng = random.Random(6)
    words = (
        list(corpus.WORDS) + [w.title() for w in corpus.WORDS] + [w.upper() for w in corpus.WORDS]
    )
    words += [k[:-1] for k in scorer._rules if k[-1:] in ".:" and k[:-1].isalpha()]
    words += [str(rng.randrange(10 ** rng.randint(1, 12))) for _ in range(300)]
    words += [
        "".join(rng.choice(string.ascii_letters) for _ in range(rng.randint(1, 7)))
        for _ in range(500)
    ]
    checked = 0
    for w in words:
        for mark in ",;!?.:":
            for ws in ("", " ", "\n\n", "  ", " \n", "\t", "\n \n", "\u00a0", "\r\n"):
                block = w + mark + ws
                fast = scorer._word_punct(block)
                if fast is not None:
                    checked += 1
                    assert fast == tuple((t.idx, t.text) for t in scorer.tokenizer(block)), block
    assert checked > 10000


def test_word_and_mark_agree_with_spacy_for_pair_words_and_stop_words(clf):
    """Words on one side of a special-case pair ("when" of "when's", "and" of "and/or",
    "or") and every stop word, each with every mark: exhaustively against spaCy."""
    scorer = clf._engine.context
    words = {t for t in scorer._pair_tokens if t.isascii() and t.isalnum()}
    for w in clf._engine.context._nlp.Defaults.stop_words:
        if w.isascii() and w.isalpha():
            words |= {w, w.title(), w.upper()}
    assert {"when", "and", "or", "it", "that", "cause", "em"} <= words
    checked = 0
    for w in sorted(words):
        for mark in ",;!?.:":
            for ws in ("", " ", "  ", "\n\n", " \n", "\t"):
                block = w + mark + ws
                fast = scorer._word_punct(block)
                if fast is not None:
                    checked += 1
                    assert fast == tuple((t.idx, t.text) for t in scorer.tokenizer(block)), block
                    if ":" in block:
                        assert scorer.chunk_pieces(w + mark) == frozenset(
                            p
                            for t in scorer.tokenizer(w + mark)
                            if ":" in t.text and not scorer.filtered(t.text)
                            for p in t.text.lower().split(":")
                        )
    assert checked > 5000


def test_plain_unit_keys_agree_with_spacy(clf):
    """unit_keys (tokenize's plain-word and word-and-mark shortcuts, then status)
    against spaCy's tokens and the scorer's keyword status of each."""
    scorer = clf._engine.context
    rng = random.Random(8)
    words = [*corpus.WORDS, *STOPS, *CONTEXT_WORDS, "be", "Be", "BE", "id", "Id", "cannot"]
    words += [w for w in scorer._nlp.Defaults.stop_words]
    words += [k for k in scorer._rules if k.isascii() and k.isalnum()]
    words = [v for w in words for v in (w, w.title(), w.upper())]
    words += [str(rng.randrange(10 ** rng.randint(1, 12))) for _ in range(200)]
    alnum = string.ascii_letters + string.digits
    words += ["".join(rng.choice(alnum) for _ in range(rng.randint(1, 9))) for _ in range(800)]
    checked = 0
    for w in words:
        for unit in (w, w + " "):
            scorer._unit_keys.pop(unit, None)
            got = scorer.unit_keys(unit)
            want = tuple(scorer.status(t.text) for t in scorer.tokenizer(unit) if t.text.strip())
            assert got == want, unit
            checked += scorer.single_token(w)
    assert checked > 3000


COLON_TEXTS = [
    "when: it:s WHEN:x x:When :it: a:b:c http://it:80/so e4:72:a8 12:30 us: :US",
    "name: status: format: Data: Id: me:\n\nIT: so: Or: and:/ and/or: Let's: D: :D",
    "\u212a:it x:\u0130t it\u0307: \u03a3:it \u0131t: it:\u017f ſo: \u00a0so: so:\u00a0",
    "passport#: lic#: ssn#: uuid: 0fa53e53-c028 date: 1974-09-22T01:13:11Z ip: ::1",
    'he said: "so:" (it: ) [or:] {and:} it.: it,: so;: -pron-: :-PRON- be: BE:',
    "no colon anywhere here, just words like it and so and the",
    "10:so so:10 the:9 THE:9 So:1 \u212a:9 9:\u212a x:the the:x it:9 9:us",
]


@pytest.mark.parametrize("text", COLON_TEXTS + TEXTS[:20])
def test_colon_piece_shortcuts_agree_with_collecting_the_pieces(clf, text):
    """`skipping` and `is_piece` answer without tokenizing around colons where no
    candidate word touches one; the answers equal those from all ':'-pieces."""
    scorer = clf._engine.context
    pieces = scorer.doc(text).colon_pieces()
    fast = scorer.doc(text)
    assert fast.skipping == (not (scorer.skip_words & pieces))
    queries = {t.lower() for t in STOPS if scorer.filtered(t)}
    queries |= {w for w in scorer._nlp.Defaults.stop_words}
    queries |= {ch for ch in text if scorer.filtered(ch)} | {"be", '"', ",", ".", "-"}
    queries.discard("-pron-")
    for q in sorted(queries):
        assert fast.is_piece(q) == (q in pieces), q


def test_remove_duplicates_matches_presidio():
    rng = random.Random(7)
    for _ in range(5000):
        items = []
        for _ in range(rng.randint(0, 8)):
            start = rng.randint(0, 10)
            items.append(
                (
                    rng.choice("AB"),
                    start,
                    start + rng.randint(1, 6),
                    rng.choice([0, 0.05, 0.4, 0.4, 1.0]),
                )
            )
        want = EntityRecognizer.remove_duplicates([RecognizerResult(*x) for x in items])
        assert sorted(remove_duplicates(items)) == sorted(
            (r.entity_type, r.start, r.end, r.score) for r in want
        )


def test_phone_spans_match_presidio(clf):
    """Spans without presidio's re-parse, and the early stop at the widest span."""
    engine = clf._engine
    rec = engine.recognizers[engine.kinds.index("phone")]
    rng = random.Random(8)
    chunks = []
    for _ in range(150):
        chunks.append(" " + corpus.phone(rng) + rng.choice([" ", ",", "\n", "x12 ", "/"]))
        chunks.append(" ".join(corpus.phone(rng) for _ in range(rng.randint(1, 3))))
        chunks.append("".join(rng.choice("0123456789 -()+./x") for _ in range(rng.randint(4, 30))))
        chunks.append(rng.choice([corpus.ssn, corpus.credit_card, corpus.itin, corpus.ip])(rng))
    for chunk in chunks:
        want = tuple(sorted((r.start, r.end) for r in rec.analyze(chunk, rec.supported_entities)))
        assert engine._phone_spans(chunk) == want
        starts = [i for i, ch in enumerate(chunk) if ch.isdigit() or ch in "(+["]
        ends = [i + 1 for i, ch in enumerate(chunk) if ch.isdigit() or ch == "#"]
        if starts and ends and starts[0] < ends[-1]:
            assert engine._phone_spans(chunk, (starts[0], ends[-1])) == want


def test_forward_whitespace_searches_are_str_isspace():
    """`re`'s \\s (forward searches) and the `regex` class (reverse) are str.isspace()."""
    from governance.classify import context as ctx_mod

    for c in range(0x110000):
        ch = chr(c)
        space = ch.isspace()
        assert (ctx_mod._WS_FWD.match(ch) is not None) is space, hex(c)
        assert (ctx_mod._NONWS_FWD.match(ch) is None) is space, hex(c)
        assert (ctx_mod._WS_REV.search(ch) is not None) is space, hex(c)

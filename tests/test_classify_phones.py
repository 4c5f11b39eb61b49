"""`phones.Matcher` finds exactly what phonenumbers' PhoneNumberMatcher finds.

`RegionShape.hopeless` lets the matcher skip parsing candidates that cannot be valid
numbers of a region; these tests check it against phonenumbers itself: directly (a
hopeless candidate never parses and verifies) and through whole matcher runs, on
random digit runs, mutated and reformatted example numbers of many regions (national
prefixes, country codes without '+', dialling prefixes, brackets), and adversarial
text (cards, SSNs, dates, time stamps, extensions, letters, non-ASCII digits).
Also the engine's span computation (region order adapts) against a plain loop.
"""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType

from governance.classify import phones
from governance.classify.classifier import DEFAULT_ENTITIES
from governance.classify.engine import Engine

REGIONS = ("US", "GB", "DE", "FR", "IL", "IN", "CA", "BR")
VALID = phonenumbers.Leniency.VALID
TYPES = (
    PhoneNumberType.FIXED_LINE,
    PhoneNumberType.MOBILE,
    PhoneNumberType.TOLL_FREE,
    PhoneNumberType.PREMIUM_RATE,
    PhoneNumberType.SHARED_COST,
    PhoneNumberType.VOIP,
    PhoneNumberType.PERSONAL_NUMBER,
    PhoneNumberType.PAGER,
    PhoneNumberType.UAN,
    PhoneNumberType.VOICEMAIL,
)
FORMATS = (
    PhoneNumberFormat.NATIONAL,
    PhoneNumberFormat.INTERNATIONAL,
    PhoneNumberFormat.E164,
    PhoneNumberFormat.RFC3966,
)
# regions sharing country codes with the supported ones, and a few others
EXAMPLE_REGIONS = (*REGIONS, "GG", "IM", "JE", "PR", "JM", "BS", "IT", "AR", "MX", "CN", "NL")
SEPARATORS = ["", "", " ", "-", ".", "/", "  ", " - ", "(", ")", "\u00a0", "x", " ext. "]


def _examples() -> list[str]:
    out = []
    for region in EXAMPLE_REGIONS:
        for kind in TYPES:
            number = phonenumbers.example_number_for_type(region, kind)
            if number is None:
                continue
            for fmt in FORMATS:
                out.append(phonenumbers.format_number(number, fmt))
            nsn = phonenumbers.national_significant_number(number)
            cc = str(number.country_code)
            out += [nsn, cc + nsn, cc + " " + nsn, "0" + nsn, "1" + nsn, "00" + cc + nsn]
            out += ["011 " + cc + " " + nsn, "0" + cc + nsn, "90" + "21" + nsn]
    return out


def _mutate(rng: random.Random, s: str) -> str:
    chars = list(s)
    for _ in range(rng.randint(0, 3)):
        op = rng.random()
        i = rng.randrange(len(chars) + 1)
        if op < 0.3 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op < 0.6:
            chars.insert(i, rng.choice("0123456789"))
        elif op < 0.8 and chars:
            chars[min(i, len(chars) - 1)] = rng.choice("0123456789")
        else:
            chars.insert(i, rng.choice(SEPARATORS))
    return "".join(chars)


def _regroup(rng: random.Random, digits: str) -> str:
    out, i = [], 0
    sep = rng.choice([" ", "-", ".", "", "/"])
    while i < len(digits):
        k = rng.randint(1, 5)
        out.append(digits[i : i + k])
        i += k
    text = sep.join(out)
    if rng.random() < 0.2 and len(out) > 1:
        text = "(" + out[0] + ") " + " ".join(out[1:])
    return text


def _candidates(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    examples = _examples()
    out = list(examples)
    while len(out) < n:
        r = rng.random()
        if r < 0.35:
            out.append(_mutate(rng, rng.choice(examples)))
        elif r < 0.6:
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(2, 18)))
            out.append(_regroup(rng, digits))
        elif r < 0.8:
            ex = rng.choice(examples)
            out.append(_regroup(rng, "".join(c for c in ex if c.isdigit())))
        else:
            digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 16)))
            out.append(_mutate(rng, digits))
    adversarial = [
        "4111 1111 1111 1111",
        "5145-0144-5669-1142",
        "078-05-1120",
        "860-14-9585",
        "4357971239348",
        "12/31/2024",
        "2012-01-02 08:00",
        "211-227 (2003)",
        "(303) 655-5582",
        "861 076 9704",
        "+1 212 555 0123",
        "011 44 20 7946 0958",
        "0044 20 7946 0958",
        "00 33 1 75 38 94 71",
        "212-555-0123 x1234",
        "212-555-0123 ext. 12",
        "212-555-0123#",
        "1-800-FLOWERS",
        "\u0662\u0661\u0662-555-0123",
        "\uff12\uff11\uff12 555 0123",
        "0 20 7946 0958",
        "020 7946 0958 / 020 7946 0959",
        "030 123456",
        "01 23 45 67 89",
        "09 12 34 56 78",
        "1234",
        "12",
        "0",
        "180020 7946 0958",
        "0 21 11 98765 4321",
        "90 21 11 98765 4321",
        "11 98765 4321",
    ]
    return out + adversarial


CANDIDATES = _candidates(2500, seed=7)
SHAPES = {r: phones.RegionShape(r) for r in REGIONS}


@pytest.mark.parametrize("region", REGIONS)
def test_hopeless_candidates_never_verify(region):
    shape = SHAPES[region]
    rejected = 0
    for c in CANDIDATES:
        if shape.hopeless(c):
            rejected += 1
            stock = phonenumbers.PhoneNumberMatcher(c, region, leniency=VALID)
            assert stock._parse_and_verify(c, 0) is None, (region, c)
    assert rejected > len(CANDIDATES) // 4  # the shortcut is exercised


@pytest.mark.parametrize("region", REGIONS)
def test_matcher_finds_what_phonenumbers_finds(region):
    rng = random.Random(region)
    shape = SHAPES[region]
    texts = list(CANDIDATES)
    for _ in range(400):  # several candidates, inner matches, letters around them
        parts = rng.sample(CANDIDATES, rng.randint(1, 4))
        glue = rng.choice([" ", " / ", " - ", ". ", "abc", "\n", " call ", "x", " (", "; "])
        texts.append(
            rng.choice(["", "a", " ", "$", "%"]) + glue.join(parts) + rng.choice(["", "b", " "])
        )
    for t in texts:
        want = [
            (m.start, m.end, m.raw_string)
            for m in phonenumbers.PhoneNumberMatcher(t, region, VALID)
        ]
        got = [(m.start, m.end, m.raw_string) for m in phones.Matcher(t, shape, VALID)]
        assert got == want, (region, t)


def test_engine_spans_match_all_regions_in_any_order():
    engine = Engine(DEFAULT_ENTITIES)
    rng = random.Random(11)
    texts = [" " + c + " " for c in CANDIDATES[:1500]]
    rng.shuffle(texts)
    for t in texts:
        found: set[tuple[int, int]] = set()
        for region in REGIONS:
            for m in phonenumbers.PhoneNumberMatcher(t, region, leniency=VALID):
                found.add((m.start, m.end))
        kept = [
            (s, e)
            for s, e in found
            if not any((s2, e2) != (s, e) and s2 <= s and e <= e2 for s2, e2 in found)
        ]
        assert engine._phone_spans(t) == tuple(sorted(kept)), t
        extent = (1, len(t) - 1)
        want = (extent,) if extent in found else tuple(sorted(kept))
        assert engine._phone_spans(t, extent) == want, t
    assert engine._phone_order != list(range(len(REGIONS)))  # the order did adapt

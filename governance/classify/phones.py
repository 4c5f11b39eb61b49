"""phonenumbers' matcher with candidates that cannot be valid numbers rejected unparsed.

Why: PhoneRecognizer runs `PhoneNumberMatcher` once per supported region, and each run
parses every candidate it tries (the whole digit run, then its inner groups) with that
region's rules: ~20 us a parse, most of it spent proving that a card number, an SSN or
a 4-digit group is no valid phone number of that region.

`Matcher` is phonenumbers' own matcher (same search, trimming, inner-match and
max-tries control flow, via subclassing); only `_parse_and_verify` first asks
`RegionShape.hopeless`, which answers True only where phonenumbers' parse + VALID
verification must fail. Then it returns None, which is what the stock method returns
for a failed parse or verification, so every region's run yields the same matches.

Exactness argument for `hopeless(candidate)`, for a candidate made only of ASCII digits
and the punctuation " -.()/" (anything else: not hopeless, parse it):
- no '+', no letters (no vanity-number letter conversion), no '#', ',', ';', '~' or
  letters (no extension can be stripped), no 'x' (no second-number cut): the digits
  phonenumbers normalizes the number to are the candidate's digits D, in order;
- if the region's international dialling prefix matches at the start of D, the
  country code could be anything: not hopeless. Otherwise the country code is the
  region's own (from the default region, or stripped from the start of D);
- the national significant number is then D with a prefix removed: the country code
  (only if D starts with it), national prefixes / carrier codes (each a match of a
  national-prefix-for-parsing pattern at the start, of the region's or the country
  code's main region's metadata; a transform rule must leave a suffix, else not
  hopeless). So it is D[k:] for some k in the closure computed below;
- VALID requires is_valid_number: for the region its country code resolves to (one of
  the country code's regions), the number matches the general description (possible
  length, then pattern) and some number type's description (its possible lengths if
  it has any, and pattern). `by_len` holds, per length, the disjunction over the
  country code's regions of "general and some type", so no match for any D[k:] means
  no parse of this candidate verifies;
- VALID also requires `_is_national_prefix_present_if_required`. When D does not
  start with the country code, the number's country code source is the default
  region, and that test reads only the country code, the national significant
  number and the raw input (the candidate): we run phonenumbers' own test on that
  number for each D[k:] that passed the previous step.
The tests compare `Matcher` with phonenumbers' matcher on many random and adversarial
strings for every supported region, and `hopeless` against parse + verify directly.
"""

from __future__ import annotations

import re

import phonenumbers
from phonenumbers import CountryCodeSource, PhoneMetadata, PhoneNumber, phonenumbermatcher
from phonenumbers.phonenumberutil import (
    COUNTRY_CODE_TO_REGION_CODE,
    _set_italian_leading_zeros_for_phone_number,
    region_code_for_country_code,
)

_SAFE = re.compile(r"[0-9 \-.()/]*")
_NONDIGITS = re.compile(r"[^0-9]+")
_MAX_NSN = 17  # phonenumbers' _MAX_LENGTH_FOR_NSN
# Every PhoneNumberDesc that _number_type_helper tests after the general description.
_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
    "mobile",
)


def _lengths(desc) -> tuple[int, ...]:
    return tuple(desc.possible_length or ())


class RegionShape:
    """What a region's parse can make of a digits-and-punctuation candidate."""

    def __init__(self, region: str) -> None:
        md = PhoneMetadata.metadata_for_region(region)
        if md is None:
            raise ValueError(f"no metadata for {region}")
        self.region = region
        self.country_code = md.country_code
        self.cc = str(md.country_code)
        self.idd = re.compile(md.international_prefix) if md.international_prefix else None
        main = PhoneMetadata.metadata_for_region(region_code_for_country_code(md.country_code))
        self.prefixes: list[tuple[re.Pattern, str | None]] = []
        for m in (md, main):
            if m is not None and m.national_prefix_for_parsing:
                entry = (
                    re.compile(m.national_prefix_for_parsing),
                    m.national_prefix_transform_rule,
                )
                if entry not in self.prefixes:
                    self.prefixes.append(entry)
        alternatives: dict[int, list[str]] = {}
        for r in COUNTRY_CODE_TO_REGION_CODE.get(md.country_code, ()):
            m = PhoneMetadata.metadata_for_region(r)
            general = m.general_desc if m is not None else None
            if general is None or not general.national_number_pattern:
                continue  # such a region never validates a number
            for n in range(1, _MAX_NSN + 1):
                if _lengths(general) and n not in _lengths(general):
                    continue
                types = [
                    d.national_number_pattern
                    for d in (getattr(m, t) for t in _TYPES)
                    if d is not None
                    and d.national_number_pattern
                    and (not _lengths(d) or n in _lengths(d))
                ]
                if types:
                    alternatives.setdefault(n, []).append(
                        rf"(?=(?:{general.national_number_pattern})\Z)(?:{'|'.join(types)})\Z"
                    )
        self.by_len = {
            n: re.compile("|".join(f"(?:{a})" for a in alts)) for n, alts in alternatives.items()
        }

    def hopeless(self, candidate: str) -> bool:
        """True only if parse(candidate, region) cannot give a VALID number."""
        if _SAFE.fullmatch(candidate) is None:
            return False
        digits = _NONDIGITS.sub("", candidate)
        if self.idd is not None and self.idd.match(digits):
            return False
        starts = {0}
        if digits.startswith(self.cc):
            starts.add(len(self.cc))
        todo = list(starts)
        while todo:
            k = todo.pop()
            rest = digits[k:]
            for rx, rule in self.prefixes:
                m = rx.match(rest)
                if m is None:
                    continue
                if rule and m.groups() and m.groups()[-1] is not None:
                    out = rx.sub(rule, rest, count=1)
                    if not rest.endswith(out):
                        return False  # not a suffix: outside this argument
                    k2 = k + len(rest) - len(out)
                else:
                    k2 = k + m.end()
                if k2 not in starts:
                    starts.add(k2)
                    todo.append(k2)
        from_default = not digits.startswith(self.cc)
        for k in starts:
            nsn = digits[k:]
            rx = self.by_len.get(len(nsn))
            if (
                rx is not None
                and rx.match(nsn) is not None
                and (not from_default or self._prefix_ok(candidate, nsn))
            ):
                return False
        return True

    def _prefix_ok(self, candidate: str, nsn: str) -> bool:
        """The matcher's national-prefix test for the number parse would make of
        `candidate` with this national significant number, its country code taken from
        the default region (no '+', no dialling prefix, no country code in front)."""
        numobj = PhoneNumber(
            country_code=self.country_code,
            national_number=int(nsn),
            country_code_source=CountryCodeSource.FROM_DEFAULT_COUNTRY,
            raw_input=candidate,
        )
        _set_italian_leading_zeros_for_phone_number(nsn, numobj)
        return bool(phonenumbermatcher._is_national_prefix_present_if_required(numobj))


class Matcher(phonenumbers.PhoneNumberMatcher):
    """PhoneNumberMatcher that skips parsing candidates its region cannot validate.

    Only for Leniency.VALID (the argument above is about is_valid_number)."""

    def __init__(self, text: str, shape: RegionShape, leniency: int) -> None:
        if leniency != phonenumbers.Leniency.VALID:
            raise ValueError("only Leniency.VALID")
        super().__init__(text, shape.region, leniency=leniency)
        self._shape = shape

    def _parse_and_verify(self, candidate, offset):
        if self._shape.hopeless(candidate):
            return None
        return super()._parse_and_verify(candidate, offset)


def supported() -> bool:
    """Does the installed phonenumbers have the matcher structure `Matcher` relies on?"""
    return callable(getattr(phonenumbers.PhoneNumberMatcher, "_parse_and_verify", None))

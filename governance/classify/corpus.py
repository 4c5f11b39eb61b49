"""Seeded synthetic documents with labelled PII, for tests and benchmarks.

Why here: the equivalence tests, the recall tests and the benchmark need the same
realistic mix (prose, code, JSON, CSV, logs) and adversarial PII-free text (UUIDs,
hashes, versions, 10-digit ids). Every generated PII value is valid for presidio
(checksums, number plans), so a miss is a miss, not a bad sample.
"""

from __future__ import annotations

import hashlib
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field

import phonenumbers

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "that",
    "for",
    "it",
    "with",
    "as",
    "on",
    "be",
    "at",
    "by",
    "this",
    "had",
    "not",
    "are",
    "but",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "her",
    "she",
    "there",
    "would",
    "their",
    "will",
    "when",
    "who",
    "him",
    "been",
    "has",
    "more",
    "if",
    "no",
    "out",
    "do",
    "so",
    "can",
    "what",
    "up",
    "said",
    "about",
    "other",
    "into",
    "than",
    "its",
    "time",
    "only",
    "could",
    "new",
    "them",
    "man",
    "some",
    "these",
    "then",
    "two",
    "first",
    "may",
    "any",
    "like",
    "now",
    "my",
    "such",
    "make",
    "over",
    "our",
    "even",
    "most",
    "me",
    "state",
    "after",
    "also",
    "made",
    "many",
    "did",
    "must",
    "before",
    "back",
    "see",
    "through",
    "way",
    "where",
    "get",
    "much",
    "go",
    "well",
    "your",
    "know",
    "should",
    "down",
    "work",
    "year",
    "because",
    "come",
    "people",
    "just",
    "say",
    "each",
    "those",
    "take",
    "day",
    "good",
    "how",
    "long",
    "very",
    "still",
    "own",
    "find",
    "here",
    "thing",
    "give",
    "world",
    "life",
    "between",
    "great",
    "report",
    "account",
    "project",
    "team",
    "meeting",
    "budget",
    "review",
    "customer",
    "order",
    "invoice",
    "payment",
    "service",
    "system",
    "data",
    "model",
    "agent",
    "storage",
    "policy",
    "record",
    "file",
    "note",
    "update",
    "release",
    "build",
    "deploy",
    "cluster",
    "region",
    "network",
    "server",
    "request",
    "response",
    "error",
    "warning",
    "cache",
    "queue",
    "schedule",
    "quarter",
    "revenue",
    "contract",
    "vendor",
    "support",
    "ticket",
    "issue",
    "change",
    "plan",
    "design",
    "test",
    "market",
    "product",
    "feature",
    "user",
    "admin",
    "access",
    "token",
    "session",
    "history",
    "summary",
    "analysis",
]
NAMES = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "oscar",
    "peggy",
    "trent",
    "victor",
    "walter",
    "olivia",
    "liam",
    "noah",
)
DOMAINS = (
    "example.com",
    "mail.example.org",
    "corp.acme.io",
    "uni.edu",
    "gmail.com",
    "contoso.net",
    "startup.dev",
    "bank.co.uk",
)

CONTEXT = {
    "EMAIL_ADDRESS": ["email", "e-mail address"],
    "PHONE_NUMBER": ["phone", "telephone number", "mobile", "cell"],
    "CREDIT_CARD": ["credit card", "visa", "card number", "amex"],
    "US_SSN": ["SSN", "social security number", "ssn#"],
    "IBAN_CODE": ["IBAN", "bank transfer to", "transaction iban"],
    "IP_ADDRESS": ["ip", "client ipv4", "ipv6 address"],
    "URL": ["website", "link", "url"],
    "US_BANK_NUMBER": ["bank account", "acct", "checking account"],
    "US_DRIVER_LICENSE": ["driver license", "DL lic#", "driving permit"],
    "US_PASSPORT": ["passport", "US passport#", "travel document"],
    "US_ITIN": ["ITIN", "taxpayer id", "tin"],
    "CRYPTO": ["bitcoin wallet", "btc", "crypto address"],
    "DATE_TIME": ["date", "birthday", "date of birth"],
    "MEDICAL_LICENSE": ["DEA", "medical certificate"],
    "UK_NHS": ["NHS number", "nhs"],
    "MAC_ADDRESS": ["mac address", "ethernet"],
    "UUID": ["uuid", "guid"],
}


def _luhn_complete(prefix: str, length: int, rng: random.Random) -> str:
    digits = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    total = 0
    for i, d in enumerate(reversed(digits)):
        v = int(d) * (2 if i % 2 == 0 else 1)
        total += v - 9 if v > 9 else v
    return digits + str((10 - total % 10) % 10)


def credit_card(rng: random.Random) -> str:
    prefix, length = rng.choice(
        [("4", 16), ("51", 16), ("55", 16), ("6011", 16), ("37", 15), ("4", 13), ("35", 16)]
    )
    n = _luhn_complete(prefix, length, rng)
    style = rng.randrange(3)
    if style == 0 or length != 16:
        return n
    sep = " " if style == 1 else "-"
    return sep.join(n[i : i + 4] for i in range(0, 16, 4))


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}-{rng.randint(1, 99):02d}-{rng.randint(1, 9999):04d}"


def itin(rng: random.Random) -> str:
    group = rng.choice([*range(70, 89), 90, 91, 92, *range(94, 100)])
    return f"9{rng.randint(0, 99):02d}-{group}-{rng.randint(0, 9999):04d}"


_IBAN_FORMATS = {  # country: BBAN template (9 digit, A upper letter)
    "DE": "999999999999999999",
    "GB": "AAAA99999999999999",
    "NL": "AAAA9999999999",
    "ES": "99999999999999999999",
    "FR": "9999999999999999999999999",
    "CH": "9999999999999999999",
}


def iban(rng: random.Random) -> str:
    cc, fmt = rng.choice(list(_IBAN_FORMATS.items()))
    bban = "".join(
        rng.choice(string.digits) if c == "9" else rng.choice(string.ascii_uppercase) for c in fmt
    )
    numeric = "".join(str(int(ch, 36)) for ch in bban + cc + "00")
    code = f"{cc}{98 - int(numeric) % 97:02d}{bban}"
    if rng.random() < 0.5:
        return " ".join(code[i : i + 4] for i in range(0, len(code), 4))
    return code


def ipv4(rng: random.Random) -> str:
    return ".".join(str(rng.randint(1, 254)) for _ in range(4))


def ipv6(rng: random.Random) -> str:
    groups = [f"{rng.randint(0, 0xFFFF):x}" for _ in range(8)]
    if rng.random() < 0.5:
        i = rng.randint(1, 5)
        return ":".join(groups[:i]) + "::" + ":".join(groups[i + 2 :])
    return ":".join(groups)


def ip(rng: random.Random) -> str:
    return ipv4(rng) if rng.random() < 0.7 else ipv6(rng)


def email(rng: random.Random) -> str:
    user = rng.choice(NAMES) + rng.choice(["", ".", "_"]) + rng.choice(NAMES + ("", "42"))
    return f"{user.strip('._')}@{rng.choice(DOMAINS)}"


_PHONE_SHAPES = (
    ("US", "({a}) {b}-{c}"),
    ("US", "{a}-{b}-{c}"),
    ("US", "+1 {a} {b} {c}"),
    ("US", "{a}.{b}.{c}"),
    ("GB", "+44 20 {b4} {c}"),
    ("GB", "020 {b4} {c}"),
    ("DE", "+49 30 {b4}{c}"),
    ("FR", "+33 1 {p} {q} {r} {s}"),
    ("IN", "+91 9{b4}{c2}"),
)


def phone(rng: random.Random) -> str:
    while True:
        region, shape = rng.choice(_PHONE_SHAPES)
        d = lambda k: "".join(rng.choice(string.digits) for _ in range(k))  # noqa: E731
        text = shape.format(
            a=rng.choice(["212", "415", "646", "312", "617", "303", "206"]),
            b=str(rng.randint(200, 999)),
            c=d(4),
            b4=d(4),
            c2=d(5),
            p=d(2),
            q=d(2),
            r=d(2),
            s=d(2),
        )
        try:
            if phonenumbers.is_valid_number(phonenumbers.parse(text, region)):
                return text
        except phonenumbers.NumberParseException:
            pass


def url(rng: random.Random) -> str:
    path = "/".join(rng.choice(WORDS) for _ in range(rng.randint(0, 3)))
    host = rng.choice(["www.", "", "docs.", "api."]) + rng.choice(DOMAINS)
    return f"{rng.choice(['https://', 'http://', ''])}{host}/{path}".rstrip("/")


def bank_number(rng: random.Random) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(8, 17)))


def driver_license(rng: random.Random) -> str:
    return rng.choice(string.ascii_uppercase) + "".join(
        rng.choice(string.digits) for _ in range(rng.choice([7, 8, 12]))
    )


def passport(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return "".join(rng.choice(string.digits) for _ in range(9))
    return rng.choice(string.ascii_uppercase) + "".join(rng.choice(string.digits) for _ in range(8))


_B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def crypto(rng: random.Random) -> str:
    payload = bytes([0]) + bytes(rng.randrange(256) for _ in range(20))
    raw = payload + hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    n, out = int.from_bytes(raw, "big"), ""
    while n:
        n, r = divmod(n, 58)
        out = _B58[r] + out
    return "1" * (len(raw) - len(raw.lstrip(b"\0"))) + out


def date(rng: random.Random) -> str:
    y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    mon = ["JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"][
        m - 1
    ]
    return rng.choice(
        [
            f"{m:02d}/{d:02d}/{y}",
            f"{y}-{m:02d}-{d:02d}",
            f"{d:02d}.{m:02d}.{y}",
            f"{d}-{mon}-{y}",
            f"{y}-{m:02d}-{d:02d}T{rng.randint(0, 23):02d}:"
            f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z",
        ]
    )


def dea(rng: random.Random) -> str:
    d = [rng.randint(0, 9) for _ in range(6)]
    check = (d[0] + d[2] + d[4] + 2 * (d[1] + d[3] + d[5])) % 10
    return (
        rng.choice("ABFGM") + rng.choice(string.ascii_uppercase) + "".join(map(str, d)) + str(check)
    )


def nhs(rng: random.Random) -> str:
    while True:
        d = [rng.randint(0, 9) for _ in range(9)]
        check = (-sum(x * w for x, w in zip(d, range(10, 1, -1), strict=True))) % 11
        if check < 10:
            s = "".join(map(str, d)) + str(check)
            return rng.choice([s, f"{s[:3]} {s[3:6]} {s[6:]}"])


def mac(rng: random.Random) -> str:
    sep = rng.choice(":-")
    return sep.join(f"{rng.randrange(256):02x}" for _ in range(6))


def uuid_(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "EMAIL_ADDRESS": email,
    "PHONE_NUMBER": phone,
    "CREDIT_CARD": credit_card,
    "US_SSN": ssn,
    "IBAN_CODE": iban,
    "IP_ADDRESS": ip,
    "URL": url,
    "US_BANK_NUMBER": bank_number,
    "US_DRIVER_LICENSE": driver_license,
    "US_PASSPORT": passport,
    "US_ITIN": itin,
    "CRYPTO": crypto,
    "DATE_TIME": date,
    "MEDICAL_LICENSE": dea,
    "UK_NHS": nhs,
    "MAC_ADDRESS": mac,
    "UUID": uuid_,
}


# -- PII-free filler ------------------------------------------------------------------------
def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(5, 16))]
    if rng.random() < 0.3:
        words.insert(rng.randrange(len(words)), str(rng.randint(1, 500)))
    if rng.random() < 0.2:
        words.insert(rng.randrange(len(words)), rng.choice(NAMES).title())
    s = " ".join(words)
    if rng.random() < 0.3:
        cut = rng.randrange(1, len(words))
        s = " ".join(words[:cut]) + ", " + " ".join(words[cut:])
    return s[0].upper() + s[1:] + rng.choice("..........??!;:")


def prose(rng: random.Random, n: int) -> str:
    out: list[str] = []
    size = 0
    while size < n:
        para = " ".join(sentence(rng) for _ in range(rng.randint(2, 6)))
        out.append(para)
        size += len(para) + 2
    return "\n\n".join(out)


def code(rng: random.Random, n: int) -> str:
    lines: list[str] = []
    size = 0
    while size < n:
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        line = rng.choice(
            [
                f"def {a}_{b}(self, {b}: int = {rng.randint(0, 99)}) -> dict:",
                f"    return self.{a}.get('{b}', {rng.random():.3f})",
                f"    {a} = std::vector<int>{{{rng.randint(0, 9)}, {rng.randint(10, 99)}}};",
                f"    if {a} is None or len({b}) > {rng.randint(1, 9999)}:",
                f'    logger.info("{a} %s {b} %d", {a}, {rng.randint(0, 10**6)})',
                f"// TODO({rng.choice(NAMES)}): {sentence(rng)}",
                f"const {a}{b.title()} = await fetch(`/api/v{rng.randint(1, 3)}/{a}`);",
                f"    {a}_{b} += {rng.randint(0, 255)} * 0x{rng.getrandbits(16):04x}",
            ]
        )
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def json_text(rng: random.Random, n: int) -> str:
    out: list[str] = []
    size = 0
    while size < n:
        rec = {
            rng.choice(WORDS): rng.choice(
                [rng.randint(0, 10**6), rng.choice(WORDS), round(rng.random() * 100, 2), None, True]
            )
            for _ in range(rng.randint(2, 6))
        }
        rec["id"] = rng.randint(1, 10**5)
        s = json.dumps(rec, indent=2 if rng.random() < 0.3 else None)
        out.append(s)
        size += len(s) + 1
    return "\n".join(out)


def csv_text(rng: random.Random, n: int) -> str:
    rows = ["id,name,amount,status,region,note"]
    size = len(rows[0])
    while size < n:
        row = (
            f"{rng.randint(1, 99999)},{rng.choice(NAMES)},{rng.randint(1, 99999) / 100:.2f},"
            f"{rng.choice(['open', 'closed', 'pending'])},{rng.choice(['eu', 'us', 'apac'])},"
            f'"{rng.choice(WORDS)} {rng.choice(WORDS)}"'
        )
        rows.append(row)
        size += len(row) + 1
    return "\n".join(rows)


def logs(rng: random.Random, n: int) -> str:
    lines: list[str] = []
    size = 0
    while size < n:
        line = (
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
            f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
            f",{rng.randint(0, 999):03d} {rng.choice(['INFO', 'WARN', 'ERROR', 'DEBUG'])} "
            f"[{rng.choice(WORDS)}-{rng.randint(1, 9)}] {rng.choice(WORDS)} {rng.choice(WORDS)} "
            f"took {rng.randint(1, 5000)}ms status={rng.choice([200, 201, 404, 500])} "
            f"bytes={rng.randint(0, 10**6)}"
        )
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def adversarial(rng: random.Random, n: int) -> str:
    """PII-free text that looks like identifiers: UUIDs, hashes, versions, 10-digit ids."""
    parts: list[str] = []
    size = 0
    while size < n:
        item = rng.choice(
            [
                lambda: f"request_id={uuid_(rng)}",
                lambda: f"sha256:{hashlib.sha256(rng.randbytes(8)).hexdigest()}",
                lambda: f"commit {hashlib.sha1(rng.randbytes(8)).hexdigest()}",
                lambda: f"md5 {hashlib.md5(rng.randbytes(8)).hexdigest()}",  # noqa: S324
                lambda: f"v{rng.randint(0, 12)}.{rng.randint(0, 40)}.{rng.randint(0, 200)}",
                lambda: (
                    f"version {rng.randint(0, 5)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}-rc{rng.randint(1, 9)}"
                ),
                lambda: f"order #{rng.randint(10**9, 10**10 - 1)}",
                lambda: f"user_id: {rng.randint(10**9, 10**10 - 1)}",
                lambda: f'"id": {rng.randint(10**9, 10**10 - 1)}',
                lambda: f"build {rng.randint(1000, 99999)} on node-{rng.randint(1, 64)}",
                lambda: (
                    f"pod {rng.choice(WORDS)}-{rng.getrandbits(32):08x}-{rng.getrandbits(20):05x}"
                ),
                lambda: f"elapsed {rng.random() * 1000:.3f}s",
                lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))),
            ]
        )()
        parts.append(item)
        size += len(item) + 1
    return rng.choice([" ", "\n", ", "]).join(parts)


FILLERS: dict[str, Callable[[random.Random, int], str]] = {
    "prose": prose,
    "code": code,
    "json": json_text,
    "csv": csv_text,
    "logs": logs,
    "adversarial": adversarial,
}


@dataclass
class Doc:
    text: str
    kind: str
    spans: list[tuple[str, int, int]] = field(default_factory=list)  # injected PII


def document(
    rng: random.Random,
    size: int,
    kind: str | None = None,
    pii_per_kb: float = 1.0,
    entities: tuple[str, ...] | None = None,
    context_ratio: float = 0.5,
    separate: bool = False,
) -> Doc:
    """Filler of `kind` (random if None) with PII values inserted at word boundaries.

    separate: follow each value with punctuation, as people write; otherwise a value
    may run into the next filler token (a harder case, used for equivalence).
    """
    kind = kind or rng.choice(list(FILLERS))
    base = FILLERS[kind](rng, size)
    entities = entities or tuple(GENERATORS)
    count = int(size / 1024 * pii_per_kb + rng.random())
    cuts = sorted(rng.randrange(len(base)) for _ in range(count))
    out: list[str] = []
    spans: list[tuple[str, int, int]] = []
    prev = 0
    pos = 0
    for cut in cuts:
        while cut < len(base) and not base[cut].isspace():
            cut += 1  # insert at whitespace so values do not fuse with filler words
        chunk = base[prev:cut]
        out.append(chunk)
        pos += len(chunk)
        entity = rng.choice(entities)
        value = GENERATORS[entity](rng)
        lead = " "
        if rng.random() < context_ratio:
            lead = " " + rng.choice(CONTEXT[entity]) + rng.choice([": ", " ", " is ", " = "])
        out.append(lead)
        pos += len(lead)
        spans.append((entity, pos, pos + len(value)))
        if separate:
            value += rng.choice([",", ".", ";", "\n", " and", " or"])
        out.append(value)
        pos += len(value)
        prev = cut
    out.append(base[prev:])
    return Doc("".join(out), kind, spans)


def english(rng: random.Random, size: int, pii_fraction: float = 0.01) -> str:
    """Prose where about `pii_fraction` of the characters are PII values."""
    doc = document(rng, size, "prose", pii_per_kb=1024 * pii_fraction / 18)
    return doc.text

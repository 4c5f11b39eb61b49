"""The governed data access layer (issue #3), end to end on real components.

Every test opens a real embedded store (SQLite metadata, local fragment folders) in
``tmp_path`` through ``server.wiring.open_app``, with the real classifier and the real
hash-chained audit log, and goes through ``Gateway`` the way tools do. Chunks are small
(64 KiB, inline up to 1 KiB) so modest texts already span several chunks.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

import governance.gateway as gateway_mod
from governance.audit import AuditWriteError
from governance.errors import DeniedByPolicy, Forbidden, Unauthorized
from governance.principals import Principal
from governance.qos import QuotaExceeded, RateLimited
from server.wiring import App, open_app
from storage import InvalidArgument, NotFound, StoreConfig, UnknownTenant, Volume
from storage.errors import InvalidPath

TENANT = "acme"

# Values the classifier finds (checked by the tests that use them: labels, spans).
EMAIL = "alice.walker@example.com"
EMAIL2 = "bob.stone@example.org"
PHONE = "415-867-5309"
IP = "172.16.254.77"
IBAN = "DE89370400440532013000"
IBAN2 = "GB82WEST12345698765432"
SSN = "536-22-4817"
SSN2 = "219-45-7735"
CARD = "4111 1111 1111 1111"
CARD_DIGITS = "4111111111111111"

POLICY = """
description: gateway tests
pii:
  entities:
    EMAIL_ADDRESS: {action: tag, threshold: 0.4}
    PHONE_NUMBER: {action: tag, threshold: 0.4}
    IP_ADDRESS: {action: tag}
    IBAN_CODE: {action: tag}
    US_SSN: {action: redact}
    CREDIT_CARD: {action: deny}
clearance:
  boss: ["*"]
  support: [EMAIL_ADDRESS]
paths:
  - {prefix: /, read: ["*"], write: ["*"]}
  - {prefix: /ro, read: ["*"], write: [boss]}
  - {prefix: /secret, read: [boss], write: [boss]}
  - {prefix: /inbox, read: [boss], write: ["*"]}
"""

ROLES = ("agent", "support", "boss", "reader")
WORDS = ["alpha", "bravo", "report", "meeting", "quarterly", "summary", "notes", "draft",
         "review", "budget", "forecast", "team", "project", "status", "update", "customer",
         "account", "ledger", "memo", "agenda", "item", "task", "plan", "river", "stone",
         "cloud", "garden", "window", "paper"]


@dataclass
class Env:
    app: App
    home: Path
    who: dict[str, Principal]
    tokens: dict[str, str]

    @property
    def gw(self) -> gateway_mod.Gateway:
        return self.app.gateway

    def set_policy(self, text: str) -> int:
        return self.app.principals.set_policy(TENANT, text).version

    def events(self) -> int:
        return self.app.audit.query("SELECT count(*) FROM audit")[1][0][0]

    def last_event(self) -> dict:
        cols, rows = self.app.audit.query(
            "SELECT seq, tenant, agent, operation, path, bytes, decision, labels, error "
            "FROM audit ORDER BY seq DESC LIMIT 1")
        return dict(zip(cols, rows[0], strict=True))

    def raw(self, path: str) -> bytes:
        """The stored bytes, as the fully cleared role reads them."""
        return self.gw.read(self.who["boss"], path).data


def _open_store(home: Path) -> App:
    cfg = StoreConfig.embedded(home, chunk_size=65536, inline_threshold=1024,
                               durability="none")
    Volume.init(home, cfg).close()
    return open_app(home)


@pytest.fixture
def env(tmp_path):
    home = tmp_path / "home"
    app = _open_store(home)
    app.principals.add_tenant(TENANT)
    app.principals.set_policy(TENANT, POLICY)
    tokens = {r: app.principals.add_agent(TENANT, f"{r}-bot", role=r) for r in ROLES}
    who = {r: app.gateway.authenticate(t) for r, t in tokens.items()}
    e = Env(app, home, who, tokens)
    yield e
    app.close()


def filler(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _pad(rng: random.Random, n: int) -> str:
    """Exactly ``n`` characters of words, starting and ending with a space."""
    out = " "
    while len(out) < n:
        out += rng.choice(WORDS) + " "
    return out[:n - 1] + " "


def files_under(home: Path) -> list[Path]:
    return [p for p in home.rglob("*") if p.is_file()]


def grep(home: Path, needles: Iterable[bytes]) -> dict[bytes, list[str]]:
    """Which files under ``home`` (SQLite + WAL, fragments, audit, config) hold each needle."""
    needles = list(needles)
    hits: dict[bytes, list[str]] = {n: [] for n in needles}
    for f in files_under(home):
        try:
            data = f.read_bytes()
        except OSError:
            continue
        for n in needles:
            if n in data:
                hits[n].append(str(f.relative_to(home)))
    return hits


def spans_of(info) -> list[tuple[int, int, str]]:
    return [tuple(s) for s in (info.attrs or {}).get("spans", [])]


def assert_masked_like(seen: bytes, raw: bytes, spans, hidden: set[str] | None = None,
                       offset: int = 0) -> None:
    """``seen`` is ``raw`` with every span of a hidden label replaced by '*' (same length)."""
    assert len(seen) == len(raw)
    expect = bytearray(raw)
    for s, e, label in spans:
        if hidden is None or label in hidden:
            a, b = max(s, offset) - offset, min(e, offset + len(raw)) - offset
            if a < b:
                expect[a:b] = b"*" * (b - a)
    assert seen == bytes(expect)


# --------------------------------------------------------------------------- tag


def test_tag_stores_labels_and_spans_with_the_version(env):
    text = (f"Contact {EMAIL} or phone {PHONE}; the gateway runs at {IP}, "
            f"payments go to {IBAN}. Thanks.")
    res = env.gw.write(env.who["agent"], "/notes/contact.txt", text.encode())
    assert res.scanned == "text"
    assert res.labels == ["EMAIL_ADDRESS", "IBAN_CODE", "IP_ADDRESS", "PHONE_NUMBER"]
    assert res.redacted == {}
    attrs = res.info.attrs
    assert attrs["labels"] == res.labels
    assert attrs["policy_version"] == env.app.principals.policy(TENANT).version == 1
    assert attrs["scanned"] == "text"
    raw = text.encode()
    stored = env.raw("/notes/contact.txt")
    assert stored == raw  # tagging keeps the content byte for byte
    # every finding keeps its own span and label (a value can carry two labels, e.g. an
    # IP address that presidio's phone recognizer also matches)
    found: dict[str, set[str]] = {}
    for s, e, label in spans_of(res.info):
        found.setdefault(stored[s:e].decode(), set()).add(label)
    assert set(found) == {EMAIL, PHONE, IP, IBAN}
    for value, label in ((EMAIL, "EMAIL_ADDRESS"), (PHONE, "PHONE_NUMBER"),
                         (IP, "IP_ADDRESS"), (IBAN, "IBAN_CODE")):
        assert label in found[value]
    # the labels and spans belong to that version: stat / list show the same
    st = env.gw.stat(env.who["agent"], "/notes/contact.txt")
    assert st.version == res.info.version == 1
    assert st.attrs == attrs
    [listed] = env.gw.list_dir(env.who["agent"], "/notes")[0]
    assert listed.attrs == attrs
    # a new version without PII carries no stale labels
    res2 = env.gw.write(env.who["agent"], "/notes/contact.txt", b"nothing to see here")
    assert res2.info.version == 2 and res2.labels == []
    assert env.gw.stat(env.who["agent"], "/notes/contact.txt").attrs["spans"] == []
    assert env.gw.read(env.who["agent"], "/notes/contact.txt").data == b"nothing to see here"


def test_tagged_spans_across_chunk_boundaries_are_masked_in_reads_and_streams(env):
    rng = random.Random(7)
    chunk = 65536
    text, values = "", []
    for i in range(6):  # an email straddling each 64 KiB chunk boundary
        start = (i + 1) * chunk - 9
        text += _pad(rng, start - len(text))
        email = f"user{i}.straddle@example.com"
        text += email
        values.append(email)
    text += " " + filler(rng, 200)
    raw = text.encode()
    res = env.gw.write(env.who["agent"], "/big/emails.txt", raw)
    assert res.info.chunks >= 6 and not res.info.inline
    spans = spans_of(res.info)
    assert sorted(raw[s:e].decode() for s, e, _ in spans) == sorted(values)
    assert all(s < (k + 1) * chunk < e for k, (s, e, _) in enumerate(sorted(spans)))
    # full read, ranged reads and the whole-file stream all mask, length-preserving
    full = env.gw.read(env.who["agent"], "/big/emails.txt").data
    assert_masked_like(full, raw, spans)
    assert not any(v.encode() in full for v in values)
    for s, e, _ in spans:
        for off, ln in ((s - 5, 12), (s + 3, 4), (e - 2, 10), (s, e - s), (s - 100, 200)):
            r = env.gw.read(env.who["agent"], "/big/emails.txt", off, ln)
            assert r.data == full[off:off + ln]
            assert r.masked == ["EMAIL_ADDRESS"]
    info, pieces = env.gw.open_stream(env.who["agent"], "/big/emails.txt")
    assert b"".join(pieces) == full
    info, pieces = env.gw.open_stream(env.who["support"], "/big/emails.txt")
    assert b"".join(pieces) == raw  # support is cleared for EMAIL_ADDRESS


# --------------------------------------------------------------------------- redact


def _ssns(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        area = rng.randint(100, 665)
        out.add(f"{area:03d}-{rng.randint(10, 99):02d}-{rng.randint(1000, 9999):04d}")
    return sorted(out)


def test_redact_stores_redacted_text_and_the_original_never_reaches_disk(env):
    env.set_policy(POLICY.replace("IBAN_CODE: {action: tag}", "IBAN_CODE: {action: redact}"))
    rng = random.Random(11)
    ssns = _ssns(rng, 80)
    canary = "canary.tagged.q7@example.net"  # tagged (kept): proves grep sees fragments
    who = env.who["agent"]

    # 1. small, inline
    small = f"patient ssn {ssns[0]}, iban {IBAN}, mail {EMAIL}".encode()
    r = env.gw.write(who, "/small.txt", small)
    assert r.info.inline and r.redacted == {"US_SSN": 1, "IBAN_CODE": 1}
    assert env.raw("/small.txt") == f"patient ssn <US_SSN>, iban <IBAN_CODE>, mail {EMAIL}".encode()
    assert r.labels == ["EMAIL_ADDRESS", "IBAN_CODE", "US_SSN"]

    # 2. large, multi-chunk, bytes
    lines = []
    for i, ssn in enumerate(ssns[1:40]):
        lines.append(f"{filler(rng, 400)} record {i} ssn {ssn} contact {canary} {filler(rng, 300)}")
    big = "\n".join(lines).encode()
    r = env.gw.write(who, "/big.txt", big)
    assert r.info.chunks >= 3 and r.redacted == {"US_SSN": 39}
    stored = env.raw("/big.txt")
    assert stored.count(b"<US_SSN>") == 39 and stored.count(canary.encode()) == 39

    # 3. large, streamed from a file object
    lines = [f"{filler(rng, 500)} ssn {ssn} iban {IBAN2} {filler(rng, 200)}" for ssn in ssns[40:70]]
    r = env.gw.write(who, "/stream.txt", io.BytesIO("\n".join(lines).encode()))
    assert r.redacted == {"US_SSN": 30, "IBAN_CODE": 30} and r.info.chunks >= 3
    assert env.raw("/stream.txt").count(b"<IBAN_CODE>") == 30

    # 4. appends, to an inline and to a chunked file
    env.gw.write(who, "/small.txt", f" more: {ssns[70]}".encode(), mode="append")
    env.gw.write(who, "/big.txt", f" tail ssn {ssns[71]} end".encode(), mode="append")
    assert env.raw("/big.txt").endswith(b" tail ssn <US_SSN> end")

    secrets = [s.encode() for s in ssns[:72]] + [IBAN.encode(), IBAN2.encode()]

    def check() -> None:
        hits = grep(env.home, [*secrets, canary.encode()])
        leaked = {k.decode(): v for k, v in hits.items() if v and k != canary.encode()}
        assert leaked == {}, f"redacted values persisted: {leaked}"
        assert any(h.startswith("targets") for h in hits[canary.encode()]), \
            "control: a tagged value in a chunked file must be visible to this grep"

    check()  # while open: SQLite WAL files, active audit segment
    env.app.close()
    check()  # after close: checkpointed databases, audit HEAD
    env.app = open_app(env.home)  # for the fixture's close


# --------------------------------------------------------------------------- deny


def test_deny_refuses_the_write_names_types_never_values_and_stores_nothing(env):
    who = env.who["agent"]
    env.gw.write(who, "/pay.txt", b"no card yet")
    before = env.gw.stat(who, "/pay.txt")
    texts = {
        "/card.txt": f"charge {CARD} today",
        "/pay.txt": f"charge {CARD_DIGITS} and mail {EMAIL}",  # overwrite keeps the old version
    }
    for path, text in texts.items():
        with pytest.raises(DeniedByPolicy) as ei:
            env.gw.write(who, path, text.encode())
        assert ei.value.entity_types == ["CREDIT_CARD"]
        msg = str(ei.value)
        assert "CREDIT_CARD" in msg and path in msg
        for piece in (CARD, CARD_DIGITS, "1111", EMAIL):
            assert piece not in msg
    # streamed (beyond the inline threshold, card in the middle) and appended
    big = (filler(random.Random(3), 3000) + f" card {CARD} " + filler(random.Random(4), 3000))
    with pytest.raises(DeniedByPolicy, match="CREDIT_CARD"):
        env.gw.write(who, "/streamed.txt", io.BytesIO(big.encode()))
    with pytest.raises(DeniedByPolicy, match="CREDIT_CARD"):
        env.gw.write(who, "/pay.txt", f" {CARD}".encode(), mode="append")
    for path in ("/card.txt", "/streamed.txt"):
        with pytest.raises(NotFound):
            env.gw.stat(who, path)
    after = env.gw.stat(who, "/pay.txt")
    assert (after.version, after.size) == (before.version, before.size)
    assert env.raw("/pay.txt") == b"no card yet"
    assert env.app.vol.usage(TENANT) == (len(b"no card yet"), 1)
    hits = grep(env.home, [CARD.encode(), CARD_DIGITS.encode()])
    assert hits == {CARD.encode(): [], CARD_DIGITS.encode(): []}


# --------------------------------------------------------------------------- masking


def test_reads_mask_labels_the_role_is_not_cleared_for(env):
    text = f"mail {EMAIL}, phone {PHONE}, host {IP}, iban {IBAN}, ssn {SSN}. end"
    res = env.gw.write(env.who["boss"], "/m.txt", text.encode())
    raw = env.raw("/m.txt")
    spans = spans_of(res.info)
    assert {label for _, _, label in spans} == {"EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS",
                                                "IBAN_CODE"}
    tagged = {"EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "IBAN_CODE"}
    for role, hidden in (("agent", tagged), ("reader", tagged),
                         ("support", tagged - {"EMAIL_ADDRESS"}), ("boss", set())):
        r = env.gw.read(env.who[role], "/m.txt")
        assert_masked_like(r.data, raw, spans, hidden)
        assert r.masked == sorted(hidden)
        assert r.next_offset is None
        for s, e, label in spans:
            assert (raw[s:e] in r.data) == (label not in hidden)
    # ranged reads that cut through spans: exactly the slice of the masked whole
    full = env.gw.read(env.who["agent"], "/m.txt").data
    for s, e, _ in spans:
        for off, ln in ((s - 2, 4), (s + 1, 3), (e - 1, 5), (s, e - s), (s + 2, 1), (0, e - 1)):
            r = env.gw.read(env.who["agent"], "/m.txt", off, ln)
            assert r.data == full[off:off + ln]
            assert set(r.data[max(s, off) - off:min(e, off + ln) - off]) == {ord("*")}
            assert r.offset == off and r.next_offset == off + ln
    r = env.gw.read(env.who["agent"], "/m.txt", 0, 4)
    assert r.data == b"mail" and r.masked == []


def test_a_value_found_as_two_types_stays_masked_for_a_role_cleared_for_one(env):
    """'164-11-2336' is both a US_SSN and a PHONE_NUMBER to the classifier (same span).
    A role cleared for phone numbers but not for SSNs must not read it."""
    env.set_policy(POLICY.replace("US_SSN: {action: redact}", "US_SSN: {action: tag}")
                   .replace("support: [EMAIL_ADDRESS]",
                            "support: [EMAIL_ADDRESS]\n  phoneops: [PHONE_NUMBER]"))
    tok = env.app.principals.add_agent(TENANT, "phoneops-bot", role="phoneops")
    phoneops = env.gw.authenticate(tok)
    ssn = "164-11-2336"
    report = env.gw.dry_run(TENANT, f"ssn {ssn}")
    assert {f["entity_type"] for f in report["findings"]} == {"US_SSN", "PHONE_NUMBER"}
    res = env.gw.write(env.who["boss"], "/both.txt", f"ssn {ssn} end".encode())
    seen = env.gw.read(phoneops, "/both.txt").data
    assert ssn.encode() not in seen, (
        f"an SSN reached a role not cleared for US_SSN: {seen!r}; stored spans "
        f"{spans_of(res.info)}")
    assert "US_SSN" in res.labels
    assert env.gw.read(env.who["agent"], "/both.txt").data == b"ssn *********** end"


def test_binary_content_is_not_scanned_as_text_but_embedded_pii_is_found(env):
    """Binary is detected and never decoded as text; its printable runs are still
    scanned, so a NUL byte or an image header cannot smuggle PII past the policy."""
    # every byte value except digits (a printable run "0123456789" reads as a phone number)
    plain = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(b for b in range(256)
                                                            if not 48 <= b <= 57)
    res = env.gw.write(env.who["agent"], "/img.png", plain)
    assert res.scanned == "binary" and res.labels == [] and res.redacted == {}
    assert res.info.attrs["spans"] == [] and res.info.attrs["scanned"] == "binary"
    assert env.gw.read(env.who["agent"], "/img.png").data == plain  # stored as is
    big = plain * 3000  # streamed, multi-chunk
    res = env.gw.write(env.who["agent"], "/img2.bin", io.BytesIO(big))
    assert res.scanned == "binary" and res.labels == []
    assert env.gw.read(env.who["agent"], "/img2.bin").data == big
    # PII inside binary: denied entity types refuse the write, tagged ones are labelled
    # (in byte offsets, content byte for byte) and masked for uncleared readers
    with pytest.raises(DeniedByPolicy, match="CREDIT_CARD"):
        env.gw.write(env.who["agent"], "/card.bin", plain + f" {CARD} ".encode() + plain)
    tagged = plain + f" {EMAIL} ".encode() + plain
    res = env.gw.write(env.who["agent"], "/mail.bin", tagged)
    assert res.scanned == "binary" and "EMAIL_ADDRESS" in res.labels
    assert env.raw("/mail.bin") == tagged
    [(s, e, _label)] = [sp for sp in spans_of(res.info) if sp[2] == "EMAIL_ADDRESS"]
    assert tagged[s:e] == EMAIL.encode()


# --------------------------------------------------------------------------- appends


def test_appends_keep_the_spans_of_both_parts_at_the_right_offsets(env):
    who = env.who["agent"]
    first = f"first part: mail {EMAIL}, ssn {SSN}, host {IP}.".encode()
    r1 = env.gw.write(who, "/log.txt", first)
    second = f" second part: phone {PHONE}, mail {EMAIL2}, ssn {SSN2}.".encode()
    r2 = env.gw.write(who, "/log.txt", second, mode="append")
    stored = env.raw("/log.txt")
    assert stored == (first.replace(SSN.encode(), b"<US_SSN>")
                      + second.replace(SSN2.encode(), b"<US_SSN>"))
    attrs = r2.info.attrs
    assert attrs["labels"] == ["EMAIL_ADDRESS", "IP_ADDRESS", "PHONE_NUMBER", "US_SSN"]
    assert attrs["redacted"] == {"US_SSN": 2}
    got = {(stored[s:e].decode(), label) for s, e, label in spans_of(r2.info)}
    want = {(EMAIL, "EMAIL_ADDRESS"), (IP, "IP_ADDRESS"), (PHONE, "PHONE_NUMBER"),
            (EMAIL2, "EMAIL_ADDRESS")}
    assert want <= got  # a value may carry a second label (presidio also reads IPs as phones)
    assert {v for v, _ in got} == {v for v, _ in want}
    n1 = len(spans_of(r1.info))
    assert spans_of(r1.info) == spans_of(r2.info)[:n1]
    seen = env.gw.read(who, "/log.txt").data
    for v in (EMAIL, EMAIL2, PHONE, IP, SSN, SSN2):
        assert v.encode() not in seen
    # appending until the file leaves the inline threshold keeps every offset right
    for i in range(30):
        env.gw.write(who, "/log.txt", f" line {i} mail n{i}.x@example.com;".encode(),
                     mode="append")
    info = env.gw.stat(who, "/log.txt")
    assert not info.inline
    stored = env.raw("/log.txt")
    vals = [stored[s:e].decode() for s, e, _ in spans_of(info)]
    vals = [v for i, v in enumerate(vals) if i == 0 or v != vals[i - 1]]  # one per value
    assert vals[:4] == [EMAIL, IP, PHONE, EMAIL2]
    assert vals[4:] == [f"n{i}.x@example.com" for i in range(30)]
    assert_masked_like(env.gw.read(who, "/log.txt").data, stored, spans_of(info))


def test_an_entity_split_across_two_appends_is_still_masked(env):
    """Appending text in pieces must not let a value through unlabelled: the classifier
    sees each appended part alone, so an address cut between two appends is never found."""
    who = env.who["agent"]
    env.gw.write(who, "/split.txt", b"contact: alice.walker@exam")
    env.gw.write(who, "/split.txt", b"ple.com, thanks", mode="append")
    assert env.raw("/split.txt") == f"contact: {EMAIL}, thanks".encode()
    seen = env.gw.read(who, "/split.txt").data
    assert EMAIL.encode() not in seen, f"unmasked for an uncleared role: {seen!r}"


# --------------------------------------------------------------------------- streams


def _pieces(data: bytes, rng: random.Random, lo: int, hi: int) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.randint(lo, hi)
        out.append(data[i:i + n])
        i += n
    return out


def test_streamed_writes_find_entities_across_classification_windows(env, monkeypatch):
    monkeypatch.setattr(gateway_mod, "WINDOW_CHARS", 1000)
    rng = random.Random(5)
    values: list[tuple[str, str]] = []
    parts = []
    ssns = _ssns(rng, 120)
    for i in range(360):
        kind = i % 3
        if kind == 0:
            v, label = f"w{i}.{filler(rng, 1)}@example.com", "EMAIL_ADDRESS"
        elif kind == 1:
            v, label = f"10.{i % 250}.{(i * 7) % 250}.{1 + i % 200}", "IP_ADDRESS"
        else:
            v, label = ssns[i // 3], "US_SSN"
        values.append((v, label))
        parts.append(f"{filler(rng, rng.randint(20, 90))} {v} ")
    text = "".join(parts)
    data = text.encode()
    assert len(data) > 70_000  # past the 64 KiB sniff, then many small windows
    src = _pieces(data, rng, 300, 5000)
    res = env.gw.write(env.who["agent"], "/streamed.txt", iter(src))
    assert res.scanned == "text" and not res.info.inline
    stored = env.raw("/streamed.txt")
    expected = text
    for v, label in values:
        if label == "US_SSN":
            expected = expected.replace(v, "<US_SSN>", 1)
    assert stored == expected.encode()
    assert res.redacted == {"US_SSN": 120}
    got = [(stored[s:e].decode(), label) for s, e, label in spans_of(res.info)]
    assert got == [(v, label) for v, label in values if label != "US_SSN"]
    seen = env.gw.read(env.who["agent"], "/streamed.txt").data
    assert_masked_like(seen, stored, spans_of(res.info))
    for v, _ in values:
        assert v.encode() not in seen
    # the same content written at once gives the same result
    once = env.gw.write(env.who["agent"], "/once.txt", data)
    assert spans_of(once.info) == spans_of(res.info)
    assert env.raw("/once.txt") == stored


def test_streamed_write_past_the_real_window_finds_an_entity_on_the_cut(env):
    # Text is read in 1 MiB pieces; with T bytes (4 MiB + 2 KiB < T < 5 MiB) the first
    # window is cut at T - OVERLAP_CHARS: put an address right across that cut.
    total = gateway_mod.WINDOW_CHARS + (300 << 10)
    cut = total - gateway_mod.OVERLAP_CHARS
    line = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor\n"
    head_len = cut - 10
    email = b" crossing.the.cut@example.com "
    body = (line * (total // len(line) + 1))
    data = body[:head_len] + email + body[:total - head_len - len(email)]
    assert len(data) == total and data.index(email) < cut < data.index(email) + len(email)
    far = b" far.away@example.com "
    data = far + data[len(far):]
    res = env.gw.write(env.who["agent"], "/huge.txt", io.BytesIO(data))
    assert res.info.size == total
    spans = spans_of(res.info)
    assert [data[s:e] for s, e, _ in spans] == [far.strip(), email.strip()]
    window = env.gw.read(env.who["agent"], "/huge.txt", cut - 40, 80).data
    assert b"crossing" not in window and b"example.com" not in window
    assert window == data[cut - 40:cut + 40].replace(email.strip(), b"*" * len(email.strip()))


def test_streamed_writes_store_the_bytes_exactly(env):
    who = env.who["boss"]
    # UTF-8 with multi-byte characters cut between pieces
    text = ("naïve café — ünïcödé ✓ " * 9000).encode()
    res = env.gw.write(who, "/utf8.txt", iter(_pieces(text, random.Random(1), 1, 7000)))
    assert res.info.size == len(text) and env.raw("/utf8.txt") == text
    # the head ends inside a UTF-8 character, and a byte that is not UTF-8 comes later
    # (Latin-1 content): the gateway switches decoders, and must not lose a byte doing so
    src = [b"a" * 65535 + b"\xc3", b"\xa9 caf\xe9 \xff end"]
    res = env.gw.write(who, "/mixed.txt", iter(src))
    assert env.raw("/mixed.txt") == b"".join(src)
    assert res.info.size == sum(map(len, src))


def test_utf16_text_with_a_bom_is_classified(env):
    """``is_binary`` calls text with a BOM text; such text must then be scanned as text
    in its encoding (not as Latin-1 bytes, where no entity can ever match)."""
    data = f"Contact {EMAIL} for details".encode("utf-16")
    res = env.gw.write(env.who["agent"], "/u16.txt", data)
    assert res.scanned == "text"
    seen = env.gw.read(env.who["agent"], "/u16.txt").data
    assert EMAIL.encode("utf-16-le") not in seen, "an email in UTF-16 text reached an " \
        "uncleared role unmasked"
    assert "EMAIL_ADDRESS" in res.labels


# --------------------------------------------------------------------------- paths


def test_path_rules(env):
    gw, w = env.gw, env.who
    gw.write(w["boss"], "/ro/doc.txt", b"read-only doc")
    gw.write(w["boss"], "/secret/plan.txt", b"secret plan")
    gw.write(w["boss"], "/secret/deep/more.txt", b"more")
    gw.write(w["agent"], "/open.txt", b"open")
    # read-only prefix: read yes, write/append/mkdir/move/delete no; nothing changes
    for role in ("agent", "reader", "support"):
        assert gw.read(w[role], "/ro/doc.txt").data == b"read-only doc"
        for op in (lambda p: gw.write(p, "/ro/new.txt", b"x"),
                   lambda p: gw.write(p, "/ro/doc.txt", b"changed"),
                   lambda p: gw.write(p, "/ro/doc.txt", b"more", mode="append"),
                   lambda p: gw.mkdir(p, "/ro/sub"),
                   lambda p: gw.move(p, "/ro/doc.txt", "/moved.txt"),
                   lambda p: gw.move(p, "/open.txt", "/ro/open.txt"),
                   lambda p: gw.delete(p, "/ro/doc.txt")):
            with pytest.raises(Forbidden, match="may not write"):
                op(w[role])
    assert [i.name for i in env.app.vol.list_dir(TENANT, "/ro")[0]] == ["doc.txt"]
    assert env.raw("/ro/doc.txt") == b"read-only doc"
    # no read right on /secret: no read, ranged read, stream, stat, list, find
    p = w["agent"]
    for op in (lambda: gw.read(p, "/secret/plan.txt"),
               lambda: gw.read(p, "/secret/plan.txt", 2, 3),
               lambda: gw.open_stream(p, "/secret/plan.txt"),
               lambda: gw.stat(p, "/secret/plan.txt"),
               lambda: gw.stat(p, "/secret"),
               lambda: gw.list_dir(p, "/secret"),
               lambda: gw.list_dir(p, "/secret/deep")):
        with pytest.raises(Forbidden):
            op()
    names = {i.name for i in gw.list_dir(p, "/")[0]}
    assert "secret" not in names and {"ro", "open.txt"} <= names
    found = {i.path for i in gw.find(p, "*")}
    assert not any(f.startswith("/secret") for f in found) and "/ro/doc.txt" in found
    assert gw.find(p, "*.txt", root="/secret") == []
    assert gw.find(p, "/secret/*") == []
    # ...while the cleared role sees it all
    assert {i.path for i in gw.find(w["boss"], "*.txt", root="/secret")} == {
        "/secret/plan.txt", "/secret/deep/more.txt"}


def test_move_cannot_take_a_file_out_of_a_prefix_the_role_may_not_read(env):
    """/inbox is a drop box (write for all, read for boss). Moving a file out of it to a
    readable place must not hand its content to a role that may not read it."""
    gw, w = env.gw, env.who
    gw.write(w["boss"], "/inbox/payroll.txt", b"salary data")
    with pytest.raises(Forbidden):
        gw.read(w["agent"], "/inbox/payroll.txt")
    with contextlib.suppress(Forbidden):
        gw.move(w["agent"], "/inbox/payroll.txt", "/mine.txt")
    with pytest.raises((Forbidden, NotFound)):
        data = gw.read(w["agent"], "/mine.txt").data
        pytest.fail(f"a role without read on /inbox read a file moved out of it: {data!r}")


# --------------------------------------------------------------------------- quotas


def test_quotas_refuse_writes_past_the_limit_and_store_nothing(env):
    env.set_policy(POLICY + "quotas: {bytes: 2000, files: 3}\n")
    who = env.who["agent"]
    env.gw.write(who, "/a.txt", b"a" * 1500)
    with pytest.raises(QuotaExceeded) as ei:
        env.gw.write(who, "/b.txt", b"b" * 600)
    msg = str(ei.value)
    assert "quota exceeded" in msg and TENANT in msg and "quotas.bytes" in msg
    assert ei.value.kind == "bytes"
    with pytest.raises(NotFound):
        env.gw.stat(who, "/b.txt")
    with pytest.raises(QuotaExceeded):  # growing an existing file counts too
        env.gw.write(who, "/a.txt", b"x" * 501, mode="append")
    with pytest.raises(QuotaExceeded):
        env.gw.write(who, "/a.txt", b"x" * 2001)
    assert env.gw.stat(who, "/a.txt").size == 1500
    env.gw.write(who, "/a.txt", b"c" * 1900)  # replacing within the quota is fine
    env.gw.write(who, "/b.txt", b"b" * 50)
    env.gw.write(who, "/c.txt", b"c" * 50)
    with pytest.raises(QuotaExceeded) as ei:
        env.gw.write(who, "/d.txt", b"")
    assert ei.value.kind == "files" and "quotas.files" in str(ei.value)
    assert "3 of 3 files used" in str(ei.value)
    with pytest.raises(NotFound):
        env.gw.stat(who, "/d.txt")
    assert env.app.vol.usage(TENANT) == (2000, 3)
    env.gw.delete(who, "/c.txt")  # deleting makes room again
    env.gw.write(who, "/d.txt", b"d" * 50)


def test_quota_applies_to_streamed_writes_without_a_size_hint(env):
    env.set_policy(POLICY + "quotas: {bytes: 5000, files: 100}\n")
    who = env.who["agent"]
    with pytest.raises(QuotaExceeded):
        env.gw.write(who, "/stream.txt", io.BytesIO(b"s" * 20_000))
    with pytest.raises(NotFound):
        env.gw.stat(who, "/stream.txt")
    assert env.app.vol.usage(TENANT)[0] <= 5000


# --------------------------------------------------------------------------- QoS


def test_rate_limit_fails_fast_with_retry_after(env):
    who = env.who["agent"]
    env.gw.write(who, "/warm.txt", b"builds the classifier before the clock matters")
    env.set_policy(POLICY + "qos: {ops_per_second: 2, burst: 1, max_wait_ms: 0}\n")
    n0 = env.events()
    env.gw.write(who, "/r.txt", b"one")
    with pytest.raises(RateLimited) as ei:
        env.gw.read(who, "/r.txt")
    with pytest.raises(RateLimited):  # a refused write stores nothing
        env.gw.write(who, "/r2.txt", b"two")
    assert re.fullmatch(r"rate limited: retry after \d+ ms.*", str(ei.value))
    assert 0 < ei.value.retry_after_ms <= 500
    assert not env.app.vol.exists(TENANT, "/r2.txt")
    assert env.events() == n0 + 3
    cols, rows = env.app.audit.query(
        "SELECT operation, path, decision, error FROM audit ORDER BY seq DESC LIMIT 2")
    assert rows == [("write_file", "/r2.txt", "rate_limited", "rate_limited"),
                    ("read_file", "/r.txt", "rate_limited", "rate_limited")]
    time.sleep((ei.value.retry_after_ms + 300) / 1000)
    assert env.gw.read(who, "/r.txt").data == b"one"


# --------------------------------------------------------------------------- identity


def test_unknown_tenant_wrong_and_revoked_tokens_are_refused(env):
    pr = env.app.principals
    with pytest.raises(UnknownTenant):
        pr.add_agent("ghost", "bot")
    tok = env.tokens["agent"]
    for bad in (None, "", "not-a-token", "lds_" + "A" * 43, tok[:-2] + "zz", tok + "x"):
        with pytest.raises(Unauthorized):
            env.gw.authenticate(bad)
    assert env.gw.authenticate(tok) == env.who["agent"]
    pr.revoke(TENANT, "agent-bot")
    with pytest.raises(Unauthorized, match="revoked"):
        env.gw.authenticate(tok)
    with pytest.raises(Unauthorized):
        pr.authenticate(tok)
    # a principal of a tenant that does not exist gets nothing and creates nothing
    ghost = Principal("ghost", "bot", "admin")
    n0 = env.events()
    with pytest.raises(UnknownTenant):
        env.gw.write(ghost, "/x.txt", b"data")
    with pytest.raises(UnknownTenant):
        env.gw.read(ghost, "/x.txt")
    assert "ghost" not in env.app.vol.list_tenants()
    assert env.events() == n0 + 2
    with pytest.raises(UnknownTenant):
        env.gw.dry_run("ghost", "text")


# --------------------------------------------------------------------------- audit


def test_every_operation_makes_exactly_one_audit_event_without_pii(env):
    gw, w = env.gw, env.who
    pii = [EMAIL, PHONE, IP, SSN, CARD, CARD_DIGITS, IBAN]
    text = f"mail {EMAIL} phone {PHONE} host {IP}".encode()
    ops = [
        ("write_file", "/a/doc.txt", "tag", None, lambda: gw.write(w["agent"], "/a/doc.txt", text)),
        ("write_file", "/a/doc.txt", "redact", None,
         lambda: gw.write(w["agent"], "/a/doc.txt", f" ssn {SSN2}".encode(), mode="append")),
        ("write_file", "/a/card.txt", "deny", DeniedByPolicy,
         lambda: gw.write(w["agent"], "/a/card.txt", f"card {CARD} mail {EMAIL}".encode())),
        ("read_file", "/a/doc.txt", "masked", None, lambda: gw.read(w["agent"], "/a/doc.txt")),
        ("read_file", "/a/doc.txt", "masked", None,
         lambda: gw.read(w["agent"], "/a/doc.txt", 3, 9)),
        ("read_file", "/a/doc.txt", "allow", None, lambda: gw.read(w["boss"], "/a/doc.txt")),
        ("read_file", "/a/doc.txt", "allow", None, lambda: gw.open_stream(w["boss"], "/a/doc.txt")),
        ("read_file", "/nope.txt", "error", NotFound, lambda: gw.read(w["agent"], "/nope.txt")),
        ("read_file", "/secret/x", "deny", Forbidden, lambda: gw.read(w["agent"], "/secret/x")),
        ("write_file", "/ro/x", "deny", Forbidden, lambda: gw.write(w["agent"], "/ro/x", b"x")),
        ("get_file_info", "/a/doc.txt", "allow", None, lambda: gw.stat(w["agent"], "/a/doc.txt")),
        ("list_directory", "/a", "allow", None, lambda: gw.list_dir(w["agent"], "/a")),
        ("find_files", "/", "allow", None, lambda: gw.find(w["agent"], "*.txt")),
        ("create_directory", "/b", "allow", None, lambda: gw.mkdir(w["agent"], "/b")),
        ("move_file", "/a/doc.txt", "allow", None,
         lambda: gw.move(w["agent"], "/a/doc.txt", "/b/doc.txt")),
        ("delete_file", "/b/doc.txt", "allow", None, lambda: gw.delete(w["agent"], "/b/doc.txt")),
        ("storage_status", None, "allow", None, lambda: gw.usage(w["agent"])),
    ]
    for op, path, decision, exc, call in ops:
        n0 = env.events()
        if exc is None:
            call()
        else:
            with pytest.raises(exc):
                call()
        assert env.events() == n0 + 1, f"{op} {path}: not exactly one event"
        ev = env.last_event()
        agent = "boss-bot" if decision == "allow" and op == "read_file" else "agent-bot"
        assert (ev["tenant"], ev["agent"], ev["operation"], ev["path"], ev["decision"]) == (
            TENANT, agent, op, path, decision), ev
        if decision == "tag":
            assert ev["labels"] == ["EMAIL_ADDRESS", "IP_ADDRESS", "PHONE_NUMBER"]
            assert ev["bytes"] == len(text)
        if decision == "redact":
            assert "US_SSN" in ev["labels"]
        if decision == "deny" and exc is DeniedByPolicy:
            assert ev["labels"] == ["CREDIT_CARD"] and ev["error"] == "denied_by_policy"
        if op == "read_file" and exc is None:
            assert "EMAIL_ADDRESS" in ev["labels"]
        if exc is Forbidden:
            assert ev["error"] == "forbidden"
    # no PII value anywhere in the audit folder or in what a query returns
    audit_dir = env.home / "audit"
    hits = grep(audit_dir, [v.encode() for v in pii])
    assert all(not v for v in hits.values()), hits
    cols, rows = env.app.audit.query("SELECT * FROM audit")
    dump = repr(rows)
    assert len(rows) == env.events()
    for v in pii:
        assert v not in dump
    rep = env.app.audit.verify()
    assert rep.ok and rep.events == len(rows), rep


def test_a_streamed_read_that_masks_is_audited_as_masked(env):
    """open_stream (CLI get, large downloads) serves the same masked bytes as read; its
    audit event must record the masking like read's does."""
    env.gw.write(env.who["boss"], "/s.txt", f"mail {EMAIL}".encode())
    env.gw.read(env.who["agent"], "/s.txt")
    by_read = env.last_event()
    _info, pieces = env.gw.open_stream(env.who["agent"], "/s.txt")
    assert b"".join(pieces) == b"mail " + b"*" * len(EMAIL)
    by_stream = env.last_event()
    assert by_read["decision"] == "masked"
    assert (by_stream["operation"], by_stream["decision"], by_stream["labels"]) == (
        "read_file", "masked", ["EMAIL_ADDRESS"])


def test_async_twins_are_governed_and_audited_once_each(env):
    import anyio

    who = env.who["agent"]
    n0 = env.events()

    async def go():
        await env.gw.awrite(who, "/as.txt", f"mail {EMAIL}".encode())
        r = await env.gw.aread(who, "/as.txt")
        with pytest.raises(DeniedByPolicy, match="CREDIT_CARD"):
            await env.gw.awrite(who, "/card.txt", f"card {CARD}".encode())
        with pytest.raises(Forbidden):
            await env.gw.aread(who, "/secret/x.txt")
        return r

    r = anyio.run(go)
    assert r.data == b"mail " + b"*" * len(EMAIL) and r.masked == ["EMAIL_ADDRESS"]
    assert not env.app.vol.exists(TENANT, "/card.txt")
    assert env.events() == n0 + 4
    cols, rows = env.app.audit.query("SELECT operation, decision FROM audit ORDER BY seq")
    assert rows[-4:] == [("write_file", "tag"), ("read_file", "masked"),
                         ("write_file", "deny"), ("read_file", "deny")]


def test_failures_before_the_pipeline_are_audited_too(env):
    """Invalid input (a bad path, an empty glob) is a failed call: one event each."""
    gw, p = env.gw, env.who["agent"]
    calls = [
        (InvalidPath, lambda: gw.read(p, "/a/../../etc/passwd")),
        (InvalidPath, lambda: gw.write(p, "/bad\x00name", b"x")),
        (InvalidPath, lambda: gw.move(p, "/x.txt", "/nul\x00")),
        (InvalidArgument, lambda: gw.find(p, "")),
    ]
    missing = []
    for exc, call in calls:
        n0 = env.events()
        with pytest.raises(exc):
            call()
        if env.events() != n0 + 1:
            missing.append(exc.__name__)
    assert missing == [], f"failed calls that left no audit event: {missing}"


def _break_audit(env: Env) -> None:
    audit_dir = env.home / "audit"
    shutil.rmtree(audit_dir)
    audit_dir.write_text("not a folder any more\n")


def test_an_unwritable_audit_log_fails_reads(env):
    env.gw.write(env.who["agent"], "/r.txt", f"mail {EMAIL}".encode())
    _break_audit(env)
    with pytest.raises(AuditWriteError, match="audit"):
        env.gw.read(env.who["boss"], "/r.txt")
    with pytest.raises(AuditWriteError):
        env.gw.stat(env.who["boss"], "/r.txt")


def test_an_unwritable_audit_log_fails_writes_and_nothing_is_committed(env):
    """'If the audit event cannot be written, the operation fails': a write that cannot be
    audited must not leave its data behind (it would have run unaudited)."""
    who = env.who["agent"]
    env.gw.write(who, "/keep.txt", b"version one")
    _break_audit(env)
    with pytest.raises(AuditWriteError):
        env.gw.write(who, "/new.txt", b"unaudited data")
    with pytest.raises(AuditWriteError):
        env.gw.write(who, "/keep.txt", b"version two")
    with pytest.raises(AuditWriteError):
        env.gw.delete(who, "/keep.txt")
    vol = env.app.vol
    state = {
        "/new.txt exists": vol.exists(TENANT, "/new.txt"),
        "/keep.txt content": vol.read(TENANT, "/keep.txt") if vol.exists(TENANT, "/keep.txt")
        else None,
    }
    assert state == {"/new.txt exists": False, "/keep.txt content": b"version one"}, (
        f"operations that failed for want of an audit event were committed: {state}")


def test_audit_survives_reopen_and_counts_match(env):
    for i in range(5):
        env.gw.write(env.who["agent"], f"/n{i}.txt", f"mail u{i}@example.com".encode())
    env.app.close()
    env.app = open_app(env.home)
    assert env.events() == 5
    env.app.gateway.read(env.who["agent"], "/n1.txt")
    assert env.events() == 6
    assert env.app.audit.verify().ok
    assert os.path.isdir(env.home / "audit")

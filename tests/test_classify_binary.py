"""Binary content is not scanned as text; text in any common encoding is."""

from __future__ import annotations

import codecs
import gzip
import random
import zlib

import pytest

from governance.classify import Classifier, decode_text, is_binary

_RNG = random.Random(1)
NOISE = bytes(_RNG.randrange(256) for _ in range(100_000))
TEXT = "Contact jane@example.com, SSN 078-05-1121, café ☕ naïve — “quoted”.\n" * 50


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n" + NOISE[:5000],
        gzip.compress(TEXT.encode()),
        zlib.compress(b"x" * 10000),
        NOISE,
        b"%PDF-1.7\n" + b"a" * 20_000 + bytes(range(256)) * 40 + b"b" * 20_000,  # binary middle
        b"\x00\x01\x02\x03" * 10,
    ],
    ids=["png", "gzip", "zlib", "random", "pdf-like", "nul"],
)
def test_binary(data):
    assert is_binary(data)


@pytest.mark.parametrize(
    "data",
    [
        TEXT.encode("utf-8"),
        TEXT.encode("utf-16"),  # BOM; NUL bytes everywhere but text
        codecs.BOM_UTF8 + TEXT.encode("utf-8"),
        TEXT.replace("☕", "")
        .replace("“", '"')
        .replace("”", '"')
        .replace("—", "-")
        .encode("cp1252"),
        b"plain ascii with a tab\tand CRLF\r\n" * 100,
        b"\x1b[31mred log line\x1b[0m 10.0.0.1\n" * 100,  # ANSI colours
        b"",
    ],
    ids=["utf8", "utf16", "utf8-bom", "cp1252", "ascii", "ansi", "empty"],
)
def test_text(data):
    assert not is_binary(data)
    assert "jane@example.com" in decode_text(data) or b"jane" not in data


def test_decode_falls_back_without_failing():
    assert decode_text("naïve".encode("latin-1")) == "naïve"
    assert decode_text(b"ok \x81\x8d") == "ok \x81\x8d".encode("latin-1").decode("latin-1")


def test_analyze_bytes():
    clf = Classifier(workers=1)
    assert clf.analyze_bytes(gzip.compress(TEXT.encode())) is None
    found = clf.analyze_bytes(TEXT.encode("utf-16"))
    assert found is not None
    assert {"EMAIL_ADDRESS", "US_SSN"} <= {f.entity_type for f in found}

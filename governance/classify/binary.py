"""Deciding whether stored bytes are text worth classifying, and decoding them.

Why: binary content (images, archives, model weights) produces nonsense PII matches and
wastes the inline budget; text in legacy encodings must still be scanned, not skipped.
"""

from __future__ import annotations

import codecs

_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SAMPLE = 4096
# Control bytes that plain text does not contain (keeps \t \n \f \r, backspace and ESC).
_CONTROL = bytes(b for b in range(32) if b not in (8, 9, 10, 12, 13, 27)) + b"\x7f"
_MAX_CONTROL_RATIO = 0.05
_MAX_INVALID_RATIO = 0.30


def _bom_encoding(data: bytes) -> str | None:
    for bom, enc in _BOMS:
        if data.startswith(bom):
            return enc
    return None


def _samples(data: bytes) -> list[bytes]:
    """Head, middle and tail: formats like PDF start with text and turn binary later."""
    n = len(data)
    if n <= 3 * _SAMPLE:
        return [data]
    mid = n // 2
    return [data[:_SAMPLE], data[mid : mid + _SAMPLE], data[-_SAMPLE:]]


def _invalid_utf8_ratio(sample: bytes) -> float:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    # final=False: a character cut at the sample edge is not an error
    text = decoder.decode(sample.lstrip(bytes(range(0x80, 0xC0))), final=False)
    return text.count("\ufffd") / max(1, len(text))


def is_binary(data: bytes) -> bool:
    """True for content that should not be scanned as text.

    Text with a Unicode BOM is text. Otherwise a NUL byte, more than 5% control bytes,
    or more than 30% bytes that are not UTF-8 (in any of three samples) means binary;
    a few stray high bytes (Latin-1 or cp1252 text) do not.
    """
    if not data or _bom_encoding(data):
        return False
    for sample in _samples(data):
        if b"\x00" in sample:
            return True
        if len(sample.translate(None, _CONTROL)) < len(sample) * (1 - _MAX_CONTROL_RATIO):
            return True
        if _invalid_utf8_ratio(sample) > _MAX_INVALID_RATIO:
            return True
    return False


def decode_text(data: bytes) -> str:
    """Decode bytes for scanning: BOM, else UTF-8, else cp1252, else Latin-1 (never fails).

    Offsets of findings refer to the returned string.
    """
    enc = _bom_encoding(data)
    if enc:
        return data.decode(enc, errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if _invalid_utf8_ratio(data[: 1 << 16]) < 0.01:
        return data.decode("utf-8", errors="replace")
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:
        return data.decode("latin-1")

"""The classifier's output record: what, where, how sure. Never the matched text itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, order=True)
class Finding:
    """A detected entity span [start, end) in the analysed text, with presidio's score.

    The value is deliberately not stored: findings travel into labels, audit events and
    logs, and the span is enough for masking at read time.
    """

    start: int
    end: int
    entity_type: str
    score: float

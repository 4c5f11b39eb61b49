"""Inline PII classification: presidio's pattern findings at write-path speed, offline.

`Classifier(...).analyze(text)` returns the findings stock presidio (pattern mode,
`stock.reference_engine`) returns for the same text, filtered by per-entity score
thresholds; `is_binary`/`decode_text` decide what stored bytes get scanned. See
`classifier.py` for the contract and `engine.py`/`context.py` for why it is exact.
"""

from . import stock  # noqa: F401  (sets tldextract offline before presidio is imported)
from .binary import decode_text, is_binary
from .classifier import DEFAULT_ENTITIES, DEFAULT_THRESHOLDS, Classifier
from .findings import Finding

__all__ = [
    "DEFAULT_ENTITIES",
    "DEFAULT_THRESHOLDS",
    "Classifier",
    "Finding",
    "decode_text",
    "is_binary",
]

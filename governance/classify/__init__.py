"""Inline PII classification: presidio's pattern findings at write-path speed, offline.

`Classifier(...).analyze(text)` returns the findings stock presidio (pattern mode,
`stock.reference_engine`) returns for the same text, filtered by per-entity score
thresholds; `is_binary`/`decode_text` decide what stored bytes get scanned. See
`classifier.py` for the contract and `engine.py`/`context.py` for why it is exact.
"""

import sys

from . import _compiled

_compiled.install()  # a compiled module (setup.py) only while its source is unchanged

# presidio (and spaCy's thinc under it) import transformers and torch when they are
# installed (the `inference` extra), ~4 s at every server start, for NER pipelines the
# pattern classifier never uses. Hide them while presidio loads; code that wants them
# (the TTFT demo) imports them normally afterwards.
_HIDDEN = [m for m in ("transformers", "torch") if m not in sys.modules]
for _m in _HIDDEN:
    sys.modules[_m] = None  # type: ignore[assignment]  # import raises ImportError
try:
    from . import stock  # noqa: F401, E402  (sets tldextract offline before presidio)
    from .binary import decode_text, is_binary  # noqa: E402
    from .classifier import DEFAULT_ENTITIES, DEFAULT_THRESHOLDS, Classifier  # noqa: E402
    from .findings import Finding  # noqa: E402
finally:
    for _m in _HIDDEN:
        if sys.modules.get(_m, 0) is None:
            del sys.modules[_m]

__all__ = [
    "DEFAULT_ENTITIES",
    "DEFAULT_THRESHOLDS",
    "Classifier",
    "Finding",
    "decode_text",
    "is_binary",
]

"""Offline construction of stock presidio pieces: registry, NLP engines, reference engine.

Why this module exists: presidio's defaults download a spaCy model on first use and
tldextract fetches the public suffix list over HTTP. Classification runs inline on the
write path and must never touch the network, so everything here is built from what is
installed: a blank English spaCy pipeline (tokenizer only, no NER) and tldextract's
bundled suffix-list snapshot. The fast classifier reproduces exactly the findings of the
engine that `reference_engine` builds, which is also what the tests compare against.
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("TLDEXTRACT_PUBLIC_SUFFIX_LIST_URLS", "")

import logging  # noqa: E402
from pathlib import Path  # noqa: E402

import spacy  # noqa: E402
import tldextract  # noqa: E402
from presidio_analyzer import AnalyzerEngine, EntityRecognizer  # noqa: E402
from presidio_analyzer.nlp_engine import SpacyNlpEngine  # noqa: E402
from presidio_analyzer.predefined_recognizers import (  # noqa: E402
    EmailRecognizer,
    IbanRecognizer,
)
from presidio_analyzer.recognizer_registry import (  # noqa: E402
    RecognizerRegistry,
    RecognizerRegistryProvider,
)
from spacy.language import Language  # noqa: E402
from spacy.tokens import Doc  # noqa: E402

# presidio warns once per non-English recognizer it skips when a registry loads; on a
# stdio server's stderr that is a screenful of noise for every new policy.
logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)

LANGUAGE = "en"
IBAN_FLAGS = re.DOTALL | re.MULTILINE  # IbanRecognizer's own default
IDENTITY_LEMMA = "lodestore_identity_lemma"

# tldextract without URLs, cache or network: the snapshot shipped in the wheel.
_OFFLINE_TLD = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None, fallback_to_snapshot=True)


if not Language.has_factory(IDENTITY_LEMMA):

    @Language.component(IDENTITY_LEMMA)
    def _identity_lemma(doc: Doc) -> Doc:
        """Lemma = token text, so presidio's context words work without a lemmatizer model.

        A bare `spacy.blank("en")` leaves every lemma empty and presidio's context
        enhancer then never boosts anything; identity lemmas keep its documented
        behaviour (substring match of context words against nearby words).
        """
        for token in doc:
            token.lemma_ = token.text
        return doc


class OfflineEmailRecognizer(EmailRecognizer):
    """presidio's EmailRecognizer validating domains against the bundled suffix list."""

    def validate_result(self, pattern_text: str) -> bool:  # noqa: D102
        return _OFFLINE_TLD(pattern_text).fqdn != ""


def warm_up() -> None:
    """Build the suffix-list trie (loaded lazily on first use, ~50 ms) ahead of time."""
    _OFFLINE_TLD("example.com")


def offline_registry() -> RecognizerRegistry:
    """presidio's default English registry, with two deliberate changes.

    - e-mail validation uses the bundled public-suffix snapshot (no network);
    - IbanRecognizer keeps its own case-sensitive flags. The default registry YAML
      applies IGNORECASE to every recognizer; IBAN's pattern then swallows a following
      four-letter word ("ES91 2100 0418 4502 0005 1332 from" -> "... 1332 from"), the
      checksum fails and the IBAN is lost. Measured on our corpus this drops IBAN
      recall from 1.0 to 0.91, so we keep the recognizer's own default
      (DOTALL | MULTILINE) as its author intended.
    """
    provider = RecognizerRegistryProvider(
        registry_configuration={"supported_languages": [LANGUAGE]}
    )
    registry = provider.create_recognizer_registry()
    swapped: list[EntityRecognizer] = []
    for rec in registry.recognizers:
        if type(rec) is EmailRecognizer:
            new = OfflineEmailRecognizer(
                patterns=rec.patterns,
                context=rec.context,
                supported_language=rec.supported_language,
                supported_entity=rec.supported_entities[0],
                name=rec.name,
            )
            new.global_regex_flags = rec.global_regex_flags
            rec = new
        elif type(rec) is IbanRecognizer:
            rec.global_regex_flags = IBAN_FLAGS
        swapped.append(rec)
    registry.recognizers = swapped
    return registry


def blank_pipeline(lemmas: bool = True) -> Language:
    """A tokenizer-only English pipeline (no model, no NER).

    spaCy refuses texts over 1,000,000 characters by default to protect parser/NER
    memory; a tokenizer needs no such limit.
    """
    nlp = spacy.blank(LANGUAGE)
    nlp.max_length = 1 << 40
    if lemmas:
        nlp.add_pipe(IDENTITY_LEMMA)
    return nlp


def load_model(model: str) -> Language:
    """Load an *installed* spaCy model (package name or path); never downloads."""
    if not (spacy.util.is_package(model) or Path(model).exists()):
        raise ValueError(f"spaCy model {model!r} is not installed (downloads are disabled)")
    return spacy.load(model)


def nlp_engine(pipeline: Language) -> SpacyNlpEngine:
    """presidio's SpacyNlpEngine around an already loaded pipeline (skips its downloader)."""
    engine = SpacyNlpEngine(models=[{"lang_code": LANGUAGE, "model_name": "preloaded"}])
    engine.nlp = {LANGUAGE: pipeline}
    return engine


def reference_engine(context: bool = True, ner_model: str | None = None) -> AnalyzerEngine:
    """Stock presidio AnalyzerEngine with the configuration the fast classifier mirrors."""
    pipeline = load_model(ner_model) if ner_model else blank_pipeline(context)
    engine = nlp_engine(pipeline)
    registry = offline_registry()
    if ner_model:
        registry.add_nlp_recognizer(nlp_engine=engine)
    return AnalyzerEngine(registry=registry, nlp_engine=engine, supported_languages=[LANGUAGE])

